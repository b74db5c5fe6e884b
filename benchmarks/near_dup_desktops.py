"""A fourth near-duplicate set, kept back from every fit: desktop wallpapers, transformed with torchvision.

benchmarks/dedup_logo.py fits the dedup cascade leave-one-generator-out on `debian`, `product` and `graphics`;
all three have been looked at while the cascade was built (docs/dedup.md says how often). This set is for one
look with the *shipped* model (`dedup_logo.py --pristine`), so that one quality figure comes from data nobody
tuned on. It shares no source and no transformation code with the other three:

* sources: the wallpapers of three other desktops' Debian packages, `gnome-backgrounds`, `mate-backgrounds`
  and `ukui-wallpapers` (photographs of flowers, grass, water and sky; abstract renderings, gradients, tiled
  patterns, flat-colour art). Licences vary (CC-BY-SA, GPL): fetched with `apt-get download` into
  benchmarks/_work/desktops, never committed. One picture per design family: the light/dark and colour
  variants of one design (gnome `*-l`/`*-d`, the Ubuntu MATE colourways, the MATE stripes) are left out
  rather than counted either way, as the Tux Paint variants are in `debian`; pictures that are blank once
  composited on white (transparent overlays) are dropped.
* transformations: torchvision.transforms.v2.functional on tensors (Pillow only draws the text and encodes
  the JPEGs, as every set stores its corpus), with
  ranges of their own and four kinds no other set has: `perspective`, `occlude` (a flat sticker over 6-12%
  of the picture), `sharpen_posterize` and `squeeze` (aspect ratio changed by 10-25%). The Elephants
  wallpaper's two larger renditions in the package are real copies of it (`rendition`).
* eval side: each picture composited on white and brought to a long side of 480-1,024 px; distractors
  (12 other wallpapers, transformed the same way) are the negatives; each eval picture has two copies per
  transformation. Every corpus image is stored as JPEG q88
  (the `jpeg` copies at their own quality).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from near_dup_eval import CorpusItem, Item, unpack_deb  # type: ignore[import-not-found]
from near_dup_sets import _as_jpeg  # type: ignore[import-not-found]
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work" / "desktops"
PACKAGES = ("gnome-backgrounds", "mate-backgrounds", "ukui-wallpapers")
FONTS = sorted(Path("/usr/share/fonts/truetype").rglob("*.ttf"))
#: (substring of the file name, family): only the first picture of a family (by sorted path) is used
FAMILIES = (("Ubuntu-Mate-", "ubuntu-mate"), ("Stripes", "stripes"), ("Elephants", "elephants"))
RENDITIONS = ("Elephants_3840x2160", "Elephants_5640x3172")
N_DISTRACTOR_SOURCES = 12
ROUNDS = 2  # copies per transformation of each eval picture (each with its own random parameters)
TRANSFORMS = ("crop", "rotate", "blur", "text", "blur_text", "colour", "rescale", "jpeg", "crop_rescale",
              "perspective", "occlude", "sharpen_posterize", "squeeze", "pad", "flip")


def fetch() -> list[Path]:
    """The wallpaper files (apt-get download + dpkg -x once into benchmarks/_work/desktops)."""
    for package in PACKAGES:
        unpack_deb(package, WORK / package, WORK)
    return sorted(p for package in PACKAGES for p in (WORK / package).rglob("*")
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and p.stat().st_size > 1000)


def _family(path: Path) -> str:
    stem = path.stem
    for needle, family in FAMILIES:
        if needle in stem:
            return family
    if stem.endswith(("-l", "-d")):  # gnome light/dark pairs
        return stem[:-2]
    return stem


def _on_white(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        opened.draft("RGB", (2048, 2048))
        img = opened.convert("RGBA")
    img.thumbnail((2048, 2048), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


def _fit(img: Image.Image, side: int) -> Image.Image:
    scale = side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.LANCZOS)


def tv_copies(img: Image.Image, rng: random.Random) -> list[tuple[str, Image.Image]]:
    """One copy per transformation, with torchvision.transforms.v2.functional (text and JPEG with Pillow)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    base = F.pil_to_tensor(img)  # uint8 (3, h, w)
    mean_colour = [float(v) for v in base.float().mean(dim=(1, 2))]

    def to_pil(t: torch.Tensor) -> Image.Image:
        return F.to_pil_image(t.clamp(0, 255).to(torch.uint8))

    def crop(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        th, tw = t.shape[1:]
        area = rng.uniform(lo, hi)
        aspect = rng.uniform(0.85, 1.15)
        ch, cw = min(th, int(th * (area / aspect) ** 0.5)), min(tw, int(tw * (area * aspect) ** 0.5))
        return F.crop(t, rng.randint(0, th - ch), rng.randint(0, tw - cw), ch, cw)

    def rescale(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        f = rng.uniform(lo, hi)
        size = [max(24, int(t.shape[1] * f)), max(24, int(t.shape[2] * f))]
        return F.resize(t, size, interpolation=InterpolationMode.BILINEAR, antialias=True)

    def blur(t: torch.Tensor) -> torch.Tensor:
        sigma = max(t.shape[1:]) * rng.uniform(0.004, 0.009)
        kernel = 2 * int(3 * sigma) + 1
        return F.gaussian_blur(t, [kernel, kernel], [sigma, sigma])

    def text(t: torch.Tensor) -> torch.Tensor:
        im = to_pil(t).convert("RGBA")
        layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        ww, hh = im.size
        size = max(10, int(hh * rng.uniform(0.07, 0.12)))
        font = ImageFont.truetype(str(rng.choice(FONTS)), size)
        words = rng.choice(("wallpaper hd free", "desktop 4k", "best backgrounds", "download now", "stock photo"))
        y = int(hh * rng.uniform(0.1, 0.8))
        if rng.random() < 0.5:  # a dark band with white text
            draw.rectangle((0, y - size // 4, ww, y + size + size // 4), fill=(0, 0, 0, 150))
            draw.text((int(ww * rng.uniform(0.03, 0.3)), y), words, font=font, fill=(255, 255, 255, 255))
        else:  # a translucent watermark
            draw.text((int(ww * rng.uniform(0.05, 0.4)), y), words, font=font, fill=(255, 255, 255, 140),
                      stroke_width=max(1, size // 20), stroke_fill=(0, 0, 0, 140))
        return F.pil_to_tensor(Image.alpha_composite(im, layer).convert("RGB"))

    def colour(t: torch.Tensor) -> torch.Tensor:
        kind = rng.choice(("hue", "saturation", "brightness", "contrast", "gamma"))
        if kind == "hue":
            return F.adjust_hue(t, rng.uniform(0.08, 0.3) * rng.choice((-1, 1)))
        if kind == "saturation":
            return F.adjust_saturation(t, rng.uniform(0.0, 0.4))
        if kind == "brightness":
            return F.adjust_brightness(t, rng.choice((rng.uniform(0.55, 0.8), rng.uniform(1.2, 1.4))))
        if kind == "contrast":
            return F.adjust_contrast(t, rng.uniform(0.5, 0.75))
        return F.adjust_gamma(t, rng.choice((rng.uniform(0.55, 0.75), rng.uniform(1.4, 1.8))))

    def perspective(t: torch.Tensor) -> torch.Tensor:
        th, tw = t.shape[1:]
        corners = [[0, 0], [tw - 1, 0], [tw - 1, th - 1], [0, th - 1]]
        moved = [[x + rng.uniform(-0.06, 0.06) * tw, y + rng.uniform(-0.06, 0.06) * th] for x, y in corners]
        return F.perspective(t, corners, moved, interpolation=InterpolationMode.BILINEAR, fill=mean_colour)

    def occlude(t: torch.Tensor) -> torch.Tensor:
        th, tw = t.shape[1:]
        area = rng.uniform(0.06, 0.12) * th * tw
        eh = int(min(th - 2, (area * rng.uniform(0.5, 2.0)) ** 0.5))
        ew = int(min(tw - 2, area / max(1, eh)))
        value = torch.tensor([rng.randint(0, 255) for _ in range(3)], dtype=torch.uint8)[:, None, None]
        return F.erase(t, rng.randint(0, th - eh), rng.randint(0, tw - ew), eh, ew, value)

    def squeeze(t: torch.Tensor) -> torch.Tensor:
        th, tw = t.shape[1:]
        f = rng.uniform(0.75, 0.9)
        size = [int(th * f), tw] if rng.random() < 0.5 else [th, int(tw * f)]
        return F.resize(t, size, interpolation=InterpolationMode.BICUBIC, antialias=True)

    def pad(t: torch.Tensor) -> torch.Tensor:
        th, tw = t.shape[1:]
        if rng.random() < 0.5:
            p = int(th * rng.uniform(0.08, 0.15))
            return F.pad(t, [0, p, 0, p], fill=0)
        p = int(tw * rng.uniform(0.08, 0.15))
        return F.pad(t, [p, 0, p, 0], fill=0)

    rotated = F.rotate(base, rng.uniform(1.5, 6.0) * rng.choice((-1, 1)), interpolation=InterpolationMode.BILINEAR,
                       fill=mean_colour)
    out = [
        ("crop", crop(base, 0.65, 0.92)),
        ("rotate", rotated),
        ("blur", blur(base)),
        ("text", text(base)),
        ("blur_text", text(blur(base))),
        ("colour", colour(base)),
        ("rescale", rescale(base, 0.25, 0.6)),
        ("jpeg", None),
        ("crop_rescale", rescale(crop(base, 0.7, 0.92), 0.3, 0.6)),
        ("perspective", perspective(base)),
        ("occlude", occlude(base)),
        ("sharpen_posterize", F.posterize(F.adjust_sharpness(base, rng.uniform(2.5, 4.0)), rng.choice((3, 4)))),
        ("squeeze", squeeze(base)),
        ("pad", pad(base)),
        ("flip", F.horizontal_flip(base)),
    ]
    assert [name for name, _ in out] == list(TRANSFORMS)
    copies = []
    for name, tensor in out:
        if name == "jpeg":
            copies.append((name, _as_jpeg(img, rng.randint(8, 30))))
        else:
            copies.append((name, _as_jpeg(to_pil(tensor), 88)))
    return copies


def build_desktops(seed: int) -> tuple[list[Item], list[CorpusItem]]:
    rng = random.Random(4000 + seed)
    files = fetch()
    chosen: dict[str, Path] = {}
    renditions = [p for p in files if p.stem in RENDITIONS]
    for path in files:
        if path.stem in RENDITIONS:
            continue
        chosen.setdefault(_family(path), path)
    sources: list[tuple[str, str, Image.Image]] = []
    for family, path in sorted(chosen.items()):
        img = _on_white(path)
        if float(np.asarray(img.convert("L"), dtype=np.float32).std()) < 4.0:
            continue  # a transparent overlay: blank on white
        group = "photo" if "nature" in path.parts else "art"
        sources.append((family, group, img))
    rng.shuffle(sources)
    evals, corpus = [], []
    for k, (family, group, img) in enumerate(sources):
        eval_img = _fit(img, rng.randint(480, 1024))
        if k < N_DISTRACTOR_SOURCES:  # not in the eval set: its copies are negatives
            for transform, copy in tv_copies(eval_img, rng):
                corpus.append(CorpusItem(f"desk-{family}~{transform}", None, "distractor", group, copy))
            continue
        name = f"desk-{family}"
        evals.append(Item(name, group, eval_img))
        for r in range(ROUNDS):
            for transform, copy in tv_copies(eval_img, rng):
                corpus.append(CorpusItem(f"{name}~{transform}-{r}", name, transform, group, copy))
        if family == "elephants":
            for path in renditions:
                copy = _fit(_on_white(path), rng.randint(640, 1280))
                corpus.append(CorpusItem(f"{name}~rendition-{path.stem}", name, "rendition", group, _as_jpeg(copy, 88)))
    return evals, corpus
