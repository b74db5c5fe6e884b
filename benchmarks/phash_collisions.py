"""How often unrelated real images land within the pHash candidate threshold, and what that costs.

With `dedup.verify`, every eval hash (main or variant) within `dedup.candidate_threshold` of a corpus
row's pHash is a candidate, and each candidate costs one `nearduplicate.verify` call (about 6 ms) up
to `dedup.max_candidates`. At LAION scale nearly all candidates are unrelated pictures, so the
verification cost per row is about (eval items) x (rate below) x 6 ms. This script measures that rate
on real images: the demo/scikit-image photos, the Debian plasma wallpapers and all 411 Tux Paint
stamps (flat cut-outs: the worst case), every unrelated ordered pair (variants of one drawing and
renditions of one wallpaper excluded), against the eval side's main hash and against main plus
`candidate_hashes` (what the stage searches). Uniform random 64-bit hashes are the lower bound.

    python benchmarks/phash_collisions.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import near_dup_eval as B  # noqa: E402  (the same images and loaders as the near-duplicate evaluation)
from PIL import Image  # noqa: E402

from curate.stages.phash_dedup import nearduplicate as nd  # noqa: E402
from curate.stages.phash_dedup import uniform_collision_rate  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "phash_collisions.json"
THRESHOLDS = (8, 10, 12, 14, 16)


def main() -> None:
    B.fetch_debs()
    photos = B.load_photos()
    walls = [w for w, _ in B.wallpaper_sources(40)]
    stamps = [B.Item(f"stamp-{p.parent.name}-{p.stem}", "stamp", B.fit(B.on_background(Image.open(p)), 512))
              for p in B.stamp_paths()]
    items = photos + walls + stamps
    family = [B.drawing_family(i.name) or i.name for i in items]
    main_hashes = np.array([B.phash_int(i.image) for i in items], dtype=np.uint64)
    variants = [nd.candidate_hashes(i.image) for i in items]
    d_main, d_loose = B.candidate_distances(main_hashes, variants, main_hashes)
    unrelated = np.array([[a != b for b in family] for a in family])
    groups = np.array([i.group for i in items])
    out: dict[str, dict] = {}
    for label, side in (("all", np.ones(len(items), bool)), ("photos and wallpapers", groups != "stamp"),
                        ("stamps (flat cut-outs)", groups == "stamp")):
        pairs = unrelated[side][:, side]
        main_d, loose_d = d_main[side][:, side][pairs], d_loose[side][:, side][pairs]
        out[label] = {
            "unrelated_pairs": int(pairs.sum()),
            "rate_main_hash": {t: float(f"{(main_d <= t).mean():.3g}") for t in THRESHOLDS},
            "rate_with_variant_hashes": {t: float(f"{(loose_d <= t).mean():.3g}") for t in THRESHOLDS},
        }
    uniform = {t: float(f"{uniform_collision_rate(t, 64):.3g}") for t in THRESHOLDS}
    result = {
        "benchmark": "phash_collisions",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "images": {"photos": len(photos), "wallpapers": len(walls), "stamps": len(stamps)},
        "mean_variant_hashes_per_eval_item": round(float(np.mean([len(v) for v in variants])), 2),
        "rates": out,
        "uniform_random_64_bit_rate": uniform,
        "note": "rate = share of unrelated (eval, corpus) pairs within the threshold; the photo sample is small "
                "(a few thousand pairs), so its rates below ~1e-3 are not resolved",
    }
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
