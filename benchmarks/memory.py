"""Memory benchmark: peak RSS of a whole `curate run` (client + Dask nannies + workers) does not grow with the
corpus, because partitions stream through the workers and nothing holds the corpus.

It generates distinct JPEGs (noise + gradients, `--image-px` square), serves them from a loopback HTTP server in
a separate process, and runs the real CLI on corpora of 10k and 50k rows (`--quick`: 2k and 10k) with download,
caption cleaning and the writer (dedup and CLIP off: they add per-worker model/index memory that is constant in
the corpus size; `--clip` adds the tiny CLIP). A poller sums the RSS of the run's process tree every 100 ms.

    python benchmarks/memory.py [--quick] [--sizes 10000 50000] [--workers 2] [--shard-size 1000]

Prints a table and writes benchmarks/results/memory.json. The baseline is the smaller corpus of the same run;
the ratio is peak(largest) / peak(smallest): 1.0 means flat. For scale, the JSON also gives the image bytes each
corpus downloads, i.e. what a non-streaming implementation would have to hold.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "memory.json"

SERVER = textwrap.dedent('''
    import http.server, os, sys
    folder = sys.argv[1]
    files = {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)}
    names = sorted(files)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a):
            pass
        def do_GET(self):
            try:
                index = int(self.path.rsplit("/", 1)[1].split(".")[0])
                body = files[names[index % len(names)]]
                status = 200
            except (ValueError, IndexError):
                body, status = b"", 404
            self.send_response(status)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024
        def handle_error(self, *a):
            pass

    httpd = Server(("127.0.0.1", 0), Handler)
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()
''')


def make_images(folder: Path, count: int, px: int) -> int:
    """`count` distinct JPEGs; returns their mean size in bytes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    yy, xx = np.mgrid[0:px, 0:px]
    for i in range(count):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, ((xx + yy) * (i % 3 + 1)) % 256], -1)
        noise = rng.integers(0, 64, (px, px, 3))
        img = Image.fromarray(((base + noise) % 256).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total // count


def write_corpus(path: Path, rows: int, base_url: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = ["red", "blue", "small", "large", "old", "new", "bright", "dark", "wooden", "metal", "glass", "stone"]
    things = ["house", "car", "tree", "boat", "chair", "lamp", "bridge", "tower", "garden", "street", "field"]
    rng = random.Random(0)
    captions = [f"A {rng.choice(words)} {rng.choice(things)} next to a {rng.choice(words)} {rng.choice(things)}, "
                f"photo {i}" for i in range(rows)]
    pq.write_table(pa.table({"url": [f"{base_url}/img/{i}.jpg" for i in range(rows)], "caption": captions}), path,
                   row_group_size=10_000)


def tree_rss(root_pid: int) -> tuple[int, dict[str, int]]:
    """RSS of a process and all its descendants (bytes), and per role (client / nanny / worker)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, {}
    total = 0
    roles: dict[str, int] = {}
    for proc in procs:
        try:
            rss = proc.memory_info().rss
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        role = "client" if proc.pid == root_pid else ("worker/nanny" if "multiprocessing" in cmd or "spawn" in cmd
                                                      else "other")
        roles[role] = max(roles.get(role, 0), rss)
        total += rss
    return total, roles


def run_one(rows: int, args: argparse.Namespace, work: Path, base_url: str) -> dict[str, Any]:
    import yaml

    corpus = work / f"corpus-{rows}.parquet"
    write_corpus(corpus, rows, base_url)
    out = work / f"run-{rows}"
    config = {
        "input": {"path": str(corpus), "shard_size": args.shard_size},
        "output": {"path": str(out)},
        "cluster": {"n_workers": args.workers, "threads_per_worker": 1, "dashboard": False},
        "download": {"allowed_networks": ["127.0.0.1/32"], "timeout": 20, "retries": 1, "threads": 16},
        "captions": {"languages": []},
        "dedup": {"enabled": False},
        "clip": {"enabled": False},
        "write": {"shard_samples": 5000},
    }
    if args.clip:
        config["clip"] = {"enabled": True, "model": "curate-tiny-clip",
                          "model_config": str(REPO / "configs" / "demo" / "curate-tiny-clip.json"),
                          "pretrained": str(work / "tiny_clip.pt"), "threshold": -1.0}
    config_path = work / f"config-{rows}.yaml"
    config_path.write_text(yaml.safe_dump(config))

    peak = {"total": 0, "samples": 0}
    peak_roles: dict[str, int] = {}
    timeline: list[tuple[float, int]] = []
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "curate.pipeline.cli", "run", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            total, roles = tree_rss(proc.pid)
            peak["total"] = max(peak["total"], total)
            peak["samples"] += 1
            for role, value in roles.items():
                peak_roles[role] = max(peak_roles.get(role, 0), value)
            timeline.append((round(time.perf_counter() - start, 2), total))
            stop.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = proc.communicate()
    elapsed = time.perf_counter() - start
    stop.set()
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"curate run failed for {rows} rows:\n{stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    # Steady state: the median tree RSS over the middle half of the run (after start-up, before finalize).
    mid = sorted(v for t, v in timeline if elapsed * 0.25 <= t <= elapsed * 0.75) or [peak["total"]]
    result = {
        "rows": rows,
        "partitions": stats.get("partitions"),
        "kept": stats["kept"],
        "rejected": stats["rejected"],
        "elapsed_s": round(elapsed, 1),
        "rows_per_s": round(rows / elapsed, 1),
        "peak_tree_rss_mib": round(peak["total"] / 2**20, 1),
        "median_mid_run_tree_rss_mib": round(mid[len(mid) // 2] / 2**20, 1),
        "peak_rss_by_role_mib": {k: round(v / 2**20, 1) for k, v in sorted(peak_roles.items())},
        "rss_samples": peak["samples"],
        "image_bytes_downloaded_mib": round(
            stats.get("stages", {}).get("download", {}).get("counters", {}).get("bytes_downloaded", 0) / 2**20, 1),
    }
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2k and 10k rows instead of 10k and 50k")
    parser.add_argument("--sizes", type=int, nargs="+", help="corpus sizes (rows)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--shard-size", type=int, default=1000, help="input.shard_size (rows per partition)")
    parser.add_argument("--image-px", type=int, default=160, help="side of the generated JPEGs")
    parser.add_argument("--distinct-images", type=int, default=500)
    parser.add_argument("--clip", action="store_true", help="also run the tiny CLIP filter")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = args.sizes or ([2000, 10000] if args.quick else [10000, 50000])

    import psutil

    work = Path(tempfile.mkdtemp(prefix="curate-memory-"))
    images = work / "images"
    mean_bytes = make_images(images, args.distinct_images, args.image_px)
    if args.clip:
        import open_clip
        import torch

        open_clip.add_model_config(str(REPO / "configs" / "demo" / "curate-tiny-clip.json"))
        torch.save({"state_dict": open_clip.create_model("curate-tiny-clip").state_dict()}, work / "tiny_clip.pt")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(images)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        base_url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        results = []
        for rows in sizes:
            print(f"running {rows:,} rows ...", flush=True)
            results.append(run_one(rows, args, work, base_url))
            print(f"  {json.dumps(results[-1])}", flush=True)
    finally:
        server.kill()
        server.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    baseline, largest = results[0], results[-1]
    report = {
        "benchmark": "memory",
        "what": "peak RSS of the whole `curate run` process tree (client + Dask nannies + workers) vs corpus size",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "note": "2-core sandbox VM, SHARED with 5 other engineers running builds/tests concurrently: timings "
                    "are noisy; RSS is not affected by other tenants",
        },
        "config": {"workers": args.workers, "threads_per_worker": 1, "shard_size": args.shard_size,
                   "image_px": args.image_px, "mean_image_bytes": mean_bytes, "distinct_images": args.distinct_images,
                   "stages": ["download", "clean_captions", *(["clip_filter"] if args.clip else []), "write"],
                   "server": "ThreadingHTTPServer on 127.0.0.1 in a separate process (not counted)"},
        "baseline": baseline,
        "results": results,
        "ratio_peak_rss_largest_vs_baseline": round(largest["peak_tree_rss_mib"] / baseline["peak_tree_rss_mib"], 3),
        "ratio_rows": round(largest["rows"] / baseline["rows"], 1),
        "image_bytes_ratio_largest_vs_baseline": round(
            largest["image_bytes_downloaded_mib"] / max(baseline["image_bytes_downloaded_mib"], 1e-9), 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"{'rows':>8} {'partitions':>10} {'elapsed s':>10} {'rows/s':>8} {'peak tree RSS MiB':>18} "
          f"{'mid-run RSS MiB':>16} {'images MiB':>11}")
    for r in results:
        print(f"{r['rows']:>8,} {r['partitions'] or 0:>10} {r['elapsed_s']:>10} {r['rows_per_s']:>8} "
              f"{r['peak_tree_rss_mib']:>18} {r['median_mid_run_tree_rss_mib']:>16} "
              f"{r['image_bytes_downloaded_mib']:>11}")
    print(f"peak RSS ratio {largest['rows']:,} vs {baseline['rows']:,} rows: "
          f"{report['ratio_peak_rss_largest_vs_baseline']} (rows x{report['ratio_rows']}, "
          f"image bytes x{report['image_bytes_ratio_largest_vs_baseline']})")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
