"""`dedup_report`: run-dir / WebDataset / Parquet corpora against a real eval index, outputs, gallery."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.stages.phash_dedup.report import dedup_report

# configs/demo/evalset holds edited copies of three demo photos (text overlay, blur, crop)
EXPECTED = {
    ("chelsea", "animal/chelsea_text.jpg"),
    ("coffee", "food/coffee_blur.jpg"),
    ("astronaut", "person/astronaut_crop.jpg"),
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def index_path(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> str:
    from curate.stages.phash_dedup import evalsets

    out = tmp_path_factory.mktemp("index") / "demo.parquet"
    evalsets.hash_evalset(str(demo_dir / "evalset"), str(out), name="demo", workers=1)
    return str(out)


def _write_tar(path: Path, images: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in images.items():
            stem, ext = name.rsplit(".", 1)
            for member, payload in ((f"{stem}.{ext}", data), (f"{stem}.txt", b"caption")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _pairs(out: Path) -> set[tuple[str, str]]:
    return {(p["key"], p["item_id"]) for p in json.loads((out / "pairs.json").read_text())}


def test_webdataset_corpus_finds_the_edited_copies(
    tmp_path: Path, real_images: dict[str, bytes], index_path: str
) -> None:
    _write_tar(tmp_path / "corpus.tar", real_images)
    out = tmp_path / "report"
    summary = dedup_report(str(tmp_path / "corpus.tar"), [index_path], str(out))

    assert _pairs(out) == EXPECTED  # nothing unrelated among 15 photos x 6 eval images
    pairs = json.loads((out / "pairs.json").read_text())
    assert all(p["verified"] is True and p["eval_set"] == "demo" for p in pairs)
    with open(out / "pairs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["key"], r["item_id"]) for r in rows} == EXPECTED
    assert set(rows[0]) >= {"key", "eval_set", "item_id", "distance", "verified"}

    assert json.loads((out / "summary.json").read_text()) == summary
    demo = summary["eval_sets"]["demo"]
    assert summary["corpus_samples"] == 15 and demo["eval_items"] == 6
    assert demo["corpus_samples_matched"] == 3 and demo["corpus_match_rate"] == pytest.approx(0.2)
    assert demo["eval_items_matched"] == 3 and demo["eval_match_rate"] == pytest.approx(0.5)
    assert sum(v["confirmed"] for v in summary["distance_histogram"].values()) == 3

    page = (out / "index.html").read_text()
    assert page.count('class="pair confirmed"') == 3
    for key, item in EXPECTED:
        assert f"demo:{item}" in page and f"corpus {key}" in page
    thumbs = sorted(p.name for p in (out / "thumbs").iterdir())
    assert len(thumbs) == 6  # one eval and one corpus thumbnail per pair, next to the page
    assert "http" not in page.split("<body>", 1)[1]  # self-contained: no remote resources


def test_run_directory_uses_stored_hashes_and_verification_guards_them(
    tmp_path: Path, real_images: dict[str, bytes], index_path: str
) -> None:
    """A run's samples carry their row's pHash in their JSON (as the write stage stores it): read from there while
    streaming the shards, not hashed again and not looked up in a table of the whole run."""
    from curate.stages.phash_dedup import phash

    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    names = ["chelsea.jpg", "brick.png", "coins.jpg", "coffee.jpg"]
    hashes = [format(phash.phash_int(phash.decode_rgb(real_images[n])), "016x") for n in names]
    # the run's metadata claims brick looks like chelsea: a pHash-only match the second signal must refuse
    hashes[1] = hashes[0]
    with tarfile.open(run / "shards" / "shard-00000.tar", "w") as tar:
        for i, (name, value) in enumerate(zip(names, hashes, strict=True)):
            key = f"00000000{i}"
            meta = {"key": key, "phash": value} if i < 3 else ["not", "an", "object"]  # coffee: nothing stored
            for member, payload in ((f"{key}.{name.split('.')[1]}", real_images[name]),
                                    (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    out = tmp_path / "report"
    summary = dedup_report(str(run), [index_path], str(out))
    by_key = {p["key"]: p for p in json.loads((out / "pairs.json").read_text())}
    assert by_key["000000000"]["item_id"] == "animal/chelsea_text.jpg" and by_key["000000000"]["verified"] is True
    assert by_key["000000001"]["item_id"] == "animal/chelsea_text.jpg"  # found through the stored hash
    assert by_key["000000001"]["verified"] is False
    assert "000000002" not in by_key
    assert by_key["000000003"]["item_id"] == "food/coffee_blur.jpg"  # hashed from its image
    demo = summary["eval_sets"]["demo"]
    assert demo["verified_false"] == 1 and demo["corpus_samples_matched"] == 2
    assert 'class="pair rejected"' in (out / "index.html").read_text()


def test_parquet_corpus_without_verification_and_pagination(
    tmp_path: Path, real_images: dict[str, bytes], index_path: str
) -> None:
    keys = [f"{i:09d}" for i in range(len(real_images))]
    pq.write_table(pa.table({"key": keys, "image": list(real_images.values())}), tmp_path / "corpus.parquet")
    out = tmp_path / "report"
    summary = dedup_report(str(tmp_path / "corpus.parquet"), [index_path], str(out), threshold=10, verify=False,
                           page_size=2)
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs and all(p["verified"] is None for p in pairs)
    assert all(p["distance"] <= 10 for p in pairs)
    assert summary["verify"] is False and summary["candidate_threshold"] is None
    name_of = dict(zip(keys, (n.rsplit(".", 1)[0] for n in real_images), strict=True))
    assert {(name_of[p["key"]], p["item_id"]) for p in pairs} >= {("chelsea", "animal/chelsea_text.jpg"),
                                                                 ("coffee", "food/coffee_blur.jpg")}
    n_pages = -(-len(pairs) // 2)
    assert (out / f"page-{n_pages}.html").exists() and not (out / f"page-{n_pages + 1}.html").exists()
    assert f'href="page-{n_pages}.html"' in (out / "index.html").read_text()


def test_bad_input_raises_clear_errors(tmp_path: Path, real_images: dict[str, bytes], index_path: str) -> None:
    _write_tar(tmp_path / "corpus.tar", {"chelsea.jpg": real_images["chelsea.jpg"]})
    corpus = str(tmp_path / "corpus.tar")
    with pytest.raises(ValueError, match="does not exist"):
        dedup_report(corpus, [str(tmp_path / "missing.parquet")], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="at least one"):
        dedup_report(corpus, [], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="no such file"):
        dedup_report(str(tmp_path / "nothing-*.tar"), [index_path], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="threshold"):
        dedup_report(corpus, [index_path], str(tmp_path / "o"), threshold=64)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a run directory"):
        dedup_report(str(tmp_path / "notes.txt"), [index_path], str(tmp_path / "o"))
    # an img2dataset output folder: 00000.parquet (metadata, no images) beside 00000.tar; the tars are the corpus
    wds = tmp_path / "wds"
    wds.mkdir()
    _write_tar(wds / "00000.tar", {"chelsea.jpg": real_images["chelsea.jpg"]})
    pq.write_table(pa.table({"key": ["0"], "status": ["success"]}), wds / "00000.parquet")
    from curate.stages.phash_dedup.report import resolve_corpus

    assert resolve_corpus(str(wds)) == resolve_corpus(str(wds / "00000.tar"))
    not_index = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), not_index)
    with pytest.raises(ValueError, match="missing columns"):
        dedup_report(corpus, [str(not_index)], str(tmp_path / "o"))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed (CI installs it)")
def test_gallery_renders_in_headless_chromium(
    tmp_path: Path, real_images: dict[str, bytes], index_path: str
) -> None:
    _write_tar(tmp_path / "corpus.tar", real_images)
    out = tmp_path / "report"
    dedup_report(str(tmp_path / "corpus.tar"), [index_path], str(out))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"]
    url = (out / "index.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True).stdout
    assert dom.count('class="pair confirmed"') == 3
    for key, item in EXPECTED:
        assert f"corpus {key}" in dom and item in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=90, check=True)
    from PIL import Image

    with Image.open(shot) as img:
        # the thumbnails really drew: the pair strip holds photo pixels, not a blank page
        strip = img.convert("L").crop((0, 480, 1200, 680))
        assert strip.getextrema()[1] - strip.getextrema()[0] > 100
        assert len(np.unique(np.asarray(strip))) > 64


def test_one_pass_over_the_corpus_in_chunks_gives_what_one_batch_gives(
    tmp_path: Path, real_images: dict[str, bytes], index_path: str, monkeypatch: pytest.MonkeyPatch,
    whole_descriptor_reads: list[object],
) -> None:
    """The corpus is read once, a chunk at a time (hash, match, thumbnails, images dropped): chunks of 2 samples
    give the pairs, summary and thumbnails of one chunk holding everything, and no read takes the index's
    descriptor column whole (at 1M eval items that is ~10-19 GB)."""
    from curate.stages.phash_dedup import report as report_mod

    images = {**real_images, **{f"again_{n}": d for n, d in real_images.items()}}  # matches in several chunks
    _write_tar(tmp_path / "corpus.tar", images)
    passes: list[int] = []
    real_iter = report_mod.iter_corpus

    def counted(*args: object, **kwargs: object) -> object:
        passes.append(1)
        return real_iter(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(report_mod, "iter_corpus", counted)
    outputs = {}
    for chunk in (10_000, 2):
        monkeypatch.setattr(report_mod, "_CHUNK_SAMPLES", chunk)
        out = tmp_path / f"report-{chunk}"
        summary = dedup_report(str(tmp_path / "corpus.tar"), [index_path], str(out))
        thumbs = {p.name: p.read_bytes() for p in sorted((out / "thumbs").iterdir())}
        outputs[chunk] = ((out / "pairs.json").read_text(), summary, thumbs)
    assert passes == [1, 1] and whole_descriptor_reads == []
    assert outputs[2] == outputs[10_000]
    pairs = json.loads(outputs[2][0])
    assert len(pairs) == 6 and {p["key"].removeprefix("again_") for p in pairs} == {k for k, _ in EXPECTED}
    assert outputs[2][1]["corpus_samples"] == 30


def test_a_corpus_thumbnail_left_from_an_earlier_report_is_not_shown_for_a_sample_without_image(
    tmp_path: Path, real_images: dict[str, bytes], index_path: str
) -> None:
    from curate.stages.phash_dedup import phash

    chelsea = phash.phash_int(phash.decode_rgb(real_images["chelsea.jpg"]))
    pq.write_table(pa.table({"key": ["k0"], "phash": [format(chelsea, "016x")]}), tmp_path / "hashes.parquet")
    out = tmp_path / "report"
    (out / "thumbs").mkdir(parents=True)
    (out / "thumbs" / "corpus-0.jpg").write_bytes(b"a thumbnail of some other corpus")
    dedup_report(str(tmp_path / "hashes.parquet"), [index_path], str(out), threshold=12, verify=False)
    assert [p["key"] for p in json.loads((out / "pairs.json").read_text())] == ["k0"]
    assert not (out / "thumbs" / "corpus-0.jpg").exists()
    assert "image not available" in (out / "index.html").read_text()


def test_the_report_replaces_an_earlier_report_but_never_files_it_did_not_write(
    tmp_path: Path, real_images: dict[str, bytes], index_path: str
) -> None:
    """A second report into the same folder leaves none of the first one's pages or thumbnails behind; a folder with
    anything else in it (a website, a run folder) is refused before any file is touched."""
    from curate.pipeline.cli import main

    _write_tar(tmp_path / "corpus.tar", real_images)
    out = tmp_path / "report"
    dedup_report(str(tmp_path / "corpus.tar"), [index_path], str(out))
    (out / "page-7.html").write_text("a page of a bigger, earlier report")
    (out / "thumbs" / "corpus-99.jpg").write_bytes(b"stale")
    _write_tar(tmp_path / "one.tar", {"chelsea.jpg": real_images["chelsea.jpg"]})
    dedup_report(str(tmp_path / "one.tar"), [index_path], str(out))
    assert not (out / "page-7.html").exists() and len(list((out / "thumbs").iterdir())) == 2
    assert _pairs(out) == {("chelsea", "animal/chelsea_text.jpg")}

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("my website")
    (site / "style.css").write_text("body{}")
    with pytest.raises(ValueError, match="holds files that are not a dedup report's \\(style.css\\)"):
        dedup_report(str(tmp_path / "one.tar"), [index_path], str(site))
    assert (site / "index.html").read_text() == "my website"
    assert main(["dedup-report", "--corpus", str(tmp_path / "one.tar"), "--index", index_path, "-o", str(site)]) == 2
