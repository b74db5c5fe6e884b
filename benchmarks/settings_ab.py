"""A/B of `curate run` settings through the CLI: the same URLs, the settings alternating in one invocation.

For changes whose effect (a few percent) is smaller than what this shared machine moves between invocations of
benchmarks/e2e_vs_img2dataset.py (~0.2-0.3 in its ratio), so that only a paired comparison in one invocation can
resolve them. curate only (no img2dataset): the end-to-end benchmark's download-only config (a), or with
`--config b` its captions + download + dedup config (b, against the same 360-item eval index), on its corpus of
real JPEGs from a loopback server with 30 ms latency, `curate run CONFIG.yaml --no-progress` in a subprocess per
repeat; the order of the variants flips every repeat. Measured per run: wall, and CPU of the whole process tree
(getrusage of the reaped children) per input row.

A variant is `NAME:K=V,K=V,...`: `cfg.SECTION.KEY=VALUE` sets a config key (VALUE read as YAML), as the e2e
benchmark's `--set SECTION.KEY=VALUE` does (and like it, the disabled captions/dedup sections are left alone), any
other `K=V` an environment variable of the curate process. The baseline is the defaults.

    python benchmarks/settings_ab.py --variant "box-margin2:cfg.download.downscale_interpolation=box,cfg.download.jpeg_draft_margin=2"
    python benchmarks/settings_ab.py --variant "mimalloc:ARROW_DEFAULT_MEMORY_POOL=mimalloc" --output benchmarks/results/ab_arrow_pool.json
    python benchmarks/settings_ab.py --config b --variant "ungated:cfg.download.cpu_threads=1024"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))  # the fault-injection server lives with the tests

import e2e_vs_img2dataset as e2e  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:K=V,..., got {text!r}")
    env: dict[str, str] = {}
    config: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected K=V in {text!r}, got {item!r}")
        if key.startswith("cfg."):
            dotted, parsed = e2e.parse_override(item.removeprefix("cfg."))
            config[dotted] = parsed
        else:
            env[key] = value
    return name, env, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--config", choices=("a", "b"), default="a",
                        help="the e2e benchmark's configuration: a = download-only, b = captions + download + dedup")
    parser.add_argument("--urls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--output", type=Path, default=None, help="JSON to write (default: print only)")
    args = parser.parse_args()

    from faultserver import FaultServer, Respond

    curate_bin = e2e.find_curate()
    files = e2e.corpus_files(5000, os.cpu_count() or 2)[: args.urls]
    bodies = {f"/img/{f.name}": f.read_bytes() for f in files}
    variants = [("defaults", {}, {}), *args.variant]
    shape = argparse.Namespace(workers=2, threads=32, set=[])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    e2e.SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=e2e.SCRATCH))
    machine = e2e.shared_machine("2-core sandbox VM shared with other tenants: compare the variants within this file only")
    try:
        with FaultServer({p: Respond(b) for p, b in bodies.items()}, latency=(e2e.LATENCY_S, e2e.LATENCY_S),
                         max_connections=4096, idle_timeout=30) as srv:
            input_path = work / "urls.parquet"
            e2e.write_input(input_path, srv.base_url, files)
            index = None
            if args.config == "b":  # built once, not timed
                index, _seconds = e2e.build_index(curate_bin, e2e.eval_folder(360, os.cpu_count() or 2, work), work)
            for rep in range(args.repeats):
                for name, env_add, config_add in variants if rep % 2 == 0 else variants[::-1]:
                    shape.set = list(config_add.items())  # applied by curate_config, as the e2e benchmark's --set
                    config = e2e.curate_config(args.config, input_path, work / f"run-{name}-{rep}", index, shape)
                    config_path = work / f"{name}.yaml"
                    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                    cpu0, t0 = e2e._children_cpu_s(), time.perf_counter()
                    proc = subprocess.run([curate_bin, "run", str(config_path), "--no-progress"],
                                          env={**os.environ, **env_add}, capture_output=True, text=True)
                    wall, cpu = time.perf_counter() - t0, e2e._children_cpu_s() - cpu0
                    if proc.returncode != 0:
                        raise SystemExit(f"{name}: curate run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                    runs[name].append({"wall_s": round(wall, 2), "cpu_ms_per_row": round(cpu / args.urls * 1000, 3)})
                    print(f"repeat {rep + 1}/{args.repeats} {name:14s} wall {wall:6.2f} s  CPU "
                          f"{cpu / args.urls * 1000:6.3f} ms/row", flush=True)
                    shutil.rmtree(work / f"run-{name}-{rep}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_after"] = os.getloadavg()
    base = runs["defaults"]
    summary: dict[str, Any] = {}
    for name, _, _ in variants:
        mine = runs[name]
        paired = [round(m["cpu_ms_per_row"] / b["cpu_ms_per_row"], 3) for m, b in zip(mine, base, strict=True)]
        paired_wall = [round(m["wall_s"] / b["wall_s"], 3) for m, b in zip(mine, base, strict=True)]
        summary[name] = {
            "cpu_ms_per_row_median": statistics.median(r["cpu_ms_per_row"] for r in mine),
            "wall_s_median": statistics.median(r["wall_s"] for r in mine),
            "cpu_vs_defaults_per_repeat": paired,
            "cpu_vs_defaults_median_of_paired": statistics.median(paired),
            "wall_vs_defaults_per_repeat": paired_wall,
            "wall_vs_defaults_median_of_paired": statistics.median(paired_wall),
        }
        print(f"{name:14s} CPU {summary[name]['cpu_ms_per_row_median']:.3f} ms/row (median), vs defaults per "
              f"repeat {paired}, median {summary[name]['cpu_vs_defaults_median_of_paired']}")
    if args.output:
        args.output.write_text(json.dumps({
            "benchmark": "settings_ab",
            "what": f"`curate run` (config ({args.config}) of e2e_vs_img2dataset) with the defaults and other settings, "
                    "alternating in one invocation; CPU of the process tree per input row",
            "config": args.config,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine,
            "command": f"python benchmarks/settings_ab.py --config {args.config} " + " ".join(
                f"--variant '{n}:{','.join([*(f'{k}={v}' for k, v in e.items()), *(f'cfg.{k}={v}' for k, v in c.items())])}'"
                for n, e, c in args.variant),
            "setup": {"urls": args.urls, "repeats": args.repeats, "latency_s": e2e.LATENCY_S,
                      "workers": 2, "threads_per_worker_process": 32},
            "variants": {name: {"env": env, "config": config} for name, env, config in variants},
            "runs": runs,
            "summary": summary,
        }, indent=1) + "\n")
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
