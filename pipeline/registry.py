"""The stage registry: the one place a stage is wired in. YAML section -> stage class, in pipeline order.

Everything else the engine knows about a stage comes from here and from the stage class itself:
- the config: each entry's section (with the stage's `config_class`) becomes a section of the run config;
- resume: a resumed run refuses changed settings of `input`, `write` and every registered section;
- columns: the output Parquet schema is the engine's columns plus every stage's `adds`, in this order;
- placement: GPU tasks from `Stage.resources(config)`; the "has image bytes" check from `Stage.requires`.

Entries name their class as "module:Class" so that the engine imports no stage module until a run needs one;
tests may pass the class itself. Adding a stage is one package under `stages/` plus one line here
(docs/writing-a-stage.md).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

from curate.pipeline.stage import Stage


@dataclass(frozen=True)
class StageEntry:
    #: YAML section (user-facing; the stage's `name` is what `reject_stage` and stats show).
    section: str
    #: "package.module:Class", or the class itself.
    stage: str | type[Stage[Any]]
    #: One line for docs/config.md.
    help: str

    def load(self) -> type[Stage[Any]]:
        return _load_class(self.stage) if isinstance(self.stage, str) else self.stage


STAGES: tuple[StageEntry, ...] = (
    StageEntry("captions", "curate.stages.clean_captions:CleanCaptionsStage", "Caption cleaning stage."),
    StageEntry("download", "curate.stages.download:DownloadStage", "Download stage."),
    StageEntry("dedup", "curate.stages.phash_dedup:PhashDedupStage", "pHash eval-set dedup stage."),
    StageEntry("clip", "curate.stages.clip_filter:ClipFilterStage", "CLIP similarity filter stage."),
)


@dataclass(frozen=True)
class RegisteredStage:
    section: str
    cls: type[Stage[Any]]
    help: str


@functools.cache
def _load_class(target: str) -> type[Stage[Any]]:
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TypeError(f"registry entry {target!r} is not a Stage subclass")
    return cls


def registered(entries: tuple[StageEntry, ...] | None = None) -> tuple[RegisteredStage, ...]:
    """The registry's stages with their classes loaded, in pipeline order."""
    out = []
    for entry in STAGES if entries is None else entries:
        cls = entry.load()
        if not cls.name or cls.config_class is object:
            raise TypeError(f"stage {cls.__name__} (section {entry.section!r}) must set `name` and `config_class`")
        out.append(RegisteredStage(entry.section, cls, entry.help))
    return tuple(out)

