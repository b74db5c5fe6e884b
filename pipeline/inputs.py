"""Input planning and partition reading.

The planner resolves `input.path` (file, folder, glob or brace pattern; local or fsspec) to source files, counts
their rows and cuts them into partitions of `input.shard_size` rows that never cross a file. Every row gets a
stable `key` from its position in the whole input (`000000042`). CSV/TSV/JSONL files are converted once to Parquet
under `_work/input/` so that each partition task reads only its own rows (row-group pruning) instead of
re-parsing a whole text file. WebDataset tars are indexed by sample; a partition reads its samples' members.

Input columns are renamed: `input.url_column` -> `url`, `input.caption_column` -> `caption`. Extra columns are
carried through unchanged, except those whose names collide with curate's own columns (e.g. an img2dataset
parquet's `status` or `width`), which are kept as `input_<name>`.

Nothing in the input is dropped silently: what cannot become a normal row (a malformed CSV/TSV/JSONL line, a
duplicate tar member, an oversized tar member, a URL or caption value of an unusable type) becomes a row turned
down at stage `input` with a reason, counted in the run's invariant like every other row. See "Input rules" in
docs/operations.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import lzma
import os
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
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
#: Compressions a CSV/TSV/JSONL file may carry (decompressed while it is converted, by fsspec's `infer`).
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")
KEY_WIDTH = 9

#: Tar members above these sizes (from the header; never read) fail their sample as `member_too_large`.
MAX_IMAGE_MEMBER_BYTES = 64 << 20
MAX_TEXT_MEMBER_BYTES = 1 << 20  # `.txt` and `.json`
#: Raw text of a malformed line kept in its row's error_message.
MAX_LINE_TEXT = 500

# Columns a CSV/TSV/JSONL conversion adds for rows it turned down (reason, message); the reader consumes them.
_REJECT_REASON_COLUMN = "__curate_input_reject_reason"
_REJECT_MESSAGE_COLUMN = "__curate_input_reject_message"

# (status, reason, error message) of a row the reader turns down.
Verdict = tuple[str, str, str]


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
    #: Byte ranges of input tars that hold no readable member (a file cut short, a corrupt header): samples stored
    #: there cannot be named, so they are not rows; each {"source", "start", "end", "reason"} is reported instead.
    damaged: tuple[dict[str, Any], ...] = ()


def _expand(path: str) -> list[str]:
    """Expand braces and globs; a folder lists its files (recursively).

    A brace pattern names files one by one (`part-{000..099}.tar`, as img2dataset and webdataset write them): one of
    them missing is a lost shard, so it is an error naming it, not a silent gap."""
    files: list[str] = []
    patterns = list(braceexpand.braceexpand(path))
    missing: list[str] = []
    for pattern in patterns:
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
            missing.append(pattern)
        files.extend(prefix + p for p in found)
    if missing and len(patterns) > 1 and len(missing) < len(patterns):
        raise ConfigError("input.path", f"{len(missing)} of the {len(patterns)} paths {path!r} names do not exist "
                          f"(first: {missing[0]!r}); name the files that exist, or use a glob (*) to take what is there")
    return files


def _detect_format(files: list[str], declared: str) -> str:
    if declared != "auto":
        return declared
    kinds = set()
    for f in files:
        suffix = _table_suffix(f)
        if suffix in TAR_EXTENSIONS:
            kinds.add("webdataset")
        elif suffix in TABLE_EXTENSIONS:
            kinds.add(TABLE_EXTENSIONS[suffix])
    if "webdataset" in kinds and len(kinds) > 1:
        # A WebDataset folder: img2dataset writes 00000.parquet and 00000_stats.json beside each 00000.tar, curate
        # writes sizes.json beside its shards. The tars hold the samples; the rest are their sidecars.
        others = sum(1 for f in files if _table_suffix(f) not in TAR_EXTENSIONS)
        log.warning("input.format auto: taking the .tar files as WebDataset and leaving %d other file(s) beside them "
                    "(their .parquet/.json sidecars); set input.format to read those instead", others)
        return "webdataset"
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
    return [f for f in files if _table_suffix(f) in wanted and not (fmt == "parquet" and _compressed(f))]


def _compressed(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in COMPRESSED_SUFFIXES


def _table_suffix(path: str) -> str:
    """The file's format suffix, behind a compression suffix (`a.csv.gz` -> `.csv`)."""
    name = PurePosixPath(path)
    return (name.with_suffix("") if _compressed(path) else name).suffix.lower()


#: fsspec `info()` keys that change when a file is rewritten (local, S3, GCS/Azure, HTTP), first present one used
_MODIFIED_KEYS = ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag")


def source_stamp(path: str) -> dict[str, Any]:
    """Size and modification marker of one input file, as its filesystem reports them (for a resume's check
    that the input is the one the run was planned from). After a glob, remote listings come from fsspec's cache."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    info = fs.info(fs_path)
    modified = next((info[k] for k in _MODIFIED_KEYS if info.get(k) is not None), None)
    return {"size": info.get("size"), "modified": None if modified is None else str(modified)}


def input_changes(planned: Sequence[str], stamps: Sequence[dict[str, Any]], files: Sequence[str]) -> str | None:
    """What differs between the files a run was planned from (with their stamps) and `files` now, or None."""
    if list(planned) != list(files):
        before, now = set(planned), set(files)
        added = [f for f in files if f not in before]
        removed = [f for f in planned if f not in now]
        parts = ([f"{len(added)} new (first {added[0]})"] if added else []) + (
            [f"{len(removed)} gone (first {removed[0]})"] if removed else [])
        return "the input files are not the planned ones: " + (", ".join(parts) or "another order")
    for path, stamp in zip(planned, stamps, strict=True):
        try:
            now = source_stamp(path)
        except (OSError, ValueError) as err:
            return f"{path} cannot be read: {err}"
        if now["size"] != stamp.get("size"):
            return f"{path} changed size ({stamp.get('size')} -> {now['size']} bytes)"
        if now["modified"] != stamp.get("modified"):
            return f"{path} was modified ({stamp.get('modified')} -> {now['modified']})"
    return None


def resolve_input(input_cfg: Any, run_dir: str | None = None) -> tuple[list[str], str]:
    """The input's files and format, without reading them. Raises ConfigError for a path that finds nothing.

    `run_dir`: the run's output folder. When `input.path` reaches into it from outside (an input folder holding the
    output folder), its files are not input: they are the run's own lock, plan and Parquet outputs (a format error
    on the first run, the outputs read as input rows on the next). An input path inside the run folder itself (the
    demo serves its corpus from there) is read as given."""
    files = _expand(input_cfg.path)
    if run_dir:
        def within(path: str, folder: str) -> bool:
            return path == folder or path.startswith(folder + "/")

        own = run_dir.rstrip("/") if "://" in run_dir else os.path.abspath(run_dir)
        asked = input_cfg.path if "://" in input_cfg.path else os.path.abspath(input_cfg.path)
        if not within(asked, own):
            files = [f for f in files if not within(f, own)]
    if not files:
        raise ConfigError("input.path", f"no files match {input_cfg.path!r}")
    fmt = _detect_format(files, input_cfg.format)
    files = _select_files(files, fmt)
    if not files:
        raise ConfigError("input.path", f"no {fmt} files under {input_cfg.path!r}")
    return files, fmt


def plan_input(input_cfg: Any, converted_dir: str, limit: int = 0, run_dir: str | None = None,
               required: Mapping[str, str] | None = None) -> InputPlan:
    """Resolve, (convert) and partition the input. Raises ConfigError for unusable input.

    `required`: {config key path: input column} the enabled stages read besides URL and caption
    (`Stage.input_columns`); a table input without one is a config error naming that key."""
    files, fmt = resolve_input(input_cfg, run_dir)
    limit = limit or input_cfg.limit
    partitions: list[PartitionSpec] = []
    position = 0
    malformed = 0
    damaged: list[dict[str, Any]] = []
    for file_index, source in enumerate(files):
        if limit and position >= limit:
            break
        if fmt == "webdataset":
            scan = tario.scan_tar(source)
            readable, n_rows = source, len(scan.rows)
            damaged += [{"source": source, "start": d.start, "end": d.end, "reason": d.reason} for d in scan.damage]
            part_format = "webdataset"
        else:
            if fmt == "parquet":
                readable = source
                names, n_rows = _parquet_footer(source)
            else:
                readable = f"{converted_dir}/file-{file_index:05d}.parquet"
                n_rows, names, bad = _convert_text_table(source, fmt, readable, input_cfg.shard_size,
                                                         (input_cfg.url_column, input_cfg.caption_column))
                malformed += bad
            _check_columns(names, input_cfg, source, required or {})
            part_format = "parquet"
        if limit:
            n_rows = min(n_rows, limit - position)
        for start in range(0, n_rows, input_cfg.shard_size):
            stop = min(start + input_cfg.shard_size, n_rows)
            partitions.append(PartitionSpec(len(partitions), readable, part_format, start, stop,
                                            position + start, source))
        position += n_rows
    return InputPlan(tuple(partitions), position, tuple(files), fmt, malformed, tuple(damaged))


def _check_columns(names: list[str], input_cfg: Any, source: str, required: Mapping[str, str]) -> None:
    wanted = {"input.url_column": input_cfg.url_column, "input.caption_column": input_cfg.caption_column, **required}
    for key_path, column in wanted.items():
        if column not in names:
            raise ConfigError(key_path, f"column {column!r} not found in {source} (columns: {', '.join(names)})")


def check_input_columns(input_cfg: Any, files: list[str], fmt: str, required: Mapping[str, str]) -> None:
    """What planning checks of the columns, where it is cheap (`curate validate`, and `run` before planning): each
    Parquet file's schema (its footer) and each CSV/TSV file's header line. JSONL lines may each have other fields,
    so a JSONL input is checked when it is converted, at planning; a WebDataset input has no columns to check."""
    for source in files:
        if fmt == "parquet":
            names, _rows = _parquet_footer(source)
        elif fmt in ("csv", "tsv"):
            try:
                with fsspec.open(source, "rb", compression="infer") as f:
                    reader = pacsv.open_csv(
                        f, read_options=pacsv.ReadOptions(block_size=1 << 16, use_threads=False),
                        parse_options=_csv_parse_options(fmt, lambda _row: "skip"),
                        convert_options=pacsv.ConvertOptions(check_utf8=False))
                    names = reader.schema.names
            except (pa.ArrowInvalid, OSError, EOFError, zlib.error, lzma.LZMAError) as err:
                raise ConfigError("input.path", f"cannot read {fmt} file {source!r}: {err}") from err
        else:
            return
        _check_columns(names, input_cfg, source, required)


def _parquet_footer(source: str) -> tuple[list[str], int]:
    """(column names, row count) of a Parquet input file, from its footer alone."""
    try:
        with fsspec.open(source, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return meta.schema.to_arrow_schema().names, meta.num_rows
    except Exception as err:
        raise ConfigError("input.path", f"cannot read Parquet {source!r}: {err}") from err


def _csv_parse_options(fmt: str, invalid_row_handler: Any) -> pacsv.ParseOptions:
    """How a CSV/TSV input is split into fields (quoted newlines in CSV only), for conversion and header checks."""
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=fmt == "csv",
                              invalid_row_handler=invalid_row_handler)


def _convert_text_table(
    source: str, fmt: str, target: str, row_group: int, text_columns: tuple[str, ...]
) -> tuple[int, list[str], int]:
    """CSV/TSV/JSONL -> Parquet (atomic), returning (rows, column names, malformed lines).

    A malformed line stays a row at its place in the file (null values, reason in the reject columns)."""
    from curate.pipeline.storage import atomic_path

    try:
        with fsspec.open(source, "rb", compression="infer") as f:
            data = f.read()
        if fmt == "jsonl":
            table, malformed = _read_jsonl(data, text_columns)
        else:
            table, malformed = _read_delimited(data, fmt, text_columns)
    except (EOFError, zlib.error, lzma.LZMAError) as err:  # gzip/bz2/xz data cut short or corrupt
        raise ConfigError("input.path", f"cannot read {fmt} file {source!r}: its compressed data is cut short or "
                          f"corrupt ({err})") from err
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise ConfigError("input.path", f"cannot read {fmt} file {source!r}: {err}") from err
    if malformed:
        log.warning("%s: %d malformed line(s) become rejected rows (reason malformed_line)", source, malformed)
    names = [n for n in table.column_names if n not in (_REJECT_REASON_COLUMN, _REJECT_MESSAGE_COLUMN)]
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group)
    return table.num_rows, names, malformed


def _read_delimited(data: bytes, fmt: str, text_columns: tuple[str, ...]) -> tuple[pa.Table, int]:
    bad: list[tuple[int | None, str, int, int]] = []

    def keep_bad(row: Any) -> str:
        bad.append((row.number, row.text, row.expected_columns, row.actual_columns))
        return "skip"

    def parse(threads: bool) -> pa.Table:
        with _invalid_utf8_in_bad_rows() as seen:
            try:
                table = pacsv.read_csv(
                    io.BytesIO(data),
                    parse_options=_csv_parse_options(fmt, keep_bad),
                    # Keep every value as text: a caption "1984" must stay a caption. Invalid UTF-8 in a value is
                    # that row's problem, not the file's (_binary_where_not_utf8).
                    convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns},
                                                         strings_can_be_null=True, check_utf8=False),
                    read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=threads),
                )
            except pa.ArrowInvalid as err:
                if seen:
                    raise pa.ArrowInvalid(f"{err} (a line with the wrong number of fields that is also not valid "
                                          "UTF-8: pyarrow cannot hand such a line over; fix the file's encoding)"
                                          ) from err
                raise
        return _binary_where_not_utf8(table)

    table = parse(True)
    if not bad:
        return table, 0
    # Only a single-threaded parse numbers the bad rows (record number, header = 1): parse again to place them.
    bad.clear()
    table = parse(False)
    lines = _line_numbers(data, [text for _n, text, _e, _a in bad])
    positions, messages = [], []
    for (number, text, expected, actual), line in zip(bad, lines, strict=True):
        where = f"line {line}" if line else f"record {number}"
        positions.append(number - 2 if number else None)
        messages.append(f"{where}: expected {expected} fields, found {actual}: {text[:MAX_LINE_TEXT]}")
    return _insert_rejected(table, positions, "malformed_line", messages), len(bad)


@contextlib.contextmanager
def _invalid_utf8_in_bad_rows() -> Iterator[list[BaseException]]:
    """Collect what pyarrow fails to hand to `invalid_row_handler` instead of letting Python print it.

    pyarrow decodes a malformed row's text as UTF-8 before calling the handler; for invalid UTF-8 that raises inside
    pyarrow, which Python reports as an "Exception ignored" traceback on stderr, and the parse then fails."""
    seen: list[BaseException] = []
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError):
            seen.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield seen
    finally:
        sys.unraisablehook = previous


def _binary_where_not_utf8(table: pa.Table) -> pa.Table:
    """String columns holding invalid UTF-8 become binary: the URL/caption rule then turns each such value into a
    row-level reason (bad_url_type / bad_caption_type) and other columns carry the bytes through unchanged."""
    for i, field in enumerate(table.schema):
        if not pa.types.is_string(field.type):
            continue
        column = table.column(i)
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            table = table.set_column(i, pa.field(field.name, pa.binary()), column.cast(pa.binary()))
    return table


def _line_numbers(data: bytes, texts: list[str]) -> list[int | None]:
    """1-based physical line of each malformed row's text, each searched at a line start after the previous."""
    found: list[int | None] = []
    cursor, line = 0, 1
    for text in texts:
        needle = text.encode("utf-8", "replace")
        hit = data.find(b"\n" + needle, cursor)
        if hit < 0:
            found.append(None)
            continue
        line += data.count(b"\n", cursor, hit + 1)
        cursor = hit + 1
        found.append(line)
    return found


def _insert_rejected(table: pa.Table, positions: list[int | None], reason: str, messages: list[str]) -> pa.Table:
    """`table` with one all-null row per message at its position (None: at the end), carrying the reason."""
    n_good, n_bad = table.num_rows, len(messages)
    total = n_good + n_bad
    slots: dict[int, int] = {}
    for i, position in enumerate(positions):
        slot = position if position is not None and 0 <= position < total and position not in slots else None
        if slot is None:  # unknown place: the first free one from the end
            slot = next(p for p in range(total - 1, -1, -1) if p not in slots)
        slots[slot] = i
    order, next_good = [], 0
    for p in range(total):
        if p in slots:
            order.append(n_good + slots[p])
        else:
            order.append(next_good)
            next_good += 1
    bad = pa.table({name: pa.nulls(n_bad, table.schema.field(name).type) for name in table.column_names})
    both = pa.concat_tables([table, bad])
    both = both.append_column(_REJECT_REASON_COLUMN, pa.array([None] * n_good + [reason] * n_bad, pa.string()))
    both = both.append_column(_REJECT_MESSAGE_COLUMN, pa.array([None] * n_good + messages, pa.string()))
    return both.take(pa.array(order, pa.int64()))


def _read_jsonl(data: bytes, text_columns: tuple[str, ...]) -> tuple[pa.Table, int]:
    try:
        return pajson.read_json(io.BytesIO(data)), 0
    except pa.ArrowInvalid as err:
        log.info("JSONL needs the line-by-line reader: %s", err)
    # Line by line: a line that is not a JSON object becomes a rejected row; URL/caption values that are not
    # strings follow the column type rule here (pyarrow cannot hold a column whose type changes between lines).
    out: list[dict[str, Any]] = []
    reasons: list[str | None] = []
    messages: list[str | None] = []
    malformed = 0
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
        except ValueError as err:
            obj, problem = None, f"invalid JSON ({err})"
        if problem is not None or not isinstance(obj, dict):
            malformed += 1
            text = line.decode("utf-8", "replace")[:MAX_LINE_TEXT]
            out.append({})
            reasons.append("malformed_line")
            messages.append(f"line {number}: {problem}: {text}")
            continue
        reason = message = None
        for column in text_columns:
            value = obj.get(column)
            if value is None or isinstance(value, str):
                continue
            kind = C.URL if column == text_columns[0] else C.CAPTION
            obj[column], error = _value_text(value, kind)
            if error is not None and reason is None:
                reason, message = f"bad_{kind}_type", f"line {number}: {kind} value: {error}"
        out.append(obj)
        reasons.append(reason)
        messages.append(message)
    names: dict[str, None] = {}  # every field any line has, in first-seen order (as pyarrow's reader does)
    for obj in out:
        names.update(dict.fromkeys(obj))
    table = pa.table({name: _values_array([obj.get(name) for obj in out]) for name in names}) if out else pa.table({})
    if any(r is not None for r in reasons):
        table = table.append_column(_REJECT_REASON_COLUMN, pa.array(reasons, pa.string()))
        table = table.append_column(_REJECT_MESSAGE_COLUMN, pa.array(messages, pa.string()))
    return table, malformed


# -- reading one partition -----------------------------------------------------------------------

def read_partition(spec: PartitionSpec, input_cfg: Any) -> pa.Table:
    """The partition's rows with `key`, `url`, `caption`, `status`, extras (and `image` for tars).

    Rows the input itself rules out come back already turned down (status rejected/failed, reject_stage
    `input`): exactly `spec.num_rows` rows, never fewer."""
    if spec.format == "webdataset":
        table, verdicts = _read_tar_samples(spec)
    else:
        table = _read_parquet_rows(spec.path, spec.start, spec.stop)
        table, verdicts = _rename_input_columns(table, input_cfg.url_column, input_cfg.caption_column)
    keys = pa.array([format_key(spec.key_offset + i) for i in range(table.num_rows)], pa.string())
    table = C.set_column(table, C.KEY, keys)
    table = _set_status(table, verdicts)
    front = [c for c in (C.KEY, C.URL, C.CAPTION, C.STATUS) if c in table.column_names]
    return table.select(front + [c for c in table.column_names if c not in front])


def _set_status(table: pa.Table, verdicts: list[Verdict | None]) -> pa.Table:
    table = C.set_column(table, C.STATUS, pa.array([v[0] if v else C.STATUS_SUCCESS for v in verdicts]
                                                   if verdicts else [C.STATUS_SUCCESS] * table.num_rows,
                                                   pa.string()))
    if any(verdicts):
        table = C.set_column(table, C.REJECT_STAGE, pa.array([C.INPUT_STAGE if v else None for v in verdicts], pa.string()))
        table = C.set_column(table, C.REJECT_REASON, pa.array([v[1] if v else None for v in verdicts], pa.string()))
        table = C.set_column(table, C.ERROR_MESSAGE, pa.array([v[2] if v else None for v in verdicts], pa.string()))
    return table


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


def _rename_input_columns(table: pa.Table, url_column: str, caption_column: str
                          ) -> tuple[pa.Table, list[Verdict | None]]:
    verdicts: list[Verdict | None] = [None] * table.num_rows
    if _REJECT_REASON_COLUMN in table.column_names:
        reasons = table.column(_REJECT_REASON_COLUMN).to_pylist()
        messages = table.column(_REJECT_MESSAGE_COLUMN).to_pylist()
        verdicts = [(C.STATUS_REJECTED, r, m or "") if r else None for r, m in zip(reasons, messages, strict=True)]
        table = table.drop_columns([_REJECT_REASON_COLUMN, _REJECT_MESSAGE_COLUMN])
    names = []
    for name in table.column_names:
        if name == url_column:
            names.append(C.URL)
        elif name == caption_column:
            names.append(C.CAPTION)
        else:
            names.append(C.input_column(name))
    table = table.rename_columns(names)
    for name in (C.URL, C.CAPTION):
        column, errors = _text_column(table.column(name), name)
        table = C.set_column(table, name, column)
        for i, error in enumerate(errors):
            if error is not None and verdicts[i] is None:
                verdicts[i] = (C.STATUS_REJECTED, f"bad_{name}_type", error)
    return table, verdicts


# -- URL and caption values that are not strings ---------------------------------------------------

def _text_column(column: pa.ChunkedArray, name: str) -> tuple[pa.ChunkedArray | pa.Array, list[str | None]]:
    """The column as strings, and per row an error for a value that has no text (see "Input rules")."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_decimal(kind) or pa.types.is_null(kind)):
        return column.cast(pa.string()), [None] * len(column)
    texts: list[str | None] = []
    errors: list[str | None] = []
    for value in column.to_pylist():
        text, error = _value_text(value, name)
        texts.append(text)
        errors.append(None if error is None else f"{name} column of type {kind}: {error}")
    return pa.array(texts, pa.string()), errors


def _value_text(value: Any, name: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not). A list of strings: its non-null elements joined with a space for a
    caption, its only element for a URL."""
    if value is None:
        return None, None
    if isinstance(value, list | tuple):
        parts = []
        for item in value:
            if item is None:
                continue
            text, error = _scalar_text(item)
            if error is not None:
                return None, f"list with a {error}"
            parts.append(text)
        if name == C.URL and len(parts) > 1:
            return None, f"a list of {len(parts)} URLs (a row has one image)"
        return (" ".join(p for p in parts if p is not None) if parts else None), None
    return _scalar_text(value)


def _scalar_text(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, bool):
        return ("true" if value else "false"), None
    if isinstance(value, int | float | Decimal):
        return str(value), None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "binary value that is not valid UTF-8"
    return None, f"{type(value).__name__} value"


# -- WebDataset tars -------------------------------------------------------------------------------

def _member_cap(field: str) -> int:
    return MAX_IMAGE_MEMBER_BYTES if field in tario.IMAGE_EXTENSIONS else MAX_TEXT_MEMBER_BYTES


def _read_tar_samples(spec: PartitionSpec) -> tuple[pa.Table, list[Verdict | None]]:
    # The header index gives every row (a sample's members wherever they are); only this partition's rows'
    # image, txt and json members are read, and none above its cap.
    rows = tario.index_rows(spec.path)[spec.start:spec.stop]
    wanted: list[list[tario.TarMember]] = []
    verdicts: list[Verdict | None] = []
    for sample in rows:
        if sample.duplicate:
            member = sample.members[0]
            wanted.append([])
            verdicts.append((C.STATUS_REJECTED, "duplicate_key",
                             f"duplicate member {member.name!r}: sample {sample.key!r} already has a "
                             f"{member.field!r} member"))
            continue
        image = tario.image_field(sample.fields())
        used = [m for m in sample.members if m.field in (image, "txt", "json")]
        too_large = [m for m in used if m.size > _member_cap(m.field)]
        truncated = [m for m in used if m.truncated]
        wanted.append([m for m in used if m.size <= _member_cap(m.field) and not m.truncated])
        if too_large:
            verdicts.append((C.STATUS_FAILED, "member_too_large", "; ".join(
                f"member {m.name!r} is {m.size:,} bytes, over the {_member_cap(m.field):,}-byte cap"
                for m in too_large)))
        elif truncated:
            verdicts.append((C.STATUS_FAILED, "truncated_member", "; ".join(
                f"the tar ends inside member {m.name!r} ({m.size:,} bytes from byte {m.offset_data:,})"
                for m in truncated)))
        else:
            verdicts.append(None)
    records: list[dict[str, Any]] = []
    for i, (sample, fields) in enumerate(zip(rows, tario.read_members(spec.path, wanted), strict=True)):
        record, error = _tar_record(sample, fields, spec.source)
        records.append(record)
        unread = [m for m in wanted[i] if m.field not in fields]
        if unread and verdicts[i] is None:  # the header was fine, the data is not (cut off, corrupt compression)
            verdicts[i] = (C.STATUS_FAILED, "unreadable_member", "; ".join(
                f"member {m.name!r} cannot be read from the tar" for m in unread))
        if error is not None and verdicts[i] is None:
            verdicts[i] = (C.STATUS_REJECTED, error[0], error[1])
    return _tar_table(records), verdicts


def _tar_record(sample: tario.TarRow, fields: dict[str, bytes], source: str
                ) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The row of one sample, and (reason, message) when its json holds a URL/caption with no text."""
    row: dict[str, Any] = {"source_key": sample.key, "source_shard": source}
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
    problem = None
    for name in (C.URL, C.CAPTION):  # json values of other types follow the column type rule
        if row[name] is not None and not isinstance(row[name], str):
            row[name], error = _value_text(row[name], name)
            if error is not None and problem is None:
                problem = (f"bad_{name}_type", f"{name} in {sample.key}.json: {error}")
    for name, value in meta.items():
        if name in ("url", "caption") or value is None:
            continue  # lists and objects are kept too (DataComp's `face_bboxes`); _values_array types them
        row[f"input_{name}" if name in row else C.input_column(name)] = value
    return row, problem


def _values_array(values: list[Any]) -> pa.Array:
    """An extra column from Python values (a tar sample's .json field, a JSONL field): the type pyarrow infers when
    the values agree on one (ints and floats make float64), else text, JSON for what is not a string (`640` and
    `"640px"` -> "640", "640px"), the rule finalize applies across partitions (sink.conform_extra_columns)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
                        pa.string())


def _tar_table(rows: list[dict[str, Any]]) -> pa.Table:
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
            arrays[name] = _values_array(values)
    if not rows:
        return pa.table({C.URL: pa.array([], pa.string()), C.CAPTION: pa.array([], pa.string()),
                         C.IMAGE: pa.array([], pa.binary()), C.IMAGE_EXT: pa.array([], pa.string())})
    return pa.table(arrays)
