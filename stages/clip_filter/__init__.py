"""clip_filter stage: image-caption similarity with open_clip (GPU, CPU fallback), by threshold or top fraction."""

from curate.stages.clip_filter.stage import ClipConfig, ClipFilterStage

__all__ = ["ClipConfig", "ClipFilterStage"]
