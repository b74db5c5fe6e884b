"""Perceptual hash (pHash) of images, bit-identical to ``imagehash.phash`` in `exact` mode.

Algorithm (imagehash 4.x, after hackerfactor's "Looks like it"): grayscale (`convert("L")`), Lanczos
resize to ``(hash_size * 4)`` squared, 2-D DCT-II (`scipy.fftpack.dct` along rows then columns),
keep the top-left ``hash_size`` x ``hash_size`` low frequencies, bit = coefficient > their median.
``str(imagehash.phash(img))`` writes the bits row-major, most significant first, as
``ceil(hash_size**2 / 4)`` hex digits; :func:`to_hex` / :func:`from_hex` use the same format.

Two modes:

* ``exact``: the same Pillow operations and the same scipy DCT on the same arrays, so every bit
  (including ties decided by float rounding on flat images) equals imagehash's. Tested on real and
  synthetic images (tests/test_phash.py).
* ``fast``: JPEG *draft* decoding (libjpeg scales by 1/2..1/8 in the DCT domain and skips colour
  conversion: the luma plane is the grayscale), Lanczos from the small draft image, and a batched
  DCT done as two small matrix products. Not bit-identical: its agreement with imagehash is
  measured by benchmarks/phash.py and documented in docs/dedup.md.

Hashes are held as ``numpy.uint64`` arrays of shape ``(n, words)`` with ``words = ceil(bits / 64)``:
the hash's bit string, left-padded with zeros to a multiple of 64, split into big-endian 64-bit
words (word 0 most significant). For the default hash size 8 that is one word equal to
``int(str(imagehash.phash(img)), 16)``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

HashMode = Literal["exact", "fast"]
HIGHFREQ_FACTOR = 4  # imagehash.phash's default: resize to 4x the hash side before the DCT
#: Smallest side (pixels) asked of the JPEG draft decoder in fast mode: large enough that the final
#: Lanczos step still low-pass filters like imagehash's full-resolution resize does.
DRAFT_MIN_SIDE = 128


@dataclass(frozen=True)
class PhashParams:
    """Everything that changes a hash value; stored with every eval index."""

    hash_size: int = 8
    mode: HashMode = "exact"
    highfreq_factor: int = HIGHFREQ_FACTOR

    def __post_init__(self) -> None:
        if self.hash_size < 2:
            raise ValueError(f"hash_size must be >= 2, got {self.hash_size}")
        if self.mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', got {self.mode!r}")

    @property
    def n_bits(self) -> int:
        return self.hash_size * self.hash_size

    @property
    def n_words(self) -> int:
        return words_for_bits(self.n_bits)

    @property
    def hex_width(self) -> int:
        return (self.n_bits + 3) // 4

    def as_metadata(self) -> dict[str, object]:
        return {
            "algorithm": "phash",
            "hash_size": self.hash_size,
            "highfreq_factor": self.highfreq_factor,
            "mode": self.mode,
            "bits": self.n_bits,
            "image_decode": "exif_transpose,RGB",
        }


def words_for_bits(n_bits: int) -> int:
    return (n_bits + 63) // 64


# -- hex / int / word conversions -------------------------------------------------------------------

def bits_to_words(bits: np.ndarray) -> np.ndarray:
    """Boolean bit rows ``(n, n_bits)`` (most significant first) -> uint64 words ``(n, words)``."""
    bits = np.asarray(bits, dtype=bool)
    n, n_bits = bits.shape
    n_words = words_for_bits(n_bits)
    pad = n_words * 64 - n_bits
    if pad:
        bits = np.concatenate([np.zeros((n, pad), dtype=bool), bits], axis=1)
    packed = np.packbits(bits, axis=1)  # big-endian bytes
    return packed.view(">u8").astype(np.uint64).reshape(n, n_words)


def to_hex(words: np.ndarray, n_bits: int = 64) -> list[str]:
    """Hash words ``(n, words)`` (or ``(n,)`` for one word) -> imagehash-style hex strings."""
    words = np.asarray(words, dtype=np.uint64)
    width = (n_bits + 3) // 4
    if words.ndim == 1 or words.shape[1] == 1:
        return [format(v, f"0{width}x") for v in words.reshape(-1).tolist()]
    out = []
    for row in words.tolist():
        value = 0
        for word in row:
            value = (value << 64) | word
        out.append(format(value, f"0{width}x"))
    return out


_NIBBLE = np.full(256, 255, dtype=np.uint8)  # ASCII byte -> hex digit value; 255 = not a hex digit
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def from_hex(hex_strings: Iterable[str] | pa.Array | pa.ChunkedArray, n_bits: int = 64) -> np.ndarray:
    """imagehash-style hex strings -> uint64 words ``(n, words)``. Raises ValueError on bad input.

    Vectorised over the strings' bytes (an eval index's millions of hashes are parsed at every worker's set-up);
    pass an Arrow string column as it is to skip making Python strings.
    """
    import pyarrow as pa

    n_words = words_for_bits(n_bits)
    width = (n_bits + 3) // 4
    if isinstance(hex_strings, pa.ChunkedArray):
        hex_strings = hex_strings.combine_chunks() if hex_strings.num_chunks else pa.array([], pa.string())
    if not isinstance(hex_strings, pa.Array):
        values = list(hex_strings)
        bad = next((v for v in values if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"expected a {width}-hex-digit pHash string for {n_bits} bits, got {bad!r}")
        hex_strings = pa.array(values, pa.large_string())
    if not (pa.types.is_string(hex_strings.type) or pa.types.is_large_string(hex_strings.type)):
        raise ValueError(f"expected {width}-hex-digit pHash strings for {n_bits} bits, got a {hex_strings.type} column")
    column = hex_strings.cast(pa.large_string())
    n = len(column)

    def refuse(row: int, why: str) -> ValueError:
        return ValueError(f"pHash {column[row].as_py()!r} {why}")

    if column.null_count:
        raise ValueError(f"expected a {width}-hex-digit pHash string for {n_bits} bits, got None")
    if n == 0:
        return np.zeros((0, n_words), dtype=np.uint64)
    offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset : column.offset + n + 1]
    wrong = np.flatnonzero(np.diff(offsets) != width)
    if len(wrong):
        raise ValueError(f"expected a {width}-hex-digit pHash string for {n_bits} bits, "
                         f"got {column[int(wrong[0])].as_py()!r}")
    text = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(n, width)
    digits = _NIBBLE[text]
    invalid = np.flatnonzero((digits == 255).any(axis=1))
    if len(invalid):
        raise refuse(int(invalid[0]), "is not hexadecimal")
    spare_bits = 4 * width - n_bits  # the first digit's high bits beyond n_bits must be zero
    if spare_bits:
        over = np.flatnonzero(digits[:, 0] >> (4 - spare_bits))
        if len(over):
            raise refuse(int(over[0]), f"has more than {n_bits} bits")
    padded = np.zeros((n, 16 * n_words), dtype=np.uint8)  # right-aligned in whole 64-bit words
    padded[:, 16 * n_words - width :] = digits
    packed = (padded[:, 0::2] << 4) | padded[:, 1::2]  # big-endian bytes
    return np.ascontiguousarray(packed).view(">u8").astype(np.uint64).reshape(n, n_words)


def from_ints(values: Sequence[int], n_bits: int = 64) -> np.ndarray:
    """Python ints (e.g. ``int(str(imagehash.phash(img)), 16)``) -> uint64 words ``(n, words)``."""
    n_words = words_for_bits(n_bits)
    mask = (1 << 64) - 1
    rows = [[(int(v) >> (64 * (n_words - 1 - k))) & mask for k in range(n_words)] for v in values]
    return np.array(rows, dtype=np.uint64).reshape(len(rows), n_words)


# -- decoding -------------------------------------------------------------------------------------

def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes as the pipeline hashes them: EXIF orientation applied, RGB.

    The engine's decode (``curate.pipeline.images.decode_rgb``), so that every stage sees the same
    pixels, with the decompression-bomb guard on.
    """
    from curate.pipeline.images import decode_rgb as engine_decode_rgb

    return engine_decode_rgb(data)


_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # EXIF value -> Image.Transpose


def _draft_gray(data: bytes, min_side: int) -> Image.Image:
    """Fast-mode decode: a small grayscale image, EXIF-transposed, via JPEG draft where possible."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        if opened.format == "JPEG" and opened.mode in ("RGB", "L", "YCbCr"):
            # libjpeg picks the largest 1/2^k scale that keeps both sides >= min_side (rotation-safe)
            opened.draft("L", (min_side, min_side))
        # Reading the tag is cheap; ImageOps.exif_transpose would re-parse EXIF and copy the image.
        orientation = opened.getexif().get(_ORIENTATION_TAG, 1)
        opened.load()
        img = opened if opened.mode == "L" else opened.convert("RGB" if opened.mode not in ("RGB", "L") else "L")
        if img.mode != "L":
            img = img.convert("L")  # palette/alpha/CMYK go through RGB like exact mode
        if img is opened:
            img = opened.copy()
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(Image.Transpose(method)) if method is not None else img


# -- hashing --------------------------------------------------------------------------------------

def _exact_bits(img: Image.Image, hash_size: int, highfreq_factor: int) -> np.ndarray:
    import scipy.fftpack
    from PIL import Image

    img_size = hash_size * highfreq_factor
    small = img.convert("L").resize((img_size, img_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(small)
    # Same calls on the same uint8 array as imagehash: identical floats, identical median ties.
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:hash_size, :hash_size]
    return (low > np.median(low)).reshape(-1)


def phash_image(img: Image.Image, params: PhashParams = PhashParams()) -> np.ndarray:
    """pHash words ``(words,)`` of a decoded image; exact mode equals ``imagehash.phash(img)``."""
    if params.mode == "exact":
        bits = _exact_bits(img, params.hash_size, params.highfreq_factor)
        return bits_to_words(bits[None, :])[0]
    from PIL import Image

    side = params.hash_size * params.highfreq_factor
    gray = img.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    return _fast_bits_to_words(np.asarray(gray, dtype=np.float64)[None], params)[0]


def phash_int(img: Image.Image, hash_size: int = 8) -> int:
    """``int(str(imagehash.phash(img, hash_size)), 16)`` computed by exact mode."""
    words = phash_image(img, PhashParams(hash_size=hash_size))
    value = 0
    for word in words.tolist():
        value = (value << 64) | word
    return value


_DCT_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """First `keep` rows of the unnormalised DCT-II matrix of size n (scipy.fftpack's scaling)."""
    key = (n, keep)
    if key not in _DCT_CACHE:
        k = np.arange(keep)[:, None]
        i = np.arange(n)[None, :]
        _DCT_CACHE[key] = 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))
    return _DCT_CACHE[key]


def _fast_bits_to_words(pixels: np.ndarray, params: PhashParams) -> np.ndarray:
    """Batched DCT of ``(n, side, side)`` float pixels by matrix products; only low frequencies."""
    n_side = pixels.shape[1]
    dct_rows = _dct_rows(n_side, params.hash_size)
    low = dct_rows @ pixels @ dct_rows.T  # (n, hash_size, hash_size)
    flat = low.reshape(len(pixels), -1)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return bits_to_words(bits)


def phash_bytes(
    images: Sequence[bytes], params: PhashParams = PhashParams()
) -> tuple[np.ndarray, list[str | None]]:
    """Hash encoded images. Returns (words ``(n, words)``, per-image error message or None).

    Undecodable images get all-zero words and an error message; callers must look at the errors.
    """
    from PIL import Image

    n = len(images)
    words = np.zeros((n, params.n_words), dtype=np.uint64)
    errors: list[str | None] = [None] * n
    if params.mode == "exact":
        for i, data in enumerate(images):
            try:
                bits = _exact_bits(decode_rgb(data), params.hash_size, params.highfreq_factor)
            except Exception as err:  # noqa: BLE001 - any decoder failure is a per-image error
                errors[i] = f"{type(err).__name__}: {err}"
                continue
            words[i] = bits_to_words(bits[None, :])[0]
        return words, errors
    side = params.hash_size * params.highfreq_factor
    min_side = max(DRAFT_MIN_SIDE, side)
    pixels = np.zeros((n, side, side), dtype=np.float64)
    ok = np.zeros(n, dtype=bool)
    for i, data in enumerate(images):
        try:
            gray = _draft_gray(data, min_side)
            # reducing_gap: box-reduce by an integer factor first, then Lanczos the last <= 2x (about
            # 13% faster on web JPEGs; agreement with imagehash is measured in benchmarks/phash.py)
            pixels[i] = np.asarray(gray.resize((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0))
        except Exception as err:  # noqa: BLE001
            errors[i] = f"{type(err).__name__}: {err}"
            continue
        ok[i] = True
    if ok.any():
        words[ok] = _fast_bits_to_words(pixels[ok], params)
    return words, errors


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of two ``(n, words)`` (or broadcastable) uint64 arrays."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)
