"""Does the verifier's conclusive-keypoints shortcut change any decision? Every candidate pair, with and without it.

`nearduplicate._dense_agreement` stops after the keypoint alignment when, for two detailed pictures, its aligned
thumbnails agree at `_CONCLUSIVE_NCC` or more (median block and global NCC), instead of also refining the identity
and mirror starts. The measurements (hence the probability) can then differ from the full search: this runs
`evidence()` both ways on every candidate pair (any variant hash within 16 bits) of the four near-duplicate
generators of benchmarks/dedup_logo.py, with the shipped model, and counts changed evidence, changed decisions and
the CPU per pair. Pairs without a keypoint transform never reach the shortcut and are skipped.

    python benchmarks/dedup_conclusive.py            # writes benchmarks/results/dedup_conclusive.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import dedup_logo as L  # noqa: E402
import near_dup_eval as B  # noqa: E402

from curate.stages.phash_dedup import nearduplicate as nd  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "dedup_conclusive.json"
NEVER = 9.0  # a _CONCLUSIVE_NCC no agreement reaches: every start is tried


def check(name: str) -> dict:
    import cv2

    cv2.setNumThreads(1)  # as the stage's workers run it
    evals, corpus = L.build(name, L.SEED)
    codes = [nd.variant_codes(e.image) for e in evals]
    corpus_hashes = np.array([B.phash_int(c.image) for c in corpus], dtype=np.uint64)
    pairs = []
    for i, item in enumerate(codes):
        d = B.hamming_matrix(np.array([h for h, _ in item], dtype=np.uint64), corpus_hashes).min(axis=0)
        pairs += [(i, int(j), int(d[j])) for j in np.flatnonzero(d <= L.WIDEST)]
    eval_desc = [nd.descriptor(e.image, with_mirror=True) for e in evals]
    corpus_desc = {j: nd.descriptor(corpus[j].image) for j in {p[1] for p in pairs}}
    shipped = nd._CONCLUSIVE_NCC
    reached, changed, flips, cpu_full, cpu_short, largest = 0, 0, [], 0.0, 0.0, 0.0
    for i, j, distance in pairs:
        e, c = nd._parse(eval_desc[i]), nd._parse(corpus_desc[j])
        if nd._keypoint_transform(e, c, True)[0] is None:
            continue
        reached += 1
        nd._CONCLUSIVE_NCC = NEVER
        t0 = time.process_time()
        full = nd.evidence(eval_desc[i], corpus_desc[j], distance=distance)
        cpu_full += time.process_time() - t0
        nd._CONCLUSIVE_NCC = shipped
        t0 = time.process_time()
        short = nd.evidence(eval_desc[i], corpus_desc[j], distance=distance)
        cpu_short += time.process_time() - t0
        if full != short:
            changed += 1
            largest = max(largest, abs(full.probability - short.probability))
        if full.match != short.match:
            flips.append({"eval": evals[i].name, "corpus": corpus[j].name, "true_pair": corpus[j].source == evals[i].name,
                          "probability_full": round(full.probability, 4), "probability_shortcut": round(short.probability, 4)})
    return {"candidate_pairs": len(pairs), "with_keypoint_transform": reached, "evidence_changed": changed,
            "largest_probability_change": round(largest, 4), "decisions_changed": flips,
            "cpu_ms_per_pair_with_transform": {"all_starts": round(cpu_full * 1000 / max(1, reached), 2),
                                               "shortcut": round(cpu_short * 1000 / max(1, reached), 2)}}


def main() -> None:
    results = {}
    for name in (*L.GENERATORS, L.PRISTINE):
        results[name] = check(name)
        print(name, results[name], flush=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "dedup_conclusive",
        "what": __doc__.split("\n")[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "loadavg": os.getloadavg()},
        "command": "python benchmarks/dedup_conclusive.py",
        "conclusive_ncc": nd._CONCLUSIVE_NCC,
        "generators": results,
    }, indent=1) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
