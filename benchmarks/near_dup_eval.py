"""Near-duplicate evaluation: plain pHash vs pHash candidates + verification (pipeline/nearduplicate.py).

Builds a near-duplicate test set from real images only:

* photos: the 15 demo photos (configs/demo/images) and further scikit-image photos/scans;
* wallpapers: Debian `plasma-workspace-wallpapers` (the largest rendition is the eval image; the
  packaged smaller renditions with a compatible aspect ratio are *real* rescale/reframe positives);
* stamps: Debian `tuxpaint-stamps-default`, cut-out drawings and products on a flat background (shown
  on white), as eval images and as unrelated flat-background distractors (GPL: fetched with
  `apt-get download` into benchmarks/data/, never committed).

Every eval image gets one corpus copy per transformation (crop 80-95% area, rotation 2-5 degrees,
blur, text overlay, colour shift, rescale, JPEG, crop+rescale, mirror). Every (eval, corpus) pair is
scored: a positive when the corpus image derives from the eval image, a negative otherwise (other
eval images' copies and the distractor stamps). Reported per transformation: recall of

* plain pHash at the largest threshold whose precision stays >= 0.99 (and at the stage default 8);
* the full method: pHash against the eval image's hash and its `candidate_hashes` at a looser
  candidate threshold, then `verify(descriptor(eval), descriptor(corpus))`.

Run: `python benchmarks/near_dup_eval.py [--quick]`; results go to benchmarks/results/near_dup_eval.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from curate.pipeline import nearduplicate as nd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "data"
RESULTS = REPO / "benchmarks" / "results" / "near_dup_eval.json"
MAX_SIDE = 1024  # eval images are brought to web size first (decoding 5K PNGs for every copy is pointless)
TRANSFORMS = (
    "crop", "rotate", "blur", "text", "colour", "rescale", "jpeg", "crop_rescale", "flip", "rendition",
)
PRECISION_TARGET = 0.99
WORDS = ("sale", "new", "best", "photo", "free", "shipping", "wallpaper", "summer", "deal", "hd", "4k", "stock")


@dataclass
class Item:
    name: str
    group: str  # photo | wallpaper | stamp
    image: Image.Image


@dataclass
class CorpusItem:
    name: str
    source: str | None  # eval item it derives from (None for distractors)
    transform: str  # one of TRANSFORMS or "distractor"
    group: str
    image: Image.Image
    extra: dict = field(default_factory=dict)


# -- data ----------------------------------------------------------------------------------------
def fetch_debs() -> None:
    """apt-get download + dpkg -x the two Debian packages into benchmarks/data/ (ignored by git)."""
    DATA.mkdir(parents=True, exist_ok=True)
    for package, folder in (("plasma-workspace-wallpapers", "plasma"), ("tuxpaint-stamps-default", "tux")):
        if (DATA / folder / "usr").is_dir():
            continue
        debs = sorted(DATA.glob(f"{package}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", package], cwd=DATA, check=True)
            debs = sorted(DATA.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(DATA / folder)], check=True)


def fit(img: Image.Image, side: int = MAX_SIDE) -> Image.Image:
    if max(img.size) <= side:
        return img
    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    return img


def on_background(img: Image.Image, colour: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A cut-out as a web page shows it: transparency composited on a flat colour."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*colour, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_photos() -> list[Item]:
    items = [Item(p.stem, "photo", fit(Image.open(p).convert("RGB")))
             for p in sorted((REPO / "configs" / "demo" / "images").iterdir())]
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for name in ("moon.png", "page.png", "text.png", "motorcycle_left.png", "microaneurysms.png", "logo.png",
                 "color.png", "phantom.png"):
        path = folder / name
        if path.exists():
            img = Image.open(path)
            img = on_background(img) if img.mode in ("RGBA", "LA", "P") else img.convert("RGB")
            items.append(Item(f"skimage-{path.stem}", "photo", fit(img)))
    return items


def wallpaper_sources(limit: int) -> list[tuple[Item, list[tuple[str, Path]]]]:
    """(eval item = largest rendition, other renditions usable as real positives)."""
    out = []
    for folder in sorted((DATA / "plasma" / "usr" / "share" / "wallpapers").iterdir())[:limit]:
        files = sorted((folder / "contents" / "images").glob("*.*"))

        def dims(p: Path) -> tuple[int, int]:
            w, h = p.stem.split("x")
            return int(w), int(h)

        files = [p for p in files if "x" in p.stem]
        if not files:
            continue
        largest = max(files, key=lambda p: dims(p)[0] * dims(p)[1])
        lw, lh = dims(largest)
        renditions = []
        for p in files:
            w, h = dims(p)
            if p == largest or max(w, h) > 1280:
                continue
            # same artwork reframed for another aspect ratio: keep it when >= 75% of the area survives
            overlap = min(w / h, lw / lh) / max(w / h, lw / lh)
            if overlap >= 0.75:
                renditions.append((f"{folder.name}-{p.stem}", p))
        item = Item(f"wallpaper-{folder.name}", "wallpaper", fit(Image.open(largest).convert("RGB")))
        out.append((item, renditions))
    return out


def stamp_paths() -> list[Path]:
    return sorted((DATA / "tux" / "usr" / "share" / "tuxpaint" / "stamps").rglob("*.png"))


# -- transformations ----------------------------------------------------------------------------
def crop_area(img: Image.Image, rng: random.Random, lo: float = 0.80, hi: float = 0.95) -> Image.Image:
    w, h = img.size
    area = rng.uniform(lo, hi)
    aspect = rng.uniform(0.9, 1.1)
    cw = min(w, round(w * (area * aspect) ** 0.5))
    ch = min(h, round(h * area / (cw / w)))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((left, top, left + cw, top + ch))


def rotate(img: Image.Image, rng: random.Random, flat: bool) -> Image.Image:
    angle = rng.uniform(2, 5) * rng.choice((-1, 1))
    if flat:  # a cut-out on white: rotate on white, nothing to crop away
        return img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    w, h = img.size
    rotated = img.rotate(angle, resample=Image.Resampling.BICUBIC)
    # largest axis-aligned rectangle without the black corners (rotate-and-crop as editors do it)
    a = np.deg2rad(abs(angle))
    cos, sin = np.cos(a), np.sin(a)
    scale = h / (w * sin + h * cos) if h <= w else w / (w * cos + h * sin)
    cw, ch = int(w * scale) - 2, int(h * scale) - 2
    left, top = (w - cw) // 2, (h - ch) // 2
    return rotated.crop((left, top, left + cw, top + ch))


def text_overlay(img: Image.Image, rng: random.Random) -> Image.Image:
    img = img.copy()
    w, h = img.size
    draw = ImageDraw.Draw(img, "RGBA")
    size = max(12, int(h * rng.uniform(0.07, 0.11)))
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", size)
    text = " ".join(rng.choice(WORDS) for _ in range(3)).upper()
    box = draw.textbbox((0, 0), text, font=font, stroke_width=max(1, size // 12))
    tw, th = box[2] - box[0], box[3] - box[1]
    x = max(0, (w - tw) // 2 + rng.randint(-w // 10, w // 10))
    y = rng.choice((int(h * 0.08), int(h * 0.45), int(h * 0.85) - th))
    if rng.random() < 0.5:  # a semi-opaque banner behind the text
        draw.rectangle((0, y - size // 4, w, y + th + size // 2), fill=(0, 0, 0, 140))
    draw.text((x, y), text, font=font, fill=(255, 255, 255, 255), stroke_width=max(1, size // 12),
              stroke_fill=(0, 0, 0, 255))
    return img


def colour_shift(img: Image.Image, rng: random.Random) -> Image.Image:
    kind = rng.choice(("hue", "grayscale", "sepia", "vivid", "contrast"))
    if kind == "hue":
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(30, 90)) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if kind == "grayscale":
        return ImageOps.grayscale(img).convert("RGB")
    if kind == "sepia":
        return ImageOps.colorize(ImageOps.grayscale(img), (40, 20, 0), (255, 235, 190))
    if kind == "vivid":
        return ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(1.8)).enhance(0.85)
    return ImageEnhance.Contrast(img).enhance(rng.uniform(1.3, 1.6))


def rescale(img: Image.Image, rng: random.Random, lo: float = 0.2, hi: float = 0.5) -> Image.Image:
    factor = rng.uniform(lo, hi)
    w, h = img.size
    return img.resize((max(16, round(w * factor)), max(16, round(h * factor))), Image.Resampling.BICUBIC)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def make_copies(item: Item, rng: random.Random) -> list[tuple[str, Image.Image]]:
    img = item.image
    flat = item.group == "stamp"
    longest = max(img.size)
    return [
        ("crop", crop_area(img, rng)),
        ("rotate", rotate(img, rng, flat)),
        ("blur", img.filter(ImageFilter.GaussianBlur(longest * rng.uniform(0.003, 0.006)))),
        ("text", text_overlay(img, rng)),
        ("colour", colour_shift(img, rng)),
        ("rescale", rescale(img, rng)),
        ("jpeg", jpeg(img, rng.randint(8, 25))),
        ("crop_rescale", rescale(crop_area(img, rng), rng, 0.25, 0.5)),
        ("flip", ImageOps.mirror(img)),
    ]


def build_dataset(quick: bool, seed: int) -> tuple[list[Item], list[CorpusItem]]:
    rng = random.Random(seed)
    photos = load_photos()
    wallpapers = wallpaper_sources(8 if quick else 40)
    stamps = stamp_paths()
    rng.shuffle(stamps)
    n_eval_stamps, n_distractors = (10, 60) if quick else (40, 300)
    eval_stamps = [Item(f"stamp-{p.parent.name}-{p.stem}", "stamp", fit(on_background(Image.open(p)), 512))
                   for p in stamps[:n_eval_stamps]]
    if quick:
        photos = photos[:10]
    evals = photos + [w for w, _ in wallpapers] + eval_stamps

    corpus: list[CorpusItem] = []
    for item in evals:
        for transform, image in make_copies(item, rng):
            corpus.append(CorpusItem(f"{item.name}~{transform}", item.name, transform, item.group, image))
    for item, renditions in wallpapers:
        for name, path in renditions:
            corpus.append(CorpusItem(name, item.name, "rendition", "wallpaper", Image.open(path).convert("RGB")))
    backgrounds = ((255, 255, 255), (240, 240, 240), (250, 235, 215), (225, 240, 250), (235, 250, 225))
    for path in stamps[n_eval_stamps:n_eval_stamps + n_distractors]:
        image = fit(on_background(Image.open(path), rng.choice(backgrounds)), 512)
        corpus.append(CorpusItem(f"stamp-{path.parent.name}-{path.stem}", None, "distractor", "stamp", image))
    # every corpus image travels as a web JPEG (the jpeg copy is already one, at its own low quality)
    for c in corpus:
        if c.transform != "jpeg":
            c.image = jpeg(c.image, 90)
    return evals, corpus


# -- scoring ------------------------------------------------------------------------------------
def phash_int(img: Image.Image) -> int:
    return int(str(imagehash.phash(img)), 16)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a[:, None] ^ b[None, :]).astype(np.int16)


def pick_threshold(dist: np.ndarray, truth: np.ndarray, max_t: int = 32) -> tuple[int, list[dict]]:
    sweep, best = [], -1
    for t in range(max_t + 1):
        predicted = dist <= t
        tp = int((predicted & truth).sum())
        fp = int((predicted & ~truth).sum())
        precision = tp / (tp + fp) if tp + fp else 1.0
        sweep.append({"threshold": t, "tp": tp, "fp": fp, "precision": round(precision, 4),
                      "recall": round(tp / int(truth.sum()), 4)})
        if precision >= PRECISION_TARGET:
            best = t
    return best, sweep


def per_transform(predicted: np.ndarray, truth: np.ndarray, corpus: list[CorpusItem],
                  groups: tuple[str, ...] | None = None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for transform in TRANSFORMS:
        cols = [j for j, c in enumerate(corpus)
                if c.transform == transform and (groups is None or c.group in groups)]
        if not cols:
            continue
        positives = truth[:, cols]
        hits = predicted[:, cols] & positives
        out[transform] = {"positives": int(positives.sum()), "found": int(hits.sum()),
                          "recall": round(float(hits.sum() / positives.sum()), 4)}
    return out


def summarize(predicted: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    mirror_free = truth.copy()
    return {"tp": tp, "fp": fp, "fn": int((~predicted & truth).sum()),
            "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
            "recall": round(tp / int(mirror_free.sum()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidate-threshold", type=int, default=None,
                        help="pHash candidate threshold for the full method (default: sweep 12..22, report 22)")
    args = parser.parse_args()

    fetch_debs()
    t0 = time.perf_counter()
    evals, corpus = build_dataset(args.quick, args.seed)
    build_s = time.perf_counter() - t0
    print(f"eval images {len(evals)}, corpus images {len(corpus)} "
          f"({Counter(c.transform for c in corpus)}) built in {build_s:.1f}s")

    eval_index = {e.name: i for i, e in enumerate(evals)}
    truth = np.zeros((len(evals), len(corpus)), dtype=bool)
    for j, c in enumerate(corpus):
        if c.source is not None:
            truth[eval_index[c.source], j] = True

    t0 = time.perf_counter()
    eval_hashes = np.array([phash_int(e.image) for e in evals], dtype=np.uint64)
    corpus_hashes = np.array([phash_int(c.image) for c in corpus], dtype=np.uint64)
    phash_ms = (time.perf_counter() - t0) * 1000 / (len(evals) + len(corpus))
    plain = hamming_matrix(eval_hashes, corpus_hashes)

    t0 = time.perf_counter()
    variants = [nd.candidate_hashes(e.image) for e in evals]
    variants_ms = (time.perf_counter() - t0) * 1000 / len(evals)
    loose = plain.copy()
    for i, hashes in enumerate(variants):
        if hashes:
            d = hamming_matrix(np.array(hashes, dtype=np.uint64), corpus_hashes).min(axis=0)
            loose[i] = np.minimum(loose[i], d)

    best_t, sweep = pick_threshold(plain, truth)
    not_flip = np.array([c.transform != "flip" for c in corpus])

    # the full method: descriptors for every eval image, for corpus images only when they are candidates
    thresholds = [args.candidate_threshold] if args.candidate_threshold is not None else [12, 16, 18, 20, 22]
    widest = max(thresholds)
    candidates = loose <= widest
    t0 = time.perf_counter()
    eval_desc = [nd.descriptor(e.image) for e in evals]
    needed = np.flatnonzero(candidates.any(axis=0))
    corpus_desc: dict[int, bytes] = {int(j): nd.descriptor(corpus[j].image) for j in needed}
    descriptor_ms = (time.perf_counter() - t0) * 1000 / (len(evals) + len(needed))
    verified = np.zeros_like(truth)
    scores = np.zeros(truth.shape, dtype=np.float32)
    pairs = np.argwhere(candidates)
    t0 = time.perf_counter()
    inliers = np.zeros(truth.shape, dtype=np.int16)
    dense = np.zeros(truth.shape, dtype=np.float32)
    low_info_pair = np.zeros_like(truth)
    blocks = np.zeros(truth.shape, dtype=np.int16)
    for i, j in pairs:
        found = nd.evidence(eval_desc[i], corpus_desc[int(j)])
        verified[i, j], scores[i, j] = found.match, found.score
        inliers[i, j], dense[i, j], low_info_pair[i, j] = found.inliers, found.dense, found.low_info
        blocks[i, j] = found.blocks
    verify_ms = (time.perf_counter() - t0) * 1000 / max(1, len(pairs))

    full_by_threshold = {}
    for t in thresholds:
        predicted = verified & (loose <= t)
        full_by_threshold[t] = {
            "candidate_recall": round(float((loose <= t)[truth].mean()), 4),
            "candidate_pairs": int((loose <= t).sum()),
            **summarize(predicted, truth),
            "recall_without_mirrors": round(float(predicted[:, not_flip][truth[:, not_flip]].mean()), 4),
        }
    chosen = args.candidate_threshold if args.candidate_threshold is not None else 22
    full_pred = verified & (loose <= chosen)
    plain_best = plain <= best_t
    plain_default = plain <= 8

    low_info = Counter()
    low_info_total = Counter()
    for e in evals:
        low_info_total[e.group] += 1
        low_info[e.group] += nd.low_information(e.image)
    distractors = [c for c in corpus if c.transform == "distractor"]
    for c in distractors:
        low_info_total["stamp distractor"] += 1
        low_info["stamp distractor"] += nd.low_information(c.image)

    false_positives = [
        {"eval": evals[i].name, "corpus": corpus[j].name, "phash_distance": int(plain[i, j]),
         "candidate_distance": int(loose[i, j]), "score": float(scores[i, j])}
        for i, j in np.argwhere(full_pred & ~truth)
    ]
    missed = [
        {"eval": evals[i].name, "corpus": corpus[j].name, "transform": corpus[j].transform,
         "candidate_distance": int(loose[i, j]), "score": float(scores[i, j])}
        for i, j in np.argwhere(truth & ~full_pred)
    ]
    plain_fp_groups = Counter(
        f"{evals[i].group}/{corpus[j].group}" for i, j in np.argwhere((plain <= 16) & ~truth)
    )

    recall_plain_nf = float(plain_best[:, not_flip][truth[:, not_flip]].mean())
    recall_full_nf = float(full_pred[:, not_flip][truth[:, not_flip]].mean())
    results = {
        "benchmark": "near_dup_eval",
        "quick": args.quick,
        "seed": args.seed,
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "note": "2-core sandbox shared with 5 other engineers working in parallel: timings are noisy",
        },
        "descriptor_version": nd.DESCRIPTOR_VERSION,
        "dataset": {
            "eval_images": dict(Counter(e.group for e in evals)),
            "corpus_images": dict(Counter(c.transform for c in corpus)),
            "pairs": int(truth.size),
            "positive_pairs": int(truth.sum()),
        },
        "baseline_plain_phash": {
            "threshold_at_precision_0.99": best_t,
            "at_best_threshold": {**summarize(plain_best, truth), "recall_without_mirrors": round(recall_plain_nf, 4),
                                  "per_transform": per_transform(plain_best, truth, corpus)},
            "at_threshold_8": {**summarize(plain_default, truth),
                               "per_transform": per_transform(plain_default, truth, corpus)},
            "sweep": sweep,
            "negative_pairs_within_16_by_group": dict(plain_fp_groups),
        },
        "full_method": {
            "candidate_threshold": chosen,
            **full_by_threshold[chosen],
            "per_transform": per_transform(full_pred, truth, corpus),
            "per_transform_photos_and_wallpapers": per_transform(full_pred, truth, corpus, ("photo", "wallpaper")),
            "per_transform_flat_stamps": per_transform(full_pred, truth, corpus, ("stamp",)),
            "by_candidate_threshold": full_by_threshold,
            "false_positives": false_positives,
            "missed": missed,
        },
        "ratio_recall_without_mirrors_full_over_plain": round(recall_full_nf / recall_plain_nf, 3)
        if recall_plain_nf else None,
        "low_information_rate": {g: round(low_info[g] / low_info_total[g], 3) for g in low_info_total},
        "timings_ms": {"phash_per_image": round(phash_ms, 2), "candidate_hashes_per_eval_image": round(variants_ms, 2),
                       "descriptor_per_image": round(descriptor_ms, 2), "verify_per_pair": round(verify_ms, 3),
                       "verify_pairs": int(len(pairs)), "dataset_build_s": round(build_s, 1)},
    }
    if os.environ.get("NEAR_DUP_DUMP"):  # raw evidence of every verified pair, for threshold tuning
        np.savez(os.environ["NEAR_DUP_DUMP"], pairs=pairs, truth=truth[pairs[:, 0], pairs[:, 1]],
                 inliers=inliers[pairs[:, 0], pairs[:, 1]], dense=dense[pairs[:, 0], pairs[:, 1]],
                 low_info=low_info_pair[pairs[:, 0], pairs[:, 1]], blocks=blocks[pairs[:, 0], pairs[:, 1]],
                 transform=np.array([corpus[j].transform for j in pairs[:, 1]]),
                 eval_name=np.array([evals[i].name for i in pairs[:, 0]]),
                 corpus_name=np.array([corpus[j].name for j in pairs[:, 1]]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nplain pHash: threshold {best_t} keeps precision >= {PRECISION_TARGET}")
    print(f"full method: candidate threshold {chosen}, verify on {len(pairs)} pairs")
    print(f"{'transform':14s} {'plain@' + str(best_t):>10s} {'plain@8':>8s} {'full':>8s}  positives")
    pt_best = per_transform(plain_best, truth, corpus)
    pt_default = per_transform(plain_default, truth, corpus)
    pt_full = per_transform(full_pred, truth, corpus)
    for transform in pt_full:
        print(f"{transform:14s} {pt_best[transform]['recall']:10.3f} {pt_default[transform]['recall']:8.3f} "
              f"{pt_full[transform]['recall']:8.3f}  {pt_full[transform]['positives']}")
    for label, pred in (("plain@best", plain_best), ("plain@8", plain_default), ("full", full_pred)):
        s = summarize(pred, truth)
        nf = float(pred[:, not_flip][truth[:, not_flip]].mean())
        print(f"{label:12s} precision {s['precision']:.4f} recall {s['recall']:.3f} "
              f"(without mirrors {nf:.3f}) fp {s['fp']}")
    print("by candidate threshold:", json.dumps(full_by_threshold))
    print("low information rate:", results["low_information_rate"])
    print("timings ms:", results["timings_ms"])
    print(f"false positives {len(false_positives)}, missed {len(missed)}; details in {RESULTS}")
    for fp in false_positives[:20]:
        print("  FP", fp)
    for miss in missed[:40]:
        print("  miss", miss)


if __name__ == "__main__":
    main()
