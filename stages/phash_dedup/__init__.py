"""phash_dedup stage: pHash near-duplicates against eval sets (and within the corpus), the eval-set index, the
dedup report."""

from curate.stages.phash_dedup.stage import (
    DedupConfig,
    EvalSetSource,
    PhashDedupStage,
    uniform_collision_rate,
)

__all__ = ["DedupConfig", "EvalSetSource", "PhashDedupStage", "uniform_collision_rate"]
