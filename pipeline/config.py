"""The run config: YAML → frozen typed dataclasses, with `--set section.key=value` overrides.

Sections `input`, `output`, `cluster` and `write` are the engine's; every stage in the registry adds its own
section (its `config_class`), in registry order. Paths in a YAML file are relative to that file's folder; paths
given with `--set` are relative to the current directory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from curate.pipeline import registry
from curate.pipeline.configspec import ConfigError, build, describe, option, resolve_path
from curate.pipeline.sink import WriteConfig

InputFormat = Literal["auto", "parquet", "csv", "tsv", "jsonl", "webdataset"]


@dataclass(frozen=True)
class InputConfig:
    path: str = option("", help="Input table(s): a file, folder, glob or brace pattern (every file it names must "
                       "exist); local or fsspec URL.", path=True)
    format: InputFormat = option("auto", help="Input format; `auto` picks it from the file extension (CSV/TSV/JSONL "
                                 "may be .gz, .bz2 or .xz compressed; .tar files win over the .parquet/.json files "
                                 "img2dataset writes beside them).")
    url_column: str = option("url", help="Column holding the image URL (LAION: `URL`).")
    caption_column: str = option("caption", help="Column holding the caption (LAION: `TEXT`).")
    shard_size: int = option(10000, help="Rows per partition (the unit of work, resume and stats).", range=(1, None))
    limit: int = option(0, help="Only take the first N input rows (0 = all). Handy for trials.", range=(0, None))

    def validate(self, key_path: str) -> None:
        if not self.path:
            raise ConfigError(f"{key_path}.path", "is required (the input table or tars)")


@dataclass(frozen=True)
class OutputConfig:
    path: str = option("", help="Run directory (local or fsspec URL); see docs/architecture.md for its layout.", path=True)

    def validate(self, key_path: str) -> None:
        if not self.path:
            raise ConfigError(f"{key_path}.path", "is required (the run directory)")


@dataclass(frozen=True)
class ClusterConfig:
    scheduler_address: str = option("", help="Connect to this Dask scheduler (tcp://host:8786) instead of starting a LocalCluster.")
    n_workers: int = option(0, help="LocalCluster worker processes (0 = one per core / threads_per_worker).", range=(0, None))
    threads_per_worker: int = option(1, help="Threads per LocalCluster worker process.", range=(1, None))
    memory_limit: str = option("auto", help="Per-worker memory limit for the LocalCluster (Dask syntax, e.g. '4GiB').")
    processes: bool = option(True, help="LocalCluster with worker processes (false = threads in this process).")
    dashboard: bool = option(True, help="Print the link of the Dask dashboard (served on a free 127.0.0.1 port).")
    gpu_workers: int = option(0, help="LocalCluster workers that advertise `GPU=1` (0 = one per visible CUDA device).", range=(0, None))
    worker_profiler: bool = option(
        False,
        help="Dask's statistical profiler in the LocalCluster's workers (the dashboard's Profile page). Off by "
        "default: it samples every thread's stack every 10 ms, and a download worker has dozens of threads.",
    )

    def validate(self, key_path: str) -> None:
        if self.memory_limit != "auto":
            from dask.utils import parse_bytes

            try:
                parse_bytes(self.memory_limit)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{key_path}.memory_limit", "expected 'auto' or a size such as '4GiB' or "
                                  f"'500MB', got {self.memory_limit!r}") from err


class RunConfig:
    """A run's config: the engine's sections, then one per registered stage (built by `run_config_class`).

    Stage sections are attributes named after their YAML section (`config.dedup`); the engine reaches them by
    name through :meth:`section`.
    """

    input: InputConfig
    output: OutputConfig
    cluster: ClusterConfig
    write: WriteConfig

    def section(self, name: str) -> Any:
        return getattr(self, name)


def run_config_class(entries: tuple[registry.StageEntry, ...] | None = None) -> type[RunConfig]:
    """The frozen dataclass of a run config for these registry entries (default: the registry's)."""
    return _run_config_class(registry.STAGES if entries is None else entries)


@functools.cache
def _run_config_class(entries: tuple[registry.StageEntry, ...]) -> type[RunConfig]:
    stage_fields = [(r.section, r.cls.config_class, option(r.cls.config_class(), help=r.help))
                    for r in registry.registered(entries)]
    cls = dataclasses.make_dataclass(
        "RunConfig",
        [("input", InputConfig, option(InputConfig(), help="What to read.")),
         ("output", OutputConfig, option(OutputConfig(), help="Where to write.")),
         ("cluster", ClusterConfig, option(ClusterConfig(), help="Where to compute.")),
         *stage_fields,
         ("write", WriteConfig, option(WriteConfig(), help="Shard writer."))],
        bases=(RunConfig,), frozen=True)
    cls.__module__ = __name__
    return cls


#: A config is a few hundred values; YAML aliases that expand it beyond this are an alias bomb, not a config.
MAX_EXPANDED_VALUES = 100_000


class _ConfigLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (YAML would silently keep the last value)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(value: Any, budget: int) -> int:
    """How many values `value` holds with YAML aliases expanded, counting no further than `budget`."""
    count = 0
    stack = [value]
    while stack and count <= budget:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return count


def load_yaml(text: str, source: str) -> Any:
    """safe_load with duplicate keys refused and alias expansion bounded; errors name `source`."""
    try:
        loaded = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError("", f"{source}: not valid YAML: {err}") from err
    if _expanded_size(loaded, MAX_EXPANDED_VALUES) > MAX_EXPANDED_VALUES:
        raise ConfigError("", f"{source}: YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values "
                              "(an alias bomb?); write the values out")
    return loaded


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"cannot set {dotted}: not a mapping")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """`section.key=value` strings → (key path, YAML-parsed value)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "expected --set section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(key or item, "expected --set section.key=value")
        try:
            value = load_yaml(raw, f"--set {key}") if raw.strip() else ""
        except ConfigError as err:
            raise ConfigError(key, err.message) from err
        out.append((key, value))
    return out


def _absolutize_overrides(cls: type, key: str, value: Any, cwd: Path) -> Any:
    """Resolve path-typed overrides against the current directory (not the config's folder)."""
    node: Any = cls
    field_meta = None
    for part in key.split("."):
        match = [f for f in fields(node)] if hasattr(node, "__dataclass_fields__") else []
        found = next((f for f in match if f.name == part), None)
        if found is None:
            return value
        field_meta = found.metadata
        node = found.type if isinstance(found.type, type) else getattr(found.default, "__class__", None)
    if field_meta and field_meta.get("path"):
        return resolve_path(value, field_meta["path"], cwd)
    return value


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read a YAML config (safe_load), apply overrides, validate. Raises ConfigError."""
    base_dir: Path | None = None
    if data is None:
        if path is None:
            raise ConfigError("", "no config given")
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError("", f"cannot read config {str(p)!r}: {err.strerror or err}") from err
        except UnicodeDecodeError as err:
            raise ConfigError("", f"{p}: not a text file (invalid UTF-8 at byte {err.start})") from err
        loaded = load_yaml(text, str(p))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("", f"{p}: expected a mapping of sections at top level, got {type(loaded).__name__}")
        raw: dict[str, Any] = loaded
        base_dir = p.resolve().parent
    else:
        raw = copy.deepcopy(dict(data))
    cwd = Path.cwd()
    config_class = run_config_class()
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, _absolutize_overrides(config_class, key, value, cwd))
    for section, value in raw.items():
        if value is None:
            raw[section] = {}
    return build(config_class, raw, "", base_dir)


def config_reference_markdown() -> str:
    """docs/config.md's option tables, generated from the dataclasses (tests keep them in sync)."""
    lines: list[str] = []
    current = None
    for key, type_text, default, help_text in describe(run_config_class()):
        section = key.split(".")[0]
        if section != current:
            current = section
            lines += ["", f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | {type_text} | `{default}` | {help_text} |")
    return "\n".join(lines).lstrip() + "\n"


def to_dict(obj: Any) -> Any:
    """A config object as plain data (for logs and the run's saved config)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj
