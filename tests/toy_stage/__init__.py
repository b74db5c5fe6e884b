"""A toy filter stage, written the way docs/writing-a-stage.md says: this folder plus one registry line.

tests/test_stage_registry.py registers it (as `StageEntry("toy", "toy_stage:MinWordsStage", ...)`) and checks
that nothing else has to change for the engine to configure, run, account for and resume it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from curate.pipeline import columns as C
from curate.pipeline.configspec import option
from curate.pipeline.stage import Stage

WORDS = "caption_words"


@dataclass(frozen=True)
class MinWordsConfig:
    enabled: bool = option(True, help="Run the toy stage.")
    min_words: int = option(2, help="Reject captions with fewer words.", range=(0, None))


class MinWordsStage(Stage[MinWordsConfig]):
    name = "min_words"
    config_class = MinWordsConfig
    requires = (C.CAPTION,)
    adds = (pa.field(WORDS, pa.int32()),)

    def process(self, table: pa.Table) -> pa.Table:
        words = [len((c or "").split()) for c in table.column(C.CAPTION).to_pylist()]
        table = C.set_column(table, WORDS, words)
        return self.reject(table, ["too_few_words" if n < self.config.min_words else None for n in words])
