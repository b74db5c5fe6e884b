"""Cost of eval-set matching at scale: CPU ms per corpus row against 10k, 100k and 1M eval items.

What is timed is `EvalMatcher.match` (the stage's and dedup-report's matcher) on a batch of corpus rows
whose pHashes are known (the stage computes them anyway) and whose images are handed over decoded (the
stage may pass decoded pixels): Hamming search over main + variant hashes, the cheap fine-code check on
every candidate, and for what it leaves open the corpus descriptor and `verify` calls. CPU time by
`time.process_time` (all threads of the process), on a shared 2-core machine: wall time would measure
the other jobs.

Eval side: real records first (Tux Paint stamps, scikit-image photos, and the eval images of
near_dup_sets.py's product and graphics generators at seeds 10+, none of them in the corpus batch):
index build time per item is measured on them. The index is then padded to 10k / 100k / 1M items with
synthetic records: a copy of a random real record whose main and variant hashes all get the same
k random bit flips (k uniform in 0..3) and whose fine codes get 4k flips. Copies keep each real
record's collision behaviour, so the padded index has about the measured real collision rate (both
rates are in the results: `collision_rate_real` vs `collision_rate_index`). A synthetic item's full
descriptor is its source record's (read from the same memory-mapped store), so verify calls cost what
real ones do.

Corpus rows: wallpapers (plasma, the largest renditions and the smaller ones), and corpus images of the
product and graphics generators at seed 20 (copies of *their own* eval images and look-alikes, unrelated
to the index). So nearly every candidate is an unrelated collision, as at LAION scale.

    python benchmarks/dedup_cost.py [--sizes 10000,100000,1000000] [--thresholds 10,12,16]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import near_dup_eval as B  # noqa: E402
import near_dup_sets as S  # noqa: E402

from curate.stages.phash_dedup import nearduplicate as nd  # noqa: E402
from curate.stages.phash_dedup.matcher import DescriptorStore, EvalMatcher, MatchSettings  # noqa: E402
from curate.stages.phash_dedup.phash import from_ints, to_hex  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "_work" / "dedup_cost"
RESULTS = REPO / "benchmarks" / "results" / "dedup_cost.json"
MAX_FLIPS = 3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def real_pool() -> tuple[list[dict], dict]:
    """Records (hashes, fine codes, low-info flag, descriptor) of real eval images, with build CPU time."""
    path = CACHE / f"pool-{nd.DESCRIPTOR_VERSION}.pkl"
    if path.exists():
        records, stats = pickle.loads(path.read_bytes())
        if "low_info" in records[0]:  # pools measured before the flag left the index: their time includes it
            stats["what"] += " (this pool's time includes a low-information check, about 1 ms, not done any more)"
        return records, stats
    images: list[tuple[str, Image.Image]] = []
    for p in B.stamp_paths():
        images.append((f"stamp/{p.stem}", B.fit(B.on_background(Image.open(p)), 512)))
    images += [(f"photo/{i.name}", i.image) for i in B.load_photos()]
    for seed in range(10, 16):
        images += [(f"product{seed}/{e.name}", e.image) for e in S.build_product(seed)[0]]
    for seed in range(10, 13):
        images += [(f"graphics{seed}/{e.name}", e.image) for e in S.build_graphics(seed)[0]]
    records, cpu = [], 0.0
    for name, img in images:
        t0 = time.process_time()
        codes = nd.variant_codes(img)
        record = {"name": name, "hashes": [h for h, _ in codes], "fine": b"".join(f for _, f in codes),
                  "descriptor": nd.descriptor(img, with_mirror=True)}
        cpu += time.process_time() - t0
        records.append(record)
    stats = {"items": len(records), "build_cpu_ms_per_item": round(cpu * 1000 / len(records), 2),
             "what": "variant pHashes + fine codes + descriptor of a decoded image "
                     "(what `curate hash-evalset` does per image after decoding)"}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps((records, stats)))
    return records, stats


def corpus_batch() -> list[Image.Image]:
    out = []
    for item, renditions in B.wallpaper_sources(40):
        out.append(B.jpeg(item.image, 90))
        out += [Image.open(p).convert("RGB") for _n, p in renditions[:2]]
    out += [c.image for c in S.build_product(20)[1][::6]]
    out += [c.image for c in S.build_graphics(20)[1][::8]]
    return out


def padded_table(records: list[dict], n: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    """n items: the real records, then synthetic copies with flipped bits. Returns (table, source record)."""
    n_real = min(n, len(records))
    source = np.concatenate([np.arange(n_real), rng.integers(0, len(records), n - n_real)])
    flips = np.where(np.arange(n) < n_real, 0, rng.integers(0, MAX_FLIPS + 1, n))
    rec_hashes = [np.array(r["hashes"], dtype=np.uint64) for r in records]
    rec_len = np.array([len(h) for h in rec_hashes])
    rec_start = np.concatenate([[0], np.cumsum(rec_len)[:-1]])
    all_hashes = np.concatenate(rec_hashes)
    all_fine = np.frombuffer(b"".join(r["fine"] for r in records), np.uint8).reshape(-1, nd.FINE_CODE_BYTES)
    lengths = rec_len[source]
    item_of = np.repeat(np.arange(n), lengths)  # flat row -> item
    within = np.arange(len(item_of)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat_src = rec_start[source][item_of] + within
    # the same bit flips in every hash of an item (up to MAX_FLIPS; a repeated bit flips once less)
    mask = np.zeros(n, np.uint64)
    for slot in range(MAX_FLIPS):
        bit = np.left_shift(np.uint64(1), rng.integers(0, 64, n).astype(np.uint64))
        mask ^= np.where(slot < flips, bit, np.uint64(0))
    hashes = all_hashes[flat_src] ^ mask[item_of]
    fine = all_fine[flat_src].copy()
    for slot in range(4 * MAX_FLIPS):
        pos = rng.integers(0, 8 * nd.FINE_CODE_BYTES, n)
        apply = (slot < 4 * flips)[item_of]
        rows = np.flatnonzero(apply)
        p = pos[item_of[rows]]
        fine[rows, p // 8] ^= (1 << (p % 8)).astype(np.uint8)
    first = np.cumsum(lengths) - lengths  # flat row of each item's main hash
    is_variant = np.ones(len(item_of), bool)
    is_variant[first] = False
    variant_offsets = np.concatenate([[0], np.cumsum(lengths - 1)]).astype(np.int32)
    fine_blobs = fine.reshape(-1)
    byte_offsets = np.concatenate([[0], np.cumsum(lengths * nd.FINE_CODE_BYTES)]).astype(np.int64)
    table = pa.table({
        "eval_set": pa.array(["bench"] * n, pa.string()),
        "item_id": pa.array([str(i) for i in range(n)], pa.string()),
        "path": pa.nulls(n, pa.string()),
        "phash": pa.array(to_hex(hashes[first][:, None], 64)),
        "variant_hashes": pa.ListArray.from_arrays(pa.array(variant_offsets),
                                                   pa.array(to_hex(hashes[is_variant][:, None], 64))),
        "fine_codes": pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), n, [None, pa.py_buffer(byte_offsets), pa.py_buffer(fine_blobs.tobytes())]
        ).cast(pa.binary()),
    })
    return table, source


class AliasStore:
    """Descriptors of synthetic items = their source record's, from one memory-mapped store of the real ones."""

    def __init__(self, store: DescriptorStore, source: np.ndarray) -> None:
        self.store, self.source = store, source

    def get(self, row: int) -> bytes | None:
        return self.store.get(int(self.source[row]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--thresholds", default="10,12,16")
    parser.add_argument("--rows", type=int, default=0, help="limit the corpus batch (0 = all)")
    parser.add_argument("--max-candidates", default="8",
                        help="dedup.max_candidates settings; runs other than 8 are saved as 'items@threshold/max{k}'")
    parser.add_argument("--merge", action="store_true",
                        help="add these runs to the saved JSON (each run records its date) instead of replacing it")
    parser.add_argument("--rates-only", action="store_true",
                        help="only the collision rates (real records vs padded index), added to the existing JSON")
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)  # as the stage's workers run it (PhashDedupStage.setup)
    B.fetch_debs()
    records, build = real_pool()
    print("real pool:", build, flush=True)
    corpus = corpus_batch()
    if args.rows:
        corpus = corpus[: args.rows]
    corpus_hashes = from_ints([B.phash_int(img) for img in corpus])
    real_store = DescriptorStore(pa.chunked_array([pa.array([r["descriptor"] for r in records], pa.binary())]))
    rng = np.random.default_rng(0)
    results: dict = {}
    if args.rates_only:
        rates = {}
        for n in [int(s) for s in args.sizes.split(",")]:
            table, _source = padded_table(records, n, rng)
            for t in [int(s) for s in args.thresholds.split(",")]:
                matcher = EvalMatcher(table, MatchSettings(8, t, 8, True), 64)
                ranked = matcher.search(corpus_hashes)
                real = sum(sum(1 for item, _d in items if item < len(records)) for items in ranked.values())
                every = sum(len(items) for items in ranked.values())
                rates[f"{n}@{t}"] = {"collision_rate_real": float(f"{real / (len(corpus) * len(records)):.3g}"),
                                     "collision_rate_index": float(f"{every / (len(corpus) * n):.3g}")}
                print(n, t, rates[f"{n}@{t}"], flush=True)
        saved = json.loads(RESULTS.read_text())
        for key, value in rates.items():
            saved["runs"].setdefault(key, {}).update(value)
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
        return
    for n in [int(s) for s in args.sizes.split(",")]:
        table, source = padded_table(records, n, rng)
        for t, k in [(int(s), int(m)) for s in args.thresholds.split(",") for m in args.max_candidates.split(",")]:
            settings = MatchSettings(threshold=8, candidate_threshold=t, max_candidates=k, verify=True)
            rss0 = _rss_bytes()
            t0 = time.process_time()
            matcher = EvalMatcher(table, settings, 64)
            build_s = time.process_time() - t0
            rss = _rss_bytes() - rss0
            matcher.descriptors = AliasStore(real_store, source)  # type: ignore[assignment]
            search_t0 = time.process_time()
            ranked = matcher.search(corpus_hashes)
            search_s = time.process_time() - search_t0
            t0 = time.process_time()
            result = matcher.match(corpus_hashes, lambda rows: {r: corpus[r] for r in rows})
            match_s = time.process_time() - t0
            c = result.counters
            real_rows = np.arange(n) < len(records)  # the first items are the real records themselves
            n_real = int(real_rows.sum())
            cand_real = sum(sum(1 for item, _d in items if real_rows[item]) for items in ranked.values())
            cand_all = sum(len(items) for items in ranked.values())
            row = {
                "items": n, "candidate_threshold": t, "max_candidates": k, "corpus_rows": len(corpus),
                "date": time.strftime("%Y-%m-%d"), "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "cpu_ms_per_row": round(match_s * 1000 / len(corpus), 3),
                "search_cpu_ms_per_row": round(search_s * 1000 / len(corpus), 3),
                "candidates_per_row": round(cand_all / len(corpus), 2),
                "collision_rate_real": float(f"{cand_real / (len(corpus) * n_real):.3g}"),
                "collision_rate_index": float(f"{cand_all / (len(corpus) * n):.3g}"),
                "cheap_checks_per_row": round(c["eval_cheap_checks"] / len(corpus), 2),
                "cheap_passed_per_row": round(c["eval_cheap_passed"] / len(corpus), 3),
                "verify_calls_per_row": round(c["eval_verify_calls"] / len(corpus), 3),
                "matches": sum(m is not None for m in result.matches),
                # every corpus row is unrelated to the index, so each match is a false positive (or a picture
                # that really occurs on both sides); named so they can be looked at
                "matched": [f"corpus row {r} -> {records[int(source[m.item])]['name']}"
                            for r, m in enumerate(result.matches) if m is not None][:20],
                "matcher_build_cpu_s": round(build_s, 2),
                "ram_bytes_per_item": round(matcher.compact_nbytes / n, 1),
                "rss_growth_bytes_per_item": round(rss / n, 1),
            }
            print(json.dumps(row), flush=True)
            results[f"{n}@{t}" if k == 8 else f"{n}@{t}/max{k}"] = row
            del matcher
    if args.merge and RESULTS.exists():
        saved = json.loads(RESULTS.read_text())
        saved["runs"].update(results)
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
        return
    out = {
        "benchmark": "dedup_cost",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "note": "shared 2-core sandbox (other jobs may run); CPU time by time.process_time"},
        "descriptor_version": nd.DESCRIPTOR_VERSION,
        "cheap_rule": {"alpha": nd.CHEAP_ALPHA, "limit": nd.CHEAP_LIMIT},
        "index_build": build,
        "padding": f"real records, then copies of random real records with 0..{MAX_FLIPS} flipped bits in every "
                   "hash (4x as many in the fine codes)",
        "runs": results,
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
