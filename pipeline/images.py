"""Image bytes → pixels: the one decoder every stage uses.

Nothing here trusts a Content-Type or a file name: the format is sniffed from the first bytes, the
decoder is restricted to that format, the pixel count is checked from the header before any pixel
is decoded (decompression-bomb guard, on top of Pillow's own `Image.MAX_IMAGE_PIXELS`, which stays
on), and the whole image is decoded to prove it is intact.

Orientation policy: every stage sees EXIF-transposed pixels, i.e. the image as a viewer shows it.
The download stage writes them that way and pHash and CLIP decode them that way, so a phone photo
stored sideways with an orientation tag is hashed, scored and stored upright.

Typical use: :func:`decode_rgb` (or :func:`decode_image` for the native mode). Callers that need the
header before paying for the decode (size filters, reduced-scale JPEG decoding) use
:func:`open_image` and then :meth:`OpenedImage.decode`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

#: Pillow's own default (about 89.5 MP): a larger header is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485
#: Every format :func:`sniff_format` recognises (Pillow format names).
SNIFFED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: Formats accepted by default; unknown bytes are `not_an_image`, other formats `unsupported_format`.
DEFAULT_INPUT_FORMATS: tuple[str, ...] = SNIFFED_FORMATS

EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # these swap width and height


class ImageError(Exception):
    """The bytes are not a usable image. `reason` is a stable reject reason: empty_body,
    not_an_image, unsupported_format, decompression_bomb, truncated_image or decode_error."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple:  # keep reason/message when pickled across processes
        return (type(self), (self.reason, self.message))


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name from magic bytes, or None if the bytes are not a known image format."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    return None


def pixel_limit(max_pixels: int | None = None) -> int | None:
    """The bomb limit in force: `max_pixels`, or Pillow's current `Image.MAX_IMAGE_PIXELS` if None."""
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def check_pixels(width: int, height: int, *, fmt: str = "image", max_pixels: int | None = None) -> None:
    """The decompression-bomb guard on a declared size; raises ImageError. For decoders other than
    Pillow (e.g. nvJPEG) that read the size from their own header parse."""
    if width <= 0 or height <= 0:
        raise ImageError("decode_error", f"{fmt} declares an empty size {width}x{height}")
    limit = pixel_limit(max_pixels)
    if limit is not None and width * height > limit:
        raise ImageError(
            "decompression_bomb",
            f"{fmt} declares {width}x{height} = {width * height} pixels, over the decompression-bomb limit of {limit}",
        )


def _describe_head(data: bytes) -> str:
    head = data[:16].lstrip()
    if head[:1] == b"<":
        return "looks like HTML/XML"
    return f"first bytes {data[:8].hex()}"


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF must not fail an otherwise good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


@dataclass
class OpenedImage:
    """An image whose header passed the checks; no pixel decoded yet."""

    image: Image.Image  # as stored (not yet transposed), header only until decode()
    format: str  # the sniffed Pillow format name
    orientation: int  # EXIF orientation 1..8 (1 = as stored; broken or missing EXIF counts as 1)

    @property
    def transposed(self) -> bool:
        """The orientation swaps width and height."""
        return self.orientation in _TRANSPOSING_ORIENTATIONS

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, i.e. after EXIF orientation."""
        width, height = self.image.size
        return (height, width) if self.transposed else (width, height)

    def draft(self, min_size: tuple[int, int]) -> None:
        """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while keeping both displayed sides >= min_size.

        No-op for other formats. The result is not resized to `min_size`: callers resize themselves.
        """
        if self.format != "JPEG":
            return
        want = (min_size[1], min_size[0]) if self.transposed else min_size
        self.image.draft(self.image.mode, (max(1, want[0]), max(1, want[1])))

    def decode(self) -> Image.Image:
        """Decode every pixel (proves the image intact; first frame of animations), then orient it."""
        img = self.image
        try:
            img.load()
        except Image.DecompressionBombError as err:
            raise ImageError("decompression_bomb", str(err)) from err
        except Exception as err:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
            text = str(err)
            reason = "truncated_image" if "truncat" in text.lower() else "decode_error"
            raise ImageError(reason, f"{self.format} does not decode: {text}") from err
        if self.orientation != 1:
            try:  # also drops the tag from the result, so nobody rotates it twice
                img = ImageOps.exif_transpose(img)
            except Exception as err:  # rewriting a malformed EXIF block can fail
                raise ImageError("decode_error", f"{self.format} EXIF orientation cannot be applied: {err}") from err
        return img


def open_image(
    data: bytes,
    *,
    max_pixels: int | None = None,
    input_formats: tuple[str, ...] = DEFAULT_INPUT_FORMATS,
) -> OpenedImage:
    """Sniff, open (header only) with a decoder restricted to the sniffed format, and bomb-check.

    `max_pixels` None means Pillow's `Image.MAX_IMAGE_PIXELS`. Raises ImageError.
    """
    if not data:
        raise ImageError("empty_body", "0 bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("not_an_image", f"bytes do not start like an image ({_describe_head(data)})")
    if fmt not in input_formats:
        raise ImageError("unsupported_format", f"{fmt} is not an accepted input format")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as err:
        raise ImageError("decompression_bomb", str(err)) from err
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        raise ImageError("decode_error", f"{fmt} header unreadable: {err}") from err
    check_pixels(*img.size, fmt=fmt, max_pixels=max_pixels)
    return OpenedImage(img, fmt, _orientation(img))


def decode_image(
    data: bytes,
    *,
    max_pixels: int | None = None,
    input_formats: tuple[str, ...] = DEFAULT_INPUT_FORMATS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Sniff, bomb-check and fully decode image bytes, EXIF-transposed, in the image's own mode.

    `draft_size` (width, height): JPEGs may be decoded at a reduced scale that keeps both sides at
    least that large (cheap for callers that only need a small image). Raises ImageError.
    """
    opened = open_image(data, max_pixels=max_pixels, input_formats=input_formats)
    if draft_size is not None:
        opened.draft(draft_size)
    return opened.decode()


def decode_rgb(
    data: bytes,
    *,
    max_pixels: int | None = None,
    input_formats: tuple[str, ...] = DEFAULT_INPUT_FORMATS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """:func:`decode_image` converted to RGB (alpha dropped, as ``Image.convert("RGB")`` does)."""
    img = decode_image(data, max_pixels=max_pixels, input_formats=input_formats, draft_size=draft_size)
    return img if img.mode == "RGB" else img.convert("RGB")
