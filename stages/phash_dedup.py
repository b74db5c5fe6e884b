"""phash_dedup stage (skeleton config; see issue 6)."""

from __future__ import annotations

from dataclasses import dataclass

from curate.pipeline.configspec import option


@dataclass(frozen=True)
class EvalSetSource:
    path: str = option("", help="Eval-set source: image folder, parquet, webdataset tars or a HF dataset saved to disk.", path=True)
    name: str = option("", help="Eval-set name (defaults to the folder/file name).")


@dataclass(frozen=True)
class DedupConfig:
    enabled: bool = option(True, help="Run pHash dedup against eval sets.")
    indexes: tuple[str, ...] = option((), help="Eval indexes (INDEX.parquet from `curate hash-evalset`).")
    eval_sets: tuple[EvalSetSource, ...] = option((), help="Eval-set sources hashed at start-up (cached).")
    threshold: int = option(8, help="Max Hamming distance (of 64 bits) for a pHash match.", range=(0, 64))
