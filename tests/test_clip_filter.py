"""clip_filter stage and curate.stages.clip_filter.model: exactness against open_clip, the tensor (GPU-style)
image pipeline against the reference, tokenizer equivalence, failure handling, both decision modes,
embeddings, model loading. GPU-only checks run when CUDA is visible."""

from __future__ import annotations

import io
import pickle
import random
import string
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from curate.pipeline import columns as C
from curate.pipeline.configspec import ConfigError, build
from curate.pipeline.images import decode_rgb
from curate.pipeline.stage import RunContext, StageError
from curate.stages.clip_filter import ClipConfig, ClipFilterStage
from curate.stages.clip_filter import model as cm
from curate.stages.clip_filter.stage import ClipDecision

CUDA = torch.cuda.is_available()
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTIONS = [
    "a photo of an astronaut",
    "A RED brick wall &amp; mortar",
    "café au lait — ﬁne “quotes” and emoji 🚀",
    "camera\tman\nin a  field",
    "cells under a microscope " * 20,  # longer than the 77-token context: truncated
    "a cat",
    "a cup of coffee",
    "coins on a table",
    "grass",
    "gravel path",
    "a horse",
    "hubble deep field",
    "immunohistochemistry slide",
    "retina fundus image",
    "a rocket launch",
]


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------
class NotATensor:
    """An arbitrary object in a checkpoint: torch.load(weights_only=True) must refuse it."""


def encode_image(img: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_table(images: list[bytes | None], captions: list[str | None], keys: list[str] | None = None) -> pa.Table:
    n = len(images)
    return pa.table({
        C.KEY: keys or [f"{i:09d}" for i in range(n)],
        C.URL: [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
        C.CAPTION: pa.array(captions, type=pa.string()),
        C.STATUS: [C.STATUS_SUCCESS] * n,
        C.IMAGE: pa.array(images, type=pa.binary()),
        "extra_column": list(range(n)),
    })


@pytest.fixture(scope="module")
def demo_pairs(real_images: dict[str, bytes]) -> tuple[list[bytes], list[str]]:
    images = list(real_images.values())
    assert len(images) == len(CAPTIONS)
    return images, CAPTIONS


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    out = tmp_path_factory.mktemp("run")
    return RunContext(output_path=str(out), work_path=str(out / "_work"))


@pytest.fixture(scope="module")
def make_stage(tiny_clip: dict[str, str], context: RunContext) -> Callable[..., ClipFilterStage]:
    def make(**overrides: Any) -> ClipFilterStage:
        data: dict[str, Any] = {**tiny_clip, "device": "cpu", "batch_size": 4, **overrides}
        stage = ClipFilterStage(build(ClipConfig, data, "clip"), context)
        stage.ensure_setup()
        return stage

    return make


@pytest.fixture(scope="module")
def reference_tiny(tiny_clip: dict[str, str]) -> tuple[Any, Any, Any]:
    """open_clip's own loading of the same checkpoint: model, preprocess, tokenizer."""
    import open_clip

    open_clip.add_model_config(tiny_clip["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip["model"], pretrained=tiny_clip["pretrained"])
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_clip["model"])


def reference_scores(model: Any, preprocess: Any, tokenizer: Any, images: list[bytes], captions: list[str]) -> np.ndarray:
    """One pair at a time: model.encode_image(preprocess(img)) · encode_text(tokenize(caption))."""
    out = []
    with torch.no_grad():
        for blob, caption in zip(images, captions, strict=True):
            image = model.encode_image(preprocess(Image.open(io.BytesIO(blob))).unsqueeze(0))
            text = model.encode_text(tokenizer([caption]))
            image = image / image.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
            out.append(float((image * text).sum()))
    return np.asarray(out, dtype=np.float64)


@pytest.fixture(scope="module")
def odd_images(real_images: dict[str, bytes]) -> dict[str, bytes]:
    """Real photo in the formats and shapes a web crawl produces."""
    base = Image.open(io.BytesIO(real_images["astronaut.jpg"])).convert("RGB")
    return {
        "gray.jpg": encode_image(base.convert("L")),
        "progressive.jpg": encode_image(base, progressive=True),
        "cmyk.jpg": encode_image(base.convert("CMYK")),
        "rgba.png": encode_image(base.convert("RGBA"), "PNG"),
        "palette.png": encode_image(base.convert("P"), "PNG"),
        "wide.jpg": encode_image(base.resize((500, 180))),
        "tiny.jpg": encode_image(base.resize((20, 30))),
        "large.jpg": encode_image(base.resize((1000, 700))),
        "exact224.jpg": encode_image(base.resize((224, 224))),
        "photo.webp": encode_image(base, "WEBP"),
    }


def bomb_jpeg(real_jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header claims width x height (decoders would allocate that much)."""
    data = bytearray(real_jpeg)
    header = cm.probe_jpeg(bytes(data))
    assert header is not None
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    data[i + 5 : i + 7] = height.to_bytes(2, "big")
    data[i + 7 : i + 9] = width.to_bytes(2, "big")
    return bytes(data)


# -------------------------------------------------------------------------------------------
# exactness of the default (reference) path
# -------------------------------------------------------------------------------------------
def test_batched_scores_equal_open_clip_reference_fp32(make_stage, reference_tiny, demo_pairs) -> None:
    images, captions = demo_pairs
    stage = make_stage(threshold=-1.0)
    assert stage.image_pipeline == "reference" and stage.scorer.spec.precision == "fp32"
    out = stage.process(make_table(images, captions))
    got = out.column("clip_score").to_numpy()
    want = reference_scores(*reference_tiny, images, captions)
    assert np.abs(got - want).max() < 1e-4
    assert np.std(want) > 1e-3  # the comparison can tell pairs apart
    assert out.column("clip_score").type == pa.float32()
    assert out.column(C.STATUS).to_pylist() == [C.STATUS_SUCCESS] * len(images)
    assert out.column("extra_column").to_pylist() == list(range(len(images)))  # carried, order kept
    assert stage.counters["scored"] == len(images)


def test_vit_b32_random_init_matches_reference_and_warns(context, demo_pairs, caplog) -> None:
    """The real ViT-B-32 architecture and its 224px preprocessing, random weights ('' warns loudly)."""
    import open_clip

    images, captions = demo_pairs
    images, captions = images[:4], captions[:4]
    stage = ClipFilterStage(
        build(ClipConfig, {"model": "ViT-B-32", "pretrained": "", "device": "cpu", "batch_size": 4}, "clip"), context
    )
    stage.preflight()  # the run's random-weights warning comes from the client, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and setup on the worker adds no UserWarning duplicate
        stage.ensure_setup()
    assert [r.getMessage() for r in caplog.records if "RANDOM weights" in r.getMessage()] == [
        cm.random_weights_message("ViT-B-32")]
    out = stage.score(make_table(images, captions))
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(size=224), is_train=False)  # ViT-B-32 without a tag's overrides
    want = reference_scores(stage.scorer.model, preprocess, open_clip.get_tokenizer("ViT-B-32"), images, captions)
    assert np.abs(out.column("clip_score").to_numpy() - want).max() < 1e-4


def test_model_cached_per_process(make_stage) -> None:
    first, second = make_stage(), make_stage(threshold=0.5)
    assert first.scorer is second.scorer
    clone = pickle.loads(pickle.dumps(first))  # shipped to a worker: no model inside, set up again there
    assert clone._scorer is None and not clone._is_set_up
    clone.ensure_setup()
    assert clone.scorer is first.scorer


# -------------------------------------------------------------------------------------------
# tensor (GPU-style) pipeline vs reference, on CPU
# -------------------------------------------------------------------------------------------
PREPROCESS_CASES = {
    "openai_224_shortest_bicubic": dict(size=224, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic",
                                        resize_mode="shortest"),
    "longest_pad": dict(size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode="longest",
                        fill_color=128),
    "squash_bilinear": dict(size=256, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", resize_mode="squash"),
    "nonsquare_shortest": dict(size=(192, 256), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear",
                               resize_mode="shortest"),
}


@pytest.mark.parametrize("case", sorted(PREPROCESS_CASES))
def test_tensor_preprocess_matches_pil_reference(case, real_images, odd_images) -> None:
    """libjpeg decode + batched tensor resize/crop/normalise vs the model's PIL transform.

    Measured on these images: max 2 levels (of 255) on a few edge pixels, mean <= 0.13 levels.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.io import ImageReadMode, decode_jpeg

    cfg = PREPROCESS_CASES[case]
    reference = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    tensor_pp = cm.TensorPreprocess(cfg)
    blobs = {**real_images, **{k: v for k, v in odd_images.items() if k != "palette.png"}}
    decoded = []
    for blob in blobs.values():
        header = cm.probe_jpeg(blob)
        if header is not None and header.gpu_decodable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded.append(decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8), mode=ImageReadMode.RGB))
        else:
            decoded.append(cm.pil_to_uint8_chw(decode_rgb(blob)))
    got = tensor_pp(decoded, "cpu")  # one call: images of many sizes grouped internally
    want = torch.stack([reference(decode_rgb(b)) for b in blobs.values()])
    levels = (got - want).abs() * torch.tensor(tensor_pp.std).view(1, 3, 1, 1) * 255
    assert got.shape == want.shape
    assert levels.max().item() <= 2.5, case
    assert levels.mean(dim=(1, 2, 3)).max().item() <= 0.2, case


@pytest.mark.parametrize("size", [224, 64])
def test_resized_size_matches_torchvision_resize(size) -> None:
    import torchvision.transforms.functional as TF

    pp = cm.TensorPreprocess({"size": size, "mean": OPENAI_MEAN, "std": OPENAI_STD})
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(1, 3000), rng.randint(1, 3000)
        resized = TF.resize(Image.new("L", (w, h)), size, interpolation=TF.InterpolationMode.NEAREST)
        assert pp.resized_size(h, w) == (resized.height, resized.width), (h, w)


def test_tensor_pipeline_scores_close_to_reference(make_stage, demo_pairs, odd_images) -> None:
    images = demo_pairs[0] + list(odd_images.values())
    captions = (demo_pairs[1] + ["a photo"] * len(odd_images))
    reference = make_stage(preprocess="reference", save_embeddings=True).score(make_table(images, captions))
    tensor_stage = make_stage(preprocess="tensor", save_embeddings=True)
    tensor = tensor_stage.score(make_table(images, captions))
    diff = np.abs(reference.column("clip_score").to_numpy() - tensor.column("clip_score").to_numpy())
    assert diff.max() < 2e-3  # measured ~2e-4; the 0.01 budget is for bf16 + nvJPEG on GPU
    ref_emb = np.array(reference.column("image_embedding").to_pylist(), dtype=np.float32)
    ten_emb = np.array(tensor.column("image_embedding").to_pylist(), dtype=np.float32)
    assert (ref_emb * ten_emb).sum(axis=1).min() > 0.999
    # plain JPEGs went through torchvision's decoder, the rest (PNG, WebP, CMYK) through Pillow
    assert tensor_stage.counters["decode_jpeg_libjpeg"] >= 15
    assert tensor_stage.counters["decode_pillow"] >= 5


# -------------------------------------------------------------------------------------------
# JPEG probing, decoding failures, captions
# -------------------------------------------------------------------------------------------
def test_probe_jpeg_routes_what_nvjpeg_cannot_decode(real_images, odd_images) -> None:
    baseline = cm.probe_jpeg(real_images["astronaut.jpg"])
    assert baseline is not None and baseline.gpu_decodable
    assert (baseline.width, baseline.height, baseline.components) == (320, 320, 3)
    progressive = cm.probe_jpeg(odd_images["progressive.jpg"])
    assert progressive is not None and progressive.sof_marker == 0xC2 and progressive.gpu_decodable
    gray = cm.probe_jpeg(odd_images["gray.jpg"])
    assert gray is not None and gray.components == 1 and gray.gpu_decodable
    cmyk = cm.probe_jpeg(odd_images["cmyk.jpg"])
    assert cmyk is not None and cmyk.components == 4 and not cmyk.gpu_decodable
    assert cm.probe_jpeg(odd_images["rgba.png"]) is None
    assert cm.probe_jpeg(b"") is None and cm.probe_jpeg(b"\xff\xd8\xff") is None
    assert cm.probe_jpeg(real_images["astronaut.jpg"][:40]) is None  # cut before the frame header
    wide = cm.probe_jpeg(odd_images["wide.jpg"])
    assert wide is not None and (wide.width, wide.height) == (500, 180)


@pytest.mark.parametrize("pipeline", ["reference", "tensor"])
def test_undecodable_rows_fail_without_touching_the_batch(make_stage, demo_pairs, real_images, pipeline) -> None:
    images, captions = demo_pairs
    jpeg = real_images["astronaut.jpg"]
    bad = {
        "garbage": b"this is not an image",
        "truncated": jpeg[: len(jpeg) // 3],
        "empty": b"",
        "null": None,
        "bomb": bomb_jpeg(jpeg, 10000, 10000),  # over the limit, under the 2x where Pillow itself refuses
        "html": b"<!doctype html><html><body>404</body></html>",
    }
    mixed_images: list[bytes | None] = []
    mixed_captions: list[str] = []
    for i, blob in enumerate(bad.values()):  # interleave failures with good rows, across batches
        mixed_images += [images[i], blob]
        mixed_captions += [captions[i], "a photo"]
    stage = make_stage(preprocess=pipeline, threshold=-1.0)
    out = stage.process(make_table(mixed_images, mixed_captions))
    assert out.num_rows == len(mixed_images)
    status = out.column(C.STATUS).to_pylist()
    reasons = out.column(C.REJECT_REASON).to_pylist()
    messages = out.column(C.ERROR_MESSAGE).to_pylist()
    scores = out.column("clip_score").to_pylist()
    for j in range(len(bad)):
        assert status[2 * j] == C.STATUS_SUCCESS and scores[2 * j] is not None
        assert status[2 * j + 1] == C.STATUS_FAILED, list(bad)[j]
        assert reasons[2 * j + 1] == "undecodable" and out.column(C.REJECT_STAGE)[2 * j + 1].as_py() == "clip_filter"
        assert scores[2 * j + 1] is None
    assert "decompression-bomb limit" in messages[2 * list(bad).index("bomb") + 1]
    # the good rows score exactly as they do without the bad neighbours
    alone = make_stage(preprocess=pipeline, threshold=-1.0).process(make_table(images[: len(bad)], captions[: len(bad)]))
    np.testing.assert_allclose([scores[2 * j] for j in range(len(bad))], alone.column("clip_score").to_numpy(), atol=1e-6)


@pytest.mark.parametrize("pipeline", ["reference", "tensor"])
def test_exif_orientation_is_applied_in_both_pipelines(make_stage, real_images, pipeline) -> None:
    """Every stage sees EXIF-transposed pixels: a sideways-stored photo tagged 6 scores as the upright one."""
    upright = Image.open(io.BytesIO(real_images["chelsea.jpg"])).convert("RGB")  # 320x213
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes; tag 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = encode_image(stored, exif=exif.tobytes())
    shown = decode_rgb(tagged)
    assert shown.size == (320, 213)
    exif[0x0112] = 1  # an APP1 segment that does not rotate: stays on the torchvision path
    plain_app1 = encode_image(stored, exif=exif.tobytes())
    images = [tagged, encode_image(shown, "PNG"), encode_image(stored), plain_app1]
    stage = make_stage(preprocess=pipeline, threshold=-1.0)
    scores = stage.score(make_table(images, ["a cat"] * 4)).column("clip_score").to_numpy()
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # the same pixels as the upright image
    assert abs(scores[0] - scores[2]) > 1e-4  # ... and not those of the sideways one
    assert scores[3] == pytest.approx(scores[2], abs=1e-6)
    if pipeline == "tensor":
        assert stage.counters["decode_exif_oriented"] == 1
        assert stage.counters["decode_jpeg_libjpeg"] == 2  # the untagged and the orientation-1 JPEG


def test_empty_captions_rejected_as_no_caption(make_stage, demo_pairs) -> None:
    images = demo_pairs[0][:4]
    out = make_stage(threshold=-1.0).process(make_table(images, ["", "   ", None, "a photo"]))
    assert out.column(C.REJECT_REASON).to_pylist() == ["no_caption"] * 3 + [None]
    assert out.column(C.STATUS).to_pylist() == [C.STATUS_REJECTED] * 3 + [C.STATUS_SUCCESS]
    assert out.column("clip_score").null_count == 3


# -------------------------------------------------------------------------------------------
# decisions
# -------------------------------------------------------------------------------------------
def test_threshold_rejects_below_with_low_clip_score(make_stage, demo_pairs) -> None:
    images, captions = demo_pairs
    scores = make_stage(threshold=-1.0).process(make_table(images, captions)).column("clip_score").to_numpy()
    threshold = float(np.median(scores))
    stage = make_stage(threshold=threshold)
    assert not stage.run_wide(stage.config)
    out = stage.process(make_table(images, captions))
    low = out.column("clip_score").to_numpy() < threshold
    assert low.sum() == (scores < threshold).sum() > 0
    assert out.column(C.REJECT_REASON).to_pylist() == ["low_clip_score" if x else None for x in low]
    assert out.column(C.STATUS).to_pylist() == [C.STATUS_REJECTED if x else C.STATUS_SUCCESS for x in low]
    assert all("< threshold" in m for m, x in zip(out.column(C.ERROR_MESSAGE).to_pylist(), low, strict=True) if x)


def run_two_pass(stage: ClipFilterStage, partitions: list[pa.Table]) -> tuple[list[pa.Table], ClipDecision]:
    scored = [stage.score(p) for p in partitions]
    decision = stage.decide([stage.summarize(p) for p in scored])
    decision = pickle.loads(pickle.dumps(decision))  # travels from client to workers
    return [stage.apply(p, decision) for p in scored], decision


def kept_keys(tables: list[pa.Table]) -> set[str]:
    return {k for t in tables for k, s in zip(t.column(C.KEY).to_pylist(), t.column(C.STATUS).to_pylist(), strict=True)
            if s == C.STATUS_SUCCESS}


def test_top_fraction_two_pass_keeps_exact_fraction_with_ties(make_stage, demo_pairs) -> None:
    images, captions = demo_pairs
    # 5 identical pairs (identical scores) + the 15 real ones + one undecodable row
    all_images = [images[0]] * 5 + images + [b"junk"]
    all_captions = [captions[0]] * 5 + captions + ["junk"]
    keys = [f"k{i:03d}" for i in range(len(all_images))]
    stage = make_stage(top_fraction=0.3)
    assert stage.run_wide(stage.config)
    with pytest.raises(StageError, match="two-pass"):
        stage.process(make_table(all_images, all_captions, keys))

    whole, decision = run_two_pass(stage, [make_table(all_images, all_captions, keys)])
    assert decision.scored == 20 and decision.keep == 6
    kept = kept_keys(whole)
    assert len(kept) == 6

    # the decision does not depend on how scored rows are partitioned or ordered
    scored = stage.score(make_table(all_images, all_captions, keys))
    order = list(range(len(keys)))
    random.Random(1).shuffle(order)
    parts = [scored.take(chunk) for chunk in (order[:4], order[4:13], order[13:])]
    decision2 = stage.decide([stage.summarize(p) for p in reversed(parts)])
    assert decision2 == decision and kept_keys([stage.apply(p, decision2) for p in parts]) == kept

    # the kept rows are the highest scores; the cut falls inside the tie group only if it must
    table = whole[0]
    scores = table.column("clip_score").to_numpy(zero_copy_only=False)
    status = table.column(C.STATUS).to_pylist()
    kept_scores = [s for s, st in zip(scores, status, strict=True) if st == C.STATUS_SUCCESS]
    low = [s for s, st, r in zip(scores, status, table.column(C.REJECT_REASON).to_pylist(), strict=True)
           if r == "low_clip_score"]
    assert min(kept_scores) >= max(low)
    assert len(low) == 14 and status[-1] == C.STATUS_FAILED


def with_scores(scores: list[float], keys: list[str]) -> pa.Table:
    """A partition as score() leaves it (apply/decide only read key, status and clip_score)."""
    table = make_table([b"x"] * len(keys), ["c"] * len(keys), keys)
    return table.append_column("clip_score", pa.array(scores, type=pa.float32()))


def test_top_fraction_exact_ties_cut_deterministically(make_stage) -> None:
    stage = make_stage(top_fraction=0.3)
    keys = [f"dup{i}" for i in range(10)]
    scores = [0.25] * 7 + [0.3, 0.1, 0.25]
    table = with_scores(scores, keys)
    decision = stage.decide([stage.summarize(table)])
    first = kept_keys([stage.apply(table, decision)])
    assert len(first) == 3 and "dup7" in first and "dup8" not in first  # 0.3 kept, then 2 of the eight 0.25s
    parts = [with_scores(scores[5:], keys[5:]), with_scores(scores[:5], keys[:5])]
    again = stage.decide([stage.summarize(p) for p in parts])
    assert again == decision and kept_keys([stage.apply(p, again) for p in parts]) == first
    assert decision.score_cutoff == pytest.approx(0.25)
    # extremes: keep everything / keep nothing
    assert kept_keys([stage.apply(table, make_stage(top_fraction=1.0).decide([stage.summarize(table)]))]) == set(keys)
    tiny = with_scores([0.5], ["only"])
    assert kept_keys([stage.apply(tiny, make_stage(top_fraction=0.3).decide([stage.summarize(tiny)]))]) == set()
    assert stage.decide([]).scored == 0


def test_apply_never_recomputes(make_stage, demo_pairs, monkeypatch) -> None:
    images, captions = demo_pairs
    stage = make_stage(top_fraction=0.5)
    scored = stage.score(make_table(images, captions))
    decision = stage.decide([stage.summarize(scored)])

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("apply must not run the model")

    monkeypatch.setattr(stage.scorer, "score_pairs", boom)
    out = stage.apply(scored, decision)
    assert (np.asarray(out.column(C.STATUS).to_pylist()) == C.STATUS_SUCCESS).sum() == 8  # round(7.5) half up
    assert decision.score_cutoff == pytest.approx(
        min(s for s, st in zip(out.column("clip_score").to_pylist(), out.column(C.STATUS).to_pylist(), strict=True)
            if st == C.STATUS_SUCCESS), abs=1e-7)


def test_threshold_mode_also_works_through_the_two_pass_api(make_stage, demo_pairs) -> None:
    images, captions = demo_pairs
    stage = make_stage(threshold=0.05)
    single = stage.process(make_table(images, captions))
    double, decision = run_two_pass(stage, [make_table(images, captions)])
    assert double[0].column(C.STATUS).to_pylist() == single.column(C.STATUS).to_pylist()
    assert decision.keep == single.column(C.STATUS).to_pylist().count(C.STATUS_SUCCESS)


def test_score_sort_keys_order_like_scores() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 0.3, 500), [-1.0, 1.0, 0.0, 1e-30, -1e-30]]).astype(np.float32)
    sort_keys = cm.score_sort_keys(scores, [str(i) for i in range(scores.size)])
    assert np.array_equal(np.argsort(sort_keys, kind="stable"), np.argsort(scores, kind="stable"))
    with_nan = cm.score_sort_keys(np.array([np.nan, -1.0], np.float32), ["a", "b"])
    assert with_nan[0] < with_nan[1]  # NaN ranks lowest


# -------------------------------------------------------------------------------------------
# embeddings
# -------------------------------------------------------------------------------------------
def test_embeddings_are_float16_lists_consistent_with_scores(make_stage, demo_pairs) -> None:
    images, captions = demo_pairs
    out = make_stage(save_embeddings=True, threshold=-1.0).process(
        make_table(images[:5] + [b"junk"], captions[:5] + ["x"]))
    for name in ("image_embedding", "text_embedding"):
        assert out.schema.field(name).type == pa.list_(pa.float16())
        assert out.column(name).null_count == 1 and out.column(name)[5].as_py() is None
    image = np.array(out.column("image_embedding").to_pylist()[:5], dtype=np.float32)
    text = np.array(out.column("text_embedding").to_pylist()[:5], dtype=np.float32)
    assert image.shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose((image * text).sum(axis=1), out.column("clip_score").to_numpy(zero_copy_only=False)[:5],
                               atol=2e-3)
    assert "image_embedding" not in make_stage().process(make_table(images[:2], captions[:2])).column_names


# -------------------------------------------------------------------------------------------
# tokenizer
# -------------------------------------------------------------------------------------------
def test_fast_tokenizer_is_identical_to_open_clip() -> None:
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    assert cm.FastSimpleTokenizer.supports(reference)
    fast = cm.FastSimpleTokenizer(reference)
    rng = random.Random(0)
    alphabet = string.printable + "\x00\x07\x0b\x0c\x1b\x7f&&;#" + "éüßÆ€“”’—ﬁ　🚀中文ÃƒÂ©\u2028\u00a0"
    texts = [
        "", " ", "A Photo of  a CAT", "it's we'll they'd", "&amp; &lt;b&gt; &#39;", "caf\u00e9 Ã©", "x" * 400,
        "word " * 100, "Tab\tNew\nline\r\nCR", "\x1b[31mred\x1b[0m", "ﬁne ﬂow", "ＦＵＬＬ width", "12345 67.8%",
        *CAPTIONS,
    ]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(1500)]
    texts += [" ".join(rng.choice(["the", "Dog", "&", "é", "don't", "3", "<b>", "..."]) for _ in range(30))
              for _ in range(200)]
    assert torch.equal(fast(texts), reference(texts))
    assert torch.equal(fast(texts), reference(texts))  # and again with warm caches


# -------------------------------------------------------------------------------------------
# model loading and config
# -------------------------------------------------------------------------------------------
def test_checkpoint_variants(tmp_path, tiny_clip, make_stage, demo_pairs) -> None:
    images, captions = demo_pairs
    want = make_stage(threshold=-1.0).process(make_table(images[:3], captions[:3])).column("clip_score").to_numpy()
    state = torch.load(tiny_clip["pretrained"], weights_only=True)["state_dict"]
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, ddp)
    for path in (bare, ddp):
        stage = make_stage(pretrained=str(path), threshold=-1.0)
        got = stage.process(make_table(images[:3], captions[:3])).column("clip_score").to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)

    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, wrong)
    with pytest.raises(StageError, match="missing keys"):
        make_stage(pretrained=str(wrong))

    pickled = tmp_path / "pickle.pt"
    torch.save({"state_dict": state, "payload": NotATensor()}, pickled)
    with pytest.raises(StageError):  # weights_only=True refuses arbitrary objects
        make_stage(pretrained=str(pickled))


def test_pretrained_tag_resolves_through_open_clip_registry_and_hf_cache(
    tmp_path, tiny_clip, context, demo_pairs, monkeypatch
) -> None:
    """The tag path users run, offline: a registered tag whose weights sit in an HF hub cache."""
    import huggingface_hub.constants
    import open_clip.pretrained as oc_pretrained

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(
        oc_pretrained._PRETRAINED, tiny_clip["model"],
        {"curate_test": oc_pretrained._pcfg(hf_hub="curate-test/tiny-clip/", mean=(0.5,) * 3, std=(0.5,) * 3)},
    )
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--curate-test--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    state = torch.load(tiny_clip["pretrained"], weights_only=True)["state_dict"]
    torch.save(state, repo / "snapshots" / commit / "open_clip_pytorch_model.bin")

    config = build(ClipConfig, {**tiny_clip, "pretrained": "curate_test", "cache_dir": str(tmp_path / "hub"),
                                "device": "cpu", "preprocess": "tensor"}, "clip")
    stage = ClipFilterStage(config, context)
    stage.ensure_setup()
    assert stage.scorer.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)  # the tag's preprocessing is used
    assert stage.scorer.tensor_preprocess.mean == (0.5, 0.5, 0.5)
    assert not stage.scorer.random_init
    ref = stage.scorer.reference_pixels(demo_pairs[0][0])
    assert ref.min() < -0.9 and ref.max() > 0.9  # (x - 0.5) / 0.5 spans [-1, 1]


@pytest.mark.parametrize(
    ("data", "key", "match"),
    [
        ({"device": "gpu"}, "clip.device", "auto, cpu, cuda or cuda:N"),
        ({"pretrained": "/no/such/ckpt.pt"}, "clip.pretrained", "not found"),
        ({"pretrained": "https://example.com/w.pt"}, "clip.pretrained", "not a URL"),
        ({"model_config": "/no/such.json"}, "clip.model_config", "no such file"),
        ({"top_fraction": 0}, "clip.top_fraction", "in \\(0, 1\\]"),
        ({"precision": "int8"}, "clip.precision", "one of"),
        ({"batch_size": -1}, "clip.batch_size", ">= 0"),
        ({"model": ""}, "clip.model", "open_clip model"),
    ],
)
def test_config_errors_name_the_key(data, key, match) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        build(ClipConfig, data, "clip")
    assert err.value.key_path == key


def test_resources_and_defaults(make_stage, context) -> None:
    stage = make_stage()
    assert stage.resources(stage.config).gpus == 0 and stage.resources(stage.config).dask_resources == {}
    assert stage.batch_size == 4
    gpu = ClipFilterStage(build(ClipConfig, {"device": "cuda"}, "clip"), context)
    gpu._device = "cuda:0"  # what resolve_device gives on a GPU worker
    assert gpu.resources(gpu.config).dask_resources == {"GPU": 1}
    assert gpu.batch_size == 1024 and gpu.image_pipeline == "tensor"
    assert cm.resolve_precision("auto", "cuda:0") == "bf16" and cm.resolve_precision("auto", "cpu") == "fp32"
    assert cm.resolve_device("cpu") == "cpu"
    if not CUDA:
        assert cm.resolve_device("auto") == "cpu"
        with pytest.raises(cm.ClipModelError):
            cm.resolve_device("cuda:0")


def test_producer_errors_propagate(make_stage, demo_pairs, monkeypatch) -> None:
    stage = make_stage()

    def broken(captions: Any) -> Any:
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(stage.scorer, "tokenize", broken)
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        stage.process(make_table(*[list(x) for x in demo_pairs]))


def test_bf16_autocast_on_cpu_close_to_fp32(make_stage, demo_pairs) -> None:
    images, captions = demo_pairs
    fp32 = make_stage(threshold=-1.0).score(make_table(images, captions)).column("clip_score").to_numpy()
    bf16 = make_stage(threshold=-1.0, precision="bf16").score(make_table(images, captions))
    assert np.abs(bf16.column("clip_score").to_numpy() - fp32).max() < 0.01


# -------------------------------------------------------------------------------------------
# GPU (run on the device machine when one is lent)
# -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_bf16_nvjpeg_path_within_001_of_cpu_fp32(make_stage, demo_pairs, odd_images) -> None:
    images = demo_pairs[0] + list(odd_images.values())
    captions = demo_pairs[1] + ["a photo"] * len(odd_images)
    cpu = make_stage(threshold=-1.0).score(make_table(images, captions))
    gpu_fp32 = make_stage(threshold=-1.0, device="cuda", precision="fp32", preprocess="reference")
    gpu_bf16 = make_stage(threshold=-1.0, device="cuda", preprocess="tensor", batch_size=8)
    assert gpu_bf16.scorer.spec.precision == "bf16"
    cpu_scores = cpu.column("clip_score").to_numpy()
    fp32_scores = gpu_fp32.score(make_table(images, captions)).column("clip_score").to_numpy()
    bf16_scores = gpu_bf16.score(make_table(images, captions)).column("clip_score").to_numpy()
    assert np.abs(fp32_scores - cpu_scores).max() < 1e-4
    assert np.abs(bf16_scores - fp32_scores).max() < 0.01
    assert gpu_bf16.counters["decode_jpeg_nvjpeg"] >= 15


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_vit_b32_bf16_within_001_of_fp32(context, demo_pairs) -> None:
    images, captions = demo_pairs

    def scores(**overrides: Any) -> np.ndarray:
        torch.manual_seed(0)  # same random init for both precisions
        cm.clear_scorers()
        data = {"model": "ViT-B-32", "pretrained": "", "device": "cuda", **overrides}
        stage = ClipFilterStage(build(ClipConfig, data, "clip"), context)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            stage.ensure_setup()
        return stage.score(make_table(images, captions)).column("clip_score").to_numpy()

    fp32 = scores(precision="fp32", preprocess="reference")
    bf16 = scores(precision="bf16", preprocess="tensor")
    assert np.abs(bf16 - fp32).max() < 0.01


def test_checkpoint_path_detection() -> None:
    assert cm.looks_like_checkpoint_path("/x/y.pt") and cm.looks_like_checkpoint_path("w.safetensors")
    assert not cm.looks_like_checkpoint_path("laion2b_s34b_b79k") and not cm.looks_like_checkpoint_path("")


# -------------------------------------------------------------------------------------------
# preflight, failing weights, one warning per run, deterministic random init, report note
# -------------------------------------------------------------------------------------------
TINY_TAG = "curate_test"
REAL_PROBE = cm.probe_weights


@pytest.fixture
def tiny_tag(tiny_clip: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Config keys selecting the tiny model by an open_clip tag served from `curate-test/tiny-clip` on the hub."""
    import open_clip
    import open_clip.pretrained as oc_pretrained

    open_clip.add_model_config(tiny_clip["model_config"])
    monkeypatch.setitem(oc_pretrained._PRETRAINED, tiny_clip["model"],
                        {TINY_TAG: oc_pretrained._pcfg(hf_hub="curate-test/tiny-clip/")})
    return {"model": tiny_clip["model"], "model_config": tiny_clip["model_config"], "pretrained": TINY_TAG}


def fill_hub_cache(cache: Any, tiny_clip: dict[str, str]) -> None:
    """The tiny checkpoint laid out as the HF hub cache holds `curate-test/tiny-clip`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--curate-test--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    state = torch.load(tiny_clip["pretrained"], weights_only=True)["state_dict"]
    torch.save(state, repo / "snapshots" / commit / "open_clip_pytorch_model.bin")


def failing_hub_download(calls: list[str]) -> Callable[..., Any]:
    """A hub download that logs a retry line and fails, as hf_hub_download does with no network."""
    import logging

    def download(repo_id: str, filename: str, **kwargs: Any) -> str:
        calls.append(filename)
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError(f"cannot reach huggingface.co for {repo_id}/{filename}")

    return download


def test_a_checkpoint_that_cannot_load_is_refused_before_the_run_as_in_the_worker(
        tiny_clip, context, tmp_path, make_stage) -> None:
    """validate = run's checks: the client compares names and shapes (meta-device model, memory-mapped file)
    and says what the worker's full load would say, without unpickling code or reading the tensors."""
    state = torch.load(tiny_clip["pretrained"], weights_only=True)["state_dict"]
    ok = tmp_path / "ok.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ok)
    other_width = tmp_path / "other.pt"
    torch.save({k: (torch.zeros(v.shape[0], 48) if k in ("text_projection", "visual.proj") else v)
                for k, v in state.items()}, other_width)
    headless = tmp_path / "headless.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, headless)
    pickled = tmp_path / "pickle.pt"
    torch.save({"state_dict": state, "payload": NotATensor()}, pickled)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ok.read_bytes()[:4096])
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 format cannot be memory-mapped: read whole
    torch.save(state, legacy, _use_new_zipfile_serialization=False)

    def preflight(path: Any) -> ConfigError | None:
        stage = ClipFilterStage(ClipConfig(**{**tiny_clip, "pretrained": str(path), "device": "cpu"}), context)
        try:
            stage.preflight()
        except ConfigError as err:
            return err
        return None

    assert preflight(ok) is None and preflight(legacy) is None
    for path, words in ((other_width, "2 tensors of another shape (e.g. text_projection (64, 48) vs (64, 64)"),
                        (headless, "missing keys (e.g. ['visual."),
                        (pickled, "torch.load(weights_only=True) refused it"),
                        (cut, "cannot read CLIP checkpoint")):
        err = preflight(path)
        assert err is not None and err.key_path == "clip.pretrained" and words in err.message, (path, err)
        with pytest.raises(StageError) as worker:  # the worker's full load refuses it with the same words
            make_stage(pretrained=str(path))
        assert words in str(worker.value), (path, worker.value)
    assert "weights_only` set to `False`" not in preflight(pickled).message  # torch's advice to run the code


def test_preflight_refuses_what_cannot_load(tiny_tag, context, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    def preflight(**data: Any) -> ConfigError:
        stage = ClipFilterStage(ClipConfig(**{"device": "cpu", **data}), context)  # unvalidated: preflight's checks
        with pytest.raises(ConfigError) as err:
            stage.preflight()
        return err.value

    err = preflight(pretrained=str(tmp_path / "missing.bin"))
    assert err.key_path == "clip.pretrained" and "not found" in err.message
    err = preflight(model="ViT-B-32", pretrained="laion2b_no_such_tag")
    assert err.key_path == "clip.pretrained" and "laion2b_s34b_b79k" in err.message  # lists the valid tags
    err = preflight(model="ViT-Q-99", pretrained="openai")
    assert err.key_path == "clip.model"
    for pretrained in ("", str(tmp_path / "missing.bin")):  # random init and a checkpoint need a known model too
        (tmp_path / "missing.bin").write_bytes(b"")
        err = preflight(model="ViT-Q-99", pretrained=pretrained)
        assert err.key_path == "clip.model" and "unknown open_clip model" in err.message
    err = preflight(model="local-dir:" + str(tmp_path / "nowhere"))
    assert err.key_path == "clip.model"

    # not cached and the hub unreachable (offline mode: the one probe fails at once, nothing retries)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = preflight(**tiny_tag, cache_dir=str(tmp_path / "empty-cache"))
    assert err.key_path == "clip.pretrained"
    assert "unreachable (HF_HUB_OFFLINE is set)" in err.message and "\n" not in err.message
    assert "clip.pretrained: /models/curate-tiny-clip/open_clip_pytorch_model.bin" in err.message
    assert "…" not in err.message  # short enough for ConfigError not to cut the advice off


def test_preflight_warns_once_about_a_download_and_is_silent_when_cached(
    tiny_tag, tiny_clip, context, tmp_path, monkeypatch, caplog
) -> None:
    from curate.stages.clip_filter import stage as stage_module

    probes: list[Any] = []
    monkeypatch.setattr(stage_module, "probe_weights", lambda weights: probes.append(weights))  # reachable
    ClipFilterStage(ClipConfig(**tiny_tag, cache_dir=str(tmp_path / "empty")), context).preflight()
    warned = [r for r in caplog.records if r.levelno >= 30]
    assert len(probes) == 1 and len(warned) == 1 and "downloads them" in warned[0].getMessage()

    caplog.clear()
    fill_hub_cache(tmp_path / "hub", tiny_clip)
    ClipFilterStage(ClipConfig(**tiny_tag, cache_dir=str(tmp_path / "hub")), context).preflight()
    assert len(probes) == 1 and not [r for r in caplog.records if r.levelno >= 30]  # cached: no request


def test_setup_fails_fast_in_one_paragraph_when_weights_cannot_download(
    tiny_tag, context, tmp_path, monkeypatch, caplog
) -> None:
    import huggingface_hub.constants
    import open_clip.pretrained as oc_pretrained

    calls: list[str] = []
    monkeypatch.setattr(oc_pretrained, "hf_hub_download", failing_hub_download(calls))
    config = build(ClipConfig, {**tiny_tag, "cache_dir": str(tmp_path / "empty"), "device": "cpu"}, "clip")

    # the hub answers the probe, then the download fails: one error, no retry chatter in the log
    monkeypatch.setattr(cm, "probe_weights", lambda weights, timeout=cm.PROBE_TIMEOUT_S: None)
    with pytest.raises(StageError) as err:
        ClipFilterStage(config, context).ensure_setup()
    message = str(err.value)
    assert calls and "\n" not in message and "cannot reach huggingface.co" in message
    assert "set clip.pretrained to a local checkpoint file" in message.lower()
    assert "clip.pretrained: /models/curate-tiny-clip/open_clip_pytorch_model.bin" in message
    assert "a tag whose weights are in the cache" in message
    assert not [r for r in caplog.records if r.levelno >= 30]  # neither the hub's retries nor open_clip's error

    # the hub unreachable: the probe fails at once and nothing is downloaded
    calls.clear()
    monkeypatch.setattr(cm, "probe_weights", REAL_PROBE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StageError, match="unreachable") as err:
        ClipFilterStage(config, context).ensure_setup()
    assert calls == [] and "\n" not in str(err.value)


def test_setup_loads_cached_tag_without_the_network(tiny_tag, tiny_clip, context, tmp_path, monkeypatch) -> None:
    import open_clip.pretrained as oc_pretrained

    fill_hub_cache(tmp_path / "hub", tiny_clip)
    calls: list[str] = []
    real_download = oc_pretrained.hf_hub_download

    def offline_only(repo_id: str, filename: str, **kwargs: Any) -> str:
        import huggingface_hub.constants

        calls.append(filename)
        assert huggingface_hub.constants.HF_HUB_OFFLINE  # cached weights never cause a hub request
        return real_download(repo_id=repo_id, filename=filename, **kwargs)

    monkeypatch.setattr(oc_pretrained, "hf_hub_download", offline_only)
    monkeypatch.setattr(cm, "probe_weights", lambda *a, **k: pytest.fail("probed the hub for cached weights"))
    config = build(ClipConfig, {**tiny_tag, "cache_dir": str(tmp_path / "hub"), "device": "cpu"}, "clip")
    stage = ClipFilterStage(config, context)
    stage.ensure_setup()
    assert calls and not stage.scorer.random_init


def test_random_weights_warn_exactly_once_per_run(tiny_clip, context, caplog, recwarn) -> None:
    """preflight (client) warns once; setup (each worker) adds nothing: no UserWarning, no open_clip record."""
    cm.clear_scorers()
    data = {"model": tiny_clip["model"], "model_config": tiny_clip["model_config"], "pretrained": "",
            "device": "cpu"}
    client = ClipFilterStage(build(ClipConfig, data, "clip"), context)
    client.preflight()
    for _ in range(2):  # two workers
        worker = pickle.loads(pickle.dumps(client))
        worker.ensure_setup()
        cm.clear_scorers()
    warned = [r for r in caplog.records if r.levelno >= 30]
    assert [r.getMessage() for r in warned] == [cm.random_weights_message(tiny_clip["model"])]
    assert warned[0].name == "curate.clip"
    assert not [w for w in recwarn if "weights" in str(w.message).lower()]


def test_model_creation_leaves_root_logging_alone(tiny_clip) -> None:
    """open_clip's logging.warning() would run basicConfig() on a handler-less worker root: a second format."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        cm.clear_scorers()
        cm.ClipScorer(cm.ModelSpec(tiny_clip["model"], "", tiny_clip["model_config"]))
        assert root.handlers == [] and root.filters == []
    finally:
        root.handlers[:] = saved
        cm.clear_scorers()


def test_random_init_is_deterministic_and_leaves_global_rng_alone(tiny_clip, demo_pairs) -> None:
    images, captions = demo_pairs
    spec = cm.ModelSpec(tiny_clip["model"], "", tiny_clip["model_config"])
    scores = []
    for seed in (1, 2):
        cm.clear_scorers()
        torch.manual_seed(seed)  # whatever the process did before
        state = torch.get_rng_state()
        scorer = cm.ClipScorer(spec)
        assert torch.equal(torch.get_rng_state(), state)
        scores.append(scorer.score_pairs(images, captions, batch_size=8).scores)
        scorer.close()
    cm.clear_scorers()
    np.testing.assert_array_equal(scores[0], scores[1])
    assert np.std(scores[0]) > 0


def test_report_says_plainly_when_weights_are_random() -> None:
    def note(**section: Any) -> str:
        return ClipFilterStage.report_parts(section).metrics[0].note

    assert note(model="ViT-B-32", pretrained="") == "RANDOM CLIP weights (clip.pretrained is empty): scores are noise"
    assert "RANDOM" not in note(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "RANDOM" not in note(model="hf-hub:org/repo", pretrained="")  # the weights come with the model
    assert "RANDOM" not in note(threshold=0.28)  # an old run's section without the key
