"""Verified, oriented image → filtered, resized, re-encoded image bytes (the download stage's output).

Decoding (format sniffing, bomb guard, EXIF orientation) is :mod:`curate.pipeline.images`; this
module adds the size/shape filters, the geometry and the encoding.

Resize semantics follow img2dataset (`keep_ratio`, `keep_ratio_largest`, `center_crop`, `border`,
`resize_only_if_bigger`, white border, rounding of the scaled side) so that migrating users get the
same geometry. Two things are done differently on purpose:

* JPEGs that will be downscaled are decoded at a reduced scale first (libjpeg DCT scaling via
  `Image.draft`), never below the target size, then resized with the configured filter. This
  is what makes decoding cheap for large photos; the output geometry is unchanged.
* EXIF orientation is applied (img2dataset's OpenCV path ignores it), so portrait phone photos are
  not stored sideways.

:func:`original_exif` gives the `exif` column exactly as img2dataset writes it (exifread's tag names
and printable values), bounded in size.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import exifread
from PIL import Image

from curate.pipeline.images import DEFAULT_INPUT_FORMATS, DEFAULT_MAX_PIXELS, open_image
from curate.stages.download.blur import Box, blur_boxes, displayed_boxes

ResizeMode = Literal["none", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
OutputFormat = Literal["jpg", "png", "webp"]
Interpolation = Literal["nearest", "box", "area", "bilinear", "linear", "hamming", "bicubic", "cubic", "lanczos"]
ReencodePolicy = Literal["always", "if_needed"]

EXT_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    # OpenCV's INTER_AREA (img2dataset's `area`) averages each output pixel's footprint, counting the source pixels
    # it cuts by the share covered. Pillow has no such filter: its BOX takes a source pixel whole or not at all,
    # which aliases at non-integer factors. Its HAMMING comes much closer to the exact average (PSNR against it on
    # 276 downscaled photos, full decode: 54.3 / 45.1 dB mean / 5th percentile, BOX 44.9 / 34.6; docs/download.md).
    "area": Image.Resampling.HAMMING,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
BORDER_COLOR = (255, 255, 255)
EXIF_MAX_CHARS = 16 * 1024  # the whole JSON; a camera's useful tags take 1-3 KB
EXIF_VALUE_MAX_CHARS = 1024  # longer printable values are blobs (embedded profiles, padding)
# "no EXIF found" is the normal case for web images: exifread's warnings would flood worker logs.
logging.getLogger("exifread").setLevel(logging.ERROR)


class ImageFiltered(Exception):
    """A valid image that a size/shape filter turns down (status `rejected`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageSpec:
    """How to verify, filter, resize and encode one image (see DownloadConfig for the meaning)."""

    resize_mode: ResizeMode = "keep_ratio"
    image_size: int = 512
    resize_only_if_bigger: bool = True
    downscale_interpolation: Interpolation = "area"
    upscale_interpolation: Interpolation = "lanczos"
    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 0.0  # 0 = no limit
    output_format: OutputFormat = "jpg"
    quality: int = 95
    png_compression: int = 6
    reencode: ReencodePolicy = "always"
    max_pixels: int = DEFAULT_MAX_PIXELS
    input_formats: tuple[str, ...] = DEFAULT_INPUT_FORMATS
    use_draft: bool = True
    draft_margin: float = 1.5  # reduced-scale JPEG decoding keeps at least this multiple of the planned size


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    source_format: str
    reencoded: bool
    sha256: str
    #: The pixels `data` holds (what decoding `data` gives, up to JPEG loss where re-encoded), for the later stages'
    #: `from_pixels`; callers drop it once used (a partition must not hold every decoded image).
    pixels: Image.Image | None = field(default=None, repr=False, compare=False)


def _planned_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int] | None:
    """Size after the scaling step (before crop/pad), or None when the image is not scaled."""
    size = spec.image_size
    if spec.resize_mode in ("keep_ratio", "center_crop"):
        side = min(width, height)
    elif spec.resize_mode in ("keep_ratio_largest", "border"):
        side = max(width, height)
    else:
        return None
    if spec.resize_only_if_bigger and side <= size:
        return None
    if side == size:
        return width, height  # no scaling, but crop/pad still applies
    scale = size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_filters(width: int, height: int, spec: ImageSpec) -> None:
    if width < spec.min_width or height < spec.min_height:
        raise ImageFiltered(
            "too_small", f"{width}x{height} is below min_width x min_height {spec.min_width}x{spec.min_height}"
        )
    if spec.max_aspect_ratio > 0:
        ratio = max(width, height) / min(width, height)
        if ratio > spec.max_aspect_ratio:
            raise ImageFiltered("aspect_ratio", f"aspect ratio {ratio:.2f} > max_aspect_ratio {spec.max_aspect_ratio:g}")


#: Largest side each output format can store (libjpeg: 65,500; libwebp: 16,383; PNG: 2^31 - 1).
_MAX_SIDE = {"jpg": 65_500, "webp": 16_383, "png": 2**31 - 1}


def _stored_size(width: int, height: int, planned: tuple[int, int] | None, spec: ImageSpec) -> tuple[int, int]:
    """Size of the picture `process_image` would store (before keeping original bytes is considered)."""
    if planned is None:
        return width, height
    if spec.resize_mode == "center_crop":
        return min(planned[0], spec.image_size), min(planned[1], spec.image_size)
    if spec.resize_mode == "border":
        return max(planned[0], spec.image_size), max(planned[1], spec.image_size)
    return planned


def _check_output_size(size: tuple[int, int], width: int, height: int, spec: ImageSpec) -> None:
    """A sliver (5000 x 1 px, a few hundred bytes) scaled to keep_ratio 256 would be 1,280,000 x 256 px: ~1 GB of
    pixels, and more than JPEG can store. Refused before decoding, like a decompression bomb."""
    w, h = size
    limit = _MAX_SIDE[spec.output_format]
    if max(w, h) > limit or w * h > spec.max_pixels:
        why = (f"over {spec.output_format}'s {limit:,}-pixel side limit" if max(w, h) > limit
               else f"over max_image_pixels {spec.max_pixels:,}")
        raise ImageFiltered("output_too_large", f"{width}x{height} resized ({spec.resize_mode} {spec.image_size}) "
                            f"would be {w}x{h}, {why}")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def _normalize_mode(img: Image.Image, output_format: str) -> Image.Image:
    """RGB (or L) for JPEG with alpha matted on white, RGB/RGBA for PNG/WebP."""
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        if output_format != "jpg":
            return rgba
        background = Image.new("RGB", rgba.size, BORDER_COLOR)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "L" and output_format == "jpg":
        return img  # grayscale JPEG stays grayscale (what img2dataset writes too)
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _encode(img: Image.Image, spec: ImageSpec) -> bytes:
    buf = io.BytesIO()
    if spec.output_format == "jpg":
        img.save(buf, "JPEG", quality=spec.quality)
    elif spec.output_format == "webp":
        img.save(buf, "WEBP", quality=spec.quality)
    else:
        img.save(buf, "PNG", compress_level=spec.png_compression)
    return buf.getvalue()


def process_image(data: bytes, spec: ImageSpec, blur: Sequence[Box] = ()) -> ProcessedImage:
    """Verify, filter, resize and encode one image. Raises ImageError or ImageFiltered.

    `blur`: boxes relative to the picture as stored (see :mod:`curate.stages.download.blur`), blurred in the output
    picture (after resizing and cropping, before padding); the bytes are then always re-encoded."""
    opened = open_image(data, max_pixels=spec.max_pixels, input_formats=spec.input_formats)
    fmt = opened.format
    original_w, original_h = opened.size
    # Filters only need the header: refuse before paying for the decode.
    _check_filters(original_w, original_h, spec)
    planned = _planned_size(original_w, original_h, spec)
    _check_output_size(_stored_size(original_w, original_h, planned, spec), original_w, original_h, spec)
    downscale = planned is not None and planned[0] < original_w
    if spec.use_draft and downscale and planned is not None:
        # Decode at 1/2, 1/4 or 1/8 scale while keeping at least `draft_margin` times the planned size: libjpeg's
        # scaled IDCT is a coarse filter, the final resize from there does the antialiasing. 1.5 (the default) with
        # `area` leaves enough for it (fewer texture artefacts than Pillow thumbnail()'s margin of 2 with a box
        # filter); 1 saves more CPU for more aliasing on fine textures (docs/download.md, benchmarks/jpeg_draft.py).
        margin = spec.draft_margin
        opened.draft((math.ceil(planned[0] * margin), math.ceil(planned[1] * margin)))
    img = opened.decode()

    geometry_changed = False
    size = spec.image_size
    # The scaled picture's size, and where center_crop's square starts in it (its shorter side is `size`); also
    # where the displayed picture's relative coordinates land once scaled and cropped (for `blur`).
    frame, offset = planned or img.size, (0, 0)
    if planned is not None and spec.resize_mode == "center_crop":
        offset = ((planned[0] - size) // 2, (planned[1] - size) // 2)
    if planned is not None and spec.resize_mode == "center_crop" and img.size != planned:
        # Resample only the source region that survives the crop, straight to the square: the
        # same pixels as resize-then-crop without scaling the parts that are thrown away.
        left, top = offset
        scale_x, scale_y = img.width / planned[0], img.height / planned[1]
        box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
        resample = _FILTERS[spec.downscale_interpolation if downscale else spec.upscale_interpolation]
        img = img.resize((size, size), resample=resample, box=box, reducing_gap=_reducing_gap(scale_x))
        geometry_changed = True
    elif planned is not None:
        if img.size != planned:
            resample = _FILTERS[spec.downscale_interpolation if downscale else spec.upscale_interpolation]
            img = img.resize(planned, resample=resample, reducing_gap=_reducing_gap(img.width / planned[0]))
            geometry_changed = True
        if spec.resize_mode == "center_crop" and img.size != (size, size):
            left, top = offset  # img is the scaled picture (`planned`) here
            img = img.crop((left, top, left + size, top + size))
            geometry_changed = True
    if blur:
        img = blur_boxes(_normalize_mode(img, spec.output_format), [
            (x0 * frame[0] - offset[0], y0 * frame[1] - offset[1], x1 * frame[0] - offset[0], y1 * frame[1] - offset[1])
            for x0, y0, x1, y1 in displayed_boxes(blur, opened.orientation)])
    if planned is not None and spec.resize_mode == "border" and img.size != (size, size):
        img = _pad(img, size, spec.output_format)
        geometry_changed = True

    keep_original = (
        spec.reencode == "if_needed"
        and not geometry_changed
        and not blur
        and opened.orientation == 1
        and EXT_BY_FORMAT.get(fmt) == spec.output_format
        and getattr(img, "n_frames", 1) == 1
    )
    if keep_original:
        out, reencoded, stored = data, False, img
    else:
        stored = _normalize_mode(img, spec.output_format)
        out, reencoded = _encode(stored, spec), True
    return ProcessedImage(
        data=out,
        ext=spec.output_format if reencoded else EXT_BY_FORMAT[fmt],
        width=img.width,
        height=img.height,
        original_width=original_w,
        original_height=original_h,
        source_format=fmt,
        reencoded=reencoded,
        sha256=hashlib.sha256(out).hexdigest(),
        pixels=stored,
    )


def _reducing_gap(factor: float) -> float | None:
    """Pillow's two-step resize (integer reduce, then the filter over >= 3x the output) only pays off
    when shrinking by 6x or more; below that it costs time (measured) and gains no quality."""
    return 3.0 if factor >= 6.0 else None


def _pad(img: Image.Image, size: int, output_format: str) -> Image.Image:
    """Centre `img` on a size x size canvas of BORDER_COLOR (img2dataset's PadIfNeeded placement)."""
    img = _normalize_mode(img, output_format)
    if img.mode == "L":
        img = img.convert("RGB")
    fill: tuple[int, ...] = BORDER_COLOR + (255,) if img.mode == "RGBA" else BORDER_COLOR
    canvas = Image.new(img.mode, (max(size, img.width), max(size, img.height)), fill)
    top = math.floor((canvas.height - img.height) / 2)
    left = math.floor((canvas.width - img.width) / 2)
    canvas.paste(img, (left, top))
    return canvas


def verify_image(data: bytes, spec: ImageSpec) -> ProcessedImage:
    """Decode-verify and measure bytes that are kept as they are (rows that arrive with image bytes).

    Runs the same format, bomb and size/shape checks as :func:`process_image`; width/height are the
    displayed (EXIF-oriented) size, equal to original_width/original_height.
    """
    opened = open_image(data, max_pixels=spec.max_pixels, input_formats=spec.input_formats)
    fmt = opened.format
    w, h = opened.size
    _check_filters(w, h, spec)
    img = opened.decode()
    ext = EXT_BY_FORMAT.get(fmt)
    if ext is None:
        # The writer only ships jpg/png/webp members: convert other formats losslessly to PNG.
        converted = io.BytesIO()
        _normalize_mode(img, "png").save(converted, "PNG", compress_level=spec.png_compression)
        data, ext = converted.getvalue(), "png"
    return ProcessedImage(
        data=data,
        ext=ext,
        width=w,
        height=h,
        original_width=w,
        original_height=h,
        source_format=fmt,
        reencoded=ext != EXT_BY_FORMAT.get(fmt),
        sha256=hashlib.sha256(data).hexdigest(),
        pixels=img,
    )


def original_exif(data: bytes) -> str | None:
    """The EXIF tags of the source bytes as img2dataset's `exif` column, or None when there are none.

    img2dataset writes ``json.dumps({name: str(tag).strip()})`` over
    ``exifread.process_file(stream, details=False)``: keys are exifread's "IFD Tag" names ("Image
    Make", "EXIF DateTimeOriginal", "GPS GPSLatitude"), values its printable strings ("Canon",
    "Rotated 90 CW", "1/125"). We do the same, minus binary blobs: no thumbnail (img2dataset dumps its
    bytes' repr), no MakerNote, no value longer than EXIF_VALUE_MAX_CHARS, and tags that would push the
    JSON past EXIF_MAX_CHARS are left out. Never raises: broken EXIF costs the column, not the row.
    """
    try:
        tags = exifread.process_file(io.BytesIO(data), details=False, extract_thumbnail=False)
    except Exception:
        return None
    kept: dict[str, str] = {}
    size = 2  # "{}"
    for name, tag in tags.items():
        if tag is None or isinstance(tag, bytes | bytearray) or "MakerNote" in name:
            continue
        value = str(tag).strip()
        if len(value) > EXIF_VALUE_MAX_CHARS:
            continue
        cost = len(json.dumps(name)) + len(json.dumps(value)) + 4  # ": " and ", "
        if size + cost > EXIF_MAX_CHARS:
            continue
        kept[name] = value
        size += cost
    return json.dumps(kept) if kept else None
