"""write stage: the sink. Turns one finished partition into its output files.

Per partition (all written atomically, named by partition id, so a task that runs twice rewrites identical files):
- `curated/part-NNNNN.parquet`: kept rows, metadata only (no image bytes, no embeddings);
- `rejected/part-NNNNN.parquet`: failed and rejected rows with `reject_stage`/`reject_reason`, no bytes;
- `embeddings/part-NNNNN.parquet`: `key` + every `*_embedding` column, when a stage produced them;
- `_work/parts/part-NNNNN.tar`: kept samples, repacked later into `shards/` (see pipeline/shards.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.pipeline import columns as C
from curate.pipeline import shards, storage
from curate.pipeline.configspec import option
from curate.pipeline.stage import Stage

EMBEDDING_SUFFIX = "_embedding"


@dataclass(frozen=True)
class WriteConfig:
    enabled: bool = option(True, help="Write WebDataset tar shards (Parquet metadata and stats are always written).")
    shard_prefix: str = option("shard", help="Shard file name prefix: shards/{prefix}-{00000..N}.tar.")
    shard_samples: int = option(10000, help="Target samples per WebDataset shard.", range=(1, None))
    shard_bytes: int = option(0, help="Also close a shard before it exceeds this many bytes (0 = no byte limit).",
                              range=(0, None))
    parquet_compression: str = option("zstd", help="Parquet codec for curated/rejected metadata (zstd, snappy, gzip, none).")

    def validate(self, key_path: str) -> None:
        from curate.pipeline.configspec import ConfigError

        if self.parquet_compression not in ("zstd", "snappy", "gzip", "none", "lz4", "brotli"):
            raise ConfigError(f"{key_path}.parquet_compression",
                              f"expected one of zstd, snappy, gzip, lz4, brotli, none, got {self.parquet_compression!r}")
        if "/" in self.shard_prefix or not self.shard_prefix:
            raise ConfigError(f"{key_path}.shard_prefix", f"expected a non-empty file name prefix, got {self.shard_prefix!r}")


def part_name(partition_id: int, suffix: str) -> str:
    return f"part-{partition_id:05d}{suffix}"


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return None
    return value


class WriteStage(Stage[WriteConfig]):
    name = "write"
    requires = (C.KEY, C.STATUS)
    adds = ()

    def process(self, table: pa.Table) -> pa.Table:  # the sink does not transform rows
        return table

    def write_partition(self, partition_id: int, table: pa.Table) -> dict[str, int]:
        """Write every output file of one partition. `table` holds all its rows (kept, failed, rejected)."""
        out = self.context.output_path
        table = table.sort_by(C.KEY)
        kept_mask = pc.equal(table.column(C.STATUS), C.STATUS_SUCCESS)
        kept = table.filter(kept_mask)
        rejected = table.filter(pc.invert(kept_mask))
        if kept.num_rows and C.IMAGE in kept.column_names:
            kept = self._fill_sha256(kept)
        embedding_cols = [c for c in table.column_names if c.endswith(EMBEDDING_SUFFIX)]
        compression = None if self.config.parquet_compression == "none" else self.config.parquet_compression

        def write_parquet(path: str, t: pa.Table) -> None:
            with storage.atomic_path(path) as tmp:
                pq.write_table(t, tmp, compression=compression)

        metadata = C.conform(kept.drop_columns(embedding_cols))
        write_parquet(f"{out}/curated/{part_name(partition_id, '.parquet')}", metadata)
        write_parquet(f"{out}/rejected/{part_name(partition_id, '.parquet')}",
                      C.conform(rejected.drop_columns(embedding_cols)))
        if embedding_cols:
            scored = table.filter(pc.is_valid(table.column(embedding_cols[0])))
            write_parquet(f"{out}/embeddings/{part_name(partition_id, '.parquet')}",
                          scored.select([C.KEY, *embedding_cols]))
        samples = 0
        if self.config.enabled:
            samples = shards.write_samples(
                f"{self.context.work_path}/parts/{part_name(partition_id, '.tar')}",
                self._samples(kept, metadata),
            )
        return {"curated_rows": metadata.num_rows, "rejected_rows": rejected.num_rows, "tar_samples": samples}

    @staticmethod
    def _fill_sha256(kept: pa.Table) -> pa.Table:
        """sha256 of the bytes written, where an upstream stage did not already record it."""
        images = kept.column(C.IMAGE).to_pylist()
        current = kept.column("sha256").to_pylist() if "sha256" in kept.column_names else [None] * len(images)
        filled = [cur or (hashlib.sha256(img).hexdigest() if img is not None else None)
                  for cur, img in zip(current, images, strict=True)]
        return C.set_column(kept, "sha256", filled)

    def _samples(self, kept: pa.Table, metadata: pa.Table):  # type: ignore[no-untyped-def]
        images = kept.column(C.IMAGE).to_pylist() if C.IMAGE in kept.column_names else [None] * kept.num_rows
        exts = kept.column(C.IMAGE_EXT).to_pylist() if C.IMAGE_EXT in kept.column_names else ["jpg"] * kept.num_rows
        for row, image, ext in zip(metadata.to_pylist(), images, exts, strict=True):
            if image is None:  # the runner fails image-less rows before they can be kept
                raise RuntimeError(f"row {row[C.KEY]} is kept but has no image bytes")
            meta = {k: _json_value(v) for k, v in row.items() if k not in C.INTERNAL_COLUMNS}
            yield shards.Sample(
                key=row[C.KEY],
                image=image,
                image_ext=ext or "jpg",
                caption=row.get(C.CAPTION) or "",
                meta_json=json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"),
            )
