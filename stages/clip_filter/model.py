"""CLIP model loading, tokenisation, batched image preprocessing and image–caption scoring.

One :class:`ClipScorer` per (model, weights, device, precision) per worker process, shared by every
stage instance in that process (:func:`get_scorer`). Scoring runs a small producer/consumer pipeline:
a producer thread decodes + preprocesses batch *i+1* and tokenises its captions (on its own CUDA
stream when on a GPU) while the calling thread runs the model on batch *i*.

Two image pipelines, same scoring code:

* ``reference`` — the shared Pillow decode (:func:`curate.pipeline.images.decode_rgb`) + the model's
  own open_clip preprocessing transform. Exactly what ``model.encode_image(preprocess(img))``
  computes for the EXIF-transposed image; the default on CPU.
* ``tensor`` — ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, batched) with a per-image fallback to
  the shared Pillow decode for what it refuses (PNG/WebP/GIF, CMYK/YCCK, Adobe RGB, 12-bit,
  lossless/arithmetic) and for JPEGs with a non-identity EXIF orientation (torchvision ignores it),
  then resize / crop / normalise as batched tensor ops on the device, mirroring the model's
  preprocessing configuration. The default on CUDA. Differences to ``reference`` come from the
  resampler arithmetic (Pillow rounds to 8 bits between its two passes) and, on GPU, from nvJPEG's
  IDCT; see docs/clip.md for measured tolerances.

Both pipelines apply the same decompression-bomb guard and see the same EXIF-transposed pixels as
every other stage (docs/clip.md, "Image decoding").

Heavy modules (torch, torchvision, open_clip, PIL) are imported inside functions so that importing
this module (for config validation) stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
import threading
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from PIL import Image as PILImage

    from curate.pipeline.images import ImageError

log = logging.getLogger("curate.clip")

Precision = Literal["fp32", "bf16", "fp16"]
ImagePipeline = Literal["reference", "tensor"]

MODEL_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names that bring their own weights
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# Bound on the float32 elements one resize call materialises (a chunk of same-sized images).
_RESIZE_CHUNK_ELEMENTS = 1 << 26

# open_clip's root-logger records that repeat what curate reports once (preflight warning or StageError)
_OPEN_CLIP_NOISE = ("No pretrained weights loaded", "Failed to download weights for tag")
# How long the one reachability probe of a weights source may take (no retries: fail fast when offline)
PROBE_TIMEOUT_S = 5.0
# Random-init weights are seeded so that every worker of every run builds the same model
RANDOM_INIT_SEED = 0


@contextlib.contextmanager
def _quiet_model_creation() -> Iterator[None]:
    """Keep open_clip's and the HF hub's log lines out of worker logs while a model is built.

    open_clip logs with module-level `logging.warning()` / `logging.info()` on the root logger: a filter on the
    root drops its records, and a NullHandler keeps those calls from running `basicConfig()` (a second log
    format) on a worker whose root has no handler yet. The hub logs one WARNING per download retry: raised to
    ERROR here, since a failure ends in one ClipModelError anyway.
    """

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(text in record.getMessage() for text in _OPEN_CLIP_NOISE)

    root = logging.getLogger()
    hub = logging.getLogger("huggingface_hub")
    flt, null, hub_level = _Filter(), logging.NullHandler(), hub.level
    root.addFilter(flt)
    root.addHandler(null)
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(hub_level)
        root.removeHandler(null)
        root.removeFilter(flt)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF hub offline mode for this process while cached weights load: no etag request, no retries."""
    import huggingface_hub.constants as hub_constants

    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


class ClipModelError(RuntimeError):
    """The model, its weights or its tokenizer could not be loaded."""


# --------------------------------------------------------------------------------------------
# Device / precision
# --------------------------------------------------------------------------------------------
def is_valid_device(name: str) -> bool:
    return bool(_DEVICE_RE.match(name))


def resolve_device(name: str) -> str:
    """`auto` → `cuda` when a CUDA device is visible, else `cpu`; `cuda` → the current CUDA device.

    `cuda` without an index means the process's current device: with one Dask worker per GPU,
    each started with its own `CUDA_VISIBLE_DEVICES`, that is the worker's GPU.
    """
    if not is_valid_device(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "cpu":
        return "cpu"
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        name = "cuda"
    if not torch.cuda.is_available():
        raise ClipModelError(f"device {name!r} requested but torch sees no CUDA device")
    if name == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    index = int(name.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ClipModelError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) visible")
    return name


def resolve_precision(precision: str, device: str) -> Precision:
    """`auto` → bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision  # type: ignore[return-value]


def looks_like_checkpoint_path(pretrained: str) -> bool:
    """A `pretrained` value naming a file rather than an open_clip tag (tags have no slash/suffix)."""
    if not pretrained:
        return False
    return (
        "/" in pretrained
        or os.sep in pretrained
        or pretrained.lower().endswith(CHECKPOINT_SUFFIXES)
        or os.path.isfile(pretrained)
    )


def is_random_init(model: str, pretrained: str) -> bool:
    """No weights will be loaded: `pretrained` is empty and the model name does not bring its own."""
    return not pretrained and not model.startswith(MODEL_SCHEMAS)


def random_weights_message(model: str) -> str:
    return (f"clip.pretrained is empty: model {model!r} gets RANDOM weights (seeded, the same on every worker), "
            "so clip_score is noise; use this only for tests, benchmarks and the demo")


# --------------------------------------------------------------------------------------------
# Pretrained tags: where their weights come from, whether they are cached here
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TagWeights:
    """The weights file of an open_clip pretrained tag, as open_clip would fetch it."""

    model: str
    tag: str
    hf_repo: str = ""  # set when open_clip downloads from the HF hub
    hf_filename: str = ""
    url: str = ""  # set when it downloads from a plain URL instead
    cached_path: str | None = None  # the local copy open_clip would use without any network access

    @property
    def source(self) -> str:
        return f"huggingface.co/{self.hf_repo}" if self.hf_repo else self.url


def _model_name(model: str) -> str:
    return model.replace("/", "-")  # open_clip accepts ViT-B/32 for ViT-B-32


def pretrained_tags(model: str) -> list[str]:
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(_model_name(model)))


def _hub_candidates(filename: str) -> list[str]:
    # open_clip tries a .safetensors twin before the named file (open_clip.pretrained._get_safe_alternatives)
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def tag_weights(model: str, tag: str, cache_dir: str = "") -> TagWeights | None:
    """Where `tag`'s weights for `model` come from and their cached copy; None if open_clip has no such tag.

    Reads only the local file system (the HF hub cache or open_clip's URL cache), never the network.
    """
    from open_clip import pretrained as oc_pretrained
    from open_clip.constants import HF_WEIGHTS_NAME

    cfg = oc_pretrained.get_pretrained_cfg(_model_name(model), tag)
    if not cfg:
        return None
    if cfg.get("file"):
        path = str(cfg["file"])
        return TagWeights(model, tag, url=path, cached_path=path if os.path.isfile(path) else None)
    if cfg.get("hf_hub") and oc_pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(str(cfg["hf_hub"]))
        filename = filename or HF_WEIGHTS_NAME
        cached = None
        for name in _hub_candidates(filename):
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir or None)
            if isinstance(found, str):  # (not None and not the "known missing" sentinel)
                cached = found
                break
        return TagWeights(model, tag, hf_repo=repo, hf_filename=filename, cached_path=cached)
    url = str(cfg.get("url", ""))
    target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return TagWeights(model, tag, url=url, cached_path=target if os.path.isfile(target) else None)


def cached_tags(model: str, cache_dir: str = "") -> list[str]:
    """The tags of `model` whose weights are already in the cache (file-system lookups only)."""
    tags = []
    for tag in pretrained_tags(model):
        weights = tag_weights(model, tag, cache_dir)
        if weights is not None and weights.cached_path:
            tags.append(tag)
    return tags


def probe_weights(weights: TagWeights, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """One request, no retries: None if the weights' server answers (any HTTP status), else why not."""
    if weights.hf_repo:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        try:
            get_hf_file_metadata(hf_hub_url(weights.hf_repo, weights.hf_filename), timeout=timeout)
        except HfHubHTTPError:
            return None  # the hub answered (a 401/404 is open_clip's to report, with its own message)
        except OfflineModeIsEnabled:
            return "HF_HUB_OFFLINE is set"
        except Exception as err:
            return _one_line(err, limit=80)
        return None
    if not weights.url.startswith(("http://", "https://")):
        return f"{weights.url} does not exist"
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(weights.url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except Exception as err:
        return _one_line(err, limit=80)


def hub_cache_dir(cache_dir: str = "") -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def weights_help(model: str, cache_dir: str = "") -> str:
    """The sentence every 'weights are not available' message ends with."""
    cached = cached_tags(model, cache_dir)
    listed = ", ".join(cached[:3]) + (f" and {len(cached) - 3} more" if len(cached) > 3 else "")
    return (f"Set clip.pretrained to a local checkpoint file (e.g. `clip.pretrained: "
            f"/models/{_model_name(model)}/open_clip_pytorch_model.bin`) or to a tag whose weights are in the "
            f"cache ({hub_cache_dir(cache_dir)}: {f'has {listed}' if cached else 'none there'}).")


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit] + "…"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def load_state_dict(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a local checkpoint safely: `torch.load(weights_only=True)` or safetensors.

    Accepts a bare state_dict or `{"state_dict": ...}` and strips a DataParallel/DDP `module.` prefix.
    `mmap=True` maps the tensors' storage instead of reading it (what `check_checkpoint` needs: names and
    shapes); a checkpoint in torch's legacy (non-zip) format is then read whole.
    """
    import torch

    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        loaded: Any = load_file(path, device="cpu")  # safetensors maps the file itself
    else:
        try:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ClipModelError(_refused_pickle(path, err)) from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise ClipModelError(f"{path}: expected a state_dict (mapping of tensors), got {type(loaded).__name__}")
    if all(isinstance(k, str) and k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return loaded


_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", re.S)
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "Please file an issue")


def _refused_pickle(path: str, err: pickle.UnpicklingError) -> str:
    # torch's message advises weights_only=False, which would run whatever code the file holds: keep only its
    # reason ("Unsupported global: GLOBAL posix.system", "Unsupported operand 110")
    text = str(err)
    found = _UNPICKLER_REASON.search(text)
    if found:
        reason = found.group(1)
    else:  # torch words some refusals without that marker, as a paragraph between its boilerplate ones
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        reason = next((p for p in paragraphs if not p.startswith(_TORCH_BOILERPLATE)), type(err).__name__)
    reason = " ".join(reason.split()).rstrip(".")
    return (f"{path} is not a plain weights checkpoint: torch.load(weights_only=True) refused it "
            f"({reason}). curate never unpickles code: save the model's "
            "state_dict() (torch.save(model.state_dict(), path)) or a .safetensors file")


def checkpoint_mismatch(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a checkpoint's tensors (name -> shape) cannot load into a model whose state_dict has `expected`."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    resized = [f"{k} {tuple(got[k])} vs {tuple(expected[k])}" for k in expected
               if k in got and tuple(got[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if resized:
        parts.append(f"{len(resized)} tensors of another shape (e.g. {'; '.join(resized[:2])}: checkpoint vs model)")
    return ", ".join(parts) or None


def check_checkpoint(model: str, path: str, model_config: str = "") -> None:
    """ClipModelError unless the checkpoint at `path` loads into open_clip model `model`.

    Cheap enough for the client before a run: the model is built on torch's meta device (no memory, no init
    cost) and the checkpoint memory-mapped, so only names and shapes are compared; a worker's full load
    (`_create_from_checkpoint`) applies the same comparison.
    """
    import open_clip
    import torch

    if model_config:
        open_clip.add_model_config(model_config)
    with _quiet_model_creation(), torch.device("meta"):
        expected = open_clip.create_model(model, pretrained=None, device="meta").state_dict()
    try:
        state = load_state_dict(path, mmap=True)
    except ClipModelError:
        raise
    except Exception as err:
        raise ClipModelError(f"cannot read CLIP checkpoint {path}: {_one_line(err)}") from err
    problem = checkpoint_mismatch({k: tuple(v.shape) for k, v in expected.items()},
                                  {k: tuple(getattr(v, "shape", ())) for k, v in state.items()})
    if problem:
        raise ClipModelError(f"checkpoint {path} does not match model {model!r}: {problem}")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
# ASCII text free of '&' (HTML entities) and of control characters other than \t and \n passes
# through ftfy.fix_text and html.unescape unchanged, so the fast path can skip both.
_NEEDS_FULL_CLEAN = re.compile(r"[&\x00-\x08\x0b-\x1f\x7f]")
_WORD_CACHE_LIMIT = 500_000


class FastSimpleTokenizer:
    """Drop-in for open_clip's `SimpleTokenizer` (clean='lower', truncation) with identical output.

    The reference spends most of its time in ftfy and per-byte string joins; for plain ASCII
    captions both are identities, and each word's token ids are memoised. Tests compare it to the
    reference on fuzzed and real captions.
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self.context_length: int = base.context_length
        self._pat = base.pat
        self._encoder: dict[str, int] = base.encoder
        self._byte_encoder: dict[int, str] = base.byte_encoder
        self._sot: int = base.sot_token_id
        self._eot: int = base.eot_token_id
        self._word_ids: dict[str, list[int]] = {}

    @staticmethod
    def supports(tokenizer: Any) -> bool:
        from open_clip import tokenizer as oc_tok

        return (
            type(tokenizer) is oc_tok.SimpleTokenizer
            and tokenizer.reduction_fn is None
            and tokenizer.clean_fn is oc_tok._clean_lower
        )

    def _clean(self, text: str) -> str:
        if text.isascii() and not _NEEDS_FULL_CLEAN.search(text):
            return " ".join(text.split()).lower()
        return self.base.clean_fn(text)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._word_ids
        for word in self._pat.findall(self._clean(text)):
            word_ids = cache.get(word)
            if word_ids is None:
                # printable ASCII maps to itself under CLIP's byte-to-unicode table
                symbols = word if word.isascii() else "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
                word_ids = [self._encoder[piece] for piece in self.base.bpe(symbols).split(" ")]
                if len(cache) >= _WORD_CACHE_LIMIT:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        import torch

        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self._sot, *self.encode(text), self._eot]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self._eot
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    sof_marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, others lossless/arithmetic
    adobe_transform: int | None  # APP14 "Adobe" colour transform flag, None if absent
    app1: bool = False  # an APP1 segment (EXIF or XMP): may carry an orientation tag

    @property
    def gpu_decodable(self) -> bool:
        """What nvJPEG (via torchvision) decodes to correct RGB; everything else goes to Pillow."""
        if self.sof_marker not in (0xC0, 0xC1, 0xC2) or self.precision != 8:
            return False
        if self.components == 1:
            return True
        # 3 components with Adobe transform 0 are stored as RGB, not YCbCr: libjpeg knows, nvJPEG not.
        return self.components == 3 and self.adobe_transform != 0 and self.width > 0 and self.height > 0


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def probe_jpeg(data: bytes) -> JpegHeader | None:
    """Parse JPEG markers up to the scan; None if `data` is not a JPEG with a parseable frame header.

    APP1/APP14 segments count wherever they stand before the scan (decoders read them there too).
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    adobe: int | None = None
    app1 = False
    frame: tuple[int, int, int, int, int] | None = None  # width, height, components, precision, marker
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI / start of scan: no more headers
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            break
        if marker == 0xE1:
            app1 = True
        elif marker == 0xEE and length >= 14 and data[i + 4 : i + 9] == b"Adobe":
            adobe = data[i + 15]
        elif marker in _SOF_MARKERS and frame is None:
            if length < 8:
                return None
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            frame = (width, height, data[i + 9], data[i + 4], marker)
        i += 2 + length
    if frame is None:
        return None
    width, height, components, precision, sof_marker = frame
    return JpegHeader(width, height, components, precision, sof_marker, adobe, app1)


def undecodable_message(err: ImageError) -> str:
    """The row's error message for bytes that do not decode (reason `undecodable` in the stage)."""
    return f"{err.reason}: {err.message}"


def pil_to_uint8_chw(img: PILImage.Image) -> torch.Tensor:
    import torch

    arr = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _pil_decode_one(blob: bytes) -> torch.Tensor | str:
    """The shared Pillow decode (bomb guard, EXIF orientation) as a uint8 CHW tensor, or why not."""
    from curate.pipeline.images import ImageError, decode_rgb

    try:
        return pil_to_uint8_chw(decode_rgb(blob))
    except ImageError as err:
        return undecodable_message(err)


def _needs_shared_decode(blob: bytes, header: JpegHeader) -> bool:
    """Whether a GPU-decodable JPEG must still go through Pillow: torchvision ignores EXIF orientation.

    Raises ImageError when the header fails the shared bomb guard (nvJPEG would allocate it).
    """
    from curate.pipeline.images import check_pixels, open_image

    check_pixels(header.width, header.height, fmt="JPEG")
    # Without an APP1 segment there is no EXIF/XMP orientation: skip the (10x dearer) Pillow header parse.
    return header.app1 and open_image(blob).orientation != 1


# --------------------------------------------------------------------------------------------
# Tensor preprocessing (mirrors open_clip's inference transform)
# --------------------------------------------------------------------------------------------
class TensorPreprocess:
    """open_clip's inference preprocessing as batched tensor ops on uint8 CHW images.

    Follows `open_clip.transform.image_transform(is_train=False)`: `shortest` = resize the short
    side (torchvision `Resize(int)`; `ResizeKeepRatio` for non-square targets) then centre crop;
    `longest` = `ResizeKeepRatio(longest=1)` then centre crop-or-pad with `fill_color`; `squash` =
    resize to the target. Antialiased bicubic/bilinear like Pillow, one separable pass at a time with
    Pillow's rounding to uint8 after each, then `/255` and mean/std normalisation in float32.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        size = cfg.get("size", 224)
        self.out_h, self.out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.resize_mode: str = cfg.get("resize_mode") or "shortest"
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ClipModelError(f"unsupported resize_mode {self.resize_mode!r} in the model's preprocess config")
        interpolation = cfg.get("interpolation") or "bicubic"
        self.interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"
        if self.resize_mode == "shortest" and self.out_h != self.out_w:
            self.interpolation = "bicubic"  # open_clip's ResizeKeepRatio(size) ignores the configured mode
        self.fill = int(cfg.get("fill_color", 0) or 0)
        mean, std = cfg.get("mean"), cfg.get("std")
        self.mean = tuple(float(m) for m in (mean if isinstance(mean, list | tuple) else (mean,) * 3))
        self.std = tuple(float(s) for s in (std if isinstance(std, list | tuple) else (std,) * 3))
        self._norm_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an image of (height, width) is resized to before cropping."""
        if self.resize_mode == "squash":
            return self.out_h, self.out_w
        if self.resize_mode == "shortest" and self.out_h == self.out_w:
            # torchvision's Resize(int): short side to size, long side truncated (not rounded)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.out_h, int(self.out_h * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        longest = 1.0 if self.resize_mode == "longest" else 0.0
        ratio_h, ratio_w = height / self.out_h, width / self.out_w
        ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
        return round(height / ratio), round(width / ratio)

    def _normalizer(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        key = str(device)
        if key not in self._norm_cache:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
            self._norm_cache[key] = (mean, std)
        return self._norm_cache[key]

    def __call__(self, images: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
        """uint8 CHW RGB images (any sizes, on `device`) → float32 [N, 3, H, W] model input."""
        import torch
        import torch.nn.functional as F
        from open_clip.transform import center_crop_or_pad

        device = torch.device(device)
        out = torch.empty((len(images), 3, self.out_h, self.out_w), dtype=torch.float32, device=device)
        mean255, std255 = self._normalizer(device)
        groups: dict[tuple[int, int], list[int]] = {}
        for idx, img in enumerate(images):
            groups.setdefault((int(img.shape[-2]), int(img.shape[-1])), []).append(idx)
        for (height, width), members in groups.items():
            new_h, new_w = self.resized_size(height, width)
            per_chunk = max(1, _RESIZE_CHUNK_ELEMENTS // (3 * max(height * width, new_h * new_w)))
            for start in range(0, len(members), per_chunk):
                chunk = members[start : start + per_chunk]
                batch = torch.stack([images[i] for i in chunk]).to(device=device, dtype=torch.float32)
                # Pillow resamples horizontally then vertically, rounding to uint8 after each pass; doing the
                # same keeps bicubic overshoot at hard edges within ~1 level of it (one pass: up to ~13)
                if new_w != width:
                    batch = F.interpolate(
                        batch, size=(height, new_w), mode=self.interpolation, align_corners=False, antialias=True
                    ).clamp_(0.0, 255.0).round_()
                if new_h != height:
                    batch = F.interpolate(
                        batch, size=(new_h, new_w), mode=self.interpolation, align_corners=False, antialias=True
                    ).clamp_(0.0, 255.0).round_()
                if self.resize_mode != "squash":
                    batch = center_crop_or_pad(batch, [self.out_h, self.out_w], fill=self.fill)
                index = torch.tensor(chunk, device=device)
                out.index_copy_(0, index, (batch - mean255) / std255)
        return out


# --------------------------------------------------------------------------------------------
# Model bundle and scoring
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Everything that selects one loaded model; the key of the per-process cache."""

    model: str
    pretrained: str = ""
    model_config: str = ""
    cache_dir: str = ""
    device: str = "cpu"  # resolved: cpu | cuda:N
    precision: Precision = "fp32"
    compile: bool = False


@dataclass
class PairScores:
    """Result of :meth:`ClipScorer.score_pairs` for n pairs."""

    scores: np.ndarray  # float32 [n], NaN where not scored
    errors: dict[int, str]  # pair index -> why its image could not be decoded
    image_embeddings: np.ndarray | None = None  # float16 [n, d], L2-normalised, zeros where not scored
    text_embeddings: np.ndarray | None = None
    counters: Counter[str] = field(default_factory=Counter)


@dataclass
class _Prepared:
    start: int
    ok: np.ndarray  # absolute pair indices that have pixels, in order
    pixels: torch.Tensor | None
    tokens: torch.Tensor | None
    errors: dict[int, str]
    counters: Counter[str]


def _create_model(spec: ModelSpec) -> Any:
    """The open_clip model of `spec` on the CPU, or ClipModelError saying in one paragraph what to change."""
    try:
        with _quiet_model_creation():
            return _create_quietly(spec)
    except ClipModelError:
        raise
    except Exception as err:
        raise ClipModelError(f"cannot load open_clip model {spec.model!r} "
                             f"({spec.pretrained or 'random init'}): {_one_line(err)}") from err


def _create_quietly(spec: ModelSpec) -> Any:
    import open_clip
    import torch

    cache_dir = spec.cache_dir or None
    if spec.model.startswith(MODEL_SCHEMAS):  # the weights come with the model (`pretrained` is ignored)
        return open_clip.create_model(spec.model, device="cpu", cache_dir=cache_dir)
    if not spec.pretrained:
        # fixed seed, own RNG state: every worker of every run builds the same random model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return open_clip.create_model(spec.model, pretrained=None, device="cpu", cache_dir=cache_dir)
    if looks_like_checkpoint_path(spec.pretrained):
        return _create_from_checkpoint(spec)
    weights = tag_weights(spec.model, spec.pretrained, spec.cache_dir)
    if weights is None:
        tags = pretrained_tags(spec.model)
        raise ClipModelError(f"{spec.pretrained!r} is not an open_clip pretrained tag of model {spec.model!r} "
                             f"(known tags: {', '.join(tags) or 'none'}). {weights_help(spec.model, spec.cache_dir)}")
    try:
        if weights.cached_path:
            with _hub_offline():  # cached: load it without asking the hub anything
                return open_clip.create_model(spec.model, pretrained=spec.pretrained, device="cpu", cache_dir=cache_dir)
        unreachable = probe_weights(weights)
        if unreachable:
            raise ClipModelError(
                f"cannot load CLIP weights {spec.pretrained!r} for model {spec.model!r}: they are not in the cache "
                f"and {weights.source} is unreachable ({unreachable}). {weights_help(spec.model, spec.cache_dir)}")
        return open_clip.create_model(spec.model, pretrained=spec.pretrained, device="cpu", cache_dir=cache_dir)
    except ClipModelError:
        raise
    except Exception as err:
        raise ClipModelError(
            f"cannot load CLIP weights {spec.pretrained!r} for model {spec.model!r} from {weights.source}: "
            f"{_one_line(err)}. {weights_help(spec.model, spec.cache_dir)}") from err


def _create_from_checkpoint(spec: ModelSpec) -> Any:
    import open_clip

    model = open_clip.create_model(spec.model, pretrained=None, device="cpu", cache_dir=spec.cache_dir or None)
    try:
        state = load_state_dict(spec.pretrained)
    except ClipModelError:
        raise
    except Exception as err:
        raise ClipModelError(f"cannot read CLIP checkpoint {spec.pretrained}: {_one_line(err)}") from err
    problem = checkpoint_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                  {k: tuple(getattr(v, "shape", ())) for k, v in state.items()})
    if problem:
        raise ClipModelError(f"checkpoint {spec.pretrained} does not match model {spec.model!r}: {problem}")
    model.load_state_dict(state)
    return model


class ClipScorer:
    """A loaded open_clip model with its preprocessing and tokenizer, scoring image–caption pairs."""

    def __init__(self, spec: ModelSpec, decode_workers: int = 0) -> None:
        import open_clip
        import torch
        from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

        self.spec = spec
        self.device = torch.device(spec.device)
        self.is_cuda = self.device.type == "cuda"
        if spec.model_config:
            open_clip.add_model_config(spec.model_config)
        self.random_init = is_random_init(spec.model, spec.pretrained)
        cache_dir = spec.cache_dir or None
        model = _create_model(spec)
        if self.random_init:
            # the run's one warning comes from the client (ClipFilterStage.preflight), not from every worker
            log.debug(random_weights_message(spec.model))
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)
        if self.is_cuda and spec.precision == "fp32":
            # "fp32" is the reference mode: keep cuDNN convolutions (patch embedding) out of TF32
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.preprocess_cfg: dict[str, Any] = dict(open_clip.get_model_preprocess_cfg(model))
        pp_cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), self.preprocess_cfg))
        self.reference_transform: Callable[[Any], torch.Tensor] = image_transform_v2(pp_cfg, is_train=False)
        self.tensor_preprocess = TensorPreprocess(self.preprocess_cfg)
        with _quiet_model_creation():
            base_tokenizer = open_clip.get_tokenizer(spec.model, cache_dir=cache_dir)
        self.reference_tokenizer = base_tokenizer
        self.tokenizer: Callable[[Sequence[str]], torch.Tensor] = (
            FastSimpleTokenizer(base_tokenizer) if FastSimpleTokenizer.supports(base_tokenizer) else base_tokenizer
        )
        self.embed_dim = int(self._infer_embed_dim())
        self._encode_image: Callable[[torch.Tensor], torch.Tensor] = self.model.encode_image
        self._encode_text: Callable[[torch.Tensor], torch.Tensor] = self.model.encode_text
        self._compile_batch = 0  # the batch size compiled graphs are specialised on
        if spec.compile:
            self._encode_image = torch.compile(self.model.encode_image, dynamic=False)
            self._encode_text = torch.compile(self.model.encode_text, dynamic=False)
        workers = decode_workers or min(8, os.cpu_count() or 1)
        self.decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="clip-decode")
        self._producer = ThreadPoolExecutor(1, thread_name_prefix="clip-prefetch")
        self._token_pool = ThreadPoolExecutor(1, thread_name_prefix="clip-tokenize")
        self._side_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self._lock = threading.Lock()  # one score_pairs at a time per model (GPU memory, streams)

    def _infer_embed_dim(self) -> int:
        import torch

        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        with torch.inference_mode():
            tokens = self.tokenizer(["a"]).to(self.device)
            return int(self.model.encode_text(tokens).shape[-1])

    # -- precision ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.spec.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # -- single-purpose helpers (also used by tests and the benchmark) -----------------------
    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    def encode(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 image and text features for device tensors."""
        import torch
        import torch.nn.functional as F

        n = pixels.shape[0]
        batch = self._pad_for_compile(pixels), self._pad_for_compile(tokens)
        with torch.inference_mode(), self.autocast():
            image_features = self._encode_image(batch[0])[:n]
            text_features = self._encode_text(batch[1])[:n]
        return F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1)

    def _pad_for_compile(self, x: torch.Tensor) -> torch.Tensor:
        # compiled graphs are specialised on shape: pad partial batches to a size seen before
        if not self.spec.compile or self._compile_batch == 0 or x.shape[0] == self._compile_batch:
            return x
        import torch

        pad = self._compile_batch - x.shape[0]
        if pad < 0:
            return x
        return torch.cat([x, x[:1].expand(pad, *x.shape[1:])])

    # -- image pipelines ---------------------------------------------------------------------
    def reference_pixels(self, blob: bytes) -> torch.Tensor:
        """`preprocess(decode_rgb(blob))`: the model's own transform (CPU tensor) of the shared decode."""
        from curate.pipeline.images import decode_rgb

        return self.reference_transform(decode_rgb(blob))

    def _reference_batch(self, blobs: Sequence[bytes]) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        from curate.pipeline.images import ImageError

        def one(blob: bytes) -> torch.Tensor | str:
            try:
                return self.reference_pixels(blob)
            except ImageError as err:
                return undecodable_message(err)

        results = list(self.decode_pool.map(one, blobs))
        errors = {i: r for i, r in enumerate(results) if isinstance(r, str)}
        return [r if not isinstance(r, str) else None for r in results], errors

    def decode_tensors(
        self, blobs: Sequence[bytes], counters: Counter[str]
    ) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        """uint8 CHW RGB tensors on the device: nvJPEG/libjpeg for plain JPEGs, Pillow for the rest.

        EXIF-oriented JPEGs take the Pillow path too, so both paths see the same (transposed) pixels.
        """
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        from curate.pipeline.images import ImageError

        images: list[torch.Tensor | None] = [None] * len(blobs)
        errors: dict[int, str] = {}
        jpeg_idx: list[int] = []
        pil_idx: list[int] = []
        for i, blob in enumerate(blobs):
            header = probe_jpeg(blob) if blob else None
            if header is None or not header.gpu_decodable:
                pil_idx.append(i)
                continue
            try:
                if _needs_shared_decode(blob, header):
                    counters["decode_exif_oriented"] += 1
                    pil_idx.append(i)
                    continue
            except ImageError as err:
                errors[i] = undecodable_message(err)
                continue
            jpeg_idx.append(i)
        # Pillow work for the non-JPEG images overlaps with the JPEG decode below
        pil_futures = [self.decode_pool.submit(_pil_decode_one, blobs[i]) for i in pil_idx]

        if jpeg_idx:
            # one contiguous host buffer; every image is a view into it (decode_jpeg wants CPU input)
            sizes = [len(blobs[i]) for i in jpeg_idx]
            flat = torch.frombuffer(bytearray(b"".join(blobs[i] for i in jpeg_idx)), dtype=torch.uint8)
            views = list(torch.split(flat, sizes))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates io decoders
                decoded = self._decode_jpegs(views, decode_jpeg, ImageReadMode.RGB, counters)
            for i, img in zip(jpeg_idx, decoded, strict=True):
                if img is not None:
                    images[i] = img
                    counters["decode_jpeg_" + ("nvjpeg" if self.is_cuda else "libjpeg")] += 1
                    continue
                counters["decode_jpeg_refused"] += 1  # e.g. a corrupt scan the header probe cannot see
                fallback = _pil_decode_one(blobs[i])
                if isinstance(fallback, str):
                    errors[i] = fallback
                else:
                    images[i] = fallback.to(self.device)
                    counters["decode_pillow"] += 1

        for i, pil_future in zip(pil_idx, pil_futures, strict=True):
            pil_result = pil_future.result()
            if isinstance(pil_result, str):
                errors[i] = pil_result
                continue
            images[i] = pil_result.pin_memory().to(self.device, non_blocking=True) if self.is_cuda else pil_result
            counters["decode_pillow"] += 1
        return images, errors

    def _decode_jpegs(
        self, views: list[torch.Tensor], decode_jpeg: Any, mode: Any, counters: Counter[str]
    ) -> list[torch.Tensor | None]:
        if self.is_cuda:
            try:
                return list(decode_jpeg(views, mode=mode, device=self.device))
            except RuntimeError:
                # the batched call returns nothing if any image fails: retry one by one
                counters["nvjpeg_batch_retry"] += 1

        def one(view: torch.Tensor) -> torch.Tensor | None:
            try:
                return decode_jpeg(view, mode=mode, device=self.device)
            except RuntimeError:
                return None

        if self.is_cuda:
            return [one(v) for v in views]
        return list(self.decode_pool.map(one, views))

    def preprocess(
        self, blobs: Sequence[bytes], pipeline: ImagePipeline, counters: Counter[str] | None = None
    ) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
        """Model input for `blobs` on the device: (pixels [k,3,H,W], indices of the k decoded, errors)."""
        import torch

        counters = counters if counters is not None else Counter()
        if pipeline == "reference":
            per_image, errors = self._reference_batch(blobs)
            ok = [i for i, t in enumerate(per_image) if t is not None]
            if not ok:
                return None, ok, errors
            pixels = torch.stack([per_image[i] for i in ok])  # type: ignore[misc]
            if self.is_cuda:
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            counters["decode_pillow"] += len(ok)
            return pixels, ok, errors
        images, errors = self.decode_tensors(blobs, counters)
        ok = [i for i, t in enumerate(images) if t is not None]
        if not ok:
            return None, ok, errors
        return self.tensor_preprocess([images[i] for i in ok], self.device), ok, errors  # type: ignore[misc]

    # -- the pipeline ------------------------------------------------------------------------
    def _prepare(
        self, start: int, blobs: Sequence[bytes], captions: Sequence[str], pipeline: ImagePipeline
    ) -> _Prepared:
        import torch

        counters: Counter[str] = Counter()
        token_future = self._token_pool.submit(self.tokenize, captions)
        stream_ctx = torch.cuda.stream(self._side_stream) if self._side_stream is not None else contextlib.nullcontext()
        with stream_ctx:
            pixels, ok_local, local_errors = self.preprocess(blobs, pipeline, counters)
            tokens = token_future.result()
            tokens = tokens[torch.as_tensor(ok_local, dtype=torch.long)] if ok_local else None
            if tokens is not None and self.is_cuda:
                tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        if self._side_stream is not None:
            self._side_stream.synchronize()  # blocks only this producer thread
        errors = {start + i: msg for i, msg in local_errors.items()}
        ok = np.asarray(ok_local, dtype=np.int64) + start
        return _Prepared(start, ok, pixels, tokens, errors, counters)

    def score_pairs(
        self,
        images: Sequence[bytes],
        captions: Sequence[str],
        *,
        batch_size: int,
        pipeline: ImagePipeline = "reference",
        embeddings: bool = False,
        prefetch: int = 2,
    ) -> PairScores:
        """Cosine similarity of each image with its caption (normalised embeddings, fp32 dot product)."""
        import torch

        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        n = len(images)
        result = PairScores(scores=np.full(n, np.nan, dtype=np.float32), errors={})
        if embeddings:
            result.image_embeddings = np.zeros((n, self.embed_dim), dtype=np.float16)
            result.text_embeddings = np.zeros((n, self.embed_dim), dtype=np.float16)
        if self.spec.compile and self._compile_batch == 0:
            self._compile_batch = batch_size
        starts: Iterator[int] = iter(range(0, n, batch_size))
        pending: deque[Future[_Prepared]] = deque()

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                stop = min(n, start + batch_size)
                pending.append(self._producer.submit(
                    self._prepare, start, images[start:stop], captions[start:stop], pipeline))

        with self._lock:
            try:
                for _ in range(max(1, prefetch)):
                    submit_next()
                while pending:
                    prepared = pending.popleft().result()
                    submit_next()
                    result.errors.update(prepared.errors)
                    result.counters.update(prepared.counters)
                    if prepared.pixels is None or prepared.tokens is None:
                        continue
                    if self.is_cuda:
                        # made on the side stream, consumed here: keep the allocator from reusing them early
                        current = torch.cuda.current_stream(self.device)
                        prepared.pixels.record_stream(current)
                        prepared.tokens.record_stream(current)
                    image_features, text_features = self.encode(prepared.pixels, prepared.tokens)
                    scores = (image_features * text_features).sum(dim=-1)
                    result.scores[prepared.ok] = scores.cpu().numpy()
                    if embeddings:
                        assert result.image_embeddings is not None and result.text_embeddings is not None
                        result.image_embeddings[prepared.ok] = image_features.half().cpu().numpy()
                        result.text_embeddings[prepared.ok] = text_features.half().cpu().numpy()
                    result.counters["scored"] += len(prepared.ok)
            finally:
                for future in pending:
                    future.cancel()
                for future in pending:
                    if not future.cancelled():
                        with contextlib.suppress(Exception):
                            future.result()
        return result

    def close(self) -> None:
        self._producer.shutdown(wait=True)
        self._token_pool.shutdown(wait=True)
        self.decode_pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# Per-process cache
# --------------------------------------------------------------------------------------------
_SCORERS: dict[ModelSpec, ClipScorer] = {}
_SCORERS_LOCK = threading.Lock()


def get_scorer(spec: ModelSpec, decode_workers: int = 0) -> ClipScorer:
    """The process-wide scorer for `spec`, loading it on first use (thread-safe)."""
    with _SCORERS_LOCK:
        scorer = _SCORERS.get(spec)
        if scorer is None:
            scorer = _SCORERS[spec] = ClipScorer(spec, decode_workers=decode_workers)
        return scorer


def clear_scorers() -> None:
    """Drop every cached model (tests; freeing GPU memory)."""
    with _SCORERS_LOCK:
        for scorer in _SCORERS.values():
            scorer.close()
        _SCORERS.clear()


def stable_key_hash32(keys: Sequence[str]) -> np.ndarray:
    """uint32 per key from blake2b: a tie-breaker that does not depend on partitioning or PYTHONHASHSEED."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=4).digest(), "big") for k in keys),
        dtype=np.uint64,
        count=len(keys),
    )


def score_sort_keys(scores: np.ndarray, keys: Sequence[str]) -> np.ndarray:
    """uint64 that orders rows by (score, key hash): float32 bits made monotonic in the high half.

    NaN sorts lowest. Used to pick exactly the top k rows across partitions with ties broken
    deterministically.
    """
    scores = np.asarray(scores, dtype=np.float32)
    bits = scores.view(np.uint32).astype(np.uint64)
    negative = (bits & 0x80000000) != 0
    ordered = np.where(negative, (~bits) & 0xFFFFFFFF, bits | 0x80000000)
    ordered = np.where(np.isnan(scores), 0, ordered).astype(np.uint64)
    return (ordered << np.uint64(32)) | stable_key_hash32(keys)

