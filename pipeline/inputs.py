"""Input planning and partition reading.

The planner resolves `input.path` (file, folder, glob or brace pattern; local or fsspec) to source files, counts
their rows and cuts them into partitions of `input.shard_size` rows that never cross a file. Every row gets a
stable `key` from its position in the whole input (`000000042`). CSV/TSV/JSONL files are converted once to Parquet
under `_work/input/` so that each partition task reads only its own rows (row-group pruning) instead of
re-parsing a whole text file. WebDataset tars are indexed by sample; a partition reads its samples' members.

Input columns are renamed: `input.url_column` -> `url`, `input.caption_column` -> `caption`. Extra columns are
carried through unchanged, except those whose names collide with curate's own columns (e.g. an img2dataset
parquet's `status` or `width`), which are kept as `input_<name>`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import braceexpand
import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from curate.pipeline import columns as C
from curate.pipeline import tario
from curate.pipeline.configspec import ConfigError

log = logging.getLogger("curate.inputs")

TABLE_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                    ".ndjson": "jsonl"}
TAR_EXTENSIONS = (".tar",)
KEY_WIDTH = 9


def format_key(position: int) -> str:
    return f"{position:0{KEY_WIDTH}d}"


@dataclass(frozen=True)
class PartitionSpec:
    """One unit of work: rows [start, stop) of one source file (sample indexes for tars)."""

    partition_id: int
    path: str  # the file a task reads (for csv/tsv/jsonl: its Parquet conversion)
    format: str  # parquet | webdataset
    start: int
    stop: int
    key_offset: int  # global position of row `start`
    source: str  # the user's file, for messages and provenance

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputPlan:
    partitions: tuple[PartitionSpec, ...]
    total_rows: int
    sources: tuple[str, ...]
    format: str
    malformed_lines: int = 0


def _expand(path: str) -> list[str]:
    """Expand braces and globs; a folder lists its files (recursively)."""
    files: list[str] = []
    for pattern in braceexpand.braceexpand(path):
        fs, fs_path = fsspec.core.url_to_fs(pattern)
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if any(ch in fs_path for ch in "*?["):
            found = sorted(fs.glob(fs_path))
        elif fs.isdir(fs_path):
            found = sorted(p for p in fs.find(fs_path) if not PurePosixPath(p).name.startswith((".", "_")))
        elif fs.exists(fs_path):
            found = [fs_path]
        else:
            found = []
        files.extend(prefix + p for p in found)
    return files


def _detect_format(files: list[str], declared: str) -> str:
    if declared != "auto":
        return declared
    kinds = set()
    for f in files:
        suffix = PurePosixPath(f).suffix.lower()
        if suffix in TAR_EXTENSIONS:
            kinds.add("webdataset")
        elif suffix in TABLE_EXTENSIONS:
            kinds.add(TABLE_EXTENSIONS[suffix])
    if len(kinds) != 1:
        found = ", ".join(sorted(kinds)) or "no known extension"
        raise ConfigError("input.format", f"cannot pick a format from the files ({found}); set input.format")
    return kinds.pop()


def _select_files(files: list[str], fmt: str) -> list[str]:
    if fmt == "webdataset":
        return [f for f in files if f.lower().endswith(TAR_EXTENSIONS)]
    wanted = {ext for ext, kind in TABLE_EXTENSIONS.items() if kind == fmt}
    if fmt == "tsv":
        wanted |= {".txt"}
    return [f for f in files if PurePosixPath(f).suffix.lower() in wanted]


def plan_input(input_cfg: Any, converted_dir: str, limit: int = 0) -> InputPlan:
    """Resolve, (convert) and partition the input. Raises ConfigError for unusable input."""
    files = _expand(input_cfg.path)
    if not files:
        raise ConfigError("input.path", f"no files match {input_cfg.path!r}")
    fmt = _detect_format(files, input_cfg.format)
    files = _select_files(files, fmt)
    if not files:
        raise ConfigError("input.path", f"no {fmt} files under {input_cfg.path!r}")
    limit = limit or input_cfg.limit
    partitions: list[PartitionSpec] = []
    position = 0
    malformed = 0
    for file_index, source in enumerate(files):
        if limit and position >= limit:
            break
        if fmt == "webdataset":
            readable, n_rows = source, len(tario.index_tar(source))
            part_format = "webdataset"
        else:
            if fmt == "parquet":
                readable = source
                try:
                    with fsspec.open(source, "rb") as f:
                        meta = pq.ParquetFile(f).metadata
                        n_rows = meta.num_rows
                        names = meta.schema.to_arrow_schema().names
                except Exception as err:
                    raise ConfigError("input.path", f"cannot read Parquet {source!r}: {err}") from err
            else:
                readable = f"{converted_dir}/file-{file_index:05d}.parquet"
                n_rows, names, bad = _convert_text_table(source, fmt, readable, input_cfg.shard_size,
                                                         (input_cfg.url_column, input_cfg.caption_column))
                malformed += bad
            _check_columns(names, input_cfg, source)
            part_format = "parquet"
        if limit:
            n_rows = min(n_rows, limit - position)
        for start in range(0, n_rows, input_cfg.shard_size):
            stop = min(start + input_cfg.shard_size, n_rows)
            partitions.append(PartitionSpec(len(partitions), readable, part_format, start, stop,
                                            position + start, source))
        position += n_rows
    return InputPlan(tuple(partitions), position, tuple(files), fmt, malformed)


def _check_columns(names: list[str], input_cfg: Any, source: str) -> None:
    if input_cfg.url_column not in names:
        raise ConfigError("input.url_column", f"column {input_cfg.url_column!r} not found in {source} "
                          f"(columns: {', '.join(names)})")
    if input_cfg.caption_column not in names:
        raise ConfigError("input.caption_column", f"column {input_cfg.caption_column!r} not found in {source} "
                          f"(columns: {', '.join(names)})")


def _convert_text_table(
    source: str, fmt: str, target: str, row_group: int, text_columns: tuple[str, ...]
) -> tuple[int, list[str], int]:
    """CSV/TSV/JSONL -> Parquet (atomic), returning (rows, column names, malformed lines skipped)."""
    from curate.pipeline.storage import atomic_path

    bad_lines: list[int] = []

    def skip_bad(row: Any) -> str:
        bad_lines.append(row.number or -1)
        return "skip"

    try:
        with fsspec.open(source, "rb", compression="infer") as f:
            data = f.read()
        if fmt == "jsonl":
            table = pajson.read_json(io.BytesIO(data))
        else:
            table = pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                                 newlines_in_values=fmt == "csv",
                                                 invalid_row_handler=skip_bad),
                # Keep every value as text: a caption "1984" must stay a caption.
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns},
                                                     strings_can_be_null=True),
                read_options=pacsv.ReadOptions(block_size=1 << 22),
            )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise ConfigError("input.path", f"cannot read {fmt} file {source!r}: {err}") from err
    if bad_lines:
        log.warning("%s: skipped %d malformed line(s) (first: %s)", source, len(bad_lines), bad_lines[:5])
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group)
    return table.num_rows, table.column_names, len(bad_lines)


# -- reading one partition -----------------------------------------------------------------------

def read_partition(spec: PartitionSpec, input_cfg: Any) -> pa.Table:
    """The partition's rows with `key`, `url`, `caption`, `status`, extras (and `image` for tars)."""
    if spec.format == "webdataset":
        table = _read_tar_samples(spec)
    else:
        table = _read_parquet_rows(spec.path, spec.start, spec.stop)
        table = _rename_input_columns(table, input_cfg.url_column, input_cfg.caption_column)
    keys = pa.array([format_key(spec.key_offset + i) for i in range(table.num_rows)], pa.string())
    table = C.set_column(table, C.KEY, keys)
    table = C.set_column(table, C.STATUS, pa.array([C.STATUS_SUCCESS] * table.num_rows, pa.string()))
    front = [c for c in (C.KEY, C.URL, C.CAPTION, C.STATUS) if c in table.column_names]
    return table.select(front + [c for c in table.column_names if c not in front])


def _read_parquet_rows(path: str, start: int, stop: int) -> pa.Table:
    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, first_row, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                if first_row is None:
                    first_row = offset
            offset += n
        if not groups:
            return pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups)
    return table.slice(start - (first_row or 0), stop - start)


def _rename_input_columns(table: pa.Table, url_column: str, caption_column: str) -> pa.Table:
    names = []
    for name in table.column_names:
        if name == url_column:
            names.append(C.URL)
        elif name == caption_column:
            names.append(C.CAPTION)
        elif name in C.known_schema().names or name in C.INTERNAL_COLUMNS:
            names.append(f"input_{name}")
        else:
            names.append(name)
    table = table.rename_columns(names)
    for name in (C.URL, C.CAPTION):
        if table.schema.field(name).type != pa.string():
            table = C.set_column(table, name, table.column(name).cast(pa.string()))
    return table


# -- WebDataset tars -------------------------------------------------------------------------------

def _read_tar_samples(spec: PartitionSpec) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for index, (key, fields) in enumerate(tario.iter_tar_samples(spec.path)):
        if index < spec.start:
            continue
        if index >= spec.stop:
            break
        row: dict[str, Any] = {"source_key": key, "source_shard": spec.source}
        meta: dict[str, Any] = {}
        if "json" in fields:
            try:
                loaded = json.loads(fields["json"])
                meta = loaded if isinstance(loaded, dict) else {}
            except (ValueError, UnicodeDecodeError):
                meta = {}
        image = tario.image_field(fields)
        row[C.IMAGE] = fields[image] if image else None
        row[C.IMAGE_EXT] = tario.IMAGE_EXTENSIONS[image] if image else None
        caption = fields.get("txt")
        row[C.CAPTION] = caption.decode("utf-8", "replace") if caption is not None else meta.get("caption")
        row[C.URL] = meta.get("url")
        for name, value in meta.items():
            if name in ("url", "caption") or not isinstance(value, str | int | float | bool) or value is None:
                continue
            target = f"input_{name}" if name in C.known_schema().names or name in row else name
            row[target] = value
        rows.append(row)
    names: dict[str, None] = {}  # every field any sample has, in first-seen order
    for row in rows:
        names.update(dict.fromkeys(row))
    arrays = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if name == C.IMAGE:
            arrays[name] = pa.array(values, pa.binary())
        elif name in (C.URL, C.CAPTION, C.IMAGE_EXT, "source_key", "source_shard"):
            arrays[name] = pa.array(values, pa.string())
        else:
            try:
                arrays[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                arrays[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    if not rows:
        return pa.table({C.URL: pa.array([], pa.string()), C.CAPTION: pa.array([], pa.string()),
                         C.IMAGE: pa.array([], pa.binary()), C.IMAGE_EXT: pa.array([], pa.string())})
    return pa.table(arrays)
