"""clean_captions stage (skeleton config; see issue 5)."""

from __future__ import annotations

from dataclasses import dataclass

from curate.pipeline.configspec import option


@dataclass(frozen=True)
class CaptionsConfig:
    enabled: bool = option(True, help="Run caption cleaning.")
    min_chars: int = option(5, help="Reject captions shorter than this after cleaning.", range=(0, None))
    max_chars: int = option(1000, help="Reject captions longer than this after cleaning.", range=(1, None))
    languages: tuple[str, ...] = option(("en",), help="Allowed ISO 639-1 languages; empty list = any language.")
