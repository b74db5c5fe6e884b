"""Blurring given bounding boxes (faces) in the stored picture: DataComp's `face_bboxes`, img2dataset's `bbox_col`.

A box is ``[x_min, y_min, x_max, y_max]`` relative (0-1) to the picture **as stored**, before EXIF orientation: that
is the frame img2dataset decodes in (OpenCV ignores the orientation tag) and so the frame of DataComp's face boxes,
which were detected on its img2dataset downloads. curate shows pictures upright, so boxes are turned with the
orientation first (:func:`displayed_boxes`).

The blur follows the ImageNet face obfuscation recipe (Yang et al. 2022, which img2dataset cites): each box is grown
by 10% of its larger side on every side, and the picture and the boxes' mask are both Gaussian-blurred with sigma =
10% of the largest box's larger side, then mixed by the blurred mask (soft edges, no visible rectangle). Like
img2dataset it is applied at the output resolution (after resizing, before padding), so its cost does not grow with
the source's size; unlike img2dataset 1.47, whose move to albumentations passes only a kernel size (OpenCV then
derives sigma ~0.3 x the intended one), sigma is the recipe's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]

#: How far past 0-1 a coordinate may be before the value counts as malformed (detectors overshoot a little).
_SLACK = 0.05
#: Boxes per row accepted: more is not a face list (a row of garbage must not cost minutes of blurring).
MAX_BOXES = 256


class BadBoxes(ValueError):
    """The row's box value cannot be read as a list of relative [x_min, y_min, x_max, y_max] boxes."""


def parse_boxes(value: Any) -> list[Box]:
    """The boxes of one row's value: a list of 4-number lists (or its JSON text); None or [] = no boxes.

    Coordinates a little outside 0-1 are clipped; anything else malformed raises BadBoxes (a privacy measure must
    not be skipped silently)."""
    if value is None:
        return []
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError as err:
            raise BadBoxes(f"not JSON: {value[:80]!r}") from err
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise BadBoxes(f"expected a list of boxes, got {type(value).__name__}")
    if len(value) > MAX_BOXES:
        raise BadBoxes(f"{len(value)} boxes, more than {MAX_BOXES}")
    boxes: list[Box] = []
    for box in value:
        if (not isinstance(box, Sequence) or isinstance(box, str | bytes) or len(box) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise BadBoxes(f"a box must be 4 finite numbers [x_min, y_min, x_max, y_max], got {str(box)[:80]}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if min(x0, y0, x1, y1) < -_SLACK or max(x0, y0, x1, y1) > 1 + _SLACK or x1 < x0 or y1 < y0:
            raise BadBoxes(f"box {[x0, y0, x1, y1]} is not [x_min, y_min, x_max, y_max] relative to the picture (0-1)")
        boxes.append((min(max(x0, 0.0), 1.0), min(max(y0, 0.0), 1.0), min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0)))
    return boxes


def displayed_boxes(boxes: Sequence[Box], orientation: int) -> list[Box]:
    """Boxes relative to the stored picture -> relative to the picture shown with EXIF `orientation` (1-8)."""

    def point(x: float, y: float) -> tuple[float, float]:
        return {1: (x, y), 2: (1 - x, y), 3: (1 - x, 1 - y), 4: (x, 1 - y),
                5: (y, x), 6: (1 - y, x), 7: (1 - y, 1 - x), 8: (y, 1 - x)}[orientation]

    turned = []
    for x0, y0, x1, y1 in boxes:
        (ax, ay), (bx, by) = point(x0, y0), point(x1, y1)
        turned.append((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
    return turned


def blur_boxes(img: Image.Image, boxes: Sequence[Box]) -> Image.Image:
    """`img` with `boxes` (in its own pixels: x0, y0, x1, y1) blurred; unchanged without boxes.

    Only the region the blur reaches is processed (the boxes grown by the blur's reach), so a small face in a
    large picture costs little."""
    if not boxes:
        return img
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    width, height = img.size
    largest = max(max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes)
    sigma = 0.1 * largest
    if sigma < 0.5:  # boxes of a pixel or two: nothing a blur can hide is left at this size; cover them
        sigma = 0.5
    reach = int(math.ceil(4 * sigma))
    grown = []
    for x0, y0, x1, y1 in boxes:
        pad = 0.1 * max(x1 - x0, y1 - y0)
        grown.append((max(0, int(x0 - pad)), max(0, int(y0 - pad)),
                      min(width, int(math.ceil(x1 + pad))), min(height, int(math.ceil(y1 + pad)))))
    # the region where the blurred mask is not zero, with room for the image blur's own reach around it
    left = max(0, min(g[0] for g in grown) - 2 * reach)
    top = max(0, min(g[1] for g in grown) - 2 * reach)
    right = min(width, max(g[2] for g in grown) + 2 * reach)
    bottom = min(height, max(g[3] for g in grown) + 2 * reach)
    if right <= left or bottom <= top:
        return img
    import cv2

    region = np.asarray(img.crop((left, top, right, bottom)), dtype=np.float32)
    mask = np.zeros(region.shape[:2], np.float32)
    for x0, y0, x1, y1 in grown:
        mask[max(0, y0 - top):max(0, y1 - top), max(0, x0 - left):max(0, x1 - left)] = 1.0
    soft = _gaussian(mask, sigma)
    mixed = _gaussian(region, sigma)
    mixed -= region  # region + (blurred - region) * soft, in place
    mixed *= soft[:, :, None] if region.ndim == 3 else soft
    mixed += region
    out = img.copy()
    out.paste(Image.fromarray(cv2.convertScaleAbs(mixed), img.mode), (left, top))  # rounds and saturates to 0-255
    return out


def _gaussian(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of float32 `values`. A wide one (sigma >= 6 px) is computed on a copy reduced by about sigma / 3
    (area averaging), blurred by what is left of sigma and enlarged back (bilinear): within 1 grey level of the
    exact blur (mean 0.02-0.26 on a photo and on noise at sigma 7-40), and 3-25x cheaper (an 80 px face at 512 px
    has sigma 8; the exact blur of its region cost more than decoding and resizing the whole image)."""
    import cv2

    factor = int(sigma // 3)
    if factor < 2:
        return cv2.GaussianBlur(values, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    height, width = values.shape[:2]
    small = cv2.resize(values, (max(1, round(width / factor)), max(1, round(height / factor))),
                       interpolation=cv2.INTER_AREA)
    # the area reduction and the bilinear enlargement blur a little by themselves: take that out of sigma
    rest = math.sqrt(max(sigma**2 - factor**2 / 4, (0.5 * factor) ** 2)) / factor
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=rest, sigmaY=rest, borderType=cv2.BORDER_REFLECT)
    enlarged = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    return enlarged if enlarged.ndim == values.ndim else enlarged[:, :, None]
