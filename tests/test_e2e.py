"""End to end: the real stages on Dask worker processes against a loopback HTTP server, a tiny CLIP checkpoint
and an eval-set folder with planted near-duplicates; then resume, trainer-side readers, the demo and exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from curate.pipeline import columns as C
from curate.pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
GOOD = [
    ("astronaut.jpg", "Portrait of an astronaut in a white spacesuit holding a helmet"),
    ("rocket.jpg", "A rocket standing on the launch pad under a blue sky"),
    ("hubble.jpg", "Hubble deep field with hundreds of distant galaxies"),
    ("retina.jpg", "Fundus photograph of a human retina showing blood vessels"),
    ("grass.jpg", "Green grass texture seen from above on a sunny day"),
    ("gravel.jpg", "Grey gravel stones lying on the ground"),
    ("coins.jpg", "Old coins lying on a dark wooden table"),
    ("camera.jpg", "A photographer with a camera on a tripod in a field"),
    ("horse.png", "Black silhouette of a horse on a white background"),
    ("ihc.jpg", "Microscope image of stained tissue from a biopsy"),
    ("clock.jpg", "Motion blurred photo of a wall clock in a kitchen"),
    ("cell.jpg", "Microscopy image of a single cell under a microscope"),
    ("chelsea.jpg", "A ginger tabby cat looking to the side on a sofa"),
    ("coffee.jpg", "A cup of coffee with latte art on a saucer with a spoon"),
]
BAD = [
    ("missing.jpg", "A picture that is no longer on the server"),  # 404
    ("page.html", "A web page served where an image was expected"),  # not an image
    ("brick.png", "IMG_1234.JPG"),  # file-name caption
    ("astronaut.jpg", "Une photo d'une astronaute en combinaison spatiale blanche avec un casque"),  # French
]


@pytest.fixture
def corpus(tmp_path: Path, http_server: Any, route: Any, real_images: dict[str, bytes]) -> Path:
    routes = {f"/{name}": route(body=data, headers={"Content-Type": "image/jpeg"})
              for name, data in real_images.items()}
    routes["/page.html"] = route(body=b"<html><body>hello</body></html>", headers={"Content-Type": "image/jpeg"})
    server = http_server(routes)
    rows = [{"URL": server.url(name), "TEXT": caption, "similarity": 0.3 + i / 100}
            for i, (name, caption) in enumerate(GOOD + BAD)]
    path = tmp_path / "laion.parquet"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_config(tmp_path: Path, corpus: Path, tiny_clip: dict[str, str], demo_dir: Path, **extra: Any) -> Path:
    config = {
        "input": {"path": str(corpus), "url_column": "URL", "caption_column": "TEXT", "shard_size": 5},
        "output": {"path": str(tmp_path / "run")},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard": False},
        "download": {"allowed_networks": ["127.0.0.1/32"], "timeout": 5, "retries": 0},
        "captions": {"languages": ["en"]},
        "dedup": {"eval_sets": [{"path": str(demo_dir / "evalset"), "name": "demo"}], "threshold": 8,
                  "cache_dir": str(tmp_path / "evalcache")},
        "clip": {**tiny_clip, "threshold": -1.0, "batch_size": 8},
        "write": {"shard_samples": 4},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def digest_tree(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and "_work" not in p.parts and p.name != "report.html"}


@pytest.mark.slow
def test_full_pipeline_on_dask_with_resume(tmp_path: Path, corpus: Path, tiny_clip: dict[str, str],
                                           demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, corpus, tiny_clip, demo_dir)
    assert main(["run", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "input rows" in err and "kept" in err and "invariant" in err  # the funnel
    run = tmp_path / "run"
    stats = json.loads((run / "stats.json").read_text())
    total = len(GOOD) + len(BAD)
    assert stats["input_rows"] == total
    assert stats["input_rows"] == stats["kept"] + sum(sum(r.values()) for r in stats["rejected"].values())
    rejected = {(r["url"].rsplit("/", 1)[1], r["caption"][:20] if r["caption"] else None): r
                for r in pq.read_table(run / "rejected").to_pylist()}
    reasons = {k[0]: (r["reject_stage"], r["status"]) for k, r in rejected.items()}
    assert reasons["missing.jpg"] == ("download", "failed")
    assert reasons["page.html"][0] == "download"
    assert reasons["brick.png"] == ("clean_captions", "rejected")
    # the eval set holds near-duplicates of the astronaut, coffee and cat pictures
    dedup_rows = [r for r in rejected.values() if r["reject_stage"] == "phash_dedup"]
    matched = {r["url"].rsplit("/", 1)[1] for r in dedup_rows}
    assert {"coffee.jpg", "chelsea.jpg"} <= matched
    assert all(r["eval_match"] and r["eval_match"].startswith("demo:") for r in dedup_rows)
    french = [r for r in rejected.values() if r["caption_original"] and r["caption_original"].startswith("Une photo")]
    assert french and french[0]["reject_stage"] == "clean_captions"

    # Parquet: kept rows with our schema, no image bytes anywhere
    curated = pq.read_table(run / "curated")
    assert curated.num_rows == stats["kept"] > 0
    for name in C.known_schema().names:
        assert name in curated.column_names
    assert curated.schema.field("clip_score").type == C.known_schema().field("clip_score").type
    assert "similarity" in curated.column_names  # extra input columns carried through
    assert C.IMAGE not in curated.column_names and C.IMAGE not in pq.read_schema(
        next((run / "rejected").glob("*.parquet"))).names
    assert all(s is not None for s in curated.column("clip_score").to_pylist())

    # Shards: tarfile and webdataset both read them; keys, captions and sha256 agree with the Parquet
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["total_samples"] == stats["kept"]
    by_key = {r["key"]: r for r in curated.to_pylist()}
    seen = set()
    for entry in manifest["shards"]:
        path = run / "shards" / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if ext in ("jpg", "png", "webp"):
                    assert hashlib.sha256(data).hexdigest() == by_key[key]["sha256"]
                    seen.add(key)
                elif ext == "txt":
                    assert data.decode() == by_key[key]["caption"]
    assert seen == set(by_key)
    import webdataset as wds

    urls = [str(run / "shards" / e["name"]) for e in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png;webp", "txt", "json"))
    assert len(samples) == stats["kept"]
    assert all(img.size[0] > 0 and txt and meta["key"] == key for key, img, txt, meta in samples)

    # Resume: a second run skips every partition and changes nothing
    before = digest_tree(run)
    assert main(["run", str(config), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert digest_tree(run) == before


def test_bad_config_exits_2_with_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {path: x.parquet}\noutput: {path: out}\nclip: {threshold: high}\n")
    proc = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "run", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "clip.threshold: expected a number in [-1, 1], got 'high'" in proc.stderr


def test_run_failure_exits_1(tmp_path: Path) -> None:
    """A config that validates but cannot run (the input is not a Parquet file) is a run failure or usage error,
    reported without a traceback."""
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    proc = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "run", "--no-progress",
                           str(REPO / "configs" / "demo.yaml"), "--set", f"input.path={tmp_path / 'x.parquet'}",
                           "--set", "input.format=parquet", "--set", f"output.path={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "input.path: cannot read Parquet" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_command_runs_offline(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "demo", "-o", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "invariant" in proc.stderr
    stats = json.loads((tmp_path / "demo" / "stats.json").read_text())
    assert stats["rejected"].get("phash_dedup") and stats["rejected"].get("download")
    assert stats["rejected"].get("clean_captions") and stats["rejected"].get("clip_filter")
    assert list((tmp_path / "demo" / "shards").glob("shard-*.tar"))
