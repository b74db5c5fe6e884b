"""Clusters: `curate run` against a real `dask scheduler` with two `dask worker` processes on loopback
(`cluster.scheduler_address`), one of which is killed (SIGKILL, nanny and worker: a lost machine) while it is
running a partition. The run must complete and write exactly what a local run writes."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "configs" / "demo" / "images"
N_ROWS = 48
SHARD_SIZE = 3


@pytest.fixture(scope="module")
def image_server(demo_image_server: Any) -> str:
    """configs/demo/images on 127.0.0.1, 40 ms per image so that partitions overlap the kill."""
    demo_image_server.delay = 0.04
    return demo_image_server.base_url


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`dask scheduler` + two `dask worker` (1 thread each, with nanny) on 127.0.0.1, each in its own group."""
    scheduler_file = tmp_path / "scheduler.json"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    procs["scheduler"] = _spawn([_dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                 "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scheduler_file.exists(), (tmp_path / "scheduler.log").read_text()[-2000:]
    for name in ("w0", "w1"):
        procs[name] = _spawn([_dask_cli(), "worker", "--scheduler-file", str(scheduler_file), "--name", name,
                              "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "2GiB"],
                             tmp_path / f"{name}.log")
    from distributed import Client

    client = Client(scheduler_file=str(scheduler_file), timeout="30s")
    try:
        client.wait_for_workers(2, timeout=90)
        yield {"address": client.scheduler.address, "client": client, "procs": procs, "tmp": tmp_path}
    finally:
        client.close()
        for proc in procs.values():
            _stop(proc)


def _dask_cli() -> str:
    """The `dask` command of this environment (next to its python), else the one on PATH."""
    beside = Path(sys.executable).with_name("dask")
    found = str(beside) if beside.exists() else shutil.which("dask")
    assert found, "the `dask` command (distributed) is not installed"
    return found


def _corpus(path: Path, base_url: str) -> None:
    names = sorted(p.name for p in IMAGES.iterdir())
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(N_ROWS):
            url = f"{base_url}/images/{names[i % len(names)]}?n={i}" if i % 9 != 8 else f"{base_url}/lost/{i}.jpg"
            writer.writerow([url, f"A photograph of the {names[i % len(names)].split('.')[0]} subject, view {i}"])


def _config(tmp_path: Path, corpus: Path, out: Path, cluster: dict[str, Any]) -> Path:
    config = {
        "input": {"path": str(corpus), "format": "csv", "shard_size": SHARD_SIZE},
        "output": {"path": str(out)},
        "cluster": cluster,
        "download": {"allowed_networks": ["127.0.0.1/32"], "timeout": 10, "retries": 0, "threads": 1},
        "captions": {"languages": []},
        "dedup": {"enabled": False},
        "clip": {"enabled": False},
        "write": {"shard_samples": 4},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snapshot(out: Path) -> dict[str, Any]:
    stats = json.loads((out / "stats.json").read_text())
    shards = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            shards[shard.name] = [(m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest())  # type: ignore[union-attr]
                                  for m in tar.getmembers()]

    def rows(sub: str) -> list[dict[str, Any]]:
        return sorted((r for p in sorted((out / sub).glob("*.parquet")) for r in pq.read_table(p).to_pylist()),
                      key=lambda r: r["key"])

    return {"shards": shards, "manifest": json.loads((out / "manifest.json").read_text()),
            "curated": rows("curated"), "rejected": rows("rejected"),
            "counts": {k: stats[k] for k in ("input_rows", "kept", "rejected", "status", "shards")}}


def test_run_on_dask_scheduler_survives_a_lost_worker(dask_cluster: dict[str, Any], image_server: str,
                                                      tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.csv"
    _corpus(corpus, image_server)
    local = tmp_path / "local"
    proc = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "run",
                           str(_config(tmp_path, corpus, local, {"n_workers": 1, "processes": False,
                                                                 "dashboard": False}))],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "distributed"
    config = _config(tmp_path, corpus, out, {"scheduler_address": dask_cluster["address"]})
    run = subprocess.Popen([sys.executable, "-m", "curate.pipeline.cli", "run", str(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    client = dask_cluster["client"]
    n_partitions = -(-N_ROWS // SHARD_SIZE)
    victim = None
    try:
        # Kill a worker while it runs a curate partition, once some partitions are already done.
        deadline = time.monotonic() + 90
        while victim is None and time.monotonic() < deadline and run.poll() is None:
            done = len(list((out / "_work" / "done").glob("*.json"))) if (out / "_work" / "done").exists() else 0
            if 2 <= done < n_partitions - 4:
                workers = client.scheduler_info()["workers"]
                busy = [addr for addr, keys in client.processing().items()
                        if any(str(k).startswith("curate-") for k in keys)]
                if busy:
                    victim = workers[busy[0]]["name"]
                    os.killpg(dask_cluster["procs"][victim].pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
        stdout, stderr = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert victim is not None, "no partition was running on a worker to kill"
    assert run.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert "connected to tcp://127.0.0.1:" in stderr.decode()
    assert len(client.scheduler_info()["workers"]) == 1  # the lost worker stayed lost; the other finished

    distributed, reference = _snapshot(out), _snapshot(local)
    counts = distributed["counts"]
    assert counts["input_rows"] == N_ROWS == counts["kept"] + sum(sum(r.values()) for r in counts["rejected"].values())
    assert counts["rejected"] == {"download": {"http_404": N_ROWS // 9}}
    assert distributed == reference  # same shards (names, members, bytes), manifest, Parquet rows and counts
