"""`curate run` (dedup only) and `curate dedup-report` give one answer: the same (corpus image, eval image) pairs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageOps

from curate.pipeline.cli import main


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _corpus(path: Path, real_images: dict[str, bytes]) -> None:
    """The demo photos (three of them edited into the eval set) plus more edited copies and a flat decoy."""
    opened = {name: Image.open(io.BytesIO(data)) for name, data in real_images.items()}
    samples = dict(real_images)
    samples["chelsea_mirror.jpg"] = _jpeg(ImageOps.mirror(opened["chelsea.jpg"]), 90)
    samples["coffee_q30.jpg"] = _jpeg(opened["coffee.jpg"], 30)
    astronaut = opened["astronaut.jpg"]
    samples["astronaut_half.png"] = _png(astronaut.resize((astronaut.width // 2, astronaut.height // 2)))
    # a flat picture whose pHash collides with the eval set's flat one: only verification tells them apart
    samples["blue.png"] = _png(Image.new("RGB", (200, 200), (30, 90, 200)))
    with tarfile.open(path, "w") as tar:
        for name, data in samples.items():
            stem = name.rsplit(".", 1)[0]
            for member, payload in ((name, data), (f"{stem}.txt", f"a photo: {stem}".encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "phash-only"])
def test_run_and_report_reject_the_same_pairs(
    tmp_path: Path, real_images: dict[str, bytes], demo_dir: Path, verify: bool
) -> None:
    evalset = tmp_path / "evalset"
    shutil.copytree(demo_dir / "evalset", evalset)
    (evalset / "flat").mkdir()
    Image.new("RGB", (200, 200), (240, 240, 240)).save(evalset / "flat" / "white.png")
    index = tmp_path / "demo.parquet"
    assert main(["hash-evalset", str(evalset), "--name", "demo", "-o", str(index)]) == 0
    corpus = tmp_path / "corpus.tar"
    _corpus(corpus, real_images)

    config = {
        "input": {"path": str(corpus), "shard_size": 7},
        "output": {"path": str(tmp_path / "run")},
        "cluster": {"processes": False, "n_workers": 1, "dashboard": False},
        "download": {"enabled": False},
        "captions": {"enabled": False},
        "clip": {"enabled": False},
        "dedup": {"indexes": [str(index)], "verify": verify},  # every other dedup value at its default
        "write": {"enabled": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "config.yaml"), "--no-progress"]) == 0
    rows = pq.read_table(tmp_path / "run" / "rejected").to_pylist()
    assert rows and all(r["reject_reason"] == "eval_duplicate" for r in rows)  # no other reason in this corpus
    run_pairs = {(r["source_key"], r["eval_match"], r["eval_distance"]) for r in rows}

    report = tmp_path / "report"
    argv = ["dedup-report", "--corpus", str(corpus), "--index", str(index), "-o", str(report)]
    assert main(argv + ([] if verify else ["--no-verify"])) == 0
    pairs = json.loads((report / "pairs.json").read_text())
    matched = [p for p in pairs if p["verified"] is not False]  # what the report calls a match
    report_pairs = {(p["key"], f"{p['eval_set']}:{p['item_id']}", p["candidate_distance"]) for p in matched}

    assert report_pairs == run_pairs
    summary = json.loads((report / "summary.json").read_text())
    assert summary["corpus_samples_matched"] == len(rows)
    assert summary["threshold"] == 8 and summary["verify"] is verify
    assert summary["candidate_threshold"] == (16 if verify else None)
    found = {(key, label) for key, label, _d in run_pairs}
    assert {("chelsea", "demo:animal/chelsea_text.jpg"), ("coffee", "demo:food/coffee_blur.jpg"),
            ("astronaut", "demo:person/astronaut_crop.jpg"), ("coffee_q30", "demo:food/coffee_blur.jpg")} <= found
    # the flat decoy: a pHash match alone, refused by the second signal (listed by the report as such)
    assert (("blue", "demo:flat/white.png") in found) is not verify
    if verify:
        assert any(p["key"] == "blue" and p["verified"] is False for p in pairs)


def test_report_defaults_are_the_stage_defaults() -> None:
    from curate.stages.phash_dedup import DedupConfig
    from curate.stages.phash_dedup.matcher import MatchSettings
    from curate.stages.phash_dedup.report import match_settings

    assert match_settings() == MatchSettings.from_config(DedupConfig())
    assert match_settings(threshold=10, verify=False) == MatchSettings(10, 16, 8, False)
    with pytest.raises(ValueError, match="candidate_threshold"):
        match_settings(threshold=20)  # above the default candidate threshold, as DedupConfig.validate refuses


def test_tar_eval_items_read_back_from_their_reference(tmp_path: Path, real_images: dict[str, bytes]) -> None:
    from curate.stages.phash_dedup import evalsets
    from curate.stages.phash_dedup.report import _read_reference

    names = ["chelsea.jpg", "horse.png"]
    with tarfile.open(tmp_path / "eval-000.tar", "w") as tar:
        for i, name in enumerate(names):
            for member, payload in ((f"d/{i:03d}.json", b"{}"), (f"d/{i:03d}.{name.rsplit('.', 1)[1]}", real_images[name])):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    items = list(evalsets.iter_eval_images(str(tmp_path / "eval-{000..000}.tar")))
    assert [item.item_id for item in items] == ["d/000", "d/001"]
    for item, name in zip(items, names, strict=True):
        assert item.read() == real_images[name] == _read_reference(item.path)


def test_dedup_report_prints_a_table_not_a_dict() -> None:
    from curate.stages.phash_dedup.commands import summary_table

    summary = {"corpus_samples": 1000, "threshold": 8, "verify": True, "corpus_samples_matched": 3,
               "corpus_match_rate": 0.003,
               "eval_sets": {"imagenet-val": {"eval_items": 50000, "corpus_samples_matched": 3,
                                              "corpus_match_rate": 0.003, "eval_items_matched": 2}}}
    lines = summary_table(summary).splitlines()
    assert lines[0].split() == ["eval", "set", "eval", "items", "corpus", "matched", "corpus", "rate", "eval",
                                "items", "matched"]
    assert lines[1].split() == ["imagenet-val", "50,000", "3", "0.30%", "2"]
    assert "{" not in "\n".join(lines) and lines[-1].startswith("1,000 corpus samples")
