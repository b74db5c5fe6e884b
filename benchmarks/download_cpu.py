"""COMPONENT benchmark: CPU per image of the download stage's steps, next to img2dataset's resizer.

Not the user's path (see benchmarks/e2e_vs_img2dataset.py for `curate run` against img2dataset): this
splits one image's CPU into its steps so that the avoidable ones show. Same real JPEGs for both sides:
crops of the bundled scikit-image photos (configs/demo/images) rescaled to 300-1,200 px, JPEG q75-95.

Steps timed per image (CPU seconds of this process, best of `--repeats`, one thread):

* curate: header + bomb check (`open_image`), JPEG decode (with DCT-scaled draft decoding as the stage
  does it, and without), resize, encode, the whole `process_image`, `original_exif`, sha256, and the
  HTTP client: `Fetcher.fetch` against a loopback server in another process (so only the client's CPU
  counts), and the one-decode pHash `from_pixels` the dedup stage asks of every image;
* img2dataset: its own `Resizer` (decode, resize, encode; OpenCV) run in its virtualenv
  (`--i2d-python`, default /work/i2d-venv/bin/python) on the same bytes.

Resize settings as the end-to-end benchmark: keep_ratio 256, not only if bigger, JPEG q95, area
downscale / lanczos upscale. Results: benchmarks/results/download_cpu.json.

    python benchmarks/download_cpu.py [--images 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "download_cpu.json"

_I2D_SCRIPT = r"""
import io, json, sys, time, os
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import cv2
cv2.setNumThreads(1)
from img2dataset.resizer import Resizer
paths = json.loads(sys.argv[1]); repeats = int(sys.argv[2])
datas = [open(p, "rb").read() for p in paths]
resizer = Resizer(image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=False)
best = 1e9
for _ in range(repeats):
    t = time.process_time()
    for d in datas:
        out = resizer(io.BytesIO(d))
        assert out[-1] is None, out[-1]
    best = min(best, time.process_time() - t)
print(json.dumps({"resizer_ms": best / len(datas) * 1000}))
"""


def make_images(count: int, folder: Path, seed: int = 0) -> list[Path]:
    """`count` distinct real-photo JPEGs, 300-1,200 px on the long side."""
    from PIL import Image

    rng = random.Random(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted((REPO / "configs" / "demo" / "images").glob("*.jpg"))]
    paths = []
    for i in range(count):
        img = rng.choice(sources)
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((left, top, left + cw, top + ch))
        scale = rng.randint(300, 1200) / max(crop.size)
        crop = crop.resize((max(1, int(crop.width * scale)), max(1, int(crop.height * scale))), Image.Resampling.LANCZOS)
        path = folder / f"{i:05d}.jpg"
        crop.save(path, "JPEG", quality=rng.randint(75, 95))
        paths.append(path)
    return paths


def best_ms(fn: Callable[[Any], object], items: list[Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        best = min(best, time.process_time() - start)
    return best / len(items) * 1000


def curate_steps(paths: list[Path], repeats: int) -> dict[str, float]:
    from PIL import Image

    from curate.pipeline.images import open_image
    from curate.stages.download.resize import (
        _FILTERS,
        ImageSpec,
        _encode,
        _planned_size,
        original_exif,
        process_image,
    )

    spec = ImageSpec(resize_mode="keep_ratio", image_size=256, resize_only_if_bigger=False)
    datas = [p.read_bytes() for p in paths]
    shrink = _FILTERS[spec.downscale_interpolation]  # the stage's filter and draft margin, at their defaults

    def decode(draft: bool) -> Callable[[bytes], Image.Image]:
        def run(data: bytes) -> Image.Image:
            opened = open_image(data)
            planned = _planned_size(*opened.size, spec)
            if draft and planned is not None and planned[0] < opened.size[0]:
                opened.draft((math.ceil(planned[0] * spec.draft_margin), math.ceil(planned[1] * spec.draft_margin)))
            return opened.decode()
        return run

    drafted = [decode(True)(d) for d in datas]
    resized = [img.resize(_planned_size(*img.size, spec) or img.size, shrink) for img in drafted]
    processed = [process_image(d, spec) for d in datas]
    return {
        "open_header_ms": best_ms(open_image, datas, repeats),
        "decode_full_ms": best_ms(decode(False), datas, repeats),
        "decode_draft_ms": best_ms(decode(True), datas, repeats),
        "resize_ms": best_ms(lambda img: img.resize(_planned_size(*img.size, spec) or img.size, shrink),
                             drafted, repeats),
        "encode_ms": best_ms(lambda img: _encode(img, spec), resized, repeats),
        "process_image_ms": best_ms(lambda d: process_image(d, spec), datas, repeats),
        "original_exif_ms": best_ms(original_exif, datas, repeats),
        "sha256_ms": best_ms(lambda d: hashlib.sha256(d).hexdigest(), [p.data for p in processed], repeats),
        "drafted_share": sum(1 for a, b in zip(drafted, datas, strict=True) if a.size != Image.open(io.BytesIO(b)).size)
        / len(datas),
    }


def phash_from_pixels_ms(paths: list[Path], repeats: int) -> float:
    from curate.pipeline.stage import RunContext
    from curate.stages.download.resize import ImageSpec, process_image
    from curate.stages.phash_dedup.stage import DedupConfig, PhashDedupStage

    spec = ImageSpec(resize_mode="keep_ratio", image_size=256, resize_only_if_bigger=False)
    with tempfile.TemporaryDirectory() as tmp:
        stage = PhashDedupStage(DedupConfig(), RunContext(output_path=tmp, work_path=tmp))
        stage.ensure_setup()
        pixels = [process_image(p.read_bytes(), spec).pixels for p in paths]
        return best_ms(stage.from_pixels, pixels, repeats)


def fetch_ms(paths: list[Path], repeats: int) -> float:
    """Client CPU per fetch: the server runs in another process."""
    from curate.stages.download.fetch import Fetcher
    from curate.stages.download.stage import DownloadConfig

    serve = (
        f"import sys, time; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from faultserver import FaultServer, Respond\n"
        "routes = {f'/{i}': Respond(open(p, 'rb').read()) for i, p in enumerate(sys.argv[1:])}\n"
        "with FaultServer(routes, max_connections=4096) as s:\n"
        "    print(s.port, flush=True); time.sleep(600)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", serve, *map(str, paths)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        fetcher = Fetcher(DownloadConfig(allowed_networks=("127.0.0.1/32",), retries=0).fetch_options())
        urls = [f"http://127.0.0.1:{port}/{i}" for i in range(len(paths))]
        try:
            return best_ms(fetcher.fetch, urls, repeats)
        finally:
            fetcher.close()
    finally:
        server.kill()


def img2dataset_ms(paths: list[Path], repeats: int, python: str) -> float | None:
    if not Path(python).exists():
        print(f"img2dataset venv missing ({python}): python -m venv /work/i2d-venv && "
              "/work/i2d-venv/bin/pip install img2dataset", file=sys.stderr)
        return None
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([python, "-c", _I2D_SCRIPT, json.dumps([str(p) for p in paths]), str(repeats)],
                         capture_output=True, text=True, env=env, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["resizer_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--i2d-python", default="/work/i2d-venv/bin/python")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(args.images, Path(tmp))
        curate = curate_steps(paths, args.repeats)
        curate["phash_from_pixels_ms"] = phash_from_pixels_ms(paths, args.repeats)
        curate["fetch_client_ms"] = fetch_ms(paths, args.repeats)
        i2d = img2dataset_ms(paths, args.repeats, args.i2d_python)
    result = {
        "benchmark": "download_cpu (component: per-image CPU by step, not the user's path)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "note": "2-core sandbox shared with other jobs: CPU time (best of repeats), not wall",
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "setup": {"images": args.images, "repeats": args.repeats, "resize": "keep_ratio 256, not only if bigger, q95"},
        "curate_ms_per_image": {k: round(v, 4) for k, v in curate.items()},
        "img2dataset_resizer_ms_per_image": None if i2d is None else round(i2d, 4),
    }
    if i2d is not None:
        result["ratio_img2dataset_resizer_over_curate_process_image"] = round(i2d / curate["process_image_ms"], 3)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
