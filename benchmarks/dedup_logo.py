"""Leave-one-generator-out evaluation of eval-set dedup: plain pHash vs the cascade (cheap check + verify).

Three near-duplicate sets, each from its own sources and its own transformation code:
`debian` (benchmarks/near_dup_eval.py: photos, plasma wallpapers, Tux Paint stamps; Pillow),
`product` and `graphics` (benchmarks/near_dup_sets.py: synthetic product shots on flat backgrounds;
text on colour and icons; OpenCV and scikit-image). For each held-out generator the cascade's cheap
check (fine-code limit) and the verifier's logistic model are fitted on the *other* generators only,
then applied once to the held-out one.

Protocol (what was looked at): `graphics` is the held-back generator. While building the cascade only
`--dev` runs were made, which fit on one of {debian, product} and report on the other. `--final` runs
all three folds once and writes benchmarks/results/dedup_logo.json; with `--write-model` it also writes
the model fitted on debian + product (the fold that reports on `graphics`) into nearduplicate.py.
`graphics` has since been looked at more than once (docs/dedup.md lists when), so a fourth generator,
`desktops` (benchmarks/near_dup_desktops.py), was built after the model was fixed and is judged once with
the shipped model: `--pristine` (it refuses to run a second time).

    python benchmarks/dedup_logo.py --dev      # debian <-> product only
    python benchmarks/dedup_logo.py --final [--write-model]
    python benchmarks/dedup_logo.py --pristine # the one look at `desktops`
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import near_dup_desktops as D  # noqa: E402
import near_dup_eval as B  # noqa: E402
import near_dup_sets as S  # noqa: E402

from curate.stages.phash_dedup import nearduplicate as nd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "_work" / "logo"
RESULTS = REPO / "benchmarks" / "results" / "dedup_logo.json"
GENERATORS = ("debian", "product", "graphics")
HELD_BACK = "graphics"
#: Kept back from every fit *and* every look while building the cascade: evaluated once with the shipped model
#: (`--pristine`, benchmarks/near_dup_desktops.py)
PRISTINE = "desktops"
SEED = 0
WIDEST = 16  # candidate threshold the data is collected at (the stage default)
COLLISIONS = 600
DATA_VERSION = "v5"  # bump when the collected measurements change (cache of benchmarks/_work/logo)
#: Features the model may use. The pHash distance and the low-information flag are left out: in each
#: generator they separate positives from negatives for reasons of that generator (its negatives sit at
#: the edge of the candidate threshold; its flat pictures are all of one kind), and a model leaning on
#: them did not transfer between the two development generators (see docs/dedup.md).
USED_FEATURES = tuple(os.environ.get("LOGO_FEATURES", "log1p_inliers,inlier_share,block_ncc_median,block_ncc_mean,"
                                     "global_ncc,raw_ncc,block_share,log1p_matches,min_median_raw,"
                                     "min_global_raw").split(","))
PLAIN_THRESHOLD = 8  # dedup.threshold's default: the detail check's reach
CHEAP_RECALL = 0.995  # the cheap check keeps at least this share of the training positives it sees
CHEAP_ALPHAS = (0.0, 2.0, 4.0, 6.0)  # cheap rule: fine distance + alpha * pHash distance <= limit


@dataclass
class GenData:
    name: str
    eval_names: list[str]
    eval_groups: list[str]
    corpus_names: list[str]
    corpus_transforms: list[str]
    corpus_sources: list[str | None]
    truth: np.ndarray
    ambiguous: np.ndarray
    plain: np.ndarray  # (eval, corpus) pHash distance to the main hash
    loose: np.ndarray  # nearest of main and variant hashes
    fine: np.ndarray  # fine-code distance to the variant the loose distance came from
    pairs: np.ndarray  # candidate pairs (loose <= WIDEST)
    features: np.ndarray
    comparable: np.ndarray
    detail: np.ndarray  # per candidate pair: nd.detail_agreement (nan where it abstains: a low-information side)
    collision_features: np.ndarray
    collision_fine: np.ndarray  # fine distance of the forced-collision pairs (nearest variant by pHash)
    low_info_eval: np.ndarray
    timings_ms: dict


def build(name: str, seed: int) -> tuple[list[B.Item], list[B.CorpusItem]]:
    if name == "debian":
        return B.build_dataset(False, seed)
    if name == PRISTINE:
        return D.build_desktops(seed)
    return S.GENERATORS[name](seed)


def collect(name: str, seed: int = SEED) -> GenData:
    path = CACHE / f"{name}-{seed}-{DATA_VERSION}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    evals, corpus = build(name, seed)
    print(f"{name}: {len(evals)} eval, {len(corpus)} corpus images", flush=True)
    eval_index = {e.name: i for i, e in enumerate(evals)}
    truth = np.zeros((len(evals), len(corpus)), dtype=bool)
    for j, c in enumerate(corpus):
        if c.source is not None:
            truth[eval_index[c.source], j] = True
    families = [B.drawing_family(c.name) for c in corpus]
    ambiguous = np.array([[f is not None and f == B.drawing_family(e.name) for f in families] for e in evals])
    ambiguous &= ~truth

    t0 = time.process_time()
    codes = [nd.variant_codes(e.image) for e in evals]
    variants_ms = (time.process_time() - t0) * 1000 / len(evals)
    t0 = time.process_time()
    corpus_hashes = np.array([B.phash_int(c.image) for c in corpus], dtype=np.uint64)
    corpus_fine = np.array([np.frombuffer(nd.fine_code(c.image), np.uint8) for c in corpus])
    corpus_ms = (time.process_time() - t0) * 1000 / len(corpus)
    plain = np.zeros(truth.shape, np.int16)
    loose = np.zeros(truth.shape, np.int16)
    fine = np.zeros(truth.shape, np.int16)
    for i, item_codes in enumerate(codes):
        hashes = np.array([h for h, _ in item_codes], dtype=np.uint64)
        d = B.hamming_matrix(hashes, corpus_hashes)  # (variants, corpus)
        nearest = d.argmin(axis=0)
        plain[i], loose[i] = d[0], d.min(axis=0)
        item_fine = np.array([np.frombuffer(f, np.uint8) for _, f in item_codes])[nearest]
        fine[i] = np.unpackbits(item_fine ^ corpus_fine, axis=1).sum(axis=1)

    candidates = loose <= WIDEST
    t0 = time.process_time()
    eval_desc = [nd.descriptor(e.image, with_mirror=True) for e in evals]
    needed = np.flatnonzero(candidates.any(axis=0))
    corpus_desc = {int(j): nd.descriptor(corpus[j].image) for j in needed}
    descriptor_ms = (time.process_time() - t0) * 1000 / (len(evals) + len(needed))
    pairs = np.argwhere(candidates)
    features, comparable = [], []
    t0 = time.process_time()
    for i, j in pairs:
        found = nd.evidence(eval_desc[i], corpus_desc[int(j)], distance=int(loose[i, j]), n_bits=64)
        features.append(found.features())
        comparable.append(found.comparable)
    verify_ms = (time.process_time() - t0) * 1000 / max(1, len(pairs))
    prepared = {int(j): nd.prepare(corpus[j].image) for j in needed}
    t0 = time.process_time()
    detail = [nd.detail_agreement(eval_desc[i], prepared[int(j)]) for i, j in pairs]
    detail_ms = (time.process_time() - t0) * 1000 / max(1, len(pairs))
    rng = np.random.default_rng(seed)
    unrelated = np.argwhere(~truth & ~candidates & ~ambiguous)
    chosen = unrelated[rng.choice(len(unrelated), size=min(COLLISIONS, len(unrelated)), replace=False)]
    collision_features, collision_fine = [], []
    for i, j in chosen:
        if int(j) not in corpus_desc:
            corpus_desc[int(j)] = nd.descriptor(corpus[j].image)
        found = nd.evidence(eval_desc[i], corpus_desc[int(j)], distance=int(rng.integers(0, WIDEST + 1)), n_bits=64)
        collision_features.append(found.features() if found.comparable else np.full(len(nd.FEATURE_NAMES), np.nan))
        collision_fine.append(int(fine[i, j]))
    data = GenData(
        name, [e.name for e in evals], [e.group for e in evals], [c.name for c in corpus],
        [c.transform for c in corpus], [c.source for c in corpus], truth, ambiguous, plain, loose, fine, pairs,
        np.array(features).reshape(len(pairs), len(nd.FEATURE_NAMES)), np.array(comparable, bool),
        np.array([np.nan if a is None else a for a in detail], dtype=np.float64),
        np.array(collision_features).reshape(len(chosen), len(nd.FEATURE_NAMES)), np.array(collision_fine),
        np.array([nd.low_information(e.image) for e in evals]),
        {"variant_codes_per_eval_item_cpu": round(variants_ms, 2), "phash_and_fine_code_per_corpus_image_cpu":
         round(corpus_ms, 2), "descriptor_cpu": round(descriptor_ms, 2), "verify_per_pair_cpu": round(verify_ms, 3),
         "detail_check_per_pair_cpu": round(detail_ms, 3)},
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))
    return data


# -- fitting on some generators -------------------------------------------------------------------
@dataclass
class Fitted:
    alpha: float
    limit: float
    model: tuple
    cut: float
    low_info_cut: float
    trained_on: tuple[str, ...]


def _pair_arrays(d: GenData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    i, j = d.pairs[:, 0], d.pairs[:, 1]
    keep = ~d.ambiguous[i, j]
    return d.loose[i, j][keep], d.fine[i, j][keep], d.truth[i, j][keep], keep


def fit(train: list[GenData]) -> Fitted:
    loose = np.concatenate([_pair_arrays(d)[0] for d in train]).astype(float)
    fine = np.concatenate([_pair_arrays(d)[1] for d in train]).astype(float)
    y = np.concatenate([_pair_arrays(d)[2] for d in train])
    best: tuple[float, float, float] | None = None
    for alpha in CHEAP_ALPHAS:
        score = fine + alpha * loose
        limit = float(np.quantile(score[y], CHEAP_RECALL, method="higher"))
        passed_negatives = float((score[~y] <= limit).mean())
        if best is None or passed_negatives < best[2]:
            best = (alpha, limit, passed_negatives)
    assert best is not None
    alpha, limit, _ = best
    xs, ys = [], []
    for d in train:
        lo, fi, yy, keep = _pair_arrays(d)
        used = d.comparable[keep] & (fi + alpha * lo <= limit)
        xs.append(d.features[keep][used])
        ys.append(yy[used])
        ok = ~np.isnan(d.collision_features).any(axis=1)
        xs.append(d.collision_features[ok])
        ys.append(np.zeros(int(ok.sum()), bool))
    x, yv = np.concatenate(xs), np.concatenate(ys)
    used = np.array([name in USED_FEATURES for name in nd.FEATURE_NAMES])
    mean, scale, weights, bias = B.fit_logistic(x[:, used], yv)
    # unused features get weight 0 (mean 0, scale 1): the shipped model keeps all 14 slots
    full = (np.zeros(used.size), np.ones(used.size), np.zeros(used.size), bias)
    full[0][used], full[1][used], full[2][used] = mean, scale, weights
    probability = B.logistic(full, x)
    cut = B.decision_threshold(probability, yv)
    low = x[:, nd.FEATURE_NAMES.index("low_info")] > 0.5
    low_cut = max(cut, B.decision_threshold(probability[low], yv[low]))
    return Fitted(alpha, limit, full, cut, low_cut, tuple(d.name for d in train))


def kind_of(d: GenData, i: int) -> str:
    return d.eval_groups[i]


def evaluate(d: GenData, f: Fitted, threshold: int) -> dict:
    """Pair-level precision/recall on `d` of plain pHash and of the cascade at candidate `threshold`."""
    truth = d.truth & ~d.ambiguous
    valid = ~d.ambiguous
    not_flip = np.array([t != "flip" for t in d.corpus_transforms])
    i, j = d.pairs[:, 0], d.pairs[:, 1]
    in_reach = (d.loose <= threshold) & valid

    def on_pairs(decided: np.ndarray) -> np.ndarray:
        """Per-candidate-pair decisions as an (eval, corpus) matrix, within the candidate threshold."""
        out = np.zeros(d.truth.shape, bool)
        out[i, j] = decided
        return out & in_reach

    passed = d.fine[i, j] + f.alpha * d.loose[i, j] <= f.limit
    prob = B.logistic(f.model, d.features)
    low = d.features[:, nd.FEATURE_NAMES.index("low_info")] > 0.5
    model_says = d.comparable & (prob >= np.where(low, f.low_info_cut, f.cut))
    # the matcher's detail check (dedup.detail_check, on by default): within the plain threshold, both detailed
    detail_says = (d.plain[i, j] <= PLAIN_THRESHOLD) & (np.nan_to_num(d.detail, nan=-1.0) >= nd.DETAIL_NCC)
    cheap = on_pairs(passed)
    cascade = on_pairs(passed & (model_says | detail_says))
    model_only = on_pairs(passed & model_says)
    by_detail = on_pairs(passed & detail_says)

    def summary(pred: np.ndarray) -> dict:
        tp, fp = int((pred & truth).sum()), int((pred & ~truth & valid).sum())
        return {"tp": tp, "fp": fp, "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
                "recall": round(tp / int(truth.sum()), 4),
                "recall_without_mirrors": round(float(pred[:, not_flip][truth[:, not_flip]].mean()), 4)}

    def by(pred: np.ndarray, key: str) -> dict:
        out: dict[str, dict] = {}
        if key == "transform":
            labels = sorted(set(d.corpus_transforms) - {"distractor"})
            for t in labels:
                cols = np.array([x == t for x in d.corpus_transforms])
                pos = truth[:, cols]
                out[t] = {"positives": int(pos.sum()), "recall": round(float(pred[:, cols][pos].mean()), 4)}
        else:
            for g in sorted(set(d.eval_groups)):
                rows = np.array([x == g for x in d.eval_groups])
                out[g] = summary_rows(pred, rows)
        return out

    def summary_rows(pred: np.ndarray, rows: np.ndarray) -> dict:
        t, v, p = truth[rows], valid[rows], pred[rows]
        tp, fp = int((p & t).sum()), int((p & ~t & v).sum())
        return {"positives": int(t.sum()), "fp": fp, "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
                "recall": round(tp / max(1, int(t.sum())), 4)}

    plain8 = (d.plain <= 8) & valid
    plain_t = (d.plain <= threshold) & valid
    negatives_in_reach = in_reach & ~truth
    return {
        "plain_phash_8": {**summary(plain8), "per_transform": by(plain8, "transform"), "per_kind": by(plain8, "kind")},
        f"plain_phash_{threshold}": summary(plain_t),
        "cascade": {**summary(cascade), "per_transform": by(cascade, "transform"), "per_kind": by(cascade, "kind")},
        "cascade_without_detail_check": summary(model_only),
        "detail_check": {"accepted": int(by_detail.sum()), "accepted_negatives": int((by_detail & ~truth).sum()),
                         "accepted_that_the_model_refused": int((by_detail & ~model_only).sum())},
        "candidate_recall": round(float((d.loose <= threshold)[truth].mean()), 4),
        "cheap_check": {
            "negative_candidates": int(negatives_in_reach.sum()),
            "negative_candidates_passed": int((cheap & negatives_in_reach).sum()),
            "positive_candidates_dropped": int(((d.loose <= threshold) & truth & ~cheap).sum()),
            "forced_collisions_passed_share": round(float(
                (d.collision_fine + f.alpha * np.random.default_rng(0).integers(0, threshold + 1, len(d.collision_fine))
                 <= f.limit).mean()), 4),
        },
        "false_positives": [
            {"eval": d.eval_names[a], "corpus": d.corpus_names[b], "candidate_distance": int(d.loose[a, b]),
             "fine_distance": int(d.fine[a, b])} for a, b in np.argwhere(cascade & ~truth & valid)][:40],
        "missed_by_transform": dict(Counter(d.corpus_transforms[b] for _a, b in np.argwhere(truth & ~cascade))),
    }


MAX_CANDIDATES = (1, 2, 3, 8)  # dedup.max_candidates settings the row-level view compares (8 is the default)


def replay_matches(d: GenData, f: Fitted, threshold: int, max_candidates: int) -> tuple[dict[int, int], int, int]:
    """(corpus row -> accepted eval item, model calls, rows with candidates): `EvalMatcher.match` replayed."""
    pair_index = {(int(a), int(b)): k for k, (a, b) in enumerate(d.pairs)}
    prob = B.logistic(f.model, d.features)
    low = d.features[:, nd.FEATURE_NAMES.index("low_info")] > 0.5
    model_says = d.comparable & (prob >= np.where(low, f.low_info_cut, f.cut))
    detail_ok = np.nan_to_num(d.detail, nan=-1.0) >= nd.DETAIL_NCC
    name_rank = np.argsort(np.argsort(np.array(d.eval_names, dtype=object)))
    matches: dict[int, int] = {}
    model_calls = rows_with_candidates = 0
    for j in range(len(d.corpus_names)):
        items = np.flatnonzero(d.loose[:, j] <= threshold)
        if not len(items):
            continue
        rows_with_candidates += 1
        items = items[np.lexsort((name_rank[items], d.loose[items, j]))]
        passed = [int(i) for i in items if d.fine[i, j] + f.alpha * d.loose[i, j] <= f.limit]
        for i in passed[:max_candidates]:
            k = pair_index[(i, j)]
            if d.plain[i, j] <= PLAIN_THRESHOLD and detail_ok[k]:
                matches[j] = i
                break
            model_calls += 1
            if model_says[k]:
                matches[j] = i
                break
    return matches, model_calls, rows_with_candidates


def row_level(d: GenData, f: Fitted, threshold: int, max_candidates: int) -> dict:
    """What the stage does per corpus row, replayed on the collected measurements.

    Per row: candidates are the eval items within `threshold` of the row's hash (nearest of main and variant
    hashes), ranked by (distance, eval name) as `EvalMatcher` ranks them by (distance, label); the cheap check
    drops some; the first `max_candidates` left are judged in that order (detail check within the plain
    threshold, else the model) and the first accepted one is the row's match. A row counts as positive when
    it derives from some eval image (the stage removes it whichever eval item it matches); a flagged row
    whose accepted item is an ambiguous Tux Paint variant of its own drawing is left out, as in `evaluate`.
    `model_calls_per_row` (verify calls) is the cost driver.
    """
    matches, model_calls, rows_with_candidates = replay_matches(d, f, threshold, max_candidates)
    positive = d.truth.any(axis=0)
    not_flip = np.array([t != "flip" for t in d.corpus_transforms])
    tp = fp = right_item = left_out = 0
    found = np.zeros(len(d.corpus_names), bool)
    for j, accepted in matches.items():
        if positive[j]:
            tp += 1
            found[j] = True
            right_item += int(d.truth[accepted, j])
        elif d.ambiguous[accepted, j]:
            left_out += 1
        else:
            fp += 1
    n = len(d.corpus_names)
    return {
        "positive_rows": int(positive.sum()), "tp": tp, "fp": fp, "left_out_ambiguous": left_out,
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "recall": round(tp / max(1, int(positive.sum())), 4),
        "recall_without_mirrors": round(float(found[positive & not_flip].mean()), 4),
        "matched_the_right_item": round(right_item / max(1, tp), 4),
        "rows_with_candidates_share": round(rows_with_candidates / n, 4),
        "model_calls_per_row": round(model_calls / n, 3),
    }


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "note": "shared 2-core sandbox (other jobs may run); CPU time by time.process_time"}


MODEL_BEGIN = "# --- fitted model: written by benchmarks/dedup_logo.py --final --write-model; do not edit by hand ---\n"
MODEL_END = "# --- end of fitted model ---\n"


def write_model(f: Fitted, n_pairs: int, n_pos: int) -> None:
    mean, scale, weights, bias = f.model

    def floats(values: np.ndarray) -> str:
        lines = textwrap.wrap(", ".join(f"{v:.6g}" for v in values) + ",", 96)
        return "(\n" + "".join(f"        {line}\n" for line in lines) + "    )"

    block = (
        f"{MODEL_BEGIN}"
        f"#: Fitted by benchmarks/dedup_logo.py on generators {' + '.join(f.trained_on)} ({n_pairs} pairs, {n_pos} positive:\n"
        f"#: candidates within {WIDEST} of 64 bits that pass the cheap check, plus {COLLISIONS} unrelated pairs per\n"
        f"#: generator posing as pHash collisions); threshold: lowest probability keeping training precision\n"
        f"#: >= {B.FIT_PRECISION}. Generator `{HELD_BACK}` was held back and is reported with this model.\n"
        f"MODEL = _LogisticModel(\n"
        f"    mean={floats(mean)},\n"
        f"    scale={floats(scale)},\n"
        f"    weights={floats(weights)},\n"
        f"    bias={bias:.6g},\n"
        f"    threshold={f.cut:.6g},\n"
        f"    low_info_threshold={f.low_info_cut:.6g},\n"
        f")\n"
        f"CHEAP_ALPHA = {f.alpha:g}\n"
        f"CHEAP_LIMIT = {f.limit:g}\n"
        f"{MODEL_END}"
    )
    source = REPO / "stages" / "phash_dedup" / "nearduplicate.py"
    text = source.read_text()
    begin, end = text.index(MODEL_BEGIN), text.index(MODEL_END) + len(MODEL_END)
    source.write_text(text[:begin] + block + text[end:])
    print(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", action="store_true", help="debian <-> product folds only (graphics untouched)")
    parser.add_argument("--final", action="store_true", help="all three folds, once; writes the results JSON")
    parser.add_argument("--write-model", action="store_true", help="with --final: ship the fold fitted without graphics")
    parser.add_argument("--thresholds", default="10,12,16")
    parser.add_argument("--rows", action="store_true",
                        help="all three folds, row level per dedup.max_candidates (1, 2, 3, 8), added to the results "
                             "JSON under folds.*.row_level; changes nothing else (no model, no pair-level numbers)")
    parser.add_argument("--pristine", action="store_true",
                        help=f"the one look at generator {PRISTINE!r} with the shipped model (added to the results "
                             "JSON under 'pristine'; refuses to run again unless --force)")
    parser.add_argument("--force", action="store_true", help="with --pristine: look again")
    args = parser.parse_args()
    if args.pristine:
        B.fetch_debs()
        pristine([int(t) for t in args.thresholds.split(",")], args.force)
        return
    if args.rows:
        row_report([int(t) for t in args.thresholds.split(",")])
        return
    B.fetch_debs()
    thresholds = [int(t) for t in args.thresholds.split(",")]
    names = GENERATORS if args.final else ("debian", "product")
    data = {n: collect(n) for n in names}
    folds = {}
    for held in names:
        train = [data[n] for n in names if n != held]
        fitted = fit(train)
        folds[held] = {
            "fitted_on": list(fitted.trained_on),
            "cheap_rule": {"alpha": fitted.alpha, "limit": fitted.limit},
            "model_threshold": round(fitted.cut, 4),
            "model_threshold_low_information": round(fitted.low_info_cut, 4),
            "by_candidate_threshold": {t: evaluate(data[held], fitted, t) for t in thresholds},
        }
        for t in thresholds:
            r = folds[held]["by_candidate_threshold"][t]
            print(f"held out {held:9s} T={t:2d} plain8 P={r['plain_phash_8']['precision']:.3f} "
                  f"R={r['plain_phash_8']['recall_without_mirrors']:.3f} | cascade P={r['cascade']['precision']:.4f} "
                  f"R={r['cascade']['recall']:.3f} Rnm={r['cascade']['recall_without_mirrors']:.3f} "
                  f"fp={r['cascade']['fp']} cand_recall={r['candidate_recall']:.3f} cheap={r['cheap_check']} "
                  f"detail={r['detail_check']} without_detail={r['cascade_without_detail_check']}")
        print(json.dumps(folds[held]["by_candidate_threshold"][16]["cascade"]["per_transform"]))
        print(json.dumps(folds[held]["by_candidate_threshold"][16]["cascade"]["per_kind"]))
        print("missed", folds[held]["by_candidate_threshold"][16]["missed_by_transform"])
        for fp in folds[held]["by_candidate_threshold"][16]["false_positives"][:10]:
            print("  FP", fp)
    if args.final:
        out = {"benchmark": "dedup_logo", "machine": machine(), "descriptor_version": nd.DESCRIPTOR_VERSION,
               "held_back_generator": HELD_BACK, "seed": SEED,
               "datasets": {n: {"eval_images": dict(Counter(d.eval_groups)), "corpus_images": len(d.corpus_names),
                                "positive_pairs": int(d.truth.sum()),
                                "hard_negatives": sum(t == "distractor" for t in d.corpus_transforms),
                                "timings_ms": d.timings_ms} for n, d in data.items()},
               "folds": folds}
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        if args.write_model:
            train = [data[n] for n in GENERATORS if n != HELD_BACK]
            fitted = fit(train)
            n_pos = sum(int(d.truth.sum()) for d in train)
            write_model(fitted, sum(len(d.pairs) + COLLISIONS for d in train), n_pos)


def shipped() -> Fitted:
    """The cheap rule and model that nearduplicate.py ships, as a :class:`Fitted`."""
    m = nd.MODEL
    model = (np.array(m.mean), np.array(m.scale), np.array(m.weights), m.bias)
    return Fitted(float(nd.CHEAP_ALPHA), float(nd.CHEAP_LIMIT), model, m.threshold, m.low_info_threshold,
                  tuple(g for g in GENERATORS if g != HELD_BACK))


def pristine(thresholds: list[int], force: bool) -> None:
    """The one look at the pristine generator: the shipped cascade, pair and row level, and the real matcher."""
    saved = json.loads(RESULTS.read_text())
    if "pristine" in saved and not force:
        raise SystemExit(f"{RESULTS.name} already has the pristine look; it is made once (--force to redo it)")
    # the shipped constants must be the graphics fold's fit (debian + product), or this is not the shipped model
    refit = fit([collect(n) for n in GENERATORS if n != HELD_BACK])
    ship = shipped()
    if (refit.alpha, round(refit.limit)) != (ship.alpha, ship.limit) or not np.allclose(
            refit.model[2], ship.model[2], rtol=1e-4, atol=1e-5) or abs(refit.cut - ship.cut) > 1e-4:
        raise SystemExit("nearduplicate.py's model is not the debian + product fit: rerun --final --write-model")
    d = collect(PRISTINE)
    pairs = {t: evaluate(d, ship, t) for t in thresholds}
    rows = {f"{t}/{k}": row_level(d, ship, t, k) for t in thresholds for k in MAX_CANDIDATES}
    for t in thresholds:
        r = pairs[t]
        print(f"pristine {PRISTINE} T={t:2d} plain8 P={r['plain_phash_8']['precision']:.3f} "
              f"R={r['plain_phash_8']['recall_without_mirrors']:.3f} | cascade P={r['cascade']['precision']:.4f} "
              f"R={r['cascade']['recall']:.3f} Rnm={r['cascade']['recall_without_mirrors']:.3f} "
              f"fp={r['cascade']['fp']} cand_recall={r['candidate_recall']:.3f}", flush=True)
    print(json.dumps(pairs[16]["cascade"]["per_transform"]))
    print(json.dumps(pairs[16]["cascade"]["per_kind"]))
    for key, r in rows.items():
        print(f"rows {key}: P={r['precision']:.4f} Rnm={r['recall_without_mirrors']:.3f} fp={r['fp']} "
              f"calls/row={r['model_calls_per_row']:.3f}", flush=True)
    saved["pristine"] = {
        "generator": PRISTINE, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "what": "benchmarks/near_dup_desktops.py (wallpapers of gnome-backgrounds, mate-backgrounds, "
                "ukui-wallpapers; torchvision transformations), never used for fitting or looked at before this "
                "run; judged once with the shipped cheap rule and model (the debian + product fit)",
        "dataset": {"eval_images": dict(Counter(d.eval_groups)), "corpus_images": len(d.corpus_names),
                    "positive_pairs": int(d.truth.sum()),
                    "hard_negatives": sum(t == "distractor" for t in d.corpus_transforms),
                    "timings_ms": d.timings_ms},
        "by_candidate_threshold": pairs,
        "row_level": {"what": "per corpus row, replayed as EvalMatcher decides; keys "
                              "'candidate_threshold/max_candidates'", "by_setting": rows},
        "row_level_replay_check": check_replay(d, thresholds, ship),
    }
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"saved {RESULTS}")


def check_replay(d: GenData, thresholds: list[int], fitted: Fitted | None = None) -> dict:
    """Run the real `EvalMatcher` on the held-back generator (whose fold's model and cheap rule are the shipped
    ones) and compare its per-row matches and verify calls with :func:`replay_matches`."""
    import pyarrow as pa
    from dedup_cost import padded_table

    from curate.stages.phash_dedup.matcher import DescriptorStore, EvalMatcher, MatchSettings
    from curate.stages.phash_dedup.phash import from_ints

    fitted = fitted or fit([collect(n) for n in GENERATORS if n != d.name])
    if (fitted.alpha, round(fitted.limit)) != (nd.CHEAP_ALPHA, nd.CHEAP_LIMIT):
        raise SystemExit("the shipped cheap rule is not this fold's: rerun --final --write-model first")
    evals, corpus = build(d.name, SEED)
    records = []
    for e in evals:
        codes = nd.variant_codes(e.image)
        records.append({"hashes": [h for h, _ in codes], "fine": b"".join(fc for _, fc in codes),
                        "descriptor": nd.descriptor(e.image, with_mirror=True)})
    table, _source = padded_table(records, len(records), np.random.default_rng(0))
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(d.eval_names))
    store = DescriptorStore(pa.chunked_array([pa.array([r["descriptor"] for r in records], pa.binary())]))
    hashes = from_ints([B.phash_int(c.image) for c in corpus])
    out = {}
    for t in thresholds:
        for k in (1, max(MAX_CANDIDATES)):
            matcher = EvalMatcher(table, MatchSettings(threshold=PLAIN_THRESHOLD, candidate_threshold=t,
                                                       max_candidates=k, verify=True), 64)
            matcher.descriptors = store
            real = matcher.match(hashes, lambda rows: {r: corpus[r].image for r in rows})
            got = {j: hit.item for j, hit in enumerate(real.matches) if hit is not None}
            replay, calls, _rows = replay_matches(d, fitted, t, k)
            out[f"{t}/{k}"] = {"matches": len(got), "identical_matches": got == replay,
                               "verify_calls": [int(real.counters["eval_verify_calls"]), calls]}
            print(f"replay check {d.name} {t}/{k}: {out[f'{t}/{k}']}", flush=True)
    return out


def row_report(thresholds: list[int]) -> None:
    data = {n: collect(n) for n in GENERATORS}
    saved = json.loads(RESULTS.read_text())
    saved["row_level_replay_check"] = {
        "what": f"EvalMatcher.match on generator {HELD_BACK} (shipped model = its fold) vs replay_matches: "
                "per-row matches and verify calls (EvalMatcher's, the replay's)",
        "by_setting": check_replay(data[HELD_BACK], thresholds)}
    for held in GENERATORS:
        fitted = fit([data[n] for n in GENERATORS if n != held])
        levels = {}
        for t in thresholds:
            for k in MAX_CANDIDATES:
                r = levels[f"{t}/{k}"] = row_level(data[held], fitted, t, k)
                print(f"held out {held:9s} candidate_threshold={t:2d} max_candidates={k} P={r['precision']:.4f} "
                      f"R={r['recall']:.3f} Rnm={r['recall_without_mirrors']:.3f} fp={r['fp']} "
                      f"model calls/row={r['model_calls_per_row']:.3f} right item={r['matched_the_right_item']:.3f}",
                      flush=True)
        saved["folds"][held]["row_level"] = {
            "what": "per corpus row, replayed as EvalMatcher decides (benchmarks/dedup_logo.py row_level); keys "
                    "'candidate_threshold/max_candidates'",
            "date": time.strftime("%Y-%m-%d"), "by_setting": levels}
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
