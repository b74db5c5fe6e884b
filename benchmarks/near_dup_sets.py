"""Two more near-duplicate test sets, each with its own sources AND its own transformation code.

The first generator is benchmarks/near_dup_eval.py (`debian`: real photos, plasma wallpapers and Tux
Paint stamps, transformed with Pillow). The two here share none of its sources or transformation code,
so a verifier fitted on one generator can be judged on another (leave-one-generator-out,
benchmarks/dedup_logo.py):

* `product` (OpenCV transformations): synthetic product shots, i.e. a textured object (texture cut from
  a real photo, or procedural: stripes, checks, rings, noise) in one of several silhouettes (ellipse,
  rounded box, bottle, star, blob), with a label and a soft shadow, on a flat studio background.
  Hard negatives: other objects with the *same silhouette, size, position and background* and another
  texture (the outside checker's main false-positive class), and the same texture in another shape.
* `graphics` (numpy / scikit-image transformations): rendered text on flat colour (quotes, banners,
  price tags in several fonts) and flat icons (a few coloured shapes). Hard negatives: the same layout,
  font and colours with other words, and icons with the same shapes moved or recoloured.

Transformations differ from the Pillow set in code and in range; `blur_text` (blur, then a caption)
and `pad` (letterbox borders) exist only here. Every corpus image is then stored as a JPEG.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from near_dup_eval import CorpusItem, Item  # type: ignore[import-not-found]
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
FONTS = sorted(Path("/usr/share/fonts/truetype").rglob("*.ttf"))
WORDS = ("summer", "quality", "design", "coffee", "morning", "travel", "freedom", "simple", "nature", "modern",
         "happy", "classic", "fresh", "ocean", "garden", "studio", "vintage", "golden", "winter", "market",
         "dream", "light", "forest", "city", "music", "house", "organic", "daily", "urban", "wild")


def _rgb(img: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _as_jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# -- product shots --------------------------------------------------------------------------------
def _photo_textures() -> list[np.ndarray]:
    """Texture sources: scikit-image's sample images (not used as eval images anywhere else)."""
    import skimage.data as sd

    out = []
    for name in ("brick", "grass", "gravel", "rough_wall", "coffee", "chelsea", "rocket", "astronaut",
                 "hubble_deep_field", "immunohistochemistry", "retina", "cell", "colorwheel", "coins"):
        try:
            img = getattr(sd, name)()
        except Exception:  # noqa: BLE001 - a sample image that cannot be fetched is skipped
            continue
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return out


def _procedural_texture(rng: random.Random, size: int) -> np.ndarray:
    kind = rng.choice(("stripes", "checks", "rings", "noise", "dots"))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    c2 = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    period = rng.uniform(8, 40)
    angle = rng.uniform(0, np.pi)
    if kind == "stripes":
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == "checks":
        t = ((xx // period + yy // period) % 2).astype(np.float32)
    elif kind == "rings":
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
        t = (np.sin(np.hypot(xx - cx, yy - cy) * 2 * np.pi / period) + 1) / 2
    elif kind == "dots":
        t = ((np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period)) > 0.5).astype(np.float32)
    else:
        noise = np.random.default_rng(rng.randint(0, 1 << 30)).random((size // 8 + 1, size // 8 + 1))
        t = cv2.resize(noise.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return (c1 + (c2 - c1) * t[..., None]).astype(np.uint8)


def _silhouette(kind: str, w: int, h: int, rng: random.Random) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    if kind == "ellipse":
        cv2.ellipse(mask, (w // 2, h // 2), (w // 2 - 2, h // 2 - 2), 0, 0, 360, 255, -1)
    elif kind == "box":
        r = min(w, h) // 6
        cv2.rectangle(mask, (r, 0), (w - r, h), 255, -1)
        cv2.rectangle(mask, (0, r), (w, h - r), 255, -1)
        for x, y in ((r, r), (w - r, r), (r, h - r), (w - r, h - r)):
            cv2.circle(mask, (x, y), r, 255, -1)
    elif kind == "bottle":
        cv2.rectangle(mask, (w // 3, 0), (2 * w // 3, h // 4), 255, -1)
        cv2.ellipse(mask, (w // 2, h // 4), (w // 2 - 2, h // 8), 0, 0, 360, 255, -1)
        cv2.rectangle(mask, (0, h // 4), (w - 1, h - 1), 255, -1)
    elif kind == "star":
        pts = []
        for k in range(10):
            radius = (0.48 if k % 2 == 0 else 0.22) * min(w, h)
            a = k * np.pi / 5 - np.pi / 2
            pts.append((w / 2 + radius * np.cos(a), h / 2 + radius * np.sin(a)))
        cv2.fillPoly(mask, [np.array(pts, np.int32)], 255)
    else:  # blob: a smooth random radial outline
        a = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        radius = np.ones_like(a)
        for k in range(2, 5):
            radius += rng.uniform(-0.15, 0.15) * np.cos(k * a + rng.uniform(0, 6.28))
        radius /= radius.max()
        pts = np.c_[w / 2 + 0.48 * w * radius * np.cos(a), h / 2 + 0.48 * h * radius * np.sin(a)]
        cv2.fillPoly(mask, [pts.astype(np.int32)], 255)
    return mask


SHAPES = ("ellipse", "box", "bottle", "star", "blob")
BACKGROUNDS = ((255, 255, 255), (245, 245, 245), (236, 236, 236), (250, 240, 230), (230, 240, 250))


def product_shot(texture: np.ndarray, shape: str, layout: dict, rng: random.Random) -> Image.Image:
    """An object with `texture` cut to `shape`, a label and a shadow, on a flat background (layout fixed)."""
    cw, ch = layout["canvas"]
    ow, oh = layout["object"]
    x0, y0 = layout["position"]
    canvas = np.full((ch, cw, 3), layout["background"], np.float32)
    shadow = np.zeros((ch, cw), np.float32)
    cv2.ellipse(shadow, (x0 + ow // 2, y0 + oh), (ow // 2, max(4, oh // 12)), 0, 0, 360, 1.0, -1)
    shadow = cv2.GaussianBlur(shadow, (0, 0), max(2, ow / 25))
    canvas *= 1 - 0.35 * shadow[..., None]
    th, tw = texture.shape[:2]
    side = rng.randint(min(th, tw) // 3, min(th, tw))
    tx, ty = rng.randint(0, tw - side), rng.randint(0, th - side)
    patch = cv2.resize(texture[ty:ty + side, tx:tx + side], (ow, oh), interpolation=cv2.INTER_AREA).astype(np.float32)
    # shading across the object, so it reads as a solid, not a flat sticker
    shade = np.linspace(1.1, 0.8, ow, dtype=np.float32)[None, :, None]
    patch = np.clip(patch * shade, 0, 255)
    if layout["label"]:
        lx, ly, lw, lh = ow // 4, oh // 2, ow // 2, max(8, oh // 6)
        label = np.full((lh, lw, 3), layout["label_colour"], np.uint8)
        cv2.putText(label, rng.choice(WORDS)[:6].upper(), (2, lh - 3), cv2.FONT_HERSHEY_SIMPLEX,
                    lh / 34, (20, 20, 20), max(1, lh // 12), cv2.LINE_AA)
        patch[ly:ly + lh, lx:lx + lw] = label
    mask = _silhouette(shape, ow, oh, rng).astype(np.float32)[..., None] / 255.0
    mask = cv2.GaussianBlur(mask, (3, 3), 0)[..., None]
    region = canvas[y0:y0 + oh, x0:x0 + ow]
    canvas[y0:y0 + oh, x0:x0 + ow] = region * (1 - mask) + patch * mask
    return _rgb(canvas)


def _product_layout(rng: random.Random) -> dict:
    cw = rng.choice((480, 560, 640, 720, 800))
    ch = int(cw * rng.choice((0.75, 1.0, 1.0, 1.25)))
    scale = rng.uniform(0.35, 0.7)
    ow, oh = int(cw * scale * rng.uniform(0.6, 1.0)), int(ch * scale * rng.uniform(0.7, 1.0))
    return {"canvas": (cw, ch), "object": (ow, oh),
            "position": (rng.randint(cw // 10, cw - ow - cw // 10), rng.randint(ch // 12, ch - oh - ch // 8)),
            "background": rng.choice(BACKGROUNDS), "label": rng.random() < 0.5,
            "label_colour": tuple(rng.randint(180, 255) for _ in range(3))}


def _texture(rng: random.Random, photos: list[np.ndarray]) -> np.ndarray:
    if photos and rng.random() < 0.6:
        return rng.choice(photos)
    return _procedural_texture(rng, 256)


def build_product(seed: int, n_eval: int = 60, negatives_per_eval: int = 3) -> tuple[list[Item], list[CorpusItem]]:
    rng = random.Random(1000 + seed)
    photos = _photo_textures()
    evals, corpus = [], []
    for k in range(n_eval):
        layout, shape = _product_layout(rng), rng.choice(SHAPES)
        state = rng.getstate()
        evals.append(Item(f"product-{k}", "product", product_shot(_texture(rng, photos), shape, layout, rng)))
        for n in range(negatives_per_eval):
            # look-alikes: same silhouette, size, place and background, another texture (and label word)
            img = product_shot(_texture(rng, photos), shape, layout, rng)
            corpus.append(CorpusItem(f"product-{k}-lookalike{n}", None, "distractor", "product", img))
        rng.setstate(state)  # the same texture again, in another shape: a sibling, not a copy
        other = rng.choice([s for s in SHAPES if s != shape])
        corpus.append(CorpusItem(f"product-{k}-othershape", None, "distractor", "product",
                                 product_shot(_texture(rng, photos), other, layout, rng)))
        rng.random()
    for item in evals:
        for transform, img in cv_copies(_arr(item.image), rng, flat=True):
            corpus.append(CorpusItem(f"{item.name}~{transform}", item.name, transform, item.group, img))
    for c in corpus:
        if c.transform != "jpeg":
            c.image = _as_jpeg(c.image, 90)
    return evals, corpus


# -- OpenCV transformations (product set) ------------------------------------------------------------
def cv_copies(img: np.ndarray, rng: random.Random, flat: bool) -> list[tuple[str, Image.Image]]:
    h, w = img.shape[:2]
    border = tuple(int(v) for v in img[0, 0]) if flat else (0, 0, 0)

    def crop(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        hh, ww = a.shape[:2]
        s = rng.uniform(lo, hi) ** 0.5
        cw, ch = int(ww * s), int(hh * s)
        x, y = rng.randint(0, ww - cw), rng.randint(0, hh - ch)
        return a[y:y + ch, x:x + cw]

    def rotate(a: np.ndarray) -> np.ndarray:
        angle = rng.uniform(2, 5) * rng.choice((-1, 1))
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        if flat:
            return cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=border)
        out = cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        return out

    def caption(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        hh, ww = a.shape[:2]
        scale = hh / rng.uniform(250, 400)
        text = " ".join(rng.choice(WORDS) for _ in range(2))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, scale, max(1, int(scale * 2)))
        x = max(0, rng.randint(0, max(1, ww - tw)))
        y = rng.choice((th + 8, hh // 2, hh - 10))
        colour = rng.choice(((255, 255, 255), (0, 0, 0), (230, 30, 30)))
        cv2.putText(a, text, (x, y), cv2.FONT_HERSHEY_DUPLEX, scale, colour, max(1, int(scale * 2)), cv2.LINE_AA)
        return a

    def colour(a: np.ndarray) -> np.ndarray:
        kind = rng.choice(("gamma", "hue", "gray", "warm"))
        if kind == "gamma":
            g = rng.choice((0.6, 0.7, 1.4, 1.6))
            return (255 * (a / 255.0) ** g).astype(np.uint8)
        if kind == "hue":
            hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(int) + rng.randint(20, 60)) % 180
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if kind == "gray":
            return cv2.cvtColor(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return np.clip(a.astype(np.float32) * np.array([1.15, 1.0, 0.8]), 0, 255).astype(np.uint8)

    def rescale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        f = rng.uniform(lo, hi)
        return cv2.resize(a, (max(16, int(a.shape[1] * f)), max(16, int(a.shape[0] * f))), interpolation=cv2.INTER_AREA)

    def jpeg(a: np.ndarray) -> Image.Image:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(a, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, rng.randint(10, 30)])
        return _rgb(cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))

    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (0, 0), max(a.shape[:2]) * rng.uniform(0.003, 0.007))

    def pad(a: np.ndarray) -> np.ndarray:
        p = int(max(a.shape[:2]) * rng.uniform(0.06, 0.15))
        value = border if flat else rng.choice(((0, 0, 0), (255, 255, 255)))
        return cv2.copyMakeBorder(a, p // 2, p // 2, p, p, cv2.BORDER_CONSTANT, value=value)

    def noise(a: np.ndarray) -> np.ndarray:
        n = np.random.default_rng(rng.randint(0, 1 << 30)).normal(0, rng.uniform(6, 12), a.shape)
        return np.clip(a.astype(np.float32) * rng.uniform(0.85, 1.15) + n, 0, 255).astype(np.uint8)

    out: list[tuple[str, Image.Image]] = [
        ("crop", _rgb(crop(img, 0.75, 0.95))),
        ("rotate", _rgb(rotate(img))),
        ("blur", _rgb(blur(img))),
        ("text", _rgb(caption(img))),
        ("blur_text", _rgb(caption(blur(img)))),
        ("colour", _rgb(colour(img))),
        ("rescale", _rgb(rescale(img, 0.25, 0.6))),
        ("jpeg", jpeg(img)),
        ("crop_rescale", _rgb(rescale(crop(img, 0.8, 0.95), 0.3, 0.6))),
        ("pad", _rgb(pad(img))),
        ("noise", _rgb(noise(img))),
        ("flip", _rgb(cv2.flip(img, 1))),
    ]
    return out


# -- graphics: text on colour and icons ------------------------------------------------------------
PALETTE = ((20, 40, 90), (200, 30, 40), (250, 200, 40), (30, 140, 80), (240, 240, 235), (30, 30, 30),
           (120, 60, 160), (250, 130, 40), (90, 180, 220), (245, 220, 200))


def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def text_graphic(layout: dict, words: list[str]) -> Image.Image:
    w, h = layout["size"]
    img = Image.new("RGB", (w, h), layout["background"])
    draw = ImageDraw.Draw(img)
    if layout["band"]:
        draw.rectangle((0, int(h * 0.7), w, h), fill=layout["band_colour"])
    font = _font(layout["font"], layout["font_size"])
    lines = [" ".join(words[i:i + 2]) for i in range(0, len(words), 2)]
    y = layout["top"]
    for line in lines:
        box = draw.textbbox((0, 0), line, font=font)
        x = (w - (box[2] - box[0])) // 2 if layout["centre"] else layout["left"]
        draw.text((x, y), line, font=font, fill=layout["ink"])
        y += int((box[3] - box[1]) * 1.4)
    return img


def _text_layout(rng: random.Random) -> dict:
    w = rng.choice((400, 500, 640, 800))
    h = int(w * rng.choice((0.5, 0.75, 1.0)))
    bg = rng.choice(PALETTE)
    ink = rng.choice([c for c in PALETTE if abs(sum(c) - sum(bg)) > 250] or [(255, 255, 255)])
    return {"size": (w, h), "background": bg, "ink": ink, "font": rng.choice(FONTS),
            "font_size": int(h * rng.uniform(0.1, 0.16)), "top": int(h * rng.uniform(0.1, 0.3)),
            "centre": rng.random() < 0.6, "left": int(w * 0.08), "band": rng.random() < 0.4,
            "band_colour": rng.choice(PALETTE), "n_words": rng.choice((2, 3, 4, 5))}


def icon(spec: list[tuple], size: int, background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for kind, colour, (x, y, r) in spec:
        box = (int((x - r) * size), int((y - r) * size), int((x + r) * size), int((y + r) * size))
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        elif kind == "square":
            draw.rectangle(box, fill=colour)
        elif kind == "triangle":
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
        else:
            draw.line((box[0], box[1], box[2], box[3]), fill=colour, width=max(2, size // 20))
    return img


def _icon_spec(rng: random.Random) -> list[tuple]:
    return [(rng.choice(("circle", "square", "triangle", "line")), rng.choice(PALETTE),
             (rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.25)))
            for _ in range(rng.randint(2, 4))]


def build_graphics(seed: int, n_text: int = 60, n_icons: int = 30) -> tuple[list[Item], list[CorpusItem]]:
    rng = random.Random(2000 + seed)
    evals, corpus = [], []
    for k in range(n_text):
        layout = _text_layout(rng)
        evals.append(Item(f"text-{k}", "text", text_graphic(layout, rng.sample(WORDS, layout["n_words"]))))
        for n in range(3):  # same layout, font and colours, other words
            img = text_graphic(layout, rng.sample(WORDS, layout["n_words"]))
            corpus.append(CorpusItem(f"text-{k}-lookalike{n}", None, "distractor", "text", img))
    for k in range(n_icons):
        size, bg, spec = rng.choice((64, 96, 128, 256)), rng.choice(PALETTE), _icon_spec(rng)
        evals.append(Item(f"icon-{k}", "icon", icon(spec, size, bg)))
        for n in range(3):  # the same shapes moved a little and recoloured
            moved = [(kind, rng.choice(PALETTE), (x + rng.uniform(-0.1, 0.1), y + rng.uniform(-0.1, 0.1), r))
                     for kind, _c, (x, y, r) in spec]
            corpus.append(CorpusItem(f"icon-{k}-lookalike{n}", None, "distractor", "icon", icon(moved, size, bg)))
    for item in evals:
        for transform, img in sk_copies(_arr(item.image), rng):
            corpus.append(CorpusItem(f"{item.name}~{transform}", item.name, transform, item.group, img))
    for c in corpus:
        if c.transform != "jpeg":
            c.image = _as_jpeg(c.image, 90)
    return evals, corpus


# -- numpy / scikit-image transformations (graphics set) -------------------------------------------
def sk_copies(img: np.ndarray, rng: random.Random) -> list[tuple[str, Image.Image]]:
    from skimage import color, filters, transform

    h, w = img.shape[:2]
    f = img.astype(np.float64) / 255.0

    def to_img(a: np.ndarray) -> Image.Image:
        return _rgb(a * 255.0)

    def crop(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        hh, ww = a.shape[:2]
        fy, fx = rng.uniform(lo, hi) ** 0.5, rng.uniform(lo, hi) ** 0.5
        ch, cw = int(hh * fy), int(ww * fx)
        y, x = rng.randint(0, hh - ch), rng.randint(0, ww - cw)
        return a[y:y + ch, x:x + cw]

    def rotate(a: np.ndarray) -> np.ndarray:
        return transform.rotate(a, rng.uniform(2, 5) * rng.choice((-1, 1)), mode="edge", order=1)

    def blur(a: np.ndarray) -> np.ndarray:
        return filters.gaussian(a, sigma=max(a.shape[:2]) * rng.uniform(0.003, 0.007), channel_axis=-1)

    def caption(a: np.ndarray) -> np.ndarray:
        im = to_img(a)
        draw = ImageDraw.Draw(im, "RGBA")
        ww, hh = im.size
        font = _font(rng.choice(FONTS), max(10, int(hh * rng.uniform(0.06, 0.1))))
        y = rng.choice((int(hh * 0.02), int(hh * 0.88) - 4))
        draw.rectangle((0, y, ww, y + int(hh * 0.11)), fill=(255, 255, 255, 170))
        draw.text((int(ww * 0.05), y), "© " + rng.choice(WORDS) + ".com", font=font, fill=(0, 0, 0, 255))
        return np.asarray(im).astype(np.float64) / 255.0

    def colour(a: np.ndarray) -> np.ndarray:
        kind = rng.choice(("hue", "desaturate", "darken"))
        if kind == "hue":
            hsv = color.rgb2hsv(a)
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(0.1, 0.4)) % 1.0
            return color.hsv2rgb(hsv)
        if kind == "desaturate":
            return np.repeat(color.rgb2gray(a)[..., None], 3, axis=-1)
        return a * rng.uniform(0.6, 0.8)

    def rescale(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
        factor = rng.uniform(lo, hi)
        out_h, out_w = max(16, int(a.shape[0] * factor)), max(16, int(a.shape[1] * factor))
        return transform.resize(a, (out_h, out_w), anti_aliasing=True, order=1)

    def jpeg(a: np.ndarray) -> Image.Image:
        return _as_jpeg(to_img(a), rng.randint(12, 35))

    def pad(a: np.ndarray) -> np.ndarray:
        p = int(max(a.shape[:2]) * rng.uniform(0.05, 0.12))
        return np.pad(a, ((p, p), (0, 0), (0, 0)), constant_values=rng.choice((0.0, 1.0)))

    def upscale(a: np.ndarray) -> np.ndarray:
        return transform.resize(a, (int(h * 1.6), int(w * 1.6)), order=0)

    return [
        ("crop", to_img(crop(f, 0.8, 0.95))),
        ("rotate", to_img(rotate(f))),
        ("blur", to_img(blur(f))),
        ("text", to_img(caption(f))),
        ("blur_text", to_img(caption(blur(f)))),
        ("colour", to_img(colour(f))),
        ("rescale", to_img(rescale(f, 0.35, 0.7))),
        ("jpeg", jpeg(f)),
        ("crop_rescale", to_img(rescale(crop(f, 0.8, 0.95), 0.4, 0.7))),
        ("pad", to_img(pad(f))),
        ("upscale", to_img(upscale(f))),
        ("flip", to_img(f[:, ::-1])),
    ]


GENERATORS: dict[str, Callable[[int], tuple[list[Item], list[CorpusItem]]]] = {
    "product": build_product,
    "graphics": build_graphics,
}
