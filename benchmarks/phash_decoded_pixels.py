"""One decode per image: the pHash taken from the download stage's pixels vs imagehash of the stored bytes.

With `dedup.hash_decoded_pixels` (default) the dedup stage's pHash of a downloaded row is computed by the
download stage from the pixels it has just resized, before JPEG encoding (`PhashDedupStage.from_pixels`),
instead of decoding the stored bytes again. This measures, on distinct real-photo JPEGs (crops of the bundled
scikit-image photos, 300-1,200 px; benchmarks/download_cpu.py's images):

* agreement: Hamming distance between that hash and ``imagehash.phash`` of the stored bytes (the exact mode's
  definition), per output size (`download.image_size`, keep_ratio, q95); rows kept byte for byte agree exactly
  by construction (tests/test_one_decode.py);
* CPU per row (one thread, best of repeats): download + dedup with the option on and off;
* with eval verification (the option's default when `dedup.verify` has indexes: rows with eval candidates are
  matched on the download thread from those pixels, not decoded again): the e2e benchmark's stress case
  (benchmarks/e2e_vs_img2dataset.py's corpus photos and its eval set of other crops of 5 of them, 256 px), the
  share of rows whose decision (eval match or none) is the same as from decoding the stored bytes, and CPU per row
  on and off.

    python benchmarks/phash_decoded_pixels.py [--images 300] [--repeats 3] [--verify-rows 600]

Results: benchmarks/results/phash_decoded_pixels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "phash_decoded_pixels.json"
sys.path.insert(0, str(REPO / "benchmarks"))


def _stages(tmp: str, size: int, reuse: bool, index: str | None = None) -> tuple[Any, Any]:
    from curate.pipeline import runner
    from curate.pipeline.stage import RunContext
    from curate.stages.download.stage import DownloadConfig, DownloadStage
    from curate.stages.phash_dedup.stage import DedupConfig, PhashDedupStage

    context = RunContext(output_path=tmp, work_path=tmp)
    down = DownloadStage(DownloadConfig(reprocess_existing=True, image_size=size, resize_only_if_bigger=False,
                                        threads=1), context)
    dedup = PhashDedupStage(DedupConfig(hash_decoded_pixels=reuse, indexes=(index,) if index else ()), context)
    for stage in (down, dedup):
        stage.ensure_setup()
    runner._wire_pixels([down, dedup])
    return down, dedup


def _table(images: list[bytes]) -> pa.Table:
    n = len(images)
    return pa.table({"key": [f"{i:06d}" for i in range(n)], "image": images, "status": ["success"] * n})


def _verification(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Decisions and CPU with eval verification: matched from the download's pixels vs from the stored bytes."""
    from e2e_vs_img2dataset import corpus_files, eval_folder

    from curate.stages.phash_dedup import evalsets

    procs = os.cpu_count() or 1
    datas = [p.read_bytes() for p in corpus_files(5000, procs)[: args.verify_rows]]
    index = tmp / "eval-index.parquet"
    evalsets.hash_evalset(str(eval_folder(360, procs, tmp)), str(index), name="e2e-eval", workers=procs)
    decisions: dict[bool, list[Any]] = {}
    counters: dict[str, dict[str, int]] = {}
    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.repeats):
        for reuse in (True, False):
            down, dedup = _stages(str(tmp), 256, reuse, str(index))
            start = time.process_time()
            scored = dedup.score(down.process(_table(datas)))
            best[reuse] = min(best[reuse], time.process_time() - start)
            decisions[reuse] = scored.column("eval_match").to_pylist()
            counters["on" if reuse else "off"] = dict(dedup.counters)
    same = [a == b for a, b in zip(decisions[True], decisions[False], strict=True)]
    flipped = [(a, b) for a, b in zip(decisions[True], decisions[False], strict=True) if (a is None) != (b is None)]
    return {
        "rows": len(datas), "eval_items": 360,
        "rows_with_candidates": counters["off"].get("eval_candidate_rows", 0),
        "same_decision_share": round(sum(same) / len(same), 4),
        "rows_matched_on_off": [sum(d is not None for d in decisions[True]), sum(d is not None for d in decisions[False])],
        "rows_matched_only_one_way": len(flipped),
        "cpu_ms_per_row": {"on": round(best[True] / len(datas) * 1000, 3), "off": round(best[False] / len(datas) * 1000, 3)},
        "counters": counters,
    }


def main() -> None:
    import io

    from download_cpu import make_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verify-rows", type=int, default=600)
    args = parser.parse_args()
    load_before = os.getloadavg()
    agreement: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        datas = [p.read_bytes() for p in make_images(args.images, Path(tmp))]
        for size in (256, 512):
            down, dedup = _stages(tmp, size, True)
            scored = dedup.score(down.process(_table(datas)))
            ours = scored.column("phash").to_pylist()
            stored = [str(imagehash.phash(Image.open(io.BytesIO(b)).convert("RGB")))
                      for b in scored.column("image").to_pylist()]
            bits = np.array([bin(int(a, 16) ^ int(b, 16)).count("1") for a, b in zip(ours, stored, strict=True)])
            agreement[str(size)] = {"identical": round(float((bits == 0).mean()), 4), "mean_bits": round(float(bits.mean()), 3),
                                    "p99_bits": float(np.percentile(bits, 99)), "max_bits": int(bits.max()),
                                    "hashed_from_decoded_pixels": int(dedup.counters["hashed_from_decoded_pixels"])}
        for reuse in (True, False):
            best = float("inf")
            for _ in range(args.repeats):
                down, dedup = _stages(tmp, 256, reuse)
                start = time.process_time()
                dedup.score(down.process(_table(datas)))
                best = min(best, time.process_time() - start)
            cpu["on" if reuse else "off"] = round(best / len(datas) * 1000, 3)
        verification = _verification(args, Path(tmp))
    result = {
        "benchmark": "phash_decoded_pixels (component: download + dedup stages in one thread)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "note": "2-core sandbox shared with other jobs: CPU time, best of repeats",
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "setup": {"images": args.images, "resize": "keep_ratio, not only if bigger, JPEG q95", "hash": "8x8 exact"},
        "agreement_with_imagehash_of_stored_bytes_by_image_size": agreement,
        "cpu_ms_per_row_download_plus_dedup_256px": cpu,
        "with_eval_verification_256px": verification,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
