"""Eval sets: read images from common dataset layouts, build versioned pHash indexes, cache them.

Adapters (:func:`iter_eval_images`, format picked by :func:`detect_format` or given):

* ``folder``: an image folder, recursive (class subfolders such as ImageNet's ``val/n01440764/``).
  ``item_id`` is the file's path relative to the folder root (POSIX separators).
* ``parquet``: one file, a folder of ``*.parquet``, or a glob/brace pattern. Image bytes come from a
  binary column (``image``, ``jpg``, ``png``, ``webp``, ``img``, ``image_bytes``, ``bytes``) or a
  Hugging Face image struct (``{bytes, path}``); otherwise a path column (``path``, ``image_path``,
  ``file_path``, ``filepath``, ``file``, ``filename``) relative to the Parquet file's folder.
  ``item_id`` comes from an id column (``item_id``, ``id``, ``key``, ``__key__``, ``image_id``,
  ``file_name``, ``filename``) or else is the row number (``file.parquet#row`` for several files).
* ``webdataset``: tar shards (a file, a folder of ``*.tar``, a glob or a brace pattern such as
  ``shard-{0000..0099}.tar``). ``item_id`` is the sample key (member path up to the first dot of
  its file name), the first image member of each sample is hashed.
* ``hf``: a Hugging Face ``datasets`` dataset written with ``save_to_disk`` (``state.json`` and
  ``data-*.arrow`` Arrow stream files; a ``DatasetDict`` folder with ``dataset_dict.json`` and one
  folder per split), read with pyarrow alone. The image column is the feature of type ``Image``.
  ``item_id`` is the row number (``split/row`` for a DatasetDict).

An index (INDEX.parquet) has the columns ``eval_set``, ``item_id``, ``path`` (file path or source
reference), ``phash`` (hex, equal to ``str(imagehash.phash(img))`` in exact mode), and when the
near-duplicate verification was on at hash time ``variant_hashes`` (list of hex), ``descriptor``
(binary) and ``fine_codes`` (binary: the 32-byte fine code of the image and of each variant, in that
order), see :mod:`curate.stages.phash_dedup.nearduplicate`. The hash parameters, format version, source
and its fingerprint live in the Parquet key-value metadata under ``curate.evalset_index``.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline import console, storage, tario
from curate.stages.phash_dedup.phash import HashMode, PhashParams, from_hex, to_hex

log = logging.getLogger("curate.evalsets")

INDEX_FORMAT_VERSION = 1
METADATA_KEY = b"curate.evalset_index"
INDEX_COLUMNS = ("eval_set", "item_id", "path", "phash")
FORMATS = ("folder", "parquet", "webdataset", "hf")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})

_BYTES_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
_PATH_COLUMNS = ("path", "image_path", "file_path", "filepath", "file", "filename")
_ID_COLUMNS = ("item_id", "id", "key", "__key__", "image_id", "file_name", "filename")


@dataclass(frozen=True)
class EvalItem:
    """One eval image: its id within the set, where it lives, and how to read its bytes."""

    item_id: str
    path: str
    read: Callable[[], bytes]


# -- locating sources -------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace expansion: ``a-{000..002}.tar`` and ``{train,val}.tar`` (bash rules, as the
    input reader's)."""
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def _expand_files(source: str) -> list[Path]:
    """A file, or the files matched by glob and brace patterns (sorted, existing only)."""
    paths: list[Path] = []
    for pattern in expand_braces(source):
        if any(ch in pattern for ch in "*?["):
            paths.extend(Path(p) for p in sorted(glob.glob(pattern, recursive=True)))
        elif Path(pattern).exists():
            paths.append(Path(pattern))
    return sorted(dict.fromkeys(p for p in paths if p.is_file()))


def detect_format(source: str) -> str:
    """Guess the adapter for `source`; raises ValueError when there is nothing readable."""
    path = Path(source)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        names = [p.name for p in path.iterdir()]
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        return "folder"
    files = _expand_files(source)
    if not files:
        raise ValueError(f"eval set {source!r}: no such file, folder or matching files")
    suffixes = {p.suffix.lower() for p in files}
    if suffixes <= {".tar"}:
        return "webdataset"
    if suffixes <= {".parquet"}:
        return "parquet"
    if suffixes <= {".arrow"}:
        return "hf"
    raise ValueError(
        f"eval set {source!r}: cannot tell the format from {sorted(suffixes)}; give it (`--format` of hash-evalset, "
        f"`format` of a dedup.eval_sets entry): one of {', '.join(FORMATS)}; a folder of images is `folder`"
    )


def default_name(source: str) -> str:
    """The eval-set name when none is given: the folder name, or the file name without extension."""
    path = Path(source.rstrip("/"))
    if path.is_dir():
        return path.resolve().name
    if any(ch in source for ch in "*?[{"):
        parent = Path(re.split(r"[*?\[{]", source, maxsplit=1)[0]).parent
        return parent.resolve().name or "evalset"
    name = path.name
    for suffix in (".parquet", ".tar", ".arrow"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem or "evalset"


def source_files(source: str, fmt: str) -> list[Path]:
    """Every file the adapter reads (used for the cache fingerprint)."""
    path = Path(source)
    if fmt == "folder":
        return [p for p in _walk_images(path)]
    if fmt == "hf":
        return [p for _split, p in _hf_arrow_files(path)] + [
            p for p in (path / "state.json", path / "dataset_info.json", path / "dataset_dict.json") if p.is_file()
        ]
    if path.is_dir():
        ext = ".tar" if fmt == "webdataset" else ".parquet"
        return sorted(p for p in path.rglob(f"*{ext}") if p.is_file())
    return _expand_files(source)


def fingerprint(source: str, fmt: str) -> str:
    """sha256 over every source file's relative path, size and mtime (cheap; no image reads).

    A changed, added or removed file changes the fingerprint; rewriting a file with identical
    bytes does too (new mtime), which costs a re-hash, never a stale index.
    """
    digest = hashlib.sha256()
    root = Path(source) if Path(source).is_dir() else None
    for file in source_files(source, fmt):
        stat = file.stat()
        rel = file.relative_to(root).as_posix() if root is not None else str(file.resolve())
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# -- adapters ----------------------------------------------------------------------------------------

def _walk_images(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _iter_folder(root: Path) -> Iterator[EvalItem]:
    for file in _walk_images(root):
        yield EvalItem(file.relative_to(root).as_posix(), str(file), file.read_bytes)


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _pick(names: Iterable[str], wanted: Iterable[str]) -> str | None:
    lower = {n.lower(): n for n in names}
    for w in wanted:
        if w in lower:
            return lower[w]
    return None


def _image_struct_column(schema: pa.Schema) -> str | None:
    for field in schema:
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            return field.name
    return None


def _rows_from_table_batches(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, base_dir: Path, ref: str, id_prefix: str,
    image_column: str | None = None, id_column: str | None = None,
) -> Iterator[EvalItem]:
    """Shared by the parquet and hf adapters: image bytes / struct / path column, id column."""
    names = schema.names
    struct_col = image_column if image_column and pa.types.is_struct(schema.field(image_column).type) else None
    bytes_col = path_col = None
    if image_column and struct_col is None:
        field_type = schema.field(image_column).type
        if pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type):
            bytes_col = image_column
        else:
            path_col = image_column
    if not image_column:
        struct_col = _image_struct_column(schema)
        if struct_col is None:
            candidate = _pick(names, _BYTES_COLUMNS)
            if candidate is not None and (
                pa.types.is_binary(schema.field(candidate).type) or pa.types.is_large_binary(schema.field(candidate).type)
            ):
                bytes_col = candidate
            else:
                path_col = _pick(names, _PATH_COLUMNS)
    if struct_col is None and bytes_col is None and path_col is None:
        raise ValueError(f"{ref}: no image column (binary, image struct or path); columns are {names}")
    id_col = id_column or _pick([n for n in names if n not in (bytes_col, struct_col)], _ID_COLUMNS)
    row = 0
    for batch in batches:
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            item_id = str(data[id_col][i]) if id_col else f"{id_prefix}{row}"
            reference = f"{ref}#{row}"
            payload: bytes | None = None
            image_path: str | None = None
            if struct_col is not None:
                value = data[struct_col][i] or {}
                payload = value.get("bytes")
                image_path = value.get("path")
            elif bytes_col is not None:
                payload = data[bytes_col][i]
            else:
                image_path = data[path_col][i]
            row += 1
            if payload is not None:
                # a Hugging Face Image struct's `path` is mostly the original file name, not a file here: the
                # index then points at the row (`file#row`), which dedup-report can always read back
                local = Path(image_path) if image_path else None
                if local is not None and not local.is_absolute():
                    local = base_dir / local
                usable = local is not None and local.is_file()
                yield EvalItem(item_id, str(local) if usable else reference, _const(payload))
            elif image_path:
                file = Path(image_path)
                file = file if file.is_absolute() else base_dir / file
                yield EvalItem(item_id, str(file), file.read_bytes)
            else:
                log.warning("%s: row %d has no image bytes or path; skipped", ref, row - 1)


def _iter_parquet(files: list[Path], image_column: str | None, id_column: str | None) -> Iterator[EvalItem]:
    for file in files:
        pf = pq.ParquetFile(file)
        prefix = "" if len(files) == 1 else f"{file.name}#"
        yield from _rows_from_table_batches(
            pf.iter_batches(batch_size=256), pf.schema_arrow, file.parent, str(file), prefix, image_column, id_column
        )


def _iter_tars(files: list[Path]) -> Iterator[EvalItem]:
    for file in files:
        seen: set[str] = set()
        for key, members in tario.iter_sample_members(str(file)):  # streaming: read front to back once
            if key in seen:
                continue
            for name, data in members:
                _key, ext = tario.split_sample_name(name)
                if f".{ext.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS:  # the first image member of the sample
                    seen.add(key)
                    yield EvalItem(key, f"{file}::{name}", _const(data))
                    break


def _hf_arrow_files(root: Path) -> list[tuple[str, Path]]:
    """(split, arrow file) of a save_to_disk folder (Dataset or DatasetDict)."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        return [(split, f) for split in splits for _s, f in _hf_arrow_files(root / split)]
    state_file = root / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        files = [root / entry["filename"] for entry in state.get("_data_files", [])]
    else:
        files = sorted(root.glob("*.arrow"))
    return [("", f) for f in files]


def _hf_image_column(root: Path) -> str | None:
    info_file = root / "dataset_info.json"
    if not info_file.is_file():
        return None
    features = json.loads(info_file.read_text()).get("features") or {}
    for name, feature in features.items():
        if isinstance(feature, dict) and feature.get("_type") == "Image":
            return name
    return None


def _open_arrow(file: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    source = pa.memory_map(str(file), "r")
    try:
        try:
            reader: Any = pa.ipc.open_stream(source)  # what datasets writes
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError) as err:  # pyarrow's own words name no file ("File is too small: 15")
        raise ValueError(f"cannot read Hugging Face Arrow file {file}: {err}") from err
    return reader.schema, iter(reader)


def _iter_hf(root: Path, image_column: str | None, id_column: str | None) -> Iterator[EvalItem]:
    entries = _hf_arrow_files(root)
    if not entries:
        raise ValueError(f"{root}: a save_to_disk folder without data files")
    rows_before: dict[str, int] = {}
    for split, file in entries:
        column = image_column or _hf_image_column(file.parent)
        schema, batches = _open_arrow(file)
        prefix = f"{split}/" if split else ""
        offset = rows_before.get(split, 0)
        count = 0

        def counted(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            nonlocal count
            for batch in batches:
                count += batch.num_rows
                yield batch

        for item in _rows_from_table_batches(counted(batches), schema, file.parent, str(file), "", column, id_column):
            # row numbers continue across a split's shards (data-00000-of-00002.arrow, ...)
            item_id = item.item_id if id_column else f"{prefix}{offset + int(item.item_id)}"
            yield EvalItem(item_id, item.path, item.read)
        rows_before[split] = offset + count


def iter_eval_images(
    source: str, fmt: str = "auto", image_column: str | None = None, id_column: str | None = None
) -> Iterator[EvalItem]:
    """Yield :class:`EvalItem` (item_id, path or reference, read()) for every image of an eval set.

    `fmt`: ``auto`` (see :func:`detect_format`), ``folder``, ``parquet``, ``webdataset`` or ``hf``.
    `image_column` / `id_column` override the column detection of the parquet and hf adapters.
    Raises ValueError for a missing or unreadable source. Order is deterministic (sorted files).
    """
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown eval-set format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    path = Path(source)
    if fmt in ("folder", "hf") and not path.is_dir():
        raise ValueError(f"eval set {source!r}: expected a folder for format {fmt!r}")
    if fmt == "folder":
        return _iter_folder(path)
    if fmt == "hf":
        return _iter_hf(path, image_column, id_column)
    files = source_files(source, fmt)
    if not files:
        raise ValueError(f"eval set {source!r}: no {fmt} files found")
    if fmt == "parquet":
        return _iter_parquet(files, image_column, id_column)
    return _iter_tars(files)


# -- hashing -----------------------------------------------------------------------------------------

def _nearduplicate() -> Any:
    try:
        from curate.stages.phash_dedup import nearduplicate
    except ImportError as err:
        raise RuntimeError(
            "near-duplicate verification needs curate.stages.phash_dedup.nearduplicate, which is not available"
        ) from err
    return nearduplicate


_Hashed = tuple[str | None, list[str], bytes | None, bytes | None, str | None]


def _hash_one(data: bytes, params: PhashParams, verify: bool) -> _Hashed:
    """(phash hex, variant hex list, descriptor, fine codes, error) of one eval image.

    Runs in pool workers. The fine codes are those of the main image and of each variant, in that order.
    """
    from curate.stages.phash_dedup.phash import decode_rgb, phash_bytes, phash_image

    try:
        if not verify:
            words, errors = phash_bytes([data], params)
            if errors[0]:
                return None, [], None, None, errors[0]
            return to_hex(words, params.n_bits)[0], [], None, None, None
        img = decode_rgb(data)
        main = to_hex(phash_image(img, params)[None, :], params.n_bits)[0]
        nd = _nearduplicate()
        width = params.hex_width
        codes = nd.variant_codes(img, params.hash_size)
        variants = [format(v, f"0{width}x") for v, _fine in codes[1:]]
        fine = b"".join(f for _v, f in codes)
        return main, variants, nd.descriptor(img, with_mirror=True), fine, None
    except Exception as err:  # noqa: BLE001 - a bad eval image is skipped with a warning, not fatal
        return None, [], None, None, f"{type(err).__name__}: {err}"


def _hash_batch(batch: list[bytes], params: PhashParams, verify: bool) -> list[_Hashed]:
    return [_hash_one(data, params, verify) for data in batch]


def _absolute_reference(reference: str) -> str:
    """An eval image's `path` as the index stores it: absolute for local files (also `archive.tar::member`), so
    that reports find the image from any working directory; URLs and names that are not files here stay."""
    if not reference or "://" in reference:
        return reference
    file, sep, member = reference.partition("::")
    if not os.path.exists(file):  # a name recorded inside the data (a Parquet `path` field), not a file here
        return reference
    return os.path.abspath(file) + sep + member


def _in_order(pool: ProcessPoolExecutor, batches: Iterator[tuple[list[EvalItem], list[bytes]]], params: PhashParams,
              verify: bool, in_flight: int) -> Iterator[tuple[list[EvalItem], list[_Hashed]]]:
    """Each batch with its hashes, in order, with at most `in_flight` batches read and queued at a time: the eval
    images' bytes are never all in memory (ImageNet's train split is ~140 GB)."""
    pending: collections.deque[tuple[list[EvalItem], Any]] = collections.deque()
    for batch, data in batches:
        pending.append((batch, pool.submit(_hash_batch, data, params, verify)))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


#: Index rows per batch of :class:`_IndexBuilder`, hence per Parquet row group of :func:`write_index`
#: (~17 MB with descriptors: what building an index holds at a time).
_ROW_GROUP_ITEMS = 1024


class _IndexBuilder:
    """Hashes an eval set into index record batches; :meth:`metadata` once they are all out.

    The one implementation behind :func:`build_index_table` (a table in memory: tests, small sets) and
    :func:`write_index` (`hash-evalset` and the eval-set cache: streamed to disk a row group at a time).
    """

    def __init__(self, source: str, name: str | None, params: PhashParams | None, fmt: str, verify: bool | None,
                 workers: int, image_column: str | None, id_column: str | None) -> None:
        self.source = source
        self.params = params or PhashParams()
        self.fmt = detect_format(source) if fmt == "auto" else fmt
        self.name = name or default_name(source)
        if verify is None:
            try:
                _nearduplicate()
                verify = True
            except RuntimeError:
                verify = False
        elif verify:
            _nearduplicate()  # asked for descriptors that cannot be made: say so now, not once per image
        self.verify = verify
        self.workers = workers
        self.columns = (image_column, id_column)
        self.items = 0
        self.skipped = 0
        fields = [pa.field("eval_set", pa.string()), pa.field("item_id", pa.string()), pa.field("path", pa.string()),
                  pa.field("phash", pa.string())]
        if verify:
            # `fine_codes`: the cascade's compact part (kept in worker RAM; the descriptors are read on demand)
            fields += [pa.field("variant_hashes", pa.list_(pa.string())), pa.field("descriptor", pa.binary()),
                       pa.field("fine_codes", pa.binary())]
        self.schema = pa.schema(fields)

    def batches(self, rows: int) -> Iterator[pa.RecordBatch]:
        """The index rows, `rows` at a time, in source order; unreadable images are counted and skipped."""
        items = iter_eval_images(self.source, self.fmt, *self.columns)
        params, verify, name = self.params, self.verify, self.name
        out: dict[str, list[Any]] = {f.name: [] for f in self.schema}

        def read(size: int = 64) -> Iterator[tuple[list[EvalItem], list[bytes]]]:
            batch: list[EvalItem] = []
            for item in items:
                batch.append(item)
                if len(batch) == size:
                    yield batch, [it.read() for it in batch]
                    batch = []
            if batch:
                yield batch, [it.read() for it in batch]

        def flush() -> pa.RecordBatch:
            batch = pa.record_batch([pa.array(out[f.name], f.type) for f in self.schema], schema=self.schema)
            for values in out.values():
                values.clear()
            return batch

        pool = ProcessPoolExecutor(self.workers) if self.workers > 1 else None
        bar = console.progress_bar(f"hashing {name}", "image")
        try:
            if pool is None:
                results: Iterator[tuple[list[EvalItem], list[_Hashed]]] = (
                    (b, _hash_batch(d, params, verify)) for b, d in read())
            else:
                results = _in_order(pool, read(), params, verify, in_flight=2 * self.workers)
            for batch, hashed in results:
                bar.update(len(batch))
                for item, (main, extra, desc, fine, error) in zip(batch, hashed, strict=True):
                    if main is None:
                        self.skipped += 1
                        log.warning("eval set %s: %s (%s) not hashed: %s", name, item.item_id, item.path, error)
                        continue
                    self.items += 1
                    out["eval_set"].append(name)
                    out["item_id"].append(item.item_id)
                    out["path"].append(_absolute_reference(item.path))
                    out["phash"].append(main)
                    if verify:
                        out["variant_hashes"].append(extra)
                        out["descriptor"].append(desc)
                        out["fine_codes"].append(fine)
                    if len(out["phash"]) >= rows:
                        yield flush()
            if out["phash"]:
                yield flush()
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def metadata(self) -> dict[bytes, bytes]:
        """The index's schema metadata (after :meth:`batches` is exhausted); ValueError when nothing was readable."""
        if not self.items:
            raise ValueError(f"eval set {self.source!r} ({self.fmt}): no readable images ({self.skipped} unreadable)")
        nd = _nearduplicate() if self.verify else None
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "phash": self.params.as_metadata(),
            "eval_set": self.name,
            "source": str(self.source),
            "source_format": self.fmt,
            "source_fingerprint": fingerprint(self.source, self.fmt),
            "items": self.items,
            "skipped": self.skipped,
            "verify": bool(self.verify),
            "descriptor_version": getattr(nd, "DESCRIPTOR_VERSION", None) if self.verify else None,
        }
        return {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}


def build_index_table(
    source: str, name: str | None = None, params: PhashParams | None = None, fmt: str = "auto",
    verify: bool | None = None, workers: int = 1, image_column: str | None = None, id_column: str | None = None,
) -> pa.Table:
    """Hash every image of `source` into an index table (with metadata), in memory. See :func:`hash_evalset`."""
    builder = _IndexBuilder(source, name, params, fmt, verify, workers, image_column, id_column)
    table = pa.Table.from_batches(list(builder.batches(_ROW_GROUP_ITEMS)), schema=builder.schema)
    return table.replace_schema_metadata(builder.metadata())


def write_index(
    source: str, output: str, name: str | None = None, params: PhashParams | None = None, fmt: str = "auto",
    verify: bool | None = None, workers: int = 1, image_column: str | None = None, id_column: str | None = None,
) -> int:
    """Hash `source` into INDEX.parquet at `output` (atomically), a row group at a time; returns the items.

    The metadata (item and skip counts) is only known at the end and readers take it from the Arrow schema, which
    a Parquet writer fixes when it opens; so the row groups go to a scratch file first and are copied, one at a
    time, into the final file under the finished schema. Memory: one row group, never the whole eval set.
    """
    builder = _IndexBuilder(source, name, params, fmt, verify, workers, image_column, id_column)
    with storage.atomic_path(output) as final:
        scratch = f"{final}.rows"
        try:
            with pq.ParquetWriter(scratch, builder.schema, compression="zstd") as writer:
                for batch in builder.batches(_ROW_GROUP_ITEMS):
                    writer.write_batch(batch)
            schema = builder.schema.with_metadata(builder.metadata())
            rows = pq.ParquetFile(scratch)
            with pq.ParquetWriter(final, schema, compression="zstd") as writer:
                for i in range(rows.metadata.num_row_groups):
                    writer.write_table(rows.read_row_group(i).replace_schema_metadata(schema.metadata))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
    return builder.items


def hash_evalset(
    source: str, output: str, name: str | None = None, hash_size: int = 8, mode: HashMode = "exact",
    fmt: str = "auto", verify: bool | None = None, workers: int = 0,
    image_column: str | None = None, id_column: str | None = None,
) -> int:
    """`curate hash-evalset`: hash an eval set into INDEX.parquet. Returns the number of items.

    `name` defaults to the folder/file name; `verify` None = store the near-duplicate variant
    hashes and descriptors when :mod:`curate.stages.phash_dedup.nearduplicate` is importable; `workers` = 0
    uses one process per core. Raises ValueError with a clear message for unreadable sources.
    """
    params = PhashParams(hash_size=hash_size, mode=mode)
    n_workers = workers if workers > 0 else (os.cpu_count() or 1)
    return write_index(source, output, name, params, fmt, verify, n_workers, image_column, id_column)


# -- loading and caching -----------------------------------------------------------------------------

def index_metadata(table_or_schema: pa.Table | pa.Schema) -> dict[str, Any]:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a curate eval index: no curate.evalset_index metadata")
    return json.loads(raw)


def index_params(table_or_schema: pa.Table | pa.Schema) -> PhashParams:
    """The hash parameters an index was built with."""
    meta = index_metadata(table_or_schema)["phash"]
    return PhashParams(hash_size=int(meta["hash_size"]), mode=meta["mode"], highfreq_factor=int(meta["highfreq_factor"]))


def load_index(path: str, *, descriptors: bool = True) -> pa.Table:
    """Read and check an INDEX.parquet (columns, metadata, format version, hash strings).

    `descriptors=False` leaves the big `descriptor` column on disk (:func:`iter_descriptors` streams it)."""
    try:
        if descriptors:
            table = pq.read_table(path)
        else:
            names = pq.read_schema(path).names
            table = pq.read_table(path, columns=[n for n in names if n != "descriptor"])
    except (OSError, pa.ArrowInvalid) as err:
        raise ValueError(f"cannot read eval index {path!r}: {err}") from err
    missing = [c for c in INDEX_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"eval index {path!r}: missing columns {missing}")
    try:
        meta = index_metadata(table)
    except ValueError as err:
        raise ValueError(f"eval index {path!r}: {err}") from err
    version = meta.get("format_version")
    if version != INDEX_FORMAT_VERSION:
        raise ValueError(f"eval index {path!r}: format version {version}, this curate reads {INDEX_FORMAT_VERSION}")
    params = index_params(table)
    width = params.hex_width
    lengths = np.unique(np.asarray(pa.compute.utf8_length(table.column("phash")).to_numpy(zero_copy_only=False)))
    if len(lengths) and lengths.tolist() != [width]:
        raise ValueError(f"eval index {path!r}: phash strings must have {width} hex digits")
    return table


def has_descriptors(path: str) -> bool:
    return "descriptor" in pq.read_schema(path).names


def iter_descriptors(path: str, batch_rows: int = 1024) -> Iterator[pa.Array]:
    """An index file's `descriptor` column (check :func:`has_descriptors` first), a batch at a time.

    Small batches (~7-19 MB): Arrow's allocator keeps freed batches' pages for a while, so the process grows by a
    few batches while streaming (measured on a 1.45 GB column in one row group: +100 MB RSS with 1,024 rows, +350 MB
    with 4,096; reading the column chunk whole, Parquet's default, +480 MB for a 363 MB column).
    """
    # buffer_size: read the column chunk a megabyte at a time (0, the default, reads a row group's chunk whole:
    # an index written in one row group would come into RAM entire, ~10-19 GB at 1M items)
    source = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    for batch in source.iter_batches(batch_size=batch_rows, columns=["descriptor"], use_threads=False):
        yield batch.column(0)


def descriptor_chunks(paths: Sequence[str], rows: Sequence[int]) -> Iterator[pa.Array]:
    """The `descriptor` columns of index files in merged order (:func:`concat_indexes`), streamed from each file
    (:func:`iter_descriptors`); an index of `rows` items without descriptors gives as many nulls."""
    for path, n in zip(paths, rows, strict=True):
        if has_descriptors(path):
            yield from iter_descriptors(path)
        else:
            yield pa.nulls(n, pa.binary())


def index_hashes(table: pa.Table) -> np.ndarray:
    """The index's main hashes as uint64 words ``(n, words)``."""
    return from_hex(table.column("phash").to_pylist(), index_params(table).n_bits)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "curate" / "evalsets"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (workers of one run hash an eval set once, not N times)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): duplicate work is possible, results still atomic
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_key(source: str, fmt: str, name: str, params: PhashParams, verify: bool) -> str:
    """Content fingerprint of the source + every parameter that changes the index."""
    descriptor_version = getattr(_nearduplicate(), "DESCRIPTOR_VERSION", "") if verify else ""
    payload = json.dumps(
        {
            "fingerprint": fingerprint(source, fmt),
            "fmt": fmt,
            "name": name,
            "phash": params.as_metadata(),
            "verify": verify,
            "descriptor_version": descriptor_version,
            "index_format": INDEX_FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_index(
    source: str, name: str | None = None, params: PhashParams | None = None, fmt: str = "auto",
    verify: bool = False, cache_dir: str | os.PathLike[str] | None = None, workers: int = 1,
    descriptors: bool = True,
) -> tuple[pa.Table, Path, bool]:
    """Index of `source` from the cache, building it on a miss. Returns (table, file, was_cached).
    `descriptors=False`: the table without its `descriptor` column (stream it from `file` instead).

    The cache file name carries the eval-set name and the first 16 hex digits of :func:`cache_key`;
    a lock file makes concurrent workers wait for the one that builds it.
    """
    params = params or PhashParams()
    fmt = detect_format(source) if fmt == "auto" else fmt
    name = name or default_name(source)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(source, fmt, name, params, verify)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:64]
    target = folder / f"{safe}-{key[:16]}.parquet"
    with _file_lock(folder / f".{safe}-{key[:16]}.lock"):
        if target.is_file():
            try:
                return load_index(str(target), descriptors=descriptors), target, True
            except ValueError as err:  # a damaged cache entry is rebuilt, not trusted
                log.warning("rebuilding damaged eval-index cache %s: %s", target, err)
        write_index(source, str(target), name, params, fmt, verify, workers)
    return load_index(str(target), descriptors=descriptors), target, False


def concat_indexes(tables: list[pa.Table]) -> pa.Table:
    """Several indexes as one table (shared columns; variant/descriptor columns null-filled)."""
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in INDEX_COLUMNS})
    extra = {"variant_hashes": pa.list_(pa.string()), "descriptor": pa.binary(), "fine_codes": pa.binary()}
    names = list(INDEX_COLUMNS) + [c for c in extra if any(c in t.column_names for t in tables)]
    parts = []
    for t in tables:
        cols = {}
        for c in names:
            if c in t.column_names:
                cols[c] = t.column(c).cast(extra.get(c, pa.string()))
            else:
                cols[c] = pa.nulls(t.num_rows, extra[c])
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)

