"""pHash: exact mode is bit-identical to imagehash.phash; fast mode agrees closely; hex/word formats."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from curate.stages.phash_dedup import phash as P


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _reference(data: bytes, hash_size: int = 8) -> str:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = ImageOps.exif_transpose(img).convert("RGB")
    return str(imagehash.phash(rgb, hash_size=hash_size))


def _synthetic_images() -> list[bytes]:
    """Edge cases for median ties and modes: flat, tiny, noise, gradients, alpha, palette, 16-bit."""
    rng = np.random.default_rng(7)
    out: list[bytes] = []
    for value in (0, 127, 255):  # flat: every AC coefficient ~0, ties decided by float noise
        out.append(_encode(Image.new("RGB", (64, 48), (value, value, value))))
    out.append(_encode(Image.new("RGB", (1, 1), (10, 200, 30))))
    out.append(_encode(Image.new("L", (3, 2), 90)))
    for size in ((32, 32), (33, 97), (640, 480), (31, 500)):
        out.append(_encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))))
    ramp = np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (120, 1))
    out.append(_encode(Image.fromarray(ramp)))
    out.append(_encode(Image.fromarray(ramp.T.copy())))
    checker = ((np.indices((256, 256)).sum(axis=0) // 16) % 2 * 255).astype(np.uint8)
    out.append(_encode(Image.fromarray(checker)))
    rgba = Image.fromarray(rng.integers(0, 256, (80, 60, 4), dtype=np.uint8), "RGBA")
    out.append(_encode(rgba))
    out.append(_encode(rgba.convert("RGB").quantize(16)))  # palette
    out.append(_encode(Image.fromarray(ramp.astype(np.uint16) * 257), "PNG"))  # I;16
    noise = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out.append(_encode(noise, "JPEG", quality=40))
    out.append(_encode(noise, "WEBP", quality=50))
    return out


def _rotated_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 CW on display
        return _encode(img.convert("RGB"), "JPEG", quality=90, exif=exif.tobytes())


@pytest.mark.parametrize("hash_size", [8, 4, 6, 16])
def test_exact_mode_is_bit_identical_to_imagehash(real_images: dict[str, bytes], hash_size: int) -> None:
    images = list(real_images.values()) + _synthetic_images()
    images += [_rotated_jpeg(real_images["astronaut.jpg"]), _rotated_jpeg(real_images["coffee.jpg"])]
    params = P.PhashParams(hash_size=hash_size)
    words, errors = P.phash_bytes(images, params)
    assert errors == [None] * len(images)
    expected = [_reference(d, hash_size) for d in images]
    assert P.to_hex(words, params.n_bits) == expected
    assert words.shape == (len(images), params.n_words)
    if hash_size == 8:
        assert all(len(h) == 16 for h in expected)


def test_exif_orientation_changes_the_hash_like_imagehash_of_the_transposed_image(real_images: dict[str, bytes]) -> None:
    plain = real_images["astronaut.jpg"]
    rotated = _rotated_jpeg(plain)
    (h_plain, h_rot), _ = P.phash_bytes([plain, rotated])
    with Image.open(io.BytesIO(plain)) as img:
        turned = img.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert P.to_hex(h_rot[None, :])[0] == str(imagehash.phash(turned))
    assert P.hamming(h_plain, h_rot) > 10  # really rotated, not ignored
    fast, _ = P.phash_bytes([rotated], P.PhashParams(mode="fast"))  # fast mode applies EXIF too
    assert P.hamming(fast[0], h_rot) <= 4


def test_phash_image_and_phash_int_match_imagehash(real_images: dict[str, bytes]) -> None:
    for data in list(real_images.values())[:5]:
        img = P.decode_rgb(data)
        assert P.phash_int(img) == int(str(imagehash.phash(img)), 16)
        assert P.phash_int(img, 16) == int(str(imagehash.phash(img, hash_size=16)), 16)


def test_hex_roundtrip_and_ints() -> None:
    rng = np.random.default_rng(1)
    for n_bits in (64, 16, 36, 256):
        n_words = (n_bits + 63) // 64
        words = rng.integers(0, 2**63, size=(20, n_words), dtype=np.uint64)
        top = n_bits - 64 * (n_words - 1)
        if top < 64:
            words[:, 0] &= np.uint64((1 << top) - 1)
        hexes = P.to_hex(words, n_bits)
        assert all(len(h) == (n_bits + 3) // 4 for h in hexes)
        assert np.array_equal(P.from_hex(hexes, n_bits), words)
        assert np.array_equal(P.from_ints([int(h, 16) for h in hexes], n_bits), words)
    with pytest.raises(ValueError, match="16-hex-digit"):
        P.from_hex(["abc"])
    with pytest.raises(ValueError, match="more than 34 bits"):
        P.from_hex(["f" * 9], 34)  # 9 hex digits hold 36 bits


def test_hex_columns_parse_like_python_ints() -> None:
    """from_hex works on the strings' bytes: every bit position, upper case, Arrow columns (sliced, chunked)."""
    import pyarrow as pa

    rng = np.random.default_rng(11)
    values = [int(v) for v in rng.integers(0, 2**64, 300, dtype=np.uint64)] + [0, 2**64 - 1, 2**63, 1]
    hexes = [format(v, "016x") for v in values]
    expected = np.array(values, dtype=np.uint64).reshape(-1, 1)
    assert np.array_equal(P.from_hex(hexes), expected)
    assert np.array_equal(P.from_hex([h.upper() for h in hexes]), expected)
    column = pa.array(["zzzz"] + hexes, pa.string()).slice(1)  # an offset into the buffers
    assert np.array_equal(P.from_hex(column), expected)
    chunked = pa.chunked_array([hexes[:100], hexes[100:]], pa.large_string())
    assert np.array_equal(P.from_hex(chunked), expected)
    assert P.from_hex(pa.chunked_array([], pa.string())).shape == (0, 1)
    assert np.array_equal(P.from_hex(["0" * 16 + "f" * 48], 256), np.array([[0, 2**64 - 1, 2**64 - 1, 2**64 - 1]],
                                                                           dtype=np.uint64))
    for bad in ("00000000000000g0", "0x00000000000001", " 000000000000001"):
        with pytest.raises(ValueError, match="not hexadecimal"):
            P.from_hex(hexes[:3] + [bad])
    with pytest.raises(ValueError, match="16-hex-digit"):
        P.from_hex([hexes[0], None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="16-hex-digit"):
        P.from_hex(pa.array([hexes[0], None]))


def test_undecodable_bytes_are_reported_not_hashed() -> None:
    for mode in ("exact", "fast"):
        words, errors = P.phash_bytes([b"<html>nope</html>", b""], P.PhashParams(mode=mode))
        assert all(errors) and not words.any()


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        P.PhashParams(hash_size=1)
    with pytest.raises(ValueError):
        P.PhashParams(mode="turbo")  # type: ignore[arg-type]


def test_fast_mode_agrees_with_imagehash_on_large_jpegs(real_images: dict[str, bytes]) -> None:
    """Fast mode decodes JPEGs at 1/2..1/8 scale; on real photos it stays within a few bits."""
    big: list[bytes] = []
    for name, data in real_images.items():
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        large = rgb.resize((rgb.width * 4, rgb.height * 4), Image.Resampling.BICUBIC)
        big.append(_encode(large, "JPEG", quality=92))
        if name == "astronaut.jpg":
            # the draft decoder really is used: a 1280 px JPEG decodes at <= 1/2 scale
            assert max(P._draft_gray(big[-1], P.DRAFT_MIN_SIDE).size) <= large.width // 2
    exact, _ = P.phash_bytes(big, P.PhashParams(mode="exact"))
    fast, errors = P.phash_bytes(big, P.PhashParams(mode="fast"))
    assert errors == [None] * len(big)
    distance = P.hamming(exact, fast)
    assert np.median(distance) <= 2, distance
    assert distance.max() <= 8, distance
    # PNGs and small images take the same route without draft: still close
    small, _ = P.phash_bytes(list(real_images.values()), P.PhashParams(mode="fast"))
    reference, _ = P.phash_bytes(list(real_images.values()))
    assert P.hamming(small, reference).max() <= 6
