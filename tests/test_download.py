"""The download stage end to end on real photos: config, resize modes, EXIF, filters, encoding,
rows that arrive with image bytes, and the stage contract (same rows, same order, reasons)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from faultserver import HTML_PAGE, FaultServer, Respond
from PIL import Image

from curate.pipeline import columns as C
from curate.pipeline.configspec import ConfigError, build
from curate.pipeline.images import ImageError, decode_image, decode_rgb, sniff_format
from curate.pipeline.stage import RunContext
from curate.stages.download import DownloadConfig, DownloadStage
from curate.stages.download.fetch import FetchOptions
from curate.stages.download.resize import EXIF_MAX_CHARS, ImageSpec, original_exif, process_image
from curate.stages.download.stage import options_from

LOOPBACK = {"allowed_networks": ("127.0.0.1/32",), "timeout": 2.0, "connect_timeout": 1.0, "retries": 0}


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def make_stage(**config: object) -> DownloadStage:
    return DownloadStage(DownloadConfig(**{**LOOPBACK, **config}), RunContext(output_path="", work_path=""))  # type: ignore[arg-type]


def rows(urls: list[str | None], **extra: list[object]) -> pa.Table:
    n = len(urls)
    data: dict[str, list[object]] = {C.KEY: [f"{i:09d}" for i in range(n)], C.URL: list(urls),
                                     C.STATUS: [C.STATUS_SUCCESS] * n}
    data.update(extra)
    return pa.table(data)


def run(urls: list[str | None], **config: object) -> pa.Table:
    stage = make_stage(**config)
    try:
        return stage.process(rows(urls))
    finally:
        stage.teardown()


@pytest.fixture
def server(real_images: dict[str, bytes]) -> Iterator[FaultServer]:
    with FaultServer({f"/{name}": Respond(data) for name, data in real_images.items()}) as srv:
        yield srv


@pytest.fixture
def big_photo(real_images: dict[str, bytes]) -> bytes:
    """A 1280x1280 JPEG mosaic of 16 real photos at native resolution: large enough for reduced-scale decoding."""
    mosaic = Image.new("RGB", (1280, 1280))
    photos = [Image.open(io.BytesIO(data)).convert("RGB") for data in real_images.values()]
    for i in range(16):
        photo = photos[i % len(photos)]
        mosaic.paste(photo.crop((0, 0, 320, 320)), ((i % 4) * 320, (i // 4) * 320))
    return encode(mosaic, quality=90)


# -- config ----------------------------------------------------------------------------------------
def test_config_defaults_and_validation() -> None:
    cfg = build(DownloadConfig, {}, "download")
    assert (cfg.allow_private, cfg.allowed_networks, cfg.allow_file) == (False, (), False)
    assert cfg.disallowed_directives == ("noai", "noimageai", "noindex", "noimageindex")
    assert build(DownloadConfig, {"allowed_networks": ["127.0.0.1/32", "::1"]}, "download").allowed_networks
    cases = [
        ({"allowed_networks": ["not-a-network"]}, "download.allowed_networks[0]"),
        ({"input_formats": ["JPEG", "SVG"]}, "download.input_formats[1]"),
        ({"connect_timeout": 20.0}, "download.connect_timeout"),
        ({"resize_mode": "stretch"}, "download.resize_mode"),
        ({"timeout": 0}, "download.timeout"),
        ({"user_agent": "a\r\nX-Evil: 1"}, "download.user_agent"),
        ({"max_image_pixels": 10**12}, "download.max_image_pixels"),
    ]
    for data, key_path in cases:
        with pytest.raises(ConfigError) as info:
            build(DownloadConfig, data, "download")
        assert info.value.key_path == key_path, (data, str(info.value))


def test_every_option_has_a_help_text_with_its_meaning() -> None:
    for f in dataclasses.fields(DownloadConfig):
        assert len(f.metadata["help"]) > 20, f.name


# -- geometry (img2dataset's semantics) ------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "size", "only_if_bigger", "expected"),
    [
        ("none", 100, False, (320, 213)),
        ("keep_ratio", 100, False, (150, 100)),  # round(320 * 100 / 213) = 150
        ("keep_ratio_largest", 100, False, (100, 67)),  # round(213 * 100 / 320) = 67
        ("center_crop", 100, False, (100, 100)),
        ("border", 100, False, (100, 100)),
        ("keep_ratio", 400, False, (601, 400)),  # upscaling when asked to
        ("keep_ratio", 400, True, (320, 213)),  # ... and not when only shrinking
        ("center_crop", 400, True, (320, 213)),  # no crop either (as img2dataset)
        ("border", 213, False, (213, 213)),
    ],
)
def test_resize_modes(server: FaultServer, mode: str, size: int, only_if_bigger: bool, expected: tuple) -> None:
    out = run([server.url("/chelsea.jpg")], resize_mode=mode, image_size=size, resize_only_if_bigger=only_if_bigger)
    row = out.to_pylist()[0]
    assert row[C.STATUS] == "success", row[C.ERROR_MESSAGE]
    assert (row["width"], row["height"]) == expected
    assert (row["original_width"], row["original_height"]) == (320, 213)
    img = Image.open(io.BytesIO(row[C.IMAGE]))
    assert img.size == expected and img.format == "JPEG"
    if mode == "border":  # white bars above and below the centred photo
        arr = np.asarray(img.convert("RGB")).astype(int)
        assert arr[0].mean() > 250 and arr[-1].mean() > 250
        assert arr[arr.shape[0] // 2].mean() < 240


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(1e-9, float(((a - b) ** 2).mean()))))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)


def test_reduced_scale_decoding_stays_close_to_full_decoding(big_photo: bytes) -> None:
    """1280 → 256 of a mosaic of textures (grass, gravel, brick: the worst case for a coarse filter)."""
    for mode in ("center_crop", "keep_ratio", "border"):
        fast = process_image(big_photo, ImageSpec(resize_mode=mode, image_size=256, use_draft=True))
        full = process_image(big_photo, ImageSpec(resize_mode=mode, image_size=256, use_draft=False))
        assert (fast.width, fast.height) == (full.width, full.height) == (256, 256)
        assert psnr(pixels(fast.data), pixels(full.data)) > 30.0, mode
    off = make_stage(fast_jpeg_decode=False)._spec
    assert off.use_draft is False


def test_draft_margin_sets_the_decode_scale(big_photo: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """1280 -> 256: margin 2 (default) asks libjpeg for >= 512 px (1/2 scale), margin 1 for >= 256 px (1/4 scale);
    the output size is the same and the pixels stay close to a full decode's."""
    from curate.pipeline.images import OpenedImage

    decoded: list[tuple[int, int]] = []
    original = OpenedImage.decode
    monkeypatch.setattr(OpenedImage, "decode", lambda self: decoded.append(self.image.size) or original(self))
    full = process_image(big_photo, ImageSpec(image_size=256, use_draft=False))
    default = process_image(big_photo, ImageSpec(image_size=256))
    tight = process_image(big_photo, ImageSpec(image_size=256, draft_margin=1.0))
    assert decoded == [(1280, 1280), (640, 640), (320, 320)]
    assert (full.width, full.height) == (default.width, default.height) == (tight.width, tight.height) == (256, 256)
    assert psnr(pixels(tight.data), pixels(full.data)) > 25.0
    assert make_stage(jpeg_draft_margin=1.0)._spec.draft_margin == 1.0


def test_center_crop_resamples_only_the_kept_region_without_changing_pixels(big_photo: bytes) -> None:
    wide = Image.open(io.BytesIO(big_photo)).convert("RGB").crop((0, 0, 1280, 640))
    reference = wide.resize((512, 256), Image.Resampling.HAMMING).crop((128, 0, 384, 256))  # `area`'s filter
    out = process_image(encode(wide, quality=95), ImageSpec(resize_mode="center_crop", image_size=256, use_draft=False))
    assert np.abs(pixels(out.data) - np.asarray(reference).astype(float)).mean() < 2.0
    assert psnr(pixels(out.data), np.asarray(reference).astype(float)) > 35.0


def test_area_downscale_is_close_to_an_exact_area_average(big_photo: bytes) -> None:
    """`area` stands for OpenCV's INTER_AREA (img2dataset's default). Pillow's box filter, which takes source
    pixels whole or not at all, strays from the exact footprint average at non-integer factors; on photos the
    hamming filter behind `area` stays much closer to it (full decode, 1280 -> 333 px)."""
    cv2 = pytest.importorskip("cv2")
    full = np.asarray(Image.open(io.BytesIO(big_photo)).convert("RGB")).astype(np.float32)
    exact = cv2.resize(full, (333, 333), interpolation=cv2.INTER_AREA)

    def fidelity(interpolation: str) -> float:
        spec = ImageSpec(image_size=333, resize_only_if_bigger=False, use_draft=False,
                         downscale_interpolation=interpolation)  # type: ignore[arg-type]
        out = process_image(big_photo, spec)
        assert out.pixels is not None and out.pixels.size == (333, 333)
        return psnr(np.asarray(out.pixels.convert("RGB")).astype(float), exact)

    assert fidelity("area") > fidelity("box") + 5.0


def test_exif_orientation_is_applied(server: FaultServer) -> None:
    stored = Image.new("RGB", (60, 40), (220, 20, 20))
    stored.paste((20, 20, 220), (30, 0, 60, 40))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    server.routes["/rotated.jpg"] = Respond(encode(stored, exif=exif.tobytes()))
    row = run([server.url("/rotated.jpg")], resize_mode="none").to_pylist()[0]
    assert (row["width"], row["height"], row["original_width"], row["original_height"]) == (40, 60, 40, 60)
    shown = np.asarray(Image.open(io.BytesIO(row[C.IMAGE])).convert("RGB")).astype(int)
    assert shown[5, 20, 0] > 150 and shown[5, 20, 2] < 100  # top is the former left (red)
    assert shown[55, 20, 2] > 150 and shown[55, 20, 0] < 100  # bottom is the former right (blue)
    assert decode_image(encode(stored, exif=exif.tobytes())).size == (40, 60)


def camera_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "Canon EOS 5D"  # Model
    exif[0x0112] = 6  # Orientation
    return exif


def test_exif_column_as_img2dataset_writes_it(server: FaultServer, real_images: dict[str, bytes]) -> None:
    """exifread's "IFD Tag" names and printable values (img2dataset's format), from the bytes as received."""
    photo = Image.new("RGB", (60, 40), (120, 80, 40))
    server.routes["/camera.jpg"] = Respond(encode(photo, exif=camera_exif().tobytes()))
    server.routes["/plain.png"] = Respond(encode(photo, "PNG"), content_type="image/png")
    out = run([server.url("/camera.jpg"), server.url("/plain.png"), server.url("/missing.jpg")]).to_pylist()
    expected = {"Image Make": "Canon", "Image Model": "Canon EOS 5D", "Image Orientation": "Rotated 90 CW"}
    assert json.loads(out[0]["exif"]) == expected
    assert out[0][C.IMAGE][:2] == b"\xff\xd8" and original_exif(out[0][C.IMAGE]) is None  # re-encoding stripped it
    assert out[1]["exif"] is None and out[2]["exif"] is None  # no EXIF; failed row
    # rows that arrive with bytes get it when they are verified, kept or reprocessed
    table = rows([None, None], image=[encode(photo, exif=camera_exif().tobytes()), real_images["horse.png"]])
    for reprocess in (False, True):
        got = make_stage(reprocess_existing=reprocess).process(table).column("exif").to_pylist()
        assert got[0] is not None and json.loads(got[0]) == expected and got[1] is None


def test_exif_column_is_bounded() -> None:
    exif = camera_exif()
    exif[0x010E] = "x" * 5000  # ImageDescription: a blob-sized value is left out
    exif[0x013B] = "Jane Doe"  # Artist
    exif[0x8298] = "y" * 900  # Copyright
    for tag in range(0x9000, 0x9000 + 30):  # unknown tags, 900 chars each: together over the cap
        exif[tag] = "z" * 900
    data = encode(Image.new("RGB", (8, 8)), exif=exif.tobytes())
    text = original_exif(data)
    assert text is not None and len(text) <= EXIF_MAX_CHARS
    tags = json.loads(text)
    assert tags["Image Artist"] == "Jane Doe" and tags["Image Make"] == "Canon"
    assert "Image ImageDescription" not in tags and all(len(v) <= 1024 for v in tags.values())
    assert original_exif(b"not an image") is None and original_exif(data[:30]) is None


# -- filters and encodings -------------------------------------------------------------------------
def test_size_and_aspect_filters_reject(server: FaultServer) -> None:
    urls = [server.url("/chelsea.jpg"), server.url("/astronaut.jpg")]
    out = run(urls, min_width=321)
    assert out.column(C.STATUS).to_pylist() == ["rejected", "rejected"]
    assert out.column(C.REJECT_REASON).to_pylist() == ["too_small", "too_small"]
    out = run(urls, min_height=214, max_aspect_ratio=1.4)
    assert out.column(C.REJECT_REASON).to_pylist() == ["too_small", None]
    out = run(urls, max_aspect_ratio=1.4)
    assert out.column(C.REJECT_REASON).to_pylist() == ["aspect_ratio", None]
    assert "1.50 > max_aspect_ratio 1.4" in out.column(C.ERROR_MESSAGE)[0].as_py()



def test_a_sliver_that_would_resize_to_gigabytes_is_refused_before_decoding(server: FaultServer) -> None:
    """5000 x 1 px (a few hundred bytes) at keep_ratio 256, not only if bigger (img2dataset's default), would be
    1,280,000 x 256 px: ~1 GB of pixels per image and more than JPEG can store. It used to be decoded, scaled and
    then fail in the encoder as internal_error."""
    server.routes["/sliver.png"] = Respond(encode(Image.new("RGB", (5000, 1), (0, 200, 0)), fmt="PNG"))
    out = run([server.url("/sliver.png"), server.url("/chelsea.jpg")], resize_mode="keep_ratio", image_size=256,
              resize_only_if_bigger=False)
    assert out.column(C.REJECT_REASON).to_pylist() == ["output_too_large", None]
    assert "would be 1280000x256" in out.column(C.ERROR_MESSAGE)[0].as_py()
    out = run([server.url("/sliver.png")], resize_mode="center_crop", image_size=256, resize_only_if_bigger=False)
    assert out.column(C.STATUS).to_pylist() == ["success"] and out.column("width").to_pylist() == [256]

def test_keep_original_bytes_when_small_enough(server: FaultServer, real_images: dict[str, bytes]) -> None:
    urls = [server.url("/chelsea.jpg"), server.url("/brick.png")]
    out = run(urls, reencode="if_needed", image_size=512).to_pylist()
    assert out[0][C.IMAGE] == real_images["chelsea.jpg"]
    assert out[0]["sha256"] == hashlib.sha256(real_images["chelsea.jpg"]).hexdigest()
    assert out[1][C.IMAGE_EXT] == "jpg" and sniff_format(out[1][C.IMAGE]) == "JPEG"  # PNG → jpg: re-encoded
    always = run(urls[:1], reencode="always", image_size=512).to_pylist()[0]
    assert always[C.IMAGE] != real_images["chelsea.jpg"]
    assert always["sha256"] == hashlib.sha256(always[C.IMAGE]).hexdigest()
    shrunk = run(urls[:1], reencode="if_needed", image_size=100).to_pylist()[0]
    assert shrunk[C.IMAGE] != real_images["chelsea.jpg"] and shrunk["height"] == 100


@pytest.mark.parametrize(("fmt", "pillow_name"), [("png", "PNG"), ("webp", "WEBP"), ("jpg", "JPEG")])
def test_output_formats(server: FaultServer, fmt: str, pillow_name: str) -> None:
    row = run([server.url("/horse.png")], output_format=fmt, image_size=128).to_pylist()[0]
    assert row[C.IMAGE_EXT] == fmt and sniff_format(row[C.IMAGE]) == pillow_name
    assert Image.open(io.BytesIO(row[C.IMAGE])).size == (row["width"], row["height"])


def test_transparency_is_matted_on_white_for_jpeg(server: FaultServer) -> None:
    rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 25, 50))
    server.routes["/alpha.png"] = Respond(encode(rgba, "PNG"), content_type="image/png")
    row = run([server.url("/alpha.png")], resize_mode="none").to_pylist()[0]
    arr = np.asarray(Image.open(io.BytesIO(row[C.IMAGE])).convert("RGB")).astype(int)
    assert arr[25, 40].min() > 245  # transparent → white, not black
    assert arr[25, 10, 0] > 150 and arr[25, 10, 1] < 60
    kept = run([server.url("/alpha.png")], resize_mode="none", output_format="png").to_pylist()[0]
    assert Image.open(io.BytesIO(kept[C.IMAGE])).mode == "RGBA"


def test_other_input_formats_and_restrictions(server: FaultServer, real_images: dict[str, bytes]) -> None:
    photo = Image.open(io.BytesIO(real_images["coffee.jpg"]))
    for fmt in ("GIF", "BMP", "TIFF", "WEBP"):
        server.routes[f"/coffee.{fmt}"] = Respond(encode(photo, fmt), content_type="application/octet-stream")
    urls = [server.url(f"/coffee.{fmt}") for fmt in ("GIF", "BMP", "TIFF", "WEBP")]
    out = run(urls, image_size=100)
    assert out.column(C.STATUS).to_pylist() == ["success"] * 4
    assert out.column("height").to_pylist() == [100] * 4
    out = run(urls, input_formats=["JPEG", "PNG"])
    assert out.column(C.REJECT_REASON).to_pylist() == ["unsupported_format"] * 4


def test_pixel_limit_is_configurable(server: FaultServer) -> None:
    row = run([server.url("/astronaut.jpg")], max_image_pixels=320 * 320 - 1).to_pylist()[0]
    assert (row[C.STATUS], row[C.REJECT_REASON]) == ("failed", "decompression_bomb")
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard stays on


def test_decode_image_api(real_images: dict[str, bytes]) -> None:
    img = decode_image(real_images["astronaut.jpg"])
    assert img.size == (320, 320) and img.mode == "RGB"
    for data, reason in ((HTML_PAGE, "not_an_image"), (b"", "empty_body"),
                         (real_images["astronaut.jpg"][:5000], "truncated_image")):
        with pytest.raises(ImageError) as info:
            decode_image(data)
        assert info.value.reason == reason


def test_decode_rgb_guard_and_draft(real_images: dict[str, bytes], big_photo: bytes) -> None:
    gray = decode_rgb(encode(Image.open(io.BytesIO(real_images["camera.jpg"])).convert("L")))
    assert gray.mode == "RGB"
    small = decode_rgb(big_photo, draft_size=(300, 200))  # 1280 → 1/4 scale keeps both sides >= the hint
    assert small.size == (320, 320) and decode_rgb(big_photo).size == (1280, 1280)
    with pytest.raises(ImageError) as info:
        decode_rgb(real_images["astronaut.jpg"], max_pixels=320 * 320 - 1)
    assert info.value.reason == "decompression_bomb" and "decompression-bomb limit" in info.value.message
    with pytest.raises(ImageError) as info:
        decode_rgb(real_images["horse.png"], input_formats=("JPEG",))
    assert info.value.reason == "unsupported_format"
    clone = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert (clone.reason, clone.message) == (info.value.reason, info.value.message)


def test_fetch_options_and_image_spec_come_from_the_config() -> None:
    cfg = DownloadConfig(timeout=3.0, connect_timeout=2.0, max_per_host=3, ca_bundle="ca.pem", robots_tokens=("x",),
                         max_image_pixels=1000, fast_jpeg_decode=False, quality=80, resize_mode="border",
                         jpeg_draft_margin=1.5)
    options, spec = cfg.fetch_options(), cfg.image_spec()
    names = {f.name for f in dataclasses.fields(DownloadConfig)}
    for f in dataclasses.fields(FetchOptions):
        expected = getattr(cfg, f.name) if f.name in names else f.default
        assert getattr(options, f.name) == expected, f.name
    for f in dataclasses.fields(ImageSpec):
        source = {"max_pixels": "max_image_pixels", "use_draft": "fast_jpeg_decode",
                  "draft_margin": "jpeg_draft_margin"}.get(f.name, f.name)
        assert getattr(spec, f.name) == getattr(cfg, source), f.name
    assert (options.ca_bundle, spec.max_pixels, spec.use_draft, spec.quality, spec.draft_margin) == (
        "ca.pem", 1000, False, 80, 1.5)
    with pytest.raises(TypeError, match="has no field"):  # a config option renamed away fails loudly
        options_from(FetchOptions, cfg)


# -- the stage contract ----------------------------------------------------------------------------
def test_rows_with_image_bytes_skip_fetching(server: FaultServer, real_images: dict[str, bytes]) -> None:
    photo = real_images["chelsea.jpg"]
    table = rows(
        ["http://127.0.0.1:9/never-fetched.jpg", None, server.url("/astronaut.jpg"), "ftp://x/y.jpg"],
        image=[photo, HTML_PAGE, None, real_images["horse.png"]],
        image_ext=["jpg", "jpg", None, "png"],
    )
    stage = make_stage(image_size=100)
    out = stage.process(table).to_pylist()
    assert server.hits == {"/astronaut.jpg": 1}
    assert out[0][C.STATUS] == "success" and out[0][C.IMAGE] == photo  # kept byte for byte
    assert (out[0]["width"], out[0]["height"]) == (320, 213)
    assert out[0]["sha256"] == hashlib.sha256(photo).hexdigest()
    assert (out[1][C.STATUS], out[1][C.REJECT_REASON]) == ("failed", "not_an_image")
    assert out[2][C.STATUS] == "success" and out[2]["height"] == 100
    assert out[3][C.IMAGE_EXT] == "png" and out[3][C.IMAGE] == real_images["horse.png"]
    assert stage.counters["input_bytes"] == 3 and stage.counters["fetched"] == 1
    stage.teardown()
    reprocessed = make_stage(image_size=100, reprocess_existing=True).process(table).to_pylist()
    assert reprocessed[0]["height"] == 100 and reprocessed[0]["original_height"] == 213


def test_contract_same_rows_same_order_extra_columns(server: FaultServer) -> None:
    urls = [server.url("/coins.jpg"), server.url("/nope.jpg"), None, server.url("/clock.jpg")]
    table = rows(urls, similarity=[0.1, 0.2, 0.3, 0.4])
    stage = make_stage()
    out = stage.process(table)
    assert out.num_rows == 4
    assert out.column(C.KEY).to_pylist() == table.column(C.KEY).to_pylist()
    assert out.column("similarity").to_pylist() == [0.1, 0.2, 0.3, 0.4]
    assert out.column(C.STATUS).to_pylist() == ["success", "failed", "failed", "success"]
    assert out.column(C.REJECT_REASON).to_pylist() == [None, "http_404", "missing_url", None]
    assert out.column(C.REJECT_STAGE).to_pylist() == [None, "download", "download", None]
    assert out.schema.field(C.IMAGE).type == pa.binary()
    assert out.schema.field("width").type == pa.int32()
    conformed = C.conform(out)  # what the runner writes: known columns typed, no image bytes
    assert C.IMAGE not in conformed.column_names and "sha256" in conformed.column_names
    assert stage.counters["fetched"] == 2 and stage.counters["bytes_downloaded"] > 0
    # Dask pickles stages to ship them; threads and sockets stay behind and are rebuilt by setup()
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.process(rows(urls[:1])).column(C.STATUS).to_pylist() == ["success"]
    clone.teardown()
    stage.teardown()


def test_image_work_runs_at_most_cpu_threads_at_a_time(
    server: FaultServer, real_images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 download threads wait for the network together, but only `cpu_threads` of them decode, resize and encode
    (and run the later stages' pixel work) at once; 0 = this process's share of the machine's CPUs."""
    import curate.stages.download.stage as download_mod

    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def counted(real: Any) -> Any:
        def work(*args: Any, **kwargs: Any) -> Any:
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            try:
                time.sleep(0.01)  # long enough for the other threads to pile up at the gate
                return real(*args, **kwargs)
            finally:
                with lock:
                    state["now"] -= 1
        return work

    monkeypatch.setattr(download_mod, "process_image", counted(download_mod.process_image))
    monkeypatch.setattr(download_mod, "verify_image", counted(download_mod.verify_image))
    name = next(iter(real_images))
    urls = [server.url(f"/{name}")] * 24

    def most_at_once(stage: DownloadStage, table: pa.Table) -> int:
        state["most"] = 0
        try:
            out = stage.process(table)
        finally:
            stage.teardown()
        assert out.column(C.STATUS).to_pylist() == [C.STATUS_SUCCESS] * table.num_rows
        return state["most"]

    assert most_at_once(make_stage(threads=8, cpu_threads=8), rows(urls)) > 2  # the count sees concurrency
    assert most_at_once(make_stage(threads=8, cpu_threads=2), rows(urls)) == 2
    with_bytes = rows([None] * 24, image=[real_images[name]] * 24)  # no network wait at all: the gate alone
    assert most_at_once(make_stage(threads=8, cpu_threads=2), with_bytes) == 2
    crowded = RunContext(output_path="", work_path="", processes_per_host=1_000_000)  # share: 1 CPU
    stage = DownloadStage(DownloadConfig(**{**LOOPBACK, "threads": 8}), crowded)  # type: ignore[arg-type]
    assert most_at_once(stage, rows(urls)) == 1


def test_empty_partition() -> None:
    stage = make_stage()
    out = stage.process(rows([]))
    assert out.num_rows == 0 and C.IMAGE in out.column_names
    stage.teardown()


_RUN = ["download.allowed_networks=[127.0.0.1/32]", "captions.enabled=false", "dedup.enabled=false",
        "clip.enabled=false", "cluster.processes=false", "cluster.n_workers=1", "cluster.dashboard=false"]


def _run_rows(run_dir: Any, *overrides: str) -> list[dict[str, Any]]:
    """A real run (threads-only cluster, download + write): every row of curated/ and rejected/ by key, each with the
    `jpg` bytes its shard holds (None for a rejected row); the accounting invariant is checked on the way."""
    import glob
    import tarfile

    import pyarrow.parquet as pq

    from curate.pipeline.config import load_config
    from curate.pipeline.runner import run as run_pipeline

    run_pipeline(load_config(None, [*_RUN, f"output.path={run_dir}", *overrides], data={}), progress=False,
                 echo=lambda _m: None)
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["input_rows"] == stats["kept"] + sum(sum(r.values()) for r in stats["rejected"].values())
    images: dict[str, bytes] = {}
    for shard in sorted(glob.glob(str(run_dir / "shards" / "*.tar"))):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    images[member.name.split(".")[0]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    table = pa.concat_tables([pq.read_table(run_dir / d) for d in ("curated", "rejected")
                              if list((run_dir / d).glob("*.parquet"))], promote_options="default")
    return [{**r, "jpg": images.get(r["key"])} for r in sorted(table.to_pylist(), key=lambda r: r["key"])]


# -- verifying the bytes against the input's digests (DataComp's sha256, img2dataset's verify_hash) --------------
def test_verify_hash_checks_the_bytes_as_received_through_a_real_run(
        tmp_path: Any, server: FaultServer, real_images: dict[str, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    """A DataComp-style table names each image's sha256: bytes with another digest (the URL now serves something
    else) fail as hash_mismatch before decoding; a null digest is not checked; the column name `sha256`, which is
    also curate's own column of the stored bytes, is read from `input_sha256`. A tar input's .json digest too."""
    import tarfile

    import pyarrow.parquet as pq

    from curate.pipeline.cli import main

    names = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    digests = [hashlib.sha256(real_images[n]).hexdigest() for n in names]
    expected = [digests[0].upper(), digests[0], None, "not-a-digest"]  # case-insensitive; row 1 gets chelsea
    pq.write_table(pa.table({"url": [server.url(f"/{n}") for n in names], "caption": ["c"] * 4,
                             "sha256": expected}), tmp_path / "in.parquet")
    base = [f"input.path={tmp_path / 'in.parquet'}", "download.verify_hash_column=sha256"]

    def outcome(run_dir: Any, *extra: str) -> list[dict[str, Any]]:
        return _run_rows(run_dir, *base, *extra)

    got = outcome(tmp_path / "run")
    assert [r["reject_reason"] for r in got] == [None, "hash_mismatch", None, "hash_mismatch"]
    assert [r["input_sha256"] for r in got] == expected
    assert f"sha256 of the {len(real_images['chelsea.jpg']):,} bytes received is {digests[1]}" in got[1]["error_message"]
    assert "is not a sha256 hex digest" in got[3]["error_message"]
    assert got[0]["sha256"] != digests[0]  # curate's own column: the digest of the stored (re-encoded) bytes
    counters = json.loads((tmp_path / "run" / "stats.json").read_text())["stages"]["download"]["counters"]
    assert counters["hash_verified"] == 1 and counters["hash_unchecked"] == 1

    md5 = [hashlib.md5(real_images[n]).hexdigest() for n in names]
    pq.write_table(pa.table({"url": [server.url(f"/{n}") for n in names], "caption": ["c"] * 4, "md5": md5}),
                   tmp_path / "in.parquet")
    got = outcome(tmp_path / "run-md5", "download.verify_hash_column=md5", "download.verify_hash_type=md5")
    assert [r["status"] for r in got] == ["success"] * 4

    # a WebDataset input's bytes are checked too (the digest in the sample's .json)
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        for i, (name, digest) in enumerate(zip(names[:2], [digests[0], digests[0]], strict=True)):
            for suffix, data in ((".jpg", real_images[name]), (".txt", b"c"),
                                 (".json", json.dumps({"sha256": digest}).encode())):
                member = tarfile.TarInfo(f"{i:03d}{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    got = outcome(tmp_path / "run-tar", f"input.path={tmp_path / 'in.tar'}")
    assert [r["reject_reason"] for r in got] == [None, "hash_mismatch"]

    # a table without the column: validate and run refuse it, naming the key
    pq.write_table(pa.table({"url": [server.url("/astronaut.jpg")], "caption": ["c"]}), tmp_path / "in.parquet")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"input": {"path": str(tmp_path / "in.parquet")},
                                  "output": {"path": str(tmp_path / "run-missing")},
                                  "download": {"verify_hash_column": "sha256"}}))
    for command in ("validate", "run"):
        assert main([command, str(config)]) == 2
        assert "download.verify_hash_column: column 'sha256' not found in" in capsys.readouterr().err
    assert not (tmp_path / "run-missing" / "stats.json").exists()


# -- blurring given boxes (DataComp's face_bboxes, img2dataset's bbox_col) ------------------------------------
def _textured(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _changed_region(a: bytes, b: bytes) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the pixels that differ clearly between two decoded images."""
    diff = np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max(axis=2) > 24
    ys, xs = np.nonzero(diff)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize(("mode", "only_if_bigger"), [("keep_ratio", False), ("center_crop", False),
                                                       ("border", False), ("none", True)])
def test_blur_lands_on_the_box_in_every_geometry_and_orientation(orientation: int, mode: str,
                                                                 only_if_bigger: bool) -> None:
    """The box is given relative to the picture as stored; the output is upright, resized, cropped or padded: the
    blurred pixels must be where the box went, and nothing else may change."""
    from curate.stages.download.blur import displayed_boxes

    stored = _textured(600, 400)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, quality=95, exif=exif.tobytes())
    box = (0.55, 0.1, 0.8, 0.45)  # stored frame: right, upper part
    spec = ImageSpec(resize_mode=mode, image_size=200, resize_only_if_bigger=only_if_bigger)
    plain, blurred = process_image(data, spec), process_image(data, spec, blur=[box])
    assert (blurred.width, blurred.height) == (plain.width, plain.height)
    # where the box should be in the output picture
    (dx0, dy0, dx1, dy1), = displayed_boxes([box], orientation)
    shown = (400, 600) if orientation in (6, 8) else (600, 400)
    scale = {"keep_ratio": 200 / min(shown), "center_crop": 200 / min(shown), "border": 200 / max(shown),
             "none": 1.0}[mode]
    frame = (round(shown[0] * scale), round(shown[1] * scale))
    offset = ((frame[0] - 200) // 2, (frame[1] - 200) // 2) if mode == "center_crop" else (0, 0)
    if mode == "border":
        offset = (-((200 - frame[0]) // 2), -((200 - frame[1]) // 2))
    want = (dx0 * frame[0] - offset[0], dy0 * frame[1] - offset[1], dx1 * frame[0] - offset[0],
            dy1 * frame[1] - offset[1])
    got = _changed_region(plain.data, blurred.data)
    side = max(want[2] - want[0], want[3] - want[1])
    # the box grows by 10% of its side and the mask's soft edge reaches ~2 sigma (20% of the side) further
    slack = 0.3 * side + 3
    visible = (max(want[0], 0), max(want[1], 0), min(want[2], blurred.width), min(want[3], blurred.height))
    assert all(abs(g - w) <= slack for g, w in zip(got, visible, strict=True)), (got, want)


def test_blur_hides_the_box_content_and_keeps_the_rest() -> None:
    from curate.stages.download.blur import blur_boxes

    img = _textured(300, 200)
    out = np.asarray(blur_boxes(img, [(100, 50, 200, 150)])).astype(float)
    src = np.asarray(img).astype(float)
    inside = np.abs(np.diff(out[60:140, 110:190], axis=1)).mean()
    assert inside < 0.2 * np.abs(np.diff(src[60:140, 110:190], axis=1)).mean()  # the texture inside is gone
    assert np.array_equal(out[:, :60], src[:, :60]) and np.array_equal(out[:, 260:], src[:, 260:])
    assert blur_boxes(img, []) is img


@pytest.mark.parametrize(("value", "error"), [
    ("[[0.1, 0.1, 0.2]]", "4 finite numbers"), ([[0.1, 0.1, 0.2, float("nan")]], "4 finite numbers"),
    ([[0.5, 0.1, 0.2, 0.3]], "not [x_min, y_min, x_max, y_max]"), ([[10, 10, 50, 50]], "relative to the picture"),
    ("not json", "not JSON"), (7, "expected a list of boxes"), ([[0, 0, 1, 1]] * 300, "more than 256")])
def test_box_values_that_cannot_be_read_are_refused(value: object, error: str) -> None:
    from curate.stages.download.blur import BadBoxes, parse_boxes

    with pytest.raises(BadBoxes, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_boxes(value)


def test_box_values_that_can_be_read() -> None:
    from curate.stages.download.blur import parse_boxes

    assert parse_boxes(None) == [] and parse_boxes([]) == [] and parse_boxes("") == []
    assert parse_boxes("[[0.1, 0.2, 0.3, 0.4]]") == [(0.1, 0.2, 0.3, 0.4)]
    assert parse_boxes([[-0.01, 0.0, 1.02, 1]]) == [(0.0, 0.0, 1.0, 1.0)]  # detectors overshoot a little: clipped


def test_blur_column_through_a_real_run(tmp_path: Any, server: FaultServer, real_images: dict[str, bytes]) -> None:
    """DataComp's face_bboxes column: rows with boxes are stored blurred, rows without are as without the option,
    an unreadable value fails the row before it is fetched; a tar sample's .json boxes and its bytes too."""
    import tarfile

    import pyarrow.parquet as pq

    url = server.url("/astronaut.jpg")
    boxes = [[[0.3, 0.1, 0.7, 0.5]], None, [], [[0.3, 0.1, 0.7, 0.5]], [[0.3, 0.1, 0.7]]]  # DataComp's list type
    pq.write_table(pa.table({"url": [f"{url}?{i}" for i in range(5)], "caption": ["c"] * 5,
                             "face_bboxes": pa.array(boxes, pa.list_(pa.list_(pa.float64())))}),
                   tmp_path / "in.parquet")
    base = [f"input.path={tmp_path / 'in.parquet'}", "download.blur_bbox_column=face_bboxes"]

    def outcome(run_dir: Any, *extra: str) -> list[dict[str, Any]]:
        return _run_rows(run_dir, *base, *extra)

    got = outcome(tmp_path / "run")
    assert [r["reject_reason"] for r in got] == [None, None, None, None, "bad_blur_boxes"]
    assert got[1]["jpg"] == got[2]["jpg"] and got[0]["jpg"] == got[3]["jpg"] and got[0]["jpg"] != got[1]["jpg"]
    # 320 x 320 (not enlarged): the box is 96-224 x 32-160; blurred a little past it (10% growth, soft edge)
    assert (got[0]["width"], got[0]["height"]) == (320, 320)
    x0, y0, x1, y1 = _changed_region(got[1]["jpg"], got[0]["jpg"])
    assert 55 <= x0 <= 96 and 224 <= x1 <= 265 and y0 <= 32 and 160 <= y1 <= 201, (x0, y0, x1, y1)
    assert got[4]["url"].endswith("?4") and "face_bboxes: a box must be 4 finite numbers" in got[4]["error_message"]
    assert server.hits["/astronaut.jpg"] == 4  # rows 0-3: the bad value's row was refused before it was fetched
    # the same boxes as JSON text (a CSV column) give the same bytes
    pq.write_table(pa.table({"url": [f"{url}?0"], "caption": ["c"], "face_bboxes": [json.dumps(boxes[0])]}),
                   tmp_path / "text.parquet")
    assert _run_rows(tmp_path / "run-text", f"input.path={tmp_path / 'text.parquet'}",
                     "download.blur_bbox_column=face_bboxes")[0]["jpg"] == got[0]["jpg"]
    plain = outcome(tmp_path / "plain", "download.blur_bbox_column=")
    assert plain[1]["jpg"] == got[1]["jpg"]  # rows without boxes: the same bytes as without the option

    with tarfile.open(tmp_path / "in.tar", "w") as tar:  # bytes already downloaded, boxes in the sample's .json
        for i, sample_boxes in enumerate([[[0.3, 0.1, 0.7, 0.5]], []]):
            for suffix, data in ((".jpg", real_images["astronaut.jpg"]), (".txt", b"c"),
                                 (".json", json.dumps({"face_bboxes": sample_boxes}).encode())):
                member = tarfile.TarInfo(f"{i:03d}{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    got = outcome(tmp_path / "run-tar", f"input.path={tmp_path / 'in.tar'}")
    assert got[1]["jpg"] == real_images["astronaut.jpg"]  # no boxes: kept byte for byte
    assert got[0]["jpg"] != real_images["astronaut.jpg"] and (got[0]["width"], got[0]["height"]) == (320, 320)
    x0, y0, x1, y1 = _changed_region(real_images["astronaut.jpg"], got[0]["jpg"])
    assert 55 <= x0 <= 96 and 224 <= x1 <= 265 and y0 <= 32 and 160 <= y1 <= 201, (x0, y0, x1, y1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_turn_as_pillow_turns_the_picture(orientation: int) -> None:
    """displayed_boxes against Pillow's own exif_transpose of a picture with the box drawn in."""
    from PIL import ImageDraw, ImageOps

    from curate.stages.download.blur import displayed_boxes

    stored = Image.new("L", (200, 100))
    box = (0.55, 0.1, 0.8, 0.45)
    ImageDraw.Draw(stored).rectangle((110, 10, 159, 44), fill=255)  # box * (200, 100), inclusive corners
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    stored.getexif()[0x0112] = orientation
    shown = ImageOps.exif_transpose(stored)
    ys, xs = np.nonzero(np.asarray(shown))
    want = (xs.min() / shown.width, ys.min() / shown.height, (xs.max() + 1) / shown.width, (ys.max() + 1) / shown.height)
    (got,) = displayed_boxes([box], orientation)
    assert np.allclose(got, want, atol=0.011), (got, want)


def test_proxy_variables_are_named_in_one_warning_before_the_run(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The downloader connects directly; on a proxied cluster every row would fail without a hint otherwise."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("WARNING"):
        make_stage().preflight()
    assert "proxies" not in caplog.text
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "localhost")  # not a proxy
    with caplog.at_level("WARNING"):
        make_stage().preflight()
    assert "HTTPS_PROXY is set: curate's downloader does not use proxies" in caplog.text
