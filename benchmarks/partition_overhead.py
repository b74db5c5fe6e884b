"""Runner overhead per partition: the same rows through `curate run` as 10 and as 100 partitions.

The user's path (the `curate` CLI in a subprocess), download + write only, from a loopback FaultServer
with 30 ms latency per request serving distinct real-photo JPEGs (benchmarks/download_cpu.py's images),
resize keep_ratio 256. The two partitionings alternate, `--repeats` times each. Reported: wall and CPU
(rusage of the whole process tree) per run, the per-stage seconds of stats.json, and the extra wall and
CPU per extra partition (the difference divided by 90): the runner's fixed cost per task.

    python benchmarks/partition_overhead.py [--rows 2000] [--repeats 3]

Results: benchmarks/results/partition_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "partition_overhead.json"
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config: Path, run_dir: Path) -> dict[str, Any]:
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "run", str(config)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"curate run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    stats = json.loads((run_dir / "stats.json").read_text())
    return {"wall_s": round(wall, 2), "cpu_s": round(_children_cpu() - cpu, 2), "kept": stats["kept"],
            "stage_seconds": {k: v.get("seconds") for k, v in stats.get("stages", {}).items()}}


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from download_cpu import make_images
    from faultserver import FaultServer, Respond

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs: dict[int, list[dict[str, Any]]] = {10: [], 100: []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "img").mkdir()
        paths = make_images(args.rows, tmp / "img")
        routes = {f"/{i}.jpg": Respond(p.read_bytes()) for i, p in enumerate(paths)}
        with FaultServer(routes, latency=(0.03, 0.03), max_connections=4096, idle_timeout=30) as server:
            table = pa.table({"url": [f"http://127.0.0.1:{server.port}/{i}.jpg" for i in range(args.rows)],
                              "caption": [f"a photo number {i}" for i in range(args.rows)]})
            pq.write_table(table, tmp / "urls.parquet")
            configs = {}
            for parts in runs:
                run_dir = tmp / f"run{parts}"
                config = {
                    "input": {"path": str(tmp / "urls.parquet"), "shard_size": args.rows // parts},
                    "output": {"path": str(run_dir)},
                    "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard": False},
                    "download": {"threads": 32, "max_per_host": 32, "retries": 0, "image_size": 256,
                                 "resize_mode": "keep_ratio", "resize_only_if_bigger": False,
                                 "allowed_networks": ["127.0.0.1/32"]},
                    "captions": {"enabled": False}, "dedup": {"enabled": False}, "clip": {"enabled": False},
                }
                path = tmp / f"config{parts}.yaml"
                path.write_text(json.dumps(config))  # JSON is YAML
                configs[parts] = (path, run_dir)
            for _ in range(args.repeats):
                for parts, (config_path, run_dir) in configs.items():
                    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                    runs[parts].append(run_once(config_path, run_dir))
                    print(parts, runs[parts][-1], flush=True)
    median = {parts: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                      "cpu_s": statistics.median(r["cpu_s"] for r in rs)} for parts, rs in runs.items()}
    result = {
        "benchmark": "partition_overhead (curate CLI, download + write, same rows as 10 and 100 partitions)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "note": "2-core sandbox shared with other jobs: compare the two partitionings within this run",
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "setup": {"rows": args.rows, "repeats": args.repeats, "latency_s": 0.03, "workers": 2, "download_threads": 32},
        "runs": {str(k): v for k, v in runs.items()},
        "median": {str(k): v for k, v in median.items()},
        "extra_wall_ms_per_partition": round((median[100]["wall_s"] - median[10]["wall_s"]) / 90 * 1000, 1),
        "extra_cpu_ms_per_partition": round((median[100]["cpu_s"] - median[10]["cpu_s"]) / 90 * 1000, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "extra_wall_ms_per_partition", "extra_cpu_ms_per_partition")}))


if __name__ == "__main__":
    main()
