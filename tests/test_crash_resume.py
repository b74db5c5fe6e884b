"""Crash safety: SIGKILL the whole `curate run` process group at random points (during download, while a
partition's files are being written, between shards of the final repack), re-run, and get exactly the output of
an uninterrupted run: same shard files byte for byte, same Parquet rows, same stats, a valid manifest, and no
partial or temporary file outside `_work/` at any time.

The runs are real CLI subprocesses against a loopback HTTP server this test starts. To make the short phases
wide enough to hit, the killed runs get two test-only slow-downs: the server delays each image, and a
`sitecustomize` (on PYTHONPATH of the subprocess only) holds every atomic write for a moment after its temporary
file is complete and before it is renamed into place.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "configs" / "demo" / "images"
N_ROWS = 60
TMP_MARK = ".tmp-"

SLOW_COMMIT = '''
import contextlib, os, time
delay = float(os.environ.get("CURATE_TEST_SLOW_COMMIT", "0") or 0)
if delay:
    from curate.pipeline import storage
    original = storage.atomic_path

    @contextlib.contextmanager
    def slow_atomic_path(path):
        with original(path) as tmp:
            yield tmp
            time.sleep(delay)  # the temporary file is complete, the rename has not happened yet

    storage.atomic_path = slow_atomic_path
'''


@pytest.fixture(scope="module")
def image_server(demo_image_server: Any) -> Any:
    return demo_image_server


def write_corpus(path: Path, base_url: str) -> None:
    names = sorted(p.name for p in IMAGES.iterdir())
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption", "source_id"])
        for i in range(N_ROWS):
            name = names[i % len(names)]
            # Every 11th image is gone (404): failed rows must survive the crashes too.
            url = f"{base_url}/images/{name}?view={i}" if i % 11 != 10 else f"{base_url}/gone/{i}.jpg"
            writer.writerow([url, f"A photograph of the {name.split('.')[0]} subject, view number {i}", f"src-{i}"])


def write_config(root: Path, corpus: Path, out: Path) -> Path:
    config = {
        "input": {"path": str(corpus), "format": "csv", "shard_size": 6},
        "output": {"path": str(out)},
        # One worker thread in the CLI process: SIGKILL semantics are the same for files and start-up stays short.
        # tests/test_cluster.py covers worker processes.
        "cluster": {"n_workers": 1, "threads_per_worker": 1, "processes": False, "dashboard": False},
        "download": {"allowed_networks": ["127.0.0.1/32"], "timeout": 10, "retries": 0, "threads": 2},
        "captions": {"languages": []},
        "dedup": {"enabled": False},
        "clip": {"enabled": False},
        "write": {"shard_samples": 5},
    }
    path = root / f"config-{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_run(config: Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "curate.pipeline.cli", "run", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def finish_run(config: Path, timeout: float = 120) -> None:
    proc = start_run(config)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]


def kill_when(proc: subprocess.Popen[bytes], condition: Callable[[], bool], timeout: float = 60) -> bool:
    """SIGKILL the run's whole process group as soon as `condition` holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return True
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    raise AssertionError("kill point never reached")


def visible_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and "_work" not in p.relative_to(out).parts]


def tmp_files(out: Path, under: str = "") -> list[Path]:
    base = out / under if under else out
    return [p for p in base.rglob(f"*{TMP_MARK}*")] if base.exists() else []


def assert_visible_state_is_consistent(out: Path) -> None:
    """What a reader sees at any moment: only complete shards and readable Parquet files."""
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert names and len(names) % 3 == 0, f"{shard.name} is partial: {len(names)} members"
    for part in sorted((out / "curated").glob("*.parquet")) + sorted((out / "rejected").glob("*.parquet")):
        pq.read_table(part)
    if (out / "manifest.json").exists():
        json.loads((out / "manifest.json").read_text())


def shard_contents(out: Path) -> dict[str, list[tuple[str, str]]]:
    contents = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            contents[shard.name] = [(m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest())  # type: ignore[union-attr]
                                    for m in tar.getmembers()]
    return contents


def rows(out: Path, sub: str) -> list[dict[str, Any]]:
    """All rows of `sub/*.parquet` (the documented layout), by key."""
    found = [row for part in sorted((out / sub).glob("*.parquet")) for row in pq.read_table(part).to_pylist()]
    return sorted(found, key=lambda r: r["key"])


def comparable_stats(out: Path) -> dict[str, Any]:
    stats = json.loads((out / "stats.json").read_text())
    stages = {name: {"rows_in": info["rows_in"], "rows_out": info["rows_out"],
                     "counters": {k: v for k, v in info.get("counters", {}).items() if not k.endswith("_ms")}}
              for name, info in stats["stages"].items()}
    return {"input_rows": stats["input_rows"], "kept": stats["kept"], "rejected": stats["rejected"],
            "status": stats["status"], "stages": stages, "shards": stats["shards"],
            "samples_in_shards": stats["samples_in_shards"]}


def output_differences(out: Path, reference: Path) -> list[str]:
    """Every way `out` differs from the uninterrupted `reference` run (empty = identical output)."""
    problems = []
    names = sorted(p.name for p in (out / "shards").glob("*.tar"))
    if names != sorted(p.name for p in (reference / "shards").glob("*.tar")):
        problems.append(f"shard names differ: {names}")
    elif shard_contents(out) != shard_contents(reference):
        problems.append("shard members differ")
    else:
        problems += [f"{name} bytes differ" for name in names
                     if (out / "shards" / name).read_bytes() != (reference / "shards" / name).read_bytes()]
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest != json.loads((reference / "manifest.json").read_text()):
        problems.append("manifest differs")
    for entry in manifest["shards"]:
        data = (out / "shards" / entry["name"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"] or len(data) != entry["bytes"]:
            problems.append(f"manifest sha256/bytes wrong for {entry['name']}")
        with tarfile.open(out / "shards" / entry["name"]) as tar:
            if len(tar.getnames()) != 3 * entry["samples"]:
                problems.append(f"manifest sample count wrong for {entry['name']}")
    for sub in ("curated", "rejected"):
        if rows(out, sub) != rows(reference, sub):
            problems.append(f"{sub}/*.parquet rows differ")
    stats, ref_stats = comparable_stats(out), comparable_stats(reference)
    if stats != ref_stats:
        problems += [f"stats[{k!r}] differs: {stats[k]} != {ref_stats[k]}" for k in stats if stats[k] != ref_stats[k]]
    if stats["input_rows"] != stats["kept"] + sum(sum(r.values()) for r in stats["rejected"].values()):
        problems.append("accounting invariant broken")
    if manifest["total_samples"] != stats["kept"]:
        problems.append("manifest total_samples != kept")
    if not (out / "report.html").is_file():
        problems.append("no report.html")
    leftovers = [str(p.relative_to(out)) for p in visible_files(out)
                 if TMP_MARK in p.name or p.name.endswith((".tmp", ".partial"))]
    if leftovers:
        problems.append(f"temporary files visible outside _work/: {sorted(leftovers)}")
    return problems


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, image_server: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("crash")
    corpus = root / "corpus.csv"
    write_corpus(corpus, image_server.base_url)
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_COMMIT)
    reference = root / "reference"
    finish_run(write_config(root, corpus, reference))
    stats = json.loads((reference / "stats.json").read_text())
    assert stats["kept"] >= 30 and stats["rejected"]["download"], stats  # a meaningful run: many shards, failures
    return {"root": root, "corpus": corpus, "hooks": hooks, "reference": reference}


def _slow_env(hooks: Path, commit_delay: float) -> dict[str, str]:
    pythonpath = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": pythonpath, "CURATE_TEST_SLOW_COMMIT": str(commit_delay)}


def test_sigkill_during_download_write_and_between_shards_then_resume(
        workspace: dict[str, Any], image_server: Any) -> None:
    seed = int(os.environ.get("CURATE_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    out = workspace["root"] / f"killed-{seed}"
    config = write_config(workspace["root"], workspace["corpus"], out)
    env = _slow_env(workspace["hooks"], 0.08)
    image_server.delay = 0.03
    try:
        # 1. During download: after a random number of image requests of this run.
        start_hits = image_server.hits
        after = rng.randrange(3, 25)
        proc = start_run(config, env)
        assert kill_when(proc, lambda: image_server.hits - start_hits >= after), f"seed {seed}: run ended first"
        assert not (out / "_work" / "finalized.json").exists()
        assert_visible_state_is_consistent(out)

        # 2. While a partition's files are written: a temporary file exists in curated/, rejected/ or parts/.
        skip = rng.randrange(0, 3)  # let a few partition writes complete first
        seen: set[str] = set()

        def writing() -> bool:
            current = {p.name for sub in ("curated", "rejected", "_work/parts") for p in tmp_files(out, sub)}
            seen.update(current)
            return len(seen) > skip and bool(current)

        proc = start_run(config, env)
        assert kill_when(proc, writing), f"seed {seed}: run ended before a write could be interrupted"
        assert_visible_state_is_consistent(out)

        # 3. Between shards: the repack has renamed at least `n` final shards, and is not finished.
        n = rng.randrange(1, 4)
        proc = start_run(config, env)
        assert kill_when(proc, lambda: len(list((out / "shards").glob("*.tar"))) >= n
                         and not (out / "_work" / "finalized.json").exists()), f"seed {seed}: repack not hit"
        assert_visible_state_is_consistent(out)
        assert not (out / "manifest.json").exists() or not (out / "_work" / "finalized.json").exists()
    finally:
        image_server.delay = 0.0

    finish_run(config)
    assert output_differences(out, workspace["reference"]) == [], f"seed {seed}"


def test_sigkill_at_random_times_then_resume(workspace: dict[str, Any], image_server: Any) -> None:
    """Kills at uniformly random moments of the run (no slow-down), twice, then completion."""
    seed = int(os.environ.get("CURATE_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    out = workspace["root"] / f"random-{seed}"
    config = write_config(workspace["root"], workspace["corpus"], out)
    for _ in range(2):
        proc = start_run(config)
        delay = rng.uniform(0.5, 4.0)
        killed_at = time.monotonic() + delay
        kill_when(proc, lambda at=killed_at: time.monotonic() >= at)  # the run may also finish first: fine
        assert_visible_state_is_consistent(out)
    finish_run(config)
    assert output_differences(out, workspace["reference"]) == [], f"seed {seed}"


def test_deleted_outputs_of_a_finished_run_are_made_again(workspace: dict[str, Any], tmp_path: Path) -> None:
    """A shard or a Parquet file deleted (or never copied) after a run, or a shard cut short: the next run said
    "nothing to do" and kept a manifest naming a file that was gone. Those partitions run again, byte for byte."""
    out = tmp_path / "run"
    config = write_config(workspace["root"], workspace["corpus"], out)
    finish_run(config)
    shard, cut = sorted((out / "shards").glob("*.tar"))[1:3]
    rejected = sorted((out / "rejected").glob("*.parquet"))[-1]
    shard.unlink()
    rejected.unlink()
    cut.write_bytes(cut.read_bytes()[:1000])  # a copy cut short: there, but not the shard the marker describes
    proc = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "run", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished partition(s) miss output files" in proc.stderr + proc.stdout
    assert shard.is_file() and rejected.is_file()
    assert output_differences(out, workspace["reference"]) == []
