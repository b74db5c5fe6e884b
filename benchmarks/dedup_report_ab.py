"""A/B of `curate dedup-report` through the CLI: another git revision's code against this tree's, same inputs.

What a user runs: `curate dedup-report --corpus CORPUS.tar --index INDEX.parquet -o DIR` in a subprocess, on a
WebDataset tar of the end-to-end benchmark's real JPEGs (300-1,200 px; benchmarks/e2e_vs_img2dataset.py's cache)
against its 360-item eval index of other crops of 5 of the corpus's 18 source photos (so ~40% of the samples have
pHash candidates and ~25% are matched: a stress case for what the report keeps in memory); `--replicate-index K`
repeats every eval item K times (item ids made unique) to give the index's descriptors a size that shows in RAM
(every repeat of an item is a candidate too, and the `max_candidates` cap bounds the verify calls). Measured per run: wall,
CPU of the subprocess, its peak RSS (VmHWM of the process itself, read at exit), and the outputs: pairs.json,
summary.json and the thumbnails of both revisions must be identical.

The other revision's `pipeline/` and `stages/` are exported with `git archive` into a temporary folder laid out as
the `curate` namespace package and put first on PYTHONPATH, so its whole code runs (the index is built once, with
this tree's `curate hash-evalset`; both revisions must share the descriptor version). Runs alternate (A B, B A, ...).

    python benchmarks/dedup_report_ab.py --rev 2d0b1f6 --images 3000   # writes results/dedup_report_ab.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import e2e_vs_img2dataset as e2e  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "dedup_report_ab.json"
# Runs the CLI in this process and prints its own peak RSS at exit (RUSAGE_CHILDREN would keep the largest child).
# VmHWM, not ru_maxrss: the latter carries the parent's peak over from fork across exec.
_LAUNCHER = (
    "import atexit, sys, runpy\n"
    "hwm = lambda: next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
    "atexit.register(lambda: print('PEAK_RSS_KIB', hwm(), file=sys.stderr))\n"
    "sys.argv = ['curate'] + sys.argv[1:]\n"
    "runpy.run_module('curate.pipeline.cli', run_name='__main__')\n"
)


def export_revision(rev: str, dest: Path) -> Path:
    """`rev`'s pipeline/ and stages/ as dest/curate/{pipeline,stages} (a namespace package portion)."""
    root = dest / "curate"
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pipeline", "stages"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return dest


def replicate(index: Path, times: int, dest: Path) -> Path:
    """The index with every item repeated `times` times (item ids suffixed), its metadata kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(index)
    copies = []
    for k in range(times):
        ids = pa.array([f"{i}#{k}" for i in table.column("item_id").to_pylist()], pa.string())
        copies.append(table.set_column(table.schema.get_field_index("item_id"), "item_id", ids))
    pq.write_table(pa.concat_tables(copies).replace_schema_metadata(table.schema.metadata), dest)
    return dest


def short_rev(rev: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True,
                          text=True).stdout.strip()


def revision_env(pythonpath: str | None) -> dict[str, str]:
    """This environment, with an exported revision (:func:`export_revision`) first on PYTHONPATH when given."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(pythonpath: str | None, args: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """`curate ARGS` of the revision on `pythonpath` (None: this tree) in a subprocess, and its peak RSS in KiB."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], env=revision_env(pythonpath),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"curate {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return proc, peak


def outputs_digest(out: Path) -> dict[str, str]:
    files = [out / "pairs.json", out / "summary.json", *sorted((out / "thumbs").glob("*"))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.exists()}


def run_report(pythonpath: str | None, corpus: Path, index: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cpu0, t0 = e2e._children_cpu_s(), time.perf_counter()
    _proc, peak = run_cli(pythonpath, ["dedup-report", "--corpus", str(corpus), "--index", str(index), "-o", str(out)])
    wall, cpu = time.perf_counter() - t0, e2e._children_cpu_s() - cpu0
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(peak / 1024, 1),
            "pairs": summary["pairs"], "digest": outputs_digest(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the other (older) revision, A")
    parser.add_argument("--images", type=int, default=3000, help="corpus samples (cached real JPEGs)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--replicate-index", type=int, default=1, metavar="K",
                        help="repeat each eval item K times in the index (a bigger index, same pictures)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    procs = os.cpu_count() or 2
    curate_bin = e2e.find_curate()
    files = e2e.corpus_files(5000, procs)[: args.images]
    e2e.SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="report-ab-", dir=e2e.SCRATCH))
    machine = e2e.shared_machine("2-core sandbox VM shared with other tenants: compare A and B within this file only")
    try:
        corpus = work / "corpus.tar"
        with tarfile.open(corpus, "w") as tar:
            for i, f in enumerate(files):
                for name, data in ((f"{i:09d}.jpg", f.read_bytes()), (f"{i:09d}.txt", f.stem.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        index, _seconds = e2e.build_index(curate_bin, e2e.eval_folder(360, procs, work), work)
        if args.replicate_index > 1:
            index = replicate(index, args.replicate_index, work / f"index-x{args.replicate_index}.parquet")
        old = export_revision(args.rev, work / "rev")
        sides = {"A": str(old), "B": None}
        runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        for rep in range(args.repeats):
            for side in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                result = run_report(sides[side], corpus, index, work / f"out-{side}")
                runs[side].append(result)
                print(f"repeat {rep + 1}/{args.repeats} {side}: wall {result['wall_s']:6.2f} s  CPU {result['cpu_s']:6.2f} s"
                      f"  peak RSS {result['peak_rss_mib']:7.1f} MiB  pairs {result['pairs']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_after"] = os.getloadavg()
    digests = {json.dumps(r.pop("digest"), sort_keys=True) for side in runs.values() for r in side}
    identical = len(digests) == 1
    rev, head = short_rev(args.rev), short_rev("HEAD")
    result = {
        "benchmark": "dedup_report_ab",
        "what": "`curate dedup-report` CLI of revision A (git archive on PYTHONPATH) vs this tree (B), same corpus tar "
                "and eval index, alternating; wall, CPU and peak RSS of the subprocess; outputs compared",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "command": f"python benchmarks/dedup_report_ab.py --rev {args.rev} --images {args.images} --repeats {args.repeats}"
                   f" --replicate-index {args.replicate_index}",
        "A": rev, "B": f"{head} + working tree",
        "setup": {"corpus_samples": len(files), "corpus_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
                  "eval_items": 360 * args.replicate_index, "replicate_index": args.replicate_index},
        "outputs_identical": identical,
        "runs": runs,
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"outputs identical: {identical}; saved {args.output}")


if __name__ == "__main__":
    main()
