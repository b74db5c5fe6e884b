"""The sink (config section `write`): turns one finished partition into its output files.

It is engine, not a stage: it filters nothing, adds no columns and runs after every stage on all of a
partition's rows. Its `requires` is what the runner checks before it, like a stage's.

Per partition (all written atomically, named by partition id, so a task that runs twice rewrites identical files):
- `curated/part-NNNNN.parquet`: kept rows, metadata only (no image bytes, no embeddings);
- `rejected/part-NNNNN.parquet`: failed and rejected rows with `reject_stage`/`reject_reason`, no bytes;
- `embeddings/part-NNNNN.parquet`: `key` + every `*_embedding` column, when a stage produced them;
- `shards/{prefix}-NNNNN.tar`: the kept samples, the partition's final shard(s) (see pipeline/shards.py).
Paths come from pipeline/layout.py.

At finalize the client makes the metadata files agree on their extra columns (:func:`conform_extra_columns`: a
partition types the input's extra fields from its own rows) and writes the shards' dataset card
(:func:`write_dataset_card`), both from what each partition reports in its done marker (:class:`PartitionOutputs`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.pipeline import columns as C
from curate.pipeline import shards, storage, tario
from curate.pipeline.configspec import ConfigError, option
from curate.pipeline.layout import RunLayout

EMBEDDING_SUFFIX = "_embedding"


@dataclass(frozen=True)
class WriteConfig:
    enabled: bool = option(True, help="Write WebDataset tar shards (Parquet metadata and stats are always written).")
    shard_prefix: str = option("shard", help="Shard file name prefix: shards/{prefix}-{00000..N}.tar.")
    shard_samples: int = option(10000, help="Most samples per WebDataset shard. Each partition writes its own shards (ceil(input.shard_size / shard_samples) at most), so shards hold what a partition kept: fewer where rows were turned down.", range=(1, None))
    shard_bytes: int = option(0, help="Also close a shard before it would exceed this many bytes, while the partition has shards left (0 = no byte limit).",
                              range=(0, None))
    parquet_compression: str = option("zstd", help="Parquet codec for curated/rejected metadata (zstd, snappy, gzip, none).")

    def validate(self, key_path: str) -> None:
        if self.parquet_compression not in ("zstd", "snappy", "gzip", "none", "lz4", "brotli"):
            raise ConfigError(f"{key_path}.parquet_compression",
                              f"expected one of zstd, snappy, gzip, lz4, brotli, none, got {self.parquet_compression!r}")
        if "/" in self.shard_prefix or not self.shard_prefix:
            raise ConfigError(f"{key_path}.shard_prefix", f"expected a non-empty file name prefix, got {self.shard_prefix!r}")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return None
    return value


def write_parquet(path: str, table: pa.Table, config: WriteConfig) -> None:
    """One metadata Parquet file, atomically (the workers' writes and the client's conform step write alike)."""
    compression = None if config.parquet_compression == "none" else config.parquet_compression
    with storage.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)


def extra_fields(*schemas: pa.Schema) -> str:
    """The columns beyond the known row columns (first seen first), as a serialized Arrow schema in base64 (for the
    done marker: the client makes them agree across partitions, see :func:`conform_extra_columns`)."""
    known = set(C.known_schema().names)
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for field in schema:
            if field.name not in known and field.name not in fields:
                fields[field.name] = field
    return base64.b64encode(pa.schema(list(fields.values())).serialize().to_pybytes()).decode("ascii")


def read_extra_fields(encoded: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


def file_extra_fields(path: str) -> pa.Schema:
    """The extra columns of a metadata file, from its footer."""
    with fsspec.open(path, "rb") as f:
        return read_extra_fields(extra_fields(pq.read_schema(f)))


@dataclass(frozen=True)
class PartitionOutputs:
    """What one partition wrote, for its done marker."""

    counters: dict[str, int]  # for stats
    shards: list[shards.ShardInfo]  # for the manifest
    extra_columns: str  # extra_fields() of its metadata files: the client makes them agree (conform_extra_columns)
    image_exts: list[str]  # image members of its shards (jpg, png, webp): the shards' dataset card names them


class PartitionWriter:
    """Writes a partition's outputs; one per worker thread, like a stage instance."""

    #: Name of the sink in stats (`stages.write`) and in `reject_stage` of rows that reach it without image bytes.
    name = "write"

    def __init__(self, config: WriteConfig, layout: RunLayout, partition_rows: int) -> None:
        self.config = config
        self.layout = layout
        #: Shards a partition may write (numbers reserved per partition, so names never depend on other partitions).
        self.pieces = shards.pieces_per_partition(partition_rows, config.shard_samples)

    @staticmethod
    def requires(config: WriteConfig) -> tuple[str, ...]:
        """Shards need image bytes; Parquet metadata alone needs nothing (read before any writer exists)."""
        return (C.IMAGE,) if config.enabled else ()

    def write_partition(self, partition_id: int, table: pa.Table) -> PartitionOutputs:
        """Write every output file of one partition; `table` holds all its rows (kept, failed, rejected)."""
        table = table.sort_by(C.KEY)
        kept_mask = pc.equal(table.column(C.STATUS), C.STATUS_SUCCESS)
        kept = table.filter(kept_mask)
        rejected = table.filter(pc.invert(kept_mask))
        if kept.num_rows and C.IMAGE in kept.column_names:
            kept = self._fill_sha256(kept)
        embedding_cols = [c for c in table.column_names if c.endswith(EMBEDDING_SUFFIX)]
        metadata = C.conform(kept.drop_columns(embedding_cols))
        rejected_metadata = C.conform(rejected.drop_columns(embedding_cols))
        write_parquet(self.layout.curated(partition_id), metadata, self.config)
        write_parquet(self.layout.rejected(partition_id), rejected_metadata, self.config)
        if embedding_cols:
            scored = table.filter(pc.is_valid(table.column(embedding_cols[0])))
            write_parquet(self.layout.embeddings(partition_id), scored.select([C.KEY, *embedding_cols]), self.config)
        written: list[shards.ShardInfo] = []
        samples = list(self._samples(kept, metadata)) if self.config.enabled else []
        if self.config.enabled:
            pieces = shards.split(samples, self.pieces, self.config.shard_samples, self.config.shard_bytes)
            for j, piece in enumerate(pieces):
                name = shards.shard_name(self.config.shard_prefix, partition_id * self.pieces + j)
                written.append(shards.write_shard(self.layout.shard(name), piece))
        counters = {"curated_rows": metadata.num_rows, "rejected_rows": rejected.num_rows,
                    "tar_samples": sum(info.samples for info in written)}
        return PartitionOutputs(counters, written, extra_fields(metadata.schema, rejected_metadata.schema),
                                sorted({sample.image_ext for sample in samples}))

    @staticmethod
    def _fill_sha256(kept: pa.Table) -> pa.Table:
        """sha256 of the bytes written, where an upstream stage did not already record it."""
        images = kept.column(C.IMAGE).to_pylist()
        current = kept.column("sha256").to_pylist() if "sha256" in kept.column_names else [None] * len(images)
        filled = [cur or (hashlib.sha256(img).hexdigest() if img is not None else None)
                  for cur, img in zip(current, images, strict=True)]
        return C.set_column(kept, "sha256", filled)

    @staticmethod
    def _samples(kept: pa.Table, metadata: pa.Table) -> Iterator[tario.Sample]:
        # The runner has failed every row without image bytes (`requires`), so every kept row has them.
        images = kept.column(C.IMAGE).to_pylist() if kept.num_rows else []
        exts = kept.column(C.IMAGE_EXT).to_pylist() if C.IMAGE_EXT in kept.column_names else ["jpg"] * kept.num_rows
        for row, image, ext in zip(metadata.to_pylist(), images, exts, strict=True):
            meta = {k: _json_value(v) for k, v in row.items() if not C.is_internal(k)}
            yield tario.Sample(
                key=row[C.KEY],
                image=image,
                image_ext=ext or "jpg",
                caption=row.get(C.CAPTION) or "",
                meta_json=json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"),
            )


# -- one schema for all partitions -------------------------------------------------------------------------------

def _common_type(types: list[pa.DataType]) -> pa.DataType:
    """The type every partition's column can take without losing a value."""
    found = [t for t in types if not pa.types.is_null(t)]
    if not found:
        return pa.null()
    if all(t == found[0] for t in found):
        return found[0]
    if all(pa.types.is_integer(t) for t in found):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in found):
        return pa.float64()
    return pa.string()


def unify_extra_columns(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema of extra columns for every partition: the union of theirs, first seen first."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for field in schema:
            types.setdefault(field.name, []).append(field.type)
    return pa.schema([pa.field(name, _common_type(found)) for name, found in types.items()])


def _as_type(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray | pa.Array:
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. a struct to text: its values' JSON
        return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                         for v in column.to_pylist()], target)


#: Files conformed at once (I/O bound: on object storage each is a few requests).
CONFORM_THREADS = 16


def conform_extra_columns(paths: list[str], extras: list[pa.Schema], config: WriteConfig) -> int:
    """Rewrite the metadata files whose extra columns differ from the run's union, so that the folders read as one
    dataset (pyarrow, pandas, polars, DuckDB and HF datasets refuse a column that is a number in one file and text,
    null-typed or missing in another). `extras`: each file's extra columns (from its done marker). The known row
    columns are typed alike everywhere already (`columns.conform`). Returns the number of files rewritten."""
    from concurrent.futures import ThreadPoolExecutor

    unified = unify_extra_columns(extras)
    candidates = [path for path, own in zip(paths, extras, strict=True) if not own.equals(unified)]
    if not candidates:
        return 0
    with ThreadPoolExecutor(min(CONFORM_THREADS, len(candidates))) as pool:
        return sum(pool.map(lambda path: _conform_file(path, unified, config), candidates))


def _conform_file(path: str, unified: pa.Schema, config: WriteConfig) -> bool:
    if not storage.exists(path) or file_extra_fields(path).equals(unified):
        return False  # the last: conformed by an earlier finalize of this run (markers keep the types as written)
    with fsspec.open(path, "rb") as f:
        table = pq.read_table(f)
    known = [name for name in table.column_names if name in C.known_schema().names]
    arrays = [table.column(name) for name in known]
    for field in unified:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, field.type))
        elif table.schema.field(field.name).type == field.type:
            arrays.append(table.column(field.name))
        else:
            arrays.append(_as_type(table.column(field.name), field.type))
    schema = pa.schema([table.schema.field(name) for name in known] + list(unified))
    write_parquet(path, pa.Table.from_arrays(arrays, schema=schema), config)
    return True


# -- the shards' dataset card ---------------------------------------------------------------------------------

DATASET_CARD = "README.md"


def _hf_dtype(kind: pa.DataType) -> str | None:
    """Hugging Face `datasets` dtype of a JSON value of this Arrow type; None: not expressible as one value type."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_integer(kind):
        return str(kind)
    if pa.types.is_floating(kind):
        return f"float{kind.bit_width}"
    if pa.types.is_null(kind):
        return "null"
    return None


def dataset_card(image_exts: list[str], extras: pa.Schema) -> str:
    """The shards folder's README.md: a Hugging Face dataset card whose `dataset_info.features` give every member's
    type. `datasets.load_dataset(SHARDS_FOLDER)` reads it; without it, `datasets` types each `.json` field from the
    first samples it sees, and a field null there (`exif`, most often) fails the load when a later sample has one.
    Nested extra fields have no such one-line type and are left out (`datasets` then skips them)."""
    lines = ["---", "dataset_info:", "  features:"]
    lines += [f"  - name: {ext}\n    dtype: image" for ext in image_exts or ["jpg"]]
    lines += ["  - name: txt", "    dtype: string", "  - name: json", "    struct:"]
    fields = [f for f in C.known_schema() if not C.is_internal(f.name)] + list(extras)
    for field in fields:
        dtype = _hf_dtype(field.type)
        if dtype is not None:
            lines += [f"    - name: {json.dumps(field.name)}", f"      dtype: {dtype}"]
    lines += ["---", "", "# curate shards", "",
              "WebDataset shards written by `curate run`: `{key}.jpg|png|webp` (the image), `{key}.txt` (the caption) "
              "and `{key}.json` (the row's metadata). `sizes.json` gives each shard's sample count (open_clip_train "
              "reads it). The front matter above gives every member's type, for `datasets.load_dataset(\"<this "
              "folder>\")`.", ""]
    return "\n".join(lines)


def write_dataset_card(shards_dir: str, image_exts: list[str], extras: pa.Schema) -> None:
    storage.write_bytes(f"{shards_dir}/{DATASET_CARD}", dataset_card(image_exts, extras).encode("utf-8"))
