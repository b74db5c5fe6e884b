"""write stage (skeleton config)."""

from __future__ import annotations

from dataclasses import dataclass

from curate.pipeline.configspec import option


@dataclass(frozen=True)
class WriteConfig:
    enabled: bool = option(True, help="Write WebDataset tar shards (Parquet metadata and stats are always written).")
    shard_prefix: str = option("shard", help="Shard file name prefix: shards/{prefix}-{00000..N}.tar.")
    shard_samples: int = option(10000, help="Target samples per WebDataset shard.", range=(1, None))
    shard_bytes: int = option(0, help="Also close a shard once it holds this many bytes (0 = no byte limit).", range=(0, None))
