"""One decode per image: the download stage's decoded pixels give the dedup stage its pHash.

The runner wires each stage of a task to the later stages that need something from pixels
(`Stage.pixel_type` / `from_pixels`); the values travel in internal `pixels.<stage>` columns that
never reach the outputs. The dedup stage decodes only rows without a value.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pipeline import columns as C
from curate.pipeline import runner as runner_mod
from curate.pipeline.config import load_config
from curate.pipeline.stage import RunContext
from curate.stages.download.stage import DownloadConfig, DownloadStage
from curate.stages.phash_dedup.phash import PhashParams, from_hex, hamming, phash_bytes
from curate.stages.phash_dedup.stage import DedupConfig, PhashDedupStage
from tests.test_runner import CAPTIONS, make_tar


def _stages(tmp_path: Path, download: DownloadConfig, dedup: DedupConfig) -> tuple[DownloadStage, PhashDedupStage]:
    context = RunContext(output_path=str(tmp_path / "run"), work_path=str(tmp_path / "work"))
    down, dedup_stage = DownloadStage(download, context), PhashDedupStage(dedup, context)
    for stage in (down, dedup_stage):
        stage.ensure_setup()
    runner_mod._wire_pixels([down, dedup_stage])
    return down, dedup_stage


def _table(images: list[bytes]) -> pa.Table:
    n = len(images)
    return pa.table({C.KEY: [f"{i:05d}" for i in range(n)], C.IMAGE: images, C.STATUS: [C.STATUS_SUCCESS] * n})


def _with_orientation(data: bytes, orientation: int) -> bytes:
    img = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def test_kept_bytes_hash_from_the_verify_decode_equals_hashing_the_bytes(
    tmp_path: Path, real_images: dict[str, bytes]
) -> None:
    """Rows that arrive with bytes: the download stage's verify decode feeds pHash; the hash is bit-identical."""
    images = list(real_images.values()) + [_with_orientation(real_images["chelsea.jpg"], 6)]
    down, dedup = _stages(tmp_path, DownloadConfig(), DedupConfig())
    assert [c[0] for c in down.pixel_consumers] == ["pixels.phash_dedup"]
    assert dedup.pixel_consumers == ()  # nothing after it in this task
    downloaded = down.process(_table(images))
    assert downloaded.column("pixels.phash_dedup").null_count == 0
    scored = dedup.score(downloaded)
    assert dedup.counters["hashed_from_decoded_pixels"] == len(images)
    expected, errors = phash_bytes(images, PhashParams())
    assert not any(errors)
    got = from_hex(scored.column("phash").to_pylist())
    assert np.array_equal(got, expected)


def test_resized_rows_hash_the_pixels_before_encoding(tmp_path: Path, real_images: dict[str, bytes]) -> None:
    """Re-encoded rows: the hash of the resized pixels is within JPEG noise of a hash of the stored bytes."""
    images = [data for name, data in real_images.items() if name.endswith(".jpg")]
    down, dedup = _stages(tmp_path, DownloadConfig(reprocess_existing=True, image_size=128), DedupConfig())
    downloaded = down.process(_table(images))
    scored = dedup.score(downloaded)
    assert dedup.counters["hashed_from_decoded_pixels"] == len(images)
    from_stored, _ = phash_bytes(downloaded.column(C.IMAGE).to_pylist(), PhashParams())
    distance = hamming(from_hex(scored.column("phash").to_pylist()), from_stored)
    assert distance.max() <= 6, distance.tolist()
    assert (distance == 0).mean() >= 0.5, distance.tolist()


def test_without_the_option_or_a_producer_the_stage_decodes(tmp_path: Path, real_images: dict[str, bytes]) -> None:
    images = list(real_images.values())
    down, dedup = _stages(tmp_path, DownloadConfig(), DedupConfig(hash_decoded_pixels=False))
    assert down.pixel_consumers == ()
    downloaded = down.process(_table(images))
    assert not any(c.startswith(C.PIXELS_PREFIX) for c in downloaded.column_names)
    dedup.score(downloaded)
    assert dedup.counters["hashed_from_decoded_pixels"] == 0
    # a consumer that fails on some pixels leaves null: the stage decodes that row itself
    down2, dedup2 = _stages(tmp_path, DownloadConfig(), DedupConfig())
    calls = {"n": 0}
    original = dedup2.from_pixels

    def flaky(image: Image.Image) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("no")
        return original(image)

    down2.pixel_consumers = (("pixels.phash_dedup", pa.string(), flaky),)
    table = down2.process(_table(images[:3]))
    assert table.column("pixels.phash_dedup").null_count == 1
    scored = dedup2.score(table)
    assert dedup2.counters["hashed_from_decoded_pixels"] == 2
    expected, _ = phash_bytes(images[:3], PhashParams())
    assert np.array_equal(from_hex(scored.column("phash").to_pylist()), expected)


def test_pixel_columns_never_reach_the_outputs(tmp_path: Path, real_images: dict[str, bytes]) -> None:
    source = tmp_path / "in.tar"
    make_tar(source, real_images, CAPTIONS)
    config = load_config(None, [f"input.path={source}", f"output.path={tmp_path / 'run'}", "input.shard_size=4",
                                "captions.enabled=false", "clip.enabled=false", "cluster.processes=false",
                                "cluster.n_workers=1", "cluster.dashboard=false"], data={})
    runner_mod.run(config, progress=False, echo=lambda _m: None)
    run = tmp_path / "run"
    for parquet in [*run.glob("curated/*.parquet"), *run.glob("rejected/*.parquet")]:
        names = pq.read_schema(parquet).names
        assert not [n for n in names if n.startswith(C.PIXELS_PREFIX)], (parquet, names)
    stats = json.loads((run / "stats.json").read_text())
    counters = stats["stages"]["phash_dedup"]["counters"]
    assert counters["hashed_from_decoded_pixels"] == len(CAPTIONS)


def test_eval_verification_runs_on_the_download_decode(
    tmp_path: Path, real_images: dict[str, bytes], demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With verification, rows with eval candidates are matched from the download stage's pixels: the same
    decisions as decoding the stored bytes (kept byte for byte here, so the pixels are identical), no decode."""
    from curate.stages.phash_dedup import evalsets, phash

    index = tmp_path / "demo.parquet"
    evalsets.hash_evalset(str(demo_dir / "evalset"), str(index), name="demo", workers=1)
    chelsea = Image.open(io.BytesIO(real_images["chelsea.jpg"]))
    mirrored = io.BytesIO()
    chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored, "JPEG", quality=90)
    images = [*real_images.values(), mirrored.getvalue()]
    outputs = {}
    for upstream in (True, False):
        down, dedup = _stages(tmp_path, DownloadConfig(), DedupConfig(indexes=(str(index),),
                                                                     hash_decoded_pixels=upstream))
        downloaded = down.process(_table(images))
        if upstream:
            assert downloaded.schema.field("pixels.phash_dedup").type == pa.struct(
                [("phash", pa.string()), ("item", pa.int64()), ("distance", pa.int32()), ("score", pa.float64()),
                 ("check", pa.string()), ("counters", pa.map_(pa.string(), pa.int64()))])

            def no_decode(data: bytes) -> Image.Image:
                raise AssertionError("a row was decoded again")

            monkeypatch.setattr(phash, "decode_rgb", no_decode)
        scored = dedup.score(downloaded)
        monkeypatch.undo()
        assert not [c for c in scored.column_names if c.startswith(C.PIXELS_PREFIX)]
        counters = dict(dedup.counters)
        assert counters.pop("matched_from_decoded_pixels", 0) == (len(images) if upstream else 0)
        assert counters.pop("hashed_from_decoded_pixels") == (len(images) if upstream else 0)
        columns = ("phash", "eval_match", "eval_distance", C.STATUS, C.REJECT_REASON, C.ERROR_MESSAGE)
        outputs[upstream] = ({c: scored.column(c).to_pylist() for c in columns}, counters)
    assert outputs[True] == outputs[False]
    matched = {m for m in outputs[True][0]["eval_match"] if m}
    assert {"demo:animal/chelsea_text.jpg", "demo:food/coffee_blur.jpg"} <= matched
    assert outputs[True][1]["eval_verify_calls"] > 0
