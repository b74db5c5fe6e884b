"""Regenerate the bundled demo corpus and mini eval set (outputs are committed; this is provenance).

Images come from scikit-image's bundled data (public domain / CC0, see each function's docstring in
`skimage.data`). Captions are ours. The eval set holds near-duplicates of three corpus images
(crop, blur, text overlay) plus unrelated images, so the demo's dedup stage visibly fires.

    pip install scikit-image && python configs/demo/make_assets.py
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import skimage.data as sk
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent
MAX_SIDE = 320

# (file stem, skimage loader, caption, format)
CORPUS = [
    ("astronaut", sk.astronaut, "Portrait of an astronaut in a white spacesuit holding a helmet, with the American flag behind her", "jpg"),
    ("chelsea", sk.chelsea, "A ginger tabby cat looking to the side", "jpg"),
    ("coffee", sk.coffee, "A cup of coffee with latte art on a saucer with a spoon", "jpg"),
    ("rocket", sk.rocket, "A rocket standing on the launch pad under a blue sky", "jpg"),
    ("hubble", sk.hubble_deep_field, "Hubble deep field: hundreds of distant galaxies in the dark sky", "jpg"),
    ("retina", sk.retina, "Fundus photograph of a human retina showing blood vessels", "jpg"),
    ("brick", sk.brick, "Close-up texture of a grey brick wall", "png"),
    ("grass", sk.grass, "Green grass texture seen from above", "jpg"),
    ("gravel", sk.gravel, "Grey gravel stones on the ground", "jpg"),
    ("coins", sk.coins, "Old coins lying on a dark table", "jpg"),
    ("camera", sk.camera, "A photographer with a camera on a tripod in a field, black and white", "jpg"),
    ("horse", sk.horse, "Black silhouette of a horse on a white background", "png"),
    ("ihc", sk.immunohistochemistry, "Microscope image of immunohistochemistry stained tissue", "jpg"),
    ("clock", sk.clock, "Motion blurred photo of a wall clock", "jpg"),
    ("cell", sk.cell, "Microscopy image of a single cell", "jpg"),
]
# Rows that exercise the filters: (url path, caption). Paths that do not exist give a 404.
EXTRA_ROWS = [
    ("images/chelsea.jpg", "IMG_1234.JPG"),
    ("images/coffee.jpg", "Une tasse de café avec un dessin de latte sur une soucoupe"),
    ("images/rocket.jpg", "royalty free stock photo"),
    ("images/missing.jpg", "A picture that is no longer on the server"),
    ("not_an_image.html", "A page that is served where an image was expected"),
]


def to_rgb(arr: np.ndarray) -> Image.Image:
    img = Image.fromarray(arr)
    img = img.convert("RGB") if img.mode != "RGB" else img
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return img


def save(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=88, optimize=True)
    else:
        img.save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())


def main() -> None:
    images: dict[str, Image.Image] = {}
    rows = []
    for stem, loader, caption, fmt in CORPUS:
        img = to_rgb(loader())
        images[stem] = img
        save(img, HERE / "images" / f"{stem}.{fmt}", fmt)
        rows.append((f"images/{stem}.{fmt}", caption))
    rows.extend(EXTRA_ROWS)
    (HERE / "not_an_image.html").write_text("<html><body>Not an image</body></html>\n")
    with open(HERE / "corpus.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)

    # Mini eval set in class folders: three near-duplicates of corpus images, three unrelated.
    ev = HERE / "evalset"
    a = images["astronaut"]
    w, h = a.size
    save(a.crop((int(w * 0.03), int(h * 0.03), int(w * 0.97), int(h * 0.97))).resize((224, 224)), ev / "person" / "astronaut_crop.jpg", "jpg")
    save(images["coffee"].filter(ImageFilter.GaussianBlur(1.5)), ev / "food" / "coffee_blur.jpg", "jpg")
    cat = images["chelsea"].copy()
    draw = ImageDraw.Draw(cat)
    draw.text((10, 10), "SAMPLE", fill=(255, 255, 255))
    save(cat, ev / "animal" / "chelsea_text.jpg", "jpg")
    for stem, loader in [("moon", sk.moon), ("page", sk.page), ("colorwheel", sk.colorwheel)]:
        save(to_rgb(loader()), ev / "other" / f"{stem}.jpg", "jpg")


if __name__ == "__main__":
    main()
