"""Peak RSS of the dedup stage's worker set-up against eval indexes of growing size, this tree vs another revision.

The stage's `setup()` (what every worker process does once per run) in a subprocess of its own, reading an
INDEX.parquet written as `curate hash-evalset` writes it (one row group, zstd): the end-to-end benchmark's 360-item
eval index with every item repeated K times (item ids made unique; the descriptors are real, ~17 KB per item with the
mirrored keypoints). Measured: the process's peak RSS (VmHWM) after importing the stage and after `setup()`,
and the matcher's compact bytes per item. The other revision's `pipeline/` and `stages/` run from a `git archive` on
PYTHONPATH (benchmarks/dedup_report_ab.py); both must share the index format.

    python benchmarks/index_setup_memory.py --rev 5e247ea --copies 1,60,240
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import e2e_vs_img2dataset as e2e  # noqa: E402
from dedup_report_ab import export_revision, replicate, revision_env, run_cli, short_rev  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "index_setup_memory.json"
_PROBE = """
import json, sys
def peak():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over from fork across exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024
from curate.pipeline.stage import RunContext
from curate.stages.phash_dedup.stage import DedupConfig, PhashDedupStage
import cv2, scipy.fftpack  # imported by set-up anyway: counted before it
before = peak()
stage = PhashDedupStage(DedupConfig(indexes=(sys.argv[1],)), RunContext(output_path=sys.argv[2], work_path=sys.argv[2]))
stage.setup()
m = stage._matcher
print(json.dumps({"peak_before_setup_mib": before, "peak_after_setup_mib": peak(), "items": len(m.labels),
                  "compact_bytes_per_item": round(m.compact_nbytes / len(m.labels))}))
"""


def probe(pythonpath: str | None, index: Path, scratch: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(index), str(scratch)], env=revision_env(pythonpath),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"set-up failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_peak(pythonpath: str | None, folder: Path, out: Path) -> dict:
    """Peak RSS (VmHWM) of the `curate hash-evalset` process, its wall and the index size."""
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    _proc, peak = run_cli(pythonpath, ["hash-evalset", str(folder), "-o", str(out)])
    return {"peak_rss_mib": round(peak / 1024, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "index_mib": round(out.stat().st_size / 2**20, 1)}


def main_build(rev: str, n: int, output: Path) -> None:
    procs = os.cpu_count() or 2
    e2e.SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-mem-", dir=e2e.SCRATCH))
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    try:
        folder = work / "evalset"
        folder.mkdir()
        for f in e2e.corpus_files(5000, procs)[:n]:
            (folder / f.name).symlink_to(f)
        old = export_revision(rev, work / "rev")
        for side, path in (("A", str(old)), ("B", None), ("B", None), ("A", str(old))):
            found = build_peak(path, folder, work / f"index-{side}.parquet")
            runs[side].append(found)
            print(f"{n} eval images {side}: {found}", flush=True)
        same = (work / "index-A.parquet").exists() and pq_rows(work / "index-A.parquet") == pq_rows(work / "index-B.parquet")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = short_rev("HEAD")
    output.write_text(json.dumps({
        "benchmark": "index_build_memory",
        "what": "peak RSS (VmHWM) of the `curate hash-evalset` process on a folder of cached real JPEGs; revision A "
                "vs this tree B, alternating, twice each; index rows compared",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "command": f"python benchmarks/index_setup_memory.py --rev {rev} --build {n}",
        "A": rev, "B": f"{head} + working tree", "eval_images": n, "same_rows": same, "runs": runs,
    }, indent=1) + "\n")
    print(f"same rows: {same}; saved {output}")


def pq_rows(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path).drop_columns(["path"]).to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the other (older) revision, A")
    parser.add_argument("--copies", default="1,60,240", help="index sizes as copies of the 360-item index")
    parser.add_argument("--build", type=int, default=0, metavar="N",
                        help="measure `curate hash-evalset` on N cached JPEGs instead of the stage's set-up")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.build:
        main_build(args.rev, args.build, args.output or RESULTS.with_name("index_build_memory.json"))
        return
    args.output = args.output or RESULTS
    copies = [int(c) for c in args.copies.split(",")]

    procs = os.cpu_count() or 2
    e2e.SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="setup-mem-", dir=e2e.SCRATCH))
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    rows = []
    try:
        base, _seconds = e2e.build_index(e2e.find_curate(), e2e.eval_folder(360, procs, work), work)
        old = export_revision(args.rev, work / "rev")
        for k in copies:
            index = base if k == 1 else replicate(base, k, work / f"index-x{k}.parquet")
            row = {"items": 360 * k, "index_file_mib": round(index.stat().st_size / 2**20, 1)}
            for side, path in (("A", str(old)), ("B", None), ("A", str(old)), ("B", None)):
                found = probe(path, index, work)
                growth = found["peak_after_setup_mib"] - found["peak_before_setup_mib"]
                row.setdefault(f"{side}_setup_peak_growth_mib", []).append(growth)
                row[f"{side}_compact_bytes_per_item"] = found["compact_bytes_per_item"]
                print(f"{360 * k:7d} items {side}: peak RSS {found['peak_before_setup_mib']} -> "
                      f"{found['peak_after_setup_mib']} MiB (+{growth})", flush=True)
            rows.append(row)
            if k != 1:
                index.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = short_rev("HEAD")
    args.output.write_text(json.dumps({
        "benchmark": "index_setup_memory",
        "what": "peak RSS growth of PhashDedupStage.setup() (one worker's set-up) against eval indexes of growing "
                "size written in one row group; revision A vs this tree B, each in its own subprocess, twice",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "command": f"python benchmarks/index_setup_memory.py --rev {args.rev} --copies {args.copies}",
        "A": args.rev, "B": f"{head} + working tree",
        "rows": rows,
    }, indent=1) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
