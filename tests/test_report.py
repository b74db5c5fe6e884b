"""The run report: funnel, histograms, galleries, safety, scale, and rendering in headless Chromium."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline import columns as C
from curate.pipeline import report, shards, stats, tario

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _row(key: str, **values: Any) -> dict[str, Any]:
    row = {C.KEY: key, C.URL: f"https://example.com/{key}.jpg", C.CAPTION: f"caption {key}",
           C.STATUS: C.STATUS_SUCCESS}
    row.update(values)
    return row


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows with differing keys as one conformed table (from_pylist alone takes the first row's keys)."""
    names = sorted({k for row in rows for k in row})
    columns = {n: [row.get(n) for row in rows] for n in names}
    return C.conform(pa.table({n: pa.array(v, type=C.known_schema().field(n).type) for n, v in columns.items()}))


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(rows), path)


def build_run_dir(root: Path, images: dict[str, bytes], demo_dir: Path) -> dict[str, Any]:
    """A finished run in the documented layout: two partitions, two shards, every kind of turn-down."""
    run = root / "run"
    names = sorted(n for n in images if n.endswith(".jpg"))  # 12 jpgs, plus png below
    kept_rows: list[dict[str, Any]] = []
    samples: list[tario.Sample] = []
    for i, name in enumerate(names[:8] + ["horse.png"]):
        data = images[name]
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
        key = f"{i:09d}"
        row = _row(key, caption=f"A photo of {name.split('.')[0]} number {i}", width=w, height=h,
                   original_width=w, original_height=h, sha256=hashlib.sha256(data).hexdigest(),
                   clip_score=0.30 + 0.01 * i, eval_distance=20 + i)
        kept_rows.append(row)
        meta = json.dumps({k: v for k, v in row.items()}, sort_keys=True).encode()
        samples.append(tario.Sample(key, data, name.rsplit(".", 1)[1], row[C.CAPTION], meta))
    (run / "shards").mkdir(parents=True)
    infos = []
    for index, chunk in enumerate((samples[:5], samples[5:])):
        path = run / "shards" / shards.shard_name("shard", index)
        infos.append(shards.write_shard(str(path), chunk))
    (run / "manifest.json").write_text(json.dumps(shards.manifest(infos, "shard")))
    _write_parquet(run / "curated" / "part-00000.parquet", kept_rows[:5])
    _write_parquet(run / "curated" / "part-00001.parquet", kept_rows[5:])

    image_dir = demo_dir / "images"
    rejected = [
        _row("000000100", status="failed", reject_stage="download", reject_reason="http_404",
             error_message="HTTP 404 Not Found"),
        _row("000000101", status="failed", reject_stage="download", reject_reason="http_404",
             error_message="HTTP 404 Not Found"),
        _row("000000102", status="failed", reject_stage="download", reject_reason="http_404",
             error_message="HTTP 404 Not Found"),
        _row("000000103", status="failed", reject_stage="download", reject_reason="timeout",
             error_message="read timed out after 10.0 s"),
        _row("000000104", status="rejected", reject_stage="captions", reject_reason="too_short", caption="ok",
             width=512, height=384, original_width=1024, original_height=768),
        # Hostile data: markup in the caption, a javascript: URL.
        _row("000000105", status="rejected", reject_stage="captions", reject_reason="language",
             caption="<script>alert('x')</script><img src=x onerror=alert(1)>", url="javascript:alert(1)",
             width=300, height=200),
        _row("000000106", status="rejected", reject_stage="dedup", reject_reason="eval_match",
             url=(image_dir / "astronaut.jpg").as_uri(), eval_match="demo:astronaut.jpg", eval_distance=2,
             width=512, height=512, original_width=512, original_height=512),
        _row("000000107", status="rejected", reject_stage="clip", reject_reason="low_score", clip_score=0.05,
             width=256, height=256, original_width=640, original_height=480),
        _row("000000108", status="rejected", reject_stage="clip", reject_reason="low_score", clip_score=0.12,
             width=256, height=256, original_width=800, original_height=600),
    ]
    _write_parquet(run / "rejected" / "part-00000.parquet", rejected[:5])
    _write_parquet(run / "rejected" / "part-00001.parquet", rejected[5:])

    index = root / "eval_index.parquet"
    pq.write_table(pa.table({"eval_set": ["demo"], "item_id": ["astronaut.jpg"],
                             "path": [str(image_dir / "astronaut.jpg")], "phash": ["0" * 16]}), index)
    (run / "config.json").write_text(json.dumps({
        "input": {"path": str(root / "corpus.parquet")},
        "dedup": {"enabled": True, "threshold": 8, "indexes": [str(index)]},
        "clip": {"enabled": True, "threshold": 0.2, "top_fraction": None},
    }))

    part_stats = []
    for kept_part, rejected_part, n_in in ((kept_rows[:5], rejected[:5], 10), (kept_rows[5:], rejected[5:], 8)):
        table = _table(kept_part + rejected_part)
        part_stats.append(stats.partition_stats(table, n_in, {
            "download": {"rows_in": n_in, "rows_out": n_in - 4 if n_in == 10 else n_in, "seconds": 1.5},
            "captions": {"rows_in": n_in, "rows_out": n_in - 1, "seconds": 0.2, "counters": {"fixed_mojibake": 1}},
            "dedup": {"rows_in": n_in, "rows_out": n_in, "seconds": 0.3},
            "clip": {"rows_in": n_in, "rows_out": n_in, "seconds": 2.0},
        }))
    merged = stats.merge(part_stats)
    (run / "stats.json").write_text(json.dumps(merged))
    return {"run": run, "kept": kept_rows, "rejected": rejected, "stats": merged}


@pytest.fixture
def run_dir(tmp_path: Path, real_images: dict[str, bytes], demo_dir: Path) -> dict[str, Any]:
    return build_run_dir(tmp_path, real_images, demo_dir)


def _attr_values(page: str, attr: str) -> list[str]:
    return re.findall(rf'\s{attr}="([^"]*)"', page)


def test_report_has_funnel_histograms_and_galleries(run_dir: dict[str, Any]) -> None:
    path = report.write_run_report(str(run_dir["run"]), samples_per_reason=2, kept_samples=6)
    assert path == str(run_dir["run"] / "report.html")
    page = Path(path).read_text(encoding="utf-8")
    merged = run_dir["stats"]
    assert merged["input_rows"] == 18 and merged["kept"] == 9

    # Funnel: each stage's remaining count and each reason with its count, linking to its gallery.
    funnel = page[page.index('id="funnel"'):page.index('id="distributions"')]
    for remaining, stage in ((14, "download"), (12, "captions"), (11, "dedup"), (9, "clip")):
        assert re.search(rf"after <b>{stage}</b></td><td class=\"n\">{remaining}</td>", funnel), stage
    for stage, reasons in merged["rejected"].items():
        for reason, count in reasons.items():
            assert f'href="#{report._slug(stage, reason)}">{reason}</a>' in funnel
            assert f">{count} <span" in funnel
            assert f'id="{report._slug(stage, reason)}"' in page

    # Four histograms with bars of both colours, the configured thresholds drawn as markers.
    charts = page[page.index('id="distributions"'):page.index('id="kept"')]
    assert charts.count("<svg") == 4
    assert charts.count(report.KEPT_COLOR) > 4 and charts.count(report.REJECTED_COLOR) > 4
    assert "threshold 0.2" in charts and "threshold 8" in charts
    # Per chart: rows with a value (kept · turned down): CLIP 9·2, pHash 9·1, caption 9·9, size 9·5.
    for kept, turned_down in ((9, 2), (9, 1), (9, 9), (9, 5)):
        assert f"{kept} kept · {turned_down} turned down" in charts

    # Kept gallery: thumbnails from both shards (evenly spread), capped at kept_samples.
    kept_html = page[page.index('id="kept"'):page.index('id="rejected"')]
    assert kept_html.count('class="card kept"') == 6
    assert kept_html.count('src="data:image/jpeg;base64,') == 6
    assert "shard-00000.tar" in kept_html and "shard-00001.tar" in kept_html

    # Rejected gallery: capped per reason, "showing 2 of 3" for the 3 HTTP 404s.
    rejected_html = page[page.index('id="rejected"'):]
    assert "showing 2 of 3" in rejected_html
    assert rejected_html.count('class="card rejected"') == 2 + 1 + 1 + 1 + 1 + 2
    assert "HTTP 404 Not Found" in rejected_html and "read timed out after 10.0 s" in rejected_html
    # The pHash match shows the matched eval image; the file:// URL that exists gives a local thumbnail.
    assert "matched demo:astronaut.jpg" in rejected_html
    assert rejected_html.count("local file</span>") == 1
    assert rejected_html.count('src="data:image/jpeg;base64,') == 2
    # http(s) URLs are links that the page never loads.
    assert '<a class="url" href="https://example.com/000000100.jpg" rel="noopener noreferrer nofollow"' in page


def test_report_is_self_contained_and_escapes_hostile_data(run_dir: dict[str, Any]) -> None:
    page = Path(report.write_run_report(str(run_dir["run"]))).read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "javascript:alert(1)" in page  # shown as text ...
    assert not any(v.lower().startswith("javascript:") for v in _attr_values(page, "href"))  # ... never a link
    # Nothing to fetch: images are data: URIs, links are anchors or plain http(s) links, CSP forbids the rest.
    assert all(v.startswith("data:image/") for v in _attr_values(page, "src"))
    assert all(v.startswith(("#", "https://", "http://")) for v in _attr_values(page, "href"))
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in page
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_histogram_counts_every_value_once(run_dir: dict[str, Any]) -> None:
    hists = report._histograms(str(run_dir["run"]), report._metrics({}), bins=7)
    by_title = {h.metric.title: h for h in hists}
    clip = by_title["CLIP score"]
    assert clip.kept is not None and clip.rejected is not None and clip.edges is not None
    assert int(clip.kept.sum()) == 9 and int(clip.rejected.sum()) == 2
    assert clip.edges[0] == pytest.approx(0.05) and clip.edges[-1] == pytest.approx(0.38)
    # The two low CLIP scores fall in the first bins, kept ones in the upper part.
    assert clip.rejected[:2].sum() == 2 and clip.kept[:3].sum() == 0
    size = by_title["Image size"]
    assert size.rejected is not None and int(size.rejected.sum()) == 5
    caption = by_title["Caption length"]
    assert caption.kept is not None and caption.rejected is not None
    assert int(caption.kept.sum()) == 9 and int(caption.rejected.sum()) == 9
    # Integer metrics get half-integer edges so no value sits on an edge.
    phash_edges = by_title["pHash distance to nearest eval item"].edges
    assert phash_edges is not None and all((e * 2) % 2 == 1 for e in phash_edges)


def test_report_of_empty_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    # a folder that is no run gets no report.html written into it
    with pytest.raises(FileNotFoundError, match="not a curate run directory"):
        report.write_run_report(str(run))
    assert list(run.iterdir()) == []
    (run / "_work").mkdir()
    (run / "_work" / "run.json").write_text("{}")  # a run that started and wrote nothing else yet
    page = Path(report.write_run_report(str(run))).read_text(encoding="utf-8")
    assert "no kept samples in shards/" in page and "nothing was turned down" in page
    assert page.count("no values in this run") == 4
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        report.write_run_report(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()


def _write_parquet_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_report_scales_with_bounded_output(tmp_path: Path) -> None:
    """120k rows in 4 partitions: streaming histograms with an overflow bin, galleries stay capped."""
    run = tmp_path / "big"
    rng = np.random.default_rng(1)
    n_per_part = 30_000
    reasons = np.array(["http_404", "timeout", "too_short", "low_score"])
    all_stats = []
    for part in range(4):
        keys = [f"{part * n_per_part + i:09d}" for i in range(n_per_part)]
        kept_mask = rng.random(n_per_part) < 0.3
        reason = [None if k else str(r) for k, r in zip(kept_mask, reasons[rng.integers(0, 4, n_per_part)],
                                                         strict=True)]
        caption_len = rng.integers(1, 80, n_per_part)
        caption_len[:10] = 5000  # a few huge captions must not squash the chart
        table = C.conform(pa.table({
            C.KEY: keys,
            C.URL: [f"https://example.com/{k}.jpg" for k in keys],
            C.CAPTION: ["x" * int(n) for n in caption_len],
            C.STATUS: ["success" if k else "rejected" for k in kept_mask],
            C.REJECT_STAGE: [None if r is None else ("download" if r in ("http_404", "timeout") else "filter")
                             for r in reason],
            C.REJECT_REASON: reason,
            "clip_score": rng.normal(0.25, 0.05, n_per_part).astype(np.float32),
            "original_width": rng.integers(64, 4000, n_per_part).astype(np.int32),
            "original_height": rng.integers(64, 4000, n_per_part).astype(np.int32),
        }))
        mask = pa.array(kept_mask)
        _write_parquet_table(run / "curated" / f"part-{part:05d}.parquet", table.filter(mask))
        _write_parquet_table(run / "rejected" / f"part-{part:05d}.parquet", table.filter(pa.array(~kept_mask)))
        all_stats.append(stats.partition_stats(table, n_per_part, {}))
    (run / "stats.json").write_text(json.dumps(stats.merge(all_stats)))

    start = time.perf_counter()
    page = Path(report.write_run_report(str(run), samples_per_reason=5)).read_text(encoding="utf-8")
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"report of 120k rows took {elapsed:.1f} s"
    assert page.count('class="card rejected"') == 4 * 5
    assert len(page) < 400_000
    assert "120,000" in page
    hist = {h.metric.title: h for h in report._histograms(str(run), report._metrics({}))}["Caption length"]
    assert hist.overflow and hist.edges is not None and hist.edges[-1] < 200  # 99.5% quantile, not 5000
    assert hist.kept is not None and hist.rejected is not None
    assert int(hist.kept.sum() + hist.rejected.sum()) == 120_000


def _run_chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    binary = _chromium()
    assert binary is not None
    profile = tmp_path / "chromium-profile"
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (CI installs the `chromium` apt package)")
def test_report_renders_in_headless_chromium(run_dir: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    path = Path(report.write_run_report(str(run_dir["run"]), samples_per_reason=2, kept_samples=6))
    dom = _run_chromium(["--dump-dom", path.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The parsed DOM (after Chromium's HTML parser, not our string) has every part of the page.
    for section in ("summary", "funnel", "distributions", "stages", "kept", "rejected"):
        assert f'id="{section}"' in dom.stdout
    assert dom.stdout.count("<svg") == 4 and dom.stdout.count("<rect") >= 8
    assert dom.stdout.count('src="data:image/jpeg;base64,') == 6 + 2
    assert "<script>alert" not in dom.stdout  # the hostile caption stayed text

    shot = tmp_path / "report.png"
    result = _run_chromium([f"--screenshot={shot}", "--window-size=1280,1600", path.as_uri()], tmp_path)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 1600)
        pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
    # Rendered, not blank: the dark header on top, the kept colour of the funnel bars somewhere below.
    assert pixels[:40].mean() < 90
    kept_rgb = np.array([int(report.KEPT_COLOR[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - kept_rgb).sum(axis=2) < 30).sum() > 2000


def test_report_of_a_run_dir_on_an_fsspec_filesystem(run_dir: dict[str, Any]) -> None:
    """Run directories on object stores (s3://...) go through fsspec; memory:// stands in for them here."""
    import fsspec

    fs = fsspec.filesystem("memory")
    local_run: Path = run_dir["run"]
    for path in local_run.rglob("*"):
        if path.is_file() and path.name != "config.json":
            fs.pipe(f"/remote-run/{path.relative_to(local_run)}", path.read_bytes())
    try:
        written = report.write_run_report("memory://remote-run", samples_per_reason=2, kept_samples=4)
        page = fs.cat(written).decode("utf-8")
    finally:
        fs.rm("/remote-run", recursive=True)
    assert written == "memory://remote-run/report.html"
    assert page.count('class="card kept"') == 4 and "showing 2 of 3" in page
    assert page.count("<svg") == 4 and "9 kept · 2 turned down" in page


def test_matched_eval_images_resolve_from_eval_set_folders_only_inside_them(demo_dir: Path) -> None:
    config = {"dedup": {"eval_sets": [{"path": str(demo_dir / "evalset"), "name": "demo-evalset"}]}}
    wanted = {"demo-evalset:animal/chelsea_text.jpg", "demo-evalset:../images/astronaut.jpg",
              "demo-evalset:missing.jpg", "other:animal/chelsea_text.jpg"}
    from curate.stages.phash_dedup.run_report import _eval_image_paths

    paths = _eval_image_paths(config["dedup"], wanted)
    assert paths == {"demo-evalset:animal/chelsea_text.jpg": str(demo_dir / "evalset" / "animal" / "chelsea_text.jpg")}


def test_report_of_a_real_run(tmp_path: Path, http_server: Any, route: Any, demo_dir: Path) -> None:
    """The report the runner writes at the end of a real run (download, captions, pHash dedup against the demo
    eval-set folder), checked against that run's own stats and outputs."""
    import csv

    from curate.pipeline.config import load_config
    from curate.pipeline.runner import run

    routes = {f"/images/{p.name}": route(body=p.read_bytes(), headers={"Content-Type": "image/jpeg"})
              for p in (demo_dir / "images").iterdir()}
    server = http_server(routes)
    corpus = tmp_path / "corpus.csv"
    with open(demo_dir / "corpus.csv", newline="", encoding="utf-8") as src, open(corpus, "w", newline="") as dst:
        writer = csv.writer(dst)
        for i, row in enumerate(csv.reader(src)):
            writer.writerow(row if i == 0 else [server.url(row[0]), row[1]])
    out = tmp_path / "run"
    config = load_config(None, [
        f"input.path={corpus}", f"output.path={out}", "input.shard_size=8", "cluster.processes=false",
        "cluster.n_workers=1", "cluster.dashboard=false", "download.allowed_networks=['127.0.0.1/32']",
        "download.retries=0", "clip.enabled=false", f"dedup.cache_dir={tmp_path / 'evalcache'}",
        f"dedup.eval_sets=[{{path: '{demo_dir / 'evalset'}', name: demo}}]", "write.shard_samples=4",
    ], data={})
    result = run(config, progress=False, echo=lambda _msg: None)
    page = (out / "report.html").read_text(encoding="utf-8")  # written by the runner itself
    merged = result.stats
    assert merged["rejected"].get("phash_dedup"), merged["rejected"]  # the demo plants eval near-duplicates
    summary = page[page.index('id="summary"'):page.index('id="funnel"')]
    assert f">{merged['input_rows']:,}</div>" in summary and f">{merged['kept']:,}</div>" in summary
    for stage, reasons in merged["rejected"].items():
        for reason, count in reasons.items():
            assert f'href="#{report._slug(stage, reason)}">{reason}</a>' in page
            shown = min(count, 12)
            section = page[page.index(f'id="{report._slug(stage, reason)}"'):]
            assert f"showing {shown} of {count}" in section[:400]
    kept_html = page[page.index('id="kept"'):page.index('id="rejected"')]
    assert kept_html.count('src="data:image/jpeg;base64,') == min(24, merged["kept"])
    # Every eval-set duplicate shows the matched eval image, resolved from the eval-set folder.
    n_eval = sum(merged["rejected"]["phash_dedup"].values())
    assert page.count("<span>matched demo:") == n_eval


def test_curate_report_command_rewrites_the_page(run_dir: dict[str, Any], capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    from curate.pipeline.cli import main

    page = run_dir["run"] / "report.html"
    page.write_text("stale")
    assert main(["report", str(run_dir["run"])]) == 0
    assert f"curate: report -> {page}" in capsys.readouterr().out
    assert 'id="funnel"' in page.read_text(encoding="utf-8")
    assert main(["report", str(run_dir["run"] / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
