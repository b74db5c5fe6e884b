"""Near-duplicate verification on top of pHash: candidate variants, a second signal, flat-image guard.

pHash alone misses crops, small rotations, text overlays and mirrors, and it collides on
flat-background images (sketches, text on a colour, cut-out products), whose 32x32 DCT is dominated
by the silhouette. The dedup stage therefore uses pHash only as a *candidate generator* at a looser
threshold, against the eval image's own hash plus the extra hashes of :func:`candidate_hashes`
(mirror and crops of the eval image), and confirms each candidate with :func:`verify`, which compares
two compact :func:`descriptor` blobs:

* **keypoints**: up to 200 ORB keypoints (FAST corners + 256-bit rotated BRIEF) of the image scaled
  to 320 px on its longest side, matched and checked for one similarity transform (RANSAC). This
  survives crops, rotations, rescales, overlays and colour shifts; flat-background look-alikes fail
  it, as their few corners do not agree.
* **thumbnail**: a 64 px grayscale thumbnail, compared after alignment (the RANSAC transform, the
  identity or a mirror, refined by ECC) by normalised cross-correlation: per 4x4 block and over the
  whole overlap, of high-passed and of plain pixels. It carries blurred and mirrored copies, where
  keypoints are scarce or not mirror-invariant.

The decision is a logistic model (:data:`MODEL`) over these measurements, the low-information flag
and the pHash distance, fitted by ``benchmarks/near_dup_eval.py --fit`` on generated near-duplicates
*and* on unrelated pairs posing as pHash collisions at any distance, so that a small pHash distance
alone never confirms a pair (at LAION scale unrelated collisions are common). Pairs with nothing to
compare (no agreeing keypoints and no detailed thumbnail block) are refused before the model.

Everything is offline (OpenCV, Pillow, numpy). A CLIP image-embedding cosine would be the natural
third signal where real weights are available; it is not used here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

#: Bumped whenever the descriptor bytes change; an index built with another version must be rebuilt
#: (it is stored in the index metadata). Refitting :data:`MODEL` alone does not change it.
#: nd4: eval descriptors also carry the mirrored picture's keypoints; the index carries the cascade's fine codes.
#: nd5: downscaling reduces by whole factors first (Pillow ``reducing_gap=3``): thumbnails within ~0.1 gray
#: level of nd4's, descriptors ~2 ms cheaper.
DESCRIPTOR_VERSION = "nd5-orb200@320-thumb64-objcrop-median3-mirrorkp-gap3+fine256"

_MAGIC = b"ND1"
# magic, flags, original width/height, thumbnail width/height, keypoint image width/height, n keypoints
_HEADER = struct.Struct("<3sBHHBBHHH")
_FLAG_LOW_INFO = 1
_FLAG_MIRROR_KEYPOINTS = 2  # eval side: a second keypoint set, of the mirrored picture, follows
_COUNT = struct.Struct("<H")

_KEYPOINT_SIDE = 320  # longest side of the image ORB runs on
_MAX_KEYPOINTS = 200  # 36 bytes each (2 x float16 position + 32-byte descriptor)
_THUMB_SIDE = 64
_GRID = 4  # keypoints are spread over a 4x4 grid; the dense check compares 4x4 blocks
_ORB_DESCRIPTOR_BYTES = 32

# Measurement parameters (the decision itself is MODEL, fitted by benchmarks/near_dup_eval.py --fit).
_RATIO = 0.8  # Lowe ratio test on Hamming distances
_RANSAC_PX = 4.0  # reprojection tolerance at the 320 px keypoint scale
_MAX_ROTATION_DEG = 20.0  # keypoint transforms turning further are not near-duplicates
_BACKGROUND_TOLERANCE = 16  # gray levels from the border colour that still count as background
_CONTENT_CROP_MAX_AREA = 0.6  # crop to the object when its bounding box covers less of the image
_MIN_SIDE = 64  # images smaller than this (px) carry too little to trust pHash: low-information
_MIN_BLOCK_DETAIL = 2.0  # high-pass std (gray levels) for a block to count as carrying detail
_MIN_DETAIL_BLOCKS = 3
# A keypoint alignment whose aligned thumbnails agree this much (median block and global NCC of the high-passed
# pixels) is kept without also trying the identity and mirror starts (two ECC alignments, ~2 ms per verify call),
# for pairs of detailed pictures (benchmarks/dedup_conclusive.py: no decision changed on the four generators)
_CONCLUSIVE_NCC = 0.9

# low_information(): share of near-flat pixels in the 64 px thumbnail, and contrast floor
_FLAT_GRADIENT = 6.0  # Sobel magnitude (0-255 gray levels per pixel) below which a pixel is flat
_LOW_INFO_FLAT_SHARE = 0.60
_LOW_INFO_MIN_STD = 12.0


def _gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale with transparency composited on white (cut-outs look as they are shown)."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return img.convert("L")


def _fit(img: Image.Image, side: int) -> Image.Image:
    """Resize so the longest side is `side` (aspect kept; never below 1 px)."""
    from PIL import Image

    w, h = img.size
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale < 1:
        # reducing_gap: a box reduction by a whole factor first, then Lanczos over >= 3x the target; within
        # ~0.1 gray level of Lanczos over the full picture at a fraction of its cost (~1 ms per call at 720 px)
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.resize(size, Image.Resampling.BICUBIC)


def _content_crop(gray: Image.Image) -> Image.Image:
    """The object of a cut-out: crop a flat border colour away when it takes up most of the picture.

    A small product on a large white page leaves it a few pixels in a 64 px thumbnail, where any two
    such pages look alike; compared at the object's own scale they do not.
    """
    import cv2

    arr = np.asarray(gray)
    if min(arr.shape) >= 16:  # JPEG ringing and speckles around the object must not widen the box
        arr = cv2.medianBlur(np.ascontiguousarray(arr), 3)
    arr = arr.astype(np.int16)
    h, w = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = int(np.median(border))
    if (np.abs(border - background) > _BACKGROUND_TOLERANCE).mean() > 0.2:  # no flat frame
        return gray
    rows = np.flatnonzero((np.abs(arr - background) > _BACKGROUND_TOLERANCE).any(axis=1))
    cols = np.flatnonzero((np.abs(arr - background) > _BACKGROUND_TOLERANCE).any(axis=0))
    if len(rows) == 0 or len(cols) == 0:
        return gray
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (bottom - top) * (right - left) > _CONTENT_CROP_MAX_AREA * h * w:
        return gray
    margin = max(1, round(0.03 * max(bottom - top, right - left)))
    return gray.crop((max(0, left - margin), max(0, top - margin), min(w, right + margin), min(h, bottom + margin)))


def _variant_images(img: Image.Image) -> list[Image.Image]:
    """The eval image, its mirror and crops of 90% / 81% of the area (centre, and the 4 corners at 81%)."""
    from PIL import ImageOps

    base = img.convert("RGB") if img.mode not in ("RGB", "L") else img
    w, h = base.size
    variants = [base, ImageOps.mirror(base)]
    for linear in (0.95, 0.9):  # 90% and 81% of the area, centred
        cw, ch = round(w * linear), round(h * linear)
        left, top = (w - cw) // 2, (h - ch) // 2
        variants.append(base.crop((left, top, left + cw, top + ch)))
    cw, ch = round(w * 0.9), round(h * 0.9)
    for left, top in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)):
        variants.append(base.crop((left, top, left + cw, top + ch)))
    return variants


def variant_codes(img: Image.Image, hash_size: int = 8) -> list[tuple[int, bytes]]:
    """(pHash, :func:`fine_code`) of the eval image and of each distinct variant, the image itself first.

    Variants whose pHash equals an earlier one are dropped, so entry ``k >= 1`` belongs to
    ``candidate_hashes(img)[k - 1]``. The fine code of the variant a candidate was found through is
    what the cascade's cheap check compares with the corpus image's fine code.
    """
    from curate.stages.phash_dedup.phash import phash_int

    if min(img.size) < 8:
        return [(phash_int(img.convert("RGB"), hash_size), fine_code(img))]
    out: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    for variant in _variant_images(img):
        value = phash_int(variant, hash_size)
        if value not in seen:
            seen.add(value)
            out.append((value, fine_code(variant)))
    return out


def candidate_hashes(img: Image.Image, hash_size: int = 8) -> list[int]:
    """Extra pHash values of an *eval* image that a near-duplicate is likely to land near.

    The mirror (pHash cannot see flips) and crops of 90% / 81% of the area (centre and the four
    corners at 81%), i.e. the framing a re-upload most often changes. Each is an int equal to
    ``int(str(imagehash.phash(variant, hash_size)), 16)``; duplicates of the main hash are dropped.
    """
    from curate.stages.phash_dedup.phash import phash_int

    if min(img.size) < 8:
        return []
    variants = _variant_images(img)
    main = phash_int(variants[0], hash_size)
    out: list[int] = []
    for variant in variants[1:]:
        value = phash_int(variant, hash_size)
        if value != main and value not in out:
            out.append(value)
    return out


#: Bytes of :func:`fine_code` (256 bits).
FINE_CODE_BYTES = 32
_FINE_SIDE = 32  # the fine code's DCT runs on a 32x32 gray image; pHash keeps 8x8 of it, this 16x16


def fine_code(img: Image.Image) -> bytes:
    """256-bit code of the 16x16 lowest DCT frequencies of a 32x32 grayscale image (bit = above median).

    pHash keeps the 8x8 lowest; two unrelated pictures that collide there (same layout, same tones)
    still differ in the next octave, where a copy does not. Comparing these codes is one XOR and a
    popcount, cheap enough to run on every pHash candidate of a 1M-item index (the cascade's first,
    cheap check); the descriptor's keypoints and thumbnail decide only what it leaves open.
    Cheap on the corpus side too: a box reduction and a 32x32 bilinear resize.
    """
    from PIL import Image
    from scipy.fftpack import dct

    gray = _gray(img)
    factor = min(gray.size) // (2 * _FINE_SIDE)
    if factor > 1:  # box reduction first: resizing a full-size picture to 32 px directly is slow
        gray = gray.reduce(factor)
    pixels = np.asarray(gray.resize((_FINE_SIDE, _FINE_SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
    coefficients = dct(dct(pixels, axis=0, norm="ortho"), axis=1, norm="ortho")[:16, :16].ravel()
    return np.packbits(coefficients > np.median(coefficients)).tobytes()


def _flat_share_and_std(thumb: np.ndarray) -> tuple[float, float]:
    import cv2

    gx = cv2.Sobel(thumb, cv2.CV_32F, 1, 0, ksize=3) / 4.0
    gy = cv2.Sobel(thumb, cv2.CV_32F, 0, 1, ksize=3) / 4.0
    magnitude = np.sqrt(gx * gx + gy * gy)
    return float((magnitude < _FLAT_GRADIENT).mean()), float(thumb.std())


def _thumb_array(gray: Image.Image) -> np.ndarray:
    return np.asarray(_fit(gray, _THUMB_SIDE), dtype=np.uint8)


def low_information(img: Image.Image) -> bool:
    """True for flat/uniform pictures (sketches, text on a colour, cut-outs on a plain background).

    Their pHash is dominated by the silhouette and collides with unrelated images of the same
    layout, so a pHash match alone must not be trusted for them. Criterion on the 64 px grayscale
    thumbnail: at least 60% of pixels with a Sobel gradient below 6 gray levels per pixel, or a
    gray-level standard deviation below 12; images under 64 px on their short side count as well.
    """
    return _is_low_info(img, _thumb_array(_gray(img)))


def _is_low_info(img: Image.Image, thumb: np.ndarray) -> bool:
    flat_share, std = _flat_share_and_std(thumb.astype(np.float32))
    return flat_share >= _LOW_INFO_FLAT_SHARE or std < _LOW_INFO_MIN_STD or min(img.size) < _MIN_SIDE


_NO_KEYPOINTS = np.zeros((0, 2), dtype=np.float16), np.zeros((0, _ORB_DESCRIPTOR_BYTES), dtype=np.uint8)


def _orb_detector() -> Any:
    import cv2

    return cv2.ORB_create(nfeatures=5 * _MAX_KEYPOINTS, fastThreshold=10, edgeThreshold=15, patchSize=15)


def _orb(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 positions (n, 2), uint8 ORB descriptors (n, 32)) of at most _MAX_KEYPOINTS spread keypoints."""
    # Detect all, describe only the spread subset: the same bytes as :func:`_orb_describing_all` (checked on 620
    # pictures and their mirrors; tests/test_nearduplicate.py), ~12% less ORB time.
    import cv2

    orb = _orb_detector()
    try:
        keypoints = orb.detect(work, None)
    except cv2.error:  # a sliver (5000 x 1 px -> 320 x 1): ORB's scale pyramid runs out of rows; no corners anyway
        return _NO_KEYPOINTS
    if not keypoints:
        return _NO_KEYPOINTS
    chosen = [keypoints[i] for i in _spread(keypoints, work.shape[1], work.shape[0])]
    for rank, keypoint in enumerate(chosen):
        keypoint.class_id = rank  # compute() may reorder keypoints (by pyramid level)
    described, descriptors = orb.compute(work, chosen)
    if descriptors is None or len(described) != len(chosen):
        return _orb_describing_all(work)  # compute() dropped a keypoint (never seen): keep the bytes as they were
    ordering = np.argsort([keypoint.class_id for keypoint in described], kind="stable")
    positions = np.array([described[i].pt for i in ordering], dtype=np.float16)
    return positions, np.ascontiguousarray(descriptors[ordering])


def _orb_describing_all(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`_orb` returns, the slow way: describe every detected keypoint, then keep the spread subset."""
    import cv2

    try:
        keypoints, descriptors = _orb_detector().detectAndCompute(work, None)
    except cv2.error:  # see _orb
        return _NO_KEYPOINTS
    if descriptors is None or not keypoints:
        return _NO_KEYPOINTS
    order = _spread(keypoints, work.shape[1], work.shape[0])
    positions = np.array([keypoints[i].pt for i in order], dtype=np.float16)
    return positions, np.ascontiguousarray(descriptors[order])


@dataclass(frozen=True)
class Prepared:
    """The cheap part of an image's :func:`descriptor`: what :func:`detail_agreement` needs, no keypoints yet."""

    flags: int
    gray: Image.Image  # grayscale, cropped to the object of a cut-out
    thumb: np.ndarray  # uint8 thumbnail of `gray`, longest side _THUMB_SIDE

    @property
    def low_info(self) -> bool:
        return bool(self.flags & _FLAG_LOW_INFO)


def prepare(img: Image.Image) -> Prepared:
    """Low-information flag, object crop and thumbnail of `img` (the first ~2 ms of :func:`descriptor`)."""
    gray = _gray(img)
    whole = _thumb_array(gray)
    flags = _FLAG_LOW_INFO if _is_low_info(img, whole) else 0
    cropped = _content_crop(gray)
    return Prepared(flags, cropped, whole if cropped is gray else _thumb_array(cropped))


def descriptor(img: Image.Image, with_mirror: bool = False, prepared: Prepared | None = None) -> bytes:
    """Compact second-signal descriptor of one image (about 7-11 KB; see module docstring).

    `with_mirror` (eval images): also the keypoints of the mirrored picture (about 7 KB more, on disk
    only), so a mirrored corpus copy can be confirmed by keypoints too: ORB descriptors are not
    mirror-invariant, and the corpus side stays one keypoint set per row. `prepared`: :func:`prepare`'s
    result for `img`, when the caller already has it.
    """
    prepared = prepared or prepare(img)
    flags, gray, thumb = prepared.flags, prepared.gray, prepared.thumb
    work = np.asarray(_fit(gray, _KEYPOINT_SIDE), dtype=np.uint8)
    positions, descriptors = _orb(work)
    extra = b""
    if with_mirror:
        flags |= _FLAG_MIRROR_KEYPOINTS
        mirror_positions, mirror_descriptors = _orb(np.ascontiguousarray(work[:, ::-1]))
        extra = _COUNT.pack(len(mirror_positions)) + mirror_positions.tobytes() + mirror_descriptors.tobytes()
    w, h = img.size
    header = _HEADER.pack(
        _MAGIC, flags, min(w, 65535), min(h, 65535), thumb.shape[1], thumb.shape[0],
        work.shape[1], work.shape[0], len(positions),
    )
    return header + thumb.tobytes() + positions.tobytes() + descriptors.tobytes() + extra


def _spread(keypoints: list, width: int, height: int) -> list[int]:
    """Indices of at most _MAX_KEYPOINTS keypoints, taken round-robin over a 4x4 grid by response.

    Keeping only the strongest corners lets one high-contrast region (an overlaid caption, a logo)
    take the whole budget; spreading them keeps evidence from the rest of the picture. Round-robin:
    rank 0 of every cell (cells in the order their first keypoint appears), then rank 1, ...; within a
    cell by response, ties by index. Vectorised (up to 1,000 keypoints per image).
    """
    n = len(keypoints)
    if n == 0:
        return []
    import cv2

    xy = cv2.KeyPoint_convert(keypoints).astype(np.float64)  # float32 positions, as kp.pt gives them
    response = np.array([kp.response for kp in keypoints], dtype=np.float64)
    cx = np.minimum(_GRID - 1, (xy[:, 0] * _GRID / width).astype(np.int64))
    cy = np.minimum(_GRID - 1, (xy[:, 1] * _GRID / height).astype(np.int64))
    cell = cy * _GRID + cx
    index = np.arange(n)
    by_cell = np.lexsort((index, -response, cell))  # cell, then strongest first, ties by index
    sorted_cells = cell[by_cell]
    group_start = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_cell] = index - np.repeat(group_start, np.diff(np.r_[group_start, n]))
    first_seen = np.full(_GRID * _GRID, n, dtype=np.int64)
    np.minimum.at(first_seen, cell, index)
    order = np.lexsort((first_seen[cell], rank))
    return order[:_MAX_KEYPOINTS].tolist()


@dataclass(frozen=True)
class _Parsed:
    low_info: bool
    thumb: np.ndarray  # uint8 (h, w)
    work_size: tuple[int, int]  # (w, h) of the keypoint image
    positions: np.ndarray  # float32 (n, 2) at the keypoint scale
    descriptors: np.ndarray  # uint8 (n, 32)
    mirror_positions: np.ndarray  # the mirrored picture's keypoints (eval side; empty when not stored)
    mirror_descriptors: np.ndarray


def _parse(blob: bytes) -> _Parsed:
    if len(blob) < _HEADER.size or blob[:3] != _MAGIC:
        raise ValueError(f"not a near-duplicate descriptor of version {DESCRIPTOR_VERSION}")
    _, flags, _, _, tw, th, ww, wh, n = _HEADER.unpack_from(blob)
    offset = _HEADER.size
    thumb = np.frombuffer(blob, dtype=np.uint8, count=tw * th, offset=offset).reshape(th, tw)
    offset += tw * th
    positions = np.frombuffer(blob, dtype=np.float16, count=2 * n, offset=offset).reshape(n, 2)
    offset += 4 * n
    descriptors = np.frombuffer(blob, dtype=np.uint8, count=_ORB_DESCRIPTOR_BYTES * n, offset=offset)
    offset += descriptors.size
    mirror_positions = np.zeros((0, 2), dtype=np.float32)
    mirror_descriptors = np.zeros((0, _ORB_DESCRIPTOR_BYTES), dtype=np.uint8)
    if flags & _FLAG_MIRROR_KEYPOINTS:
        (m,) = _COUNT.unpack_from(blob, offset)
        offset += _COUNT.size
        mirror_positions = np.frombuffer(blob, dtype=np.float16, count=2 * m, offset=offset).reshape(m, 2)
        offset += 4 * m
        mirror_descriptors = np.frombuffer(blob, dtype=np.uint8, count=_ORB_DESCRIPTOR_BYTES * m, offset=offset)
        offset += mirror_descriptors.size
        mirror_positions = mirror_positions.astype(np.float32)
        mirror_descriptors = mirror_descriptors.reshape(m, _ORB_DESCRIPTOR_BYTES)
    if offset != len(blob):
        raise ValueError("descriptor is truncated or has trailing bytes")
    return _Parsed(
        low_info=bool(flags & _FLAG_LOW_INFO),
        thumb=thumb,
        work_size=(ww, wh),
        positions=positions.astype(np.float32),
        descriptors=descriptors.reshape(n, _ORB_DESCRIPTOR_BYTES),
        mirror_positions=mirror_positions,
        mirror_descriptors=mirror_descriptors,
    )


def _keypoint_transform(
    eval_d: _Parsed, corpus_d: _Parsed, allow_mirror: bool = True
) -> tuple[np.ndarray | None, int, int]:
    """Similarity transform corpus->eval (keypoint scale) agreed by RANSAC, its inliers and the matches.

    Returns (matrix or None, distinct eval keypoints among the inliers, matches passing the ratio test).
    With `allow_mirror` and mirrored eval keypoints stored, the mirrored picture is tried too and the
    set with more inliers wins; its transform is turned back into eval coordinates (a reflection).
    """
    found = _match_set(eval_d.positions, eval_d.descriptors, corpus_d)
    if allow_mirror and len(eval_d.mirror_descriptors):
        matrix, inliers, matches = _match_set(eval_d.mirror_positions, eval_d.mirror_descriptors, corpus_d)
        if matrix is not None and inliers > found[1]:
            flip = np.array([[-1.0, 0.0, eval_d.work_size[0] - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
            found = ((flip @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2], inliers, matches)
    return found


def _match_set(
    eval_positions: np.ndarray, eval_descriptors: np.ndarray, corpus_d: _Parsed
) -> tuple[np.ndarray | None, int, int]:
    import cv2

    if len(eval_descriptors) < 2 or len(corpus_d.descriptors) < 2:
        return None, 0, 0
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = matcher.knnMatch(corpus_d.descriptors, eval_descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < _RATIO * p[1].distance]
    if len(good) < 6:
        return None, 0, len(good)
    src = corpus_d.positions[[m.queryIdx for m in good]]
    dst = eval_positions[[m.trainIdx for m in good]]
    matrix, inlier_mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=_RANSAC_PX, maxIters=2000, confidence=0.995
    )
    if matrix is None or inlier_mask is None:
        return None, 0, len(good)
    scale = float(np.hypot(matrix[0, 0], matrix[1, 0]))
    angle = abs(float(np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0]))))
    # a near-duplicate is neither a tiny detail of the other picture nor turned over ("u" vs "n")
    if not 0.33 <= scale <= 3.0 or angle > _MAX_ROTATION_DEG:
        return None, 0, len(good)
    # many-to-one matches onto a few corners are not evidence: count distinct eval keypoints
    inliers = {good[i].trainIdx for i in np.flatnonzero(inlier_mask.ravel())}
    return matrix, len(inliers), len(good)


def _highpass(thumb: np.ndarray) -> np.ndarray:
    """Zero-mean detail image: the flat background and global tone shifts carry no evidence."""
    import cv2

    img = thumb.astype(np.float32)
    return img - cv2.GaussianBlur(img, (0, 0), 3.0)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-6 else 0.0


def _block_scores(
    target_hp: np.ndarray, aligned_hp: np.ndarray, mask: np.ndarray, min_overlap: float = 0.4, min_cover: float = 0.7
) -> list[float]:
    """NCC of each 4x4 block that overlaps and carries detail in the eval image.

    Only blocks with detail, so a shared flat background cannot make two different cut-outs agree;
    callers take the median, so an overlaid caption or logo (a few blocks) cannot sink a true match.
    Computed from per-block masked sums (the verify hot path), in row-major block order.
    """
    if mask.sum() < min_overlap * mask.size:  # too little overlap to judge
        return []
    h, w = target_hp.shape
    rows = [by * h // _GRID for by in range(_GRID)]
    cols = [bx * w // _GRID for bx in range(_GRID)]
    m = mask.astype(np.float64)
    t = target_hp.astype(np.float64) * m
    a = aligned_hp.astype(np.float64) * m

    def block_sums(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(np.add.reduceat(x, rows, axis=0), cols, axis=1).ravel()

    area = np.diff([*rows, h])[:, None] * np.diff([*cols, w])[None, :]
    n, st, sa = block_sums(m), block_sums(t), block_sums(a)
    stt, saa, sta = block_sums(t * t), block_sums(a * a), block_sums(t * a)
    scores = []
    for i in np.flatnonzero(n >= min_cover * area.ravel()):
        var_t = stt[i] - st[i] * st[i] / n[i]
        if np.sqrt(max(var_t, 0.0) / n[i]) < _MIN_BLOCK_DETAIL:
            continue
        var_a = saa[i] - sa[i] * sa[i] / n[i]
        denom = np.sqrt(max(var_t, 0.0) * max(var_a, 0.0))
        scores.append(float((sta[i] - st[i] * sa[i] / n[i]) / denom) if denom > 1e-6 else 0.0)
    return scores


@dataclass(frozen=True)
class _Agreement:
    """How well the corpus thumbnail, aligned one way, agrees with the eval thumbnail."""

    alignment: str  # keypoints | identity | mirror
    median: float  # median block NCC of high-passed pixels (0 with fewer than 3 detailed blocks)
    mean: float  # mean block NCC
    global_ncc: float  # NCC of the high-passed pixels over the whole overlap
    raw_ncc: float  # NCC of the plain pixels over the whole overlap (layout and tone)
    interior_ncc: float  # NCC of the plain pixels inside a cut-out's object (raw_ncc when there is none)
    blocks: int  # detailed blocks compared


def _dense_agreement(
    eval_d: _Parsed, corpus_d: _Parsed, matrix: np.ndarray | None, allow_mirror: bool
) -> _Agreement:
    """Thumbnail agreement after aligning corpus onto eval (keypoint transform, identity, mirror; ECC-refined).

    The best alignment by median block NCC (then global NCC) is kept.
    """
    import cv2

    target = eval_d.thumb
    th, tw = target.shape
    source = corpus_d.thumb
    sh, sw = source.shape
    target_hp = _highpass(target)
    target_f = target.astype(np.float32)
    source_f = source.astype(np.float32)

    starts: list[tuple[str, np.ndarray, np.ndarray]] = []
    if matrix is not None:
        # keypoint-scale transform -> thumbnail scale
        to_src_kp = np.diag([corpus_d.work_size[0] / sw, corpus_d.work_size[1] / sh, 1.0])
        to_tgt_thumb = np.diag([tw / eval_d.work_size[0], th / eval_d.work_size[1], 1.0])
        full = to_tgt_thumb @ np.vstack([matrix, [0, 0, 1]]) @ to_src_kp
        starts.append(("keypoints", full[:2].astype(np.float32), source_f))
    stretch = np.array([[tw / sw, 0, 0], [0, th / sh, 0]], dtype=np.float32)
    starts.append(("identity", stretch, source_f))
    if allow_mirror:
        starts.append(("mirror", stretch, source_f[:, ::-1].copy()))

    best: _Agreement | None = None
    # low-information pairs sit near their own, higher model threshold: they always try every start
    detailed = not (eval_d.low_info or corpus_d.low_info)
    ones = np.ones_like(source_f)
    interior = _object_interior(target)
    for alignment, warp, src in starts:
        warp = _refine_ecc(target, src, warp)
        aligned = cv2.warpAffine(src, warp, (tw, th), flags=cv2.INTER_LINEAR)
        valid = cv2.warpAffine(ones, warp, (tw, th), flags=cv2.INTER_NEAREST) > 0.5
        valid = cv2.erode(valid.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # drop border blur
        aligned_hp = _highpass(aligned)
        overlap = valid.sum() > 0.4 * valid.size
        if interior is not None and (valid & interior).sum() >= 0.1 * valid.size:
            # a cut-out: judge the object's surface only, away from the silhouette both pictures share
            valid = valid & interior
            scores = _block_scores(target_hp, aligned_hp, valid, min_overlap=0.1, min_cover=0.5)
        else:
            scores = _block_scores(target_hp, aligned_hp, valid)
        found = _Agreement(
            alignment=alignment,
            median=float(np.median(scores)) if len(scores) >= _MIN_DETAIL_BLOCKS else 0.0,
            mean=float(np.mean(scores)) if scores else 0.0,
            global_ncc=_ncc(target_hp[valid], aligned_hp[valid]) if overlap else 0.0,
            raw_ncc=_ncc(target_f[valid], aligned[valid]) if overlap else 0.0,
            interior_ncc=_interior_ncc(target_f, aligned, valid, interior) if overlap else 0.0,
            blocks=len(scores),
        )
        if best is None or (found.median, found.global_ncc) > (best.median, best.global_ncc):
            best = found
        if alignment == "keypoints" and detailed and min(found.median, found.global_ncc) >= _CONCLUSIVE_NCC:
            break  # the keypoints' alignment already shows one picture; the other starts would not change the verdict
    assert best is not None
    return best


def _object_interior(thumb: np.ndarray) -> np.ndarray | None:
    """Inside of the object of a cut-out thumbnail (flat border colour around it), or None.

    Two different objects of one silhouette on one studio background agree on the silhouette's edges, which
    dominate every high-passed score; only the pixels inside the object (eroded away from the edge) tell
    their surfaces apart.
    """
    import cv2

    arr = thumb.astype(np.int16)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = int(np.median(border))
    if (np.abs(border - background) > _BACKGROUND_TOLERANCE).mean() > 0.2:
        return None  # no flat frame: not a cut-out
    # 9x9: beyond the high-pass halo (sigma 3) of the silhouette edge
    inside = cv2.erode((np.abs(arr - background) > _BACKGROUND_TOLERANCE).astype(np.uint8), np.ones((9, 9), np.uint8))
    return inside > 0 if inside.mean() >= 0.1 else None


def _interior_ncc(target: np.ndarray, aligned: np.ndarray, valid: np.ndarray, interior: np.ndarray | None) -> float:
    """Plain-pixel NCC inside the eval cut-out's object; over the whole overlap when there is no object."""
    mask = valid if interior is None else valid & interior
    if mask.sum() < 0.05 * mask.size:
        mask = valid
    return _ncc(target[mask], aligned[mask])


def _refine_ecc(target: np.ndarray, source: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """ECC alignment of source onto target starting from `warp` (kept if ECC does not converge)."""
    import cv2

    # ECC maps target coordinates to source coordinates: invert, refine, invert back
    inverse = cv2.invertAffineTransform(warp).astype(np.float32)
    # 15 iterations to 1e-3: a copy converges within them; an unrelated pair never converges, and 50 iterations
    # (the former cap) only spent 2 ms per call on it (1,200 development pairs, nd4 model: 2 decisions changed)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 15, 1e-3)
    try:
        _, refined = cv2.findTransformECC(
            target.astype(np.float32), source, inverse, cv2.MOTION_AFFINE, criteria, None, 3
        )
    except cv2.error:
        return warp
    refined = cv2.invertAffineTransform(refined).astype(np.float32)
    # ECC may bend one picture onto another's edges with shear or squeeze: keep only refinements
    # that stay close to the start (a few percent of scale, a few degrees, a fraction of the size)
    linear_change = refined[:, :2] @ np.linalg.inv(warp[:, :2]) - np.eye(2)
    shift = np.abs(refined[:, 2] - warp[:, 2]) / np.array(target.shape[::-1], dtype=np.float32)
    if np.abs(linear_change).max() > 0.2 or shift.max() > 0.2:
        return warp
    return refined


@dataclass(frozen=True)
class _LogisticModel:
    """Logistic regression over :meth:`Evidence.features`, fitted by benchmarks/near_dup_eval.py --fit."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float  # probability at which a candidate counts as the same picture
    # the same for pairs with a low-information side (flat, tiny, silhouette-only pictures), set separately
    # on those pairs alone: their look-alikes are the hardest negatives, so they get their own cut
    low_info_threshold: float

    def probability(self, features: np.ndarray) -> float:
        z = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        logit = float(z @ np.asarray(self.weights) + self.bias)
        return float(1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0))))


# --- fitted model: written by benchmarks/dedup_logo.py --final --write-model; do not edit by hand ---
#: Fitted by benchmarks/dedup_logo.py on generators debian + product (8996 pairs, 1609 positive:
#: candidates within 16 of 64 bits that pass the cheap check, plus 600 unrelated pairs per
#: generator posing as pHash collisions); threshold: lowest probability keeping training precision
#: >= 0.993. Generator `graphics` was held back and is reported with this model.
MODEL = _LogisticModel(
    mean=(
        1.10109, 0.103002, 0.291948, 0.298511, 0.296872, 0.389257, 0.556766, 0, 0, 0, 0, 2.94587,
        0.261924, 0.271424, 0,
    ),
    scale=(
        1.76595, 0.223619, 0.396277, 0.391372, 0.399628, 0.398293, 0.307488, 1, 1, 1, 1, 1.12608,
        0.409751, 0.41364, 1,
    ),
    weights=(
        0.288538, 4.0635, -0.211647, 0.952805, 2.15942, 0.785676, -0.700773, 0, 0, 0, 0, -0.451542,
        -0.503738, -0.0291673, 0,
    ),
    bias=-1.8476,
    threshold=0.728017,
    low_info_threshold=0.786695,
)
CHEAP_ALPHA = 6
CHEAP_LIMIT = 198
# --- end of fitted model ---


def cheap_check(fine_distance: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """The cascade's first stage: which candidates may be near-duplicates at all (bool per candidate).

    `fine_distance`: bits differing between the corpus image's :func:`fine_code` and that of the eval hash
    the candidate was found through; `distance`: the pHash candidate distance. A candidate passes when
    ``fine_distance + CHEAP_ALPHA * distance <= CHEAP_LIMIT`` (both fitted by benchmarks/dedup_logo.py to
    keep 99.5% of the training generators' true candidates). Those that pass go to :func:`verify`.
    """
    return np.asarray(fine_distance) + CHEAP_ALPHA * np.asarray(distance) <= CHEAP_LIMIT


FEATURE_NAMES = (
    "log1p_inliers", "inlier_share", "block_ncc_median", "block_ncc_mean", "global_ncc", "raw_ncc",
    "block_share", "low_info", "candidate_distance", "low_info_x_median", "low_info_x_raw",
    "log1p_matches", "min_median_raw", "min_global_raw", "interior_ncc",
)


@dataclass(frozen=True)
class Evidence:
    """The measurements verify() decides on, and the model's probability that the pair is the same picture."""

    inliers: int  # distinct eval keypoints agreeing on one similarity transform
    matches: int  # keypoint matches passing the ratio test
    keypoints: int  # keypoints of the image with fewer of them
    alignment: str  # thumbnail alignment that agreed best: keypoints | identity | mirror
    dense: float  # median block NCC of the aligned, high-passed thumbnails
    dense_mean: float
    global_ncc: float
    raw_ncc: float
    interior_ncc: float  # plain-pixel NCC inside a cut-out's object (raw_ncc without a flat frame)
    blocks: int  # detailed thumbnail blocks the dense scores rest on
    low_info: bool
    distance_share: float  # pHash candidate distance / hash bits
    probability: float

    @property
    def comparable(self) -> bool:
        """Is there anything to judge? Keypoints agreeing, or detailed thumbnail blocks to compare.

        Two featureless pictures (flat colours, a plain silhouette without corners) can be neither
        confirmed nor told apart by this descriptor; such a candidate is not accepted.
        """
        return self.inliers > 0 or self.blocks >= _MIN_DETAIL_BLOCKS

    @property
    def match(self) -> bool:
        cut = MODEL.low_info_threshold if self.low_info else MODEL.threshold
        return self.comparable and self.probability >= cut

    @property
    def score(self) -> float:
        """The model's probability, rounded (reports and row messages)."""
        return round(self.probability, 4)

    def features(self) -> np.ndarray:
        return _features(self.inliers, self.matches, self.keypoints, self.dense, self.dense_mean,
                         self.global_ncc, self.raw_ncc, self.blocks, self.low_info, self.distance_share,
                         self.interior_ncc)


def _features(
    inliers: int, matches: int, keypoints: int, median: float, mean: float, global_ncc: float, raw_ncc: float,
    blocks: int, low_info: bool, distance_share: float, interior_ncc: float,
) -> np.ndarray:
    low = 1.0 if low_info else 0.0
    return np.array([
        np.log1p(inliers), inliers / max(30, keypoints), median, mean, global_ncc, raw_ncc,
        blocks / (_GRID * _GRID), low, distance_share, low * median, low * raw_ncc, np.log1p(matches),
        min(median, raw_ncc), min(global_ncc, raw_ncc), interior_ncc,
    ], dtype=np.float64)


#: Assumed pHash distance when the caller does not give one: the stage's default candidate threshold
#: (16 of 64 bits), the least favourable distance a candidate can have.
_UNKNOWN_DISTANCE_SHARE = 0.25


def evidence(
    eval_desc: bytes, corpus_desc: bytes, allow_mirror: bool = True,
    distance: int | None = None, n_bits: int = 64,
) -> Evidence:
    """The full reasoning behind :func:`verify` (for reports and model fitting)."""
    eval_d, corpus_d = _parse(eval_desc), _parse(corpus_desc)
    low_info = eval_d.low_info or corpus_d.low_info
    matrix, inliers, matches = _keypoint_transform(eval_d, corpus_d, allow_mirror)
    agreement = _dense_agreement(eval_d, corpus_d, matrix, allow_mirror)
    share = _UNKNOWN_DISTANCE_SHARE if distance is None else distance / max(1, n_bits)
    keypoints = min(len(eval_d.descriptors), len(corpus_d.descriptors))
    found = Evidence(
        inliers=inliers, matches=matches, keypoints=keypoints, alignment=agreement.alignment,
        dense=agreement.median, dense_mean=agreement.mean, global_ncc=agreement.global_ncc,
        raw_ncc=agreement.raw_ncc, interior_ncc=agreement.interior_ncc, blocks=agreement.blocks, low_info=low_info, distance_share=share,
        probability=0.0,
    )
    if not found.comparable:
        return found  # probability 0: nothing the model could judge (it never saw such pairs)
    return replace(found, probability=MODEL.probability(found.features()))


#: Detail check: two *detailed* pictures (neither low-information) within the plain pHash threshold whose
#: thumbnails' high-passed pixels, where they stand, correlate at least this much are one picture; the
#: keypoint model is not asked. Set on the development generators (debian, product) only: the most any
#: unrelated pair of detailed pictures reached there was 0.68 (two stamps 24 bits apart; 47k pairs, any
#: distance; the one within 12 bits reached 0.04); 0.7 passes 85% of the true detailed pairs within 8 bits.
DETAIL_NCC = 0.7
_DETAIL_BORDER = 3  # px of the thumbnail edge left out (resampling and JPEG blocks differ most there)


def detail_agreement(eval_desc: bytes, corpus: Prepared) -> float | None:
    """High-pass NCC of the eval and corpus thumbnails as they stand (no alignment), or None.

    None when either picture is low-information (flat, tiny, a silhouette on a plain background): there
    the thumbnails agree for unrelated pictures of one layout, and only :func:`verify` may decide. Cheap
    (~0.1 ms): no keypoints, no alignment; the corpus side needs only :func:`prepare`.
    """
    import cv2

    eval_d = _parse(eval_desc)
    if eval_d.low_info or corpus.low_info:
        return None
    target = eval_d.thumb.astype(np.float32)
    th, tw = target.shape
    if min(th, tw) <= 4 * _DETAIL_BORDER:
        return None
    source = cv2.resize(corpus.thumb.astype(np.float32), (tw, th), interpolation=cv2.INTER_AREA)
    inside = (slice(_DETAIL_BORDER, th - _DETAIL_BORDER), slice(_DETAIL_BORDER, tw - _DETAIL_BORDER))
    return _ncc(_highpass(target)[inside].ravel(), _highpass(source)[inside].ravel())


def verify(
    eval_desc: bytes, corpus_desc: bytes, allow_mirror: bool = True,
    distance: int | None = None, n_bits: int = 64,
) -> tuple[bool, float]:
    """Is the corpus image really the same picture as the eval image? Returns (match, probability).

    Measures keypoint agreement (RANSAC similarity transform: inliers, matches) and thumbnail agreement
    after alignment (block, global and plain NCC), and combines them with the low-information flag and
    the pHash `distance` (of `n_bits`; the candidate threshold 16/64 is assumed when unknown) in a
    logistic model (:data:`MODEL`). With `allow_mirror` false, mirrored alignment is not tried.
    """
    found = evidence(eval_desc, corpus_desc, allow_mirror, distance, n_bits)
    return found.match, found.score
