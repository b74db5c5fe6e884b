"""What the download stage adds to the run report: the image-size histogram and each card's image size."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from curate.pipeline.report import Metric, ReportParts

_SIZE_COLUMNS = ("original_width", "original_height", "width", "height")


class ShorterSide(Metric):
    """min(original width, original height), falling back to the written size where the original is unknown."""

    def values(self, table: pa.Table) -> np.ndarray:
        def side(w: str, h: str) -> np.ndarray:
            wc, hc = table.column(w), table.column(h)
            if pa.types.is_null(wc.type) or pa.types.is_null(hc.type):
                return np.full(table.num_rows, np.nan)
            wa = wc.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)
            ha = hc.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)
            return np.minimum(wa, ha)

        original = side("original_width", "original_height")
        written = side("width", "height")
        merged = np.where(np.isnan(original), written, original)
        return merged[np.isfinite(merged)]


def _size_fact(row: dict[str, Any]) -> list[tuple[str, str]]:
    w, h = row.get("original_width") or row.get("width"), row.get("original_height") or row.get("height")
    return [("size", f"{w}×{h}")] if w and h else []


def report_parts(section: dict[str, Any]) -> ReportParts:
    size = ShorterSide("Image size", "shorter side of the original image, px", _SIZE_COLUMNS, integer=True,
                       clip_upper_quantile=0.995)
    return ReportParts(metrics=(size,), columns=_SIZE_COLUMNS, facts=_size_fact)
