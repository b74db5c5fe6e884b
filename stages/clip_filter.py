"""clip_filter stage (skeleton config; see issue 7)."""

from __future__ import annotations

from dataclasses import dataclass

from curate.pipeline.configspec import option


@dataclass(frozen=True)
class ClipConfig:
    enabled: bool = option(True, help="Run the CLIP similarity filter.")
    model: str = option("ViT-B-32", help="open_clip model name.")
    model_config: str = option("", help="Extra open_clip model config JSON to register first (its file stem becomes a model name).", path=True)
    pretrained: str = option("laion2b_s34b_b79k", help="open_clip pretrained tag, or a local checkpoint path; '' = random init (warns).")
    threshold: float = option(0.28, help="Reject rows whose image-caption cosine similarity is below this.", range=(-1, 1))
    top_fraction: float | None = option(None, help="Instead of threshold: keep this fraction of rows with the highest score (two-pass).", range=(0, 1), open_low=True)
