"""clip_filter stage: score every image–caption pair with an open_clip model and filter on it.

Adds `clip_score` (float32 cosine similarity of the L2-normalised image and text embeddings, the
quantity LAION thresholded at 0.28 for ViT-B/32 and DataComp ranks on) to every scored row, and
optionally `image_embedding` / `text_embedding` (list<float16>, L2-normalised) for downstream
semantic dedup. Two decision modes:

* `clip.threshold` (single pass): reject rows scoring below it (`low_clip_score`).
* `clip.top_fraction` (two passes): score every partition first, pick the global cut-off that keeps
  exactly that fraction of scored rows (ties broken by a stable hash of the key), then filter the
  stored scores — nothing is re-encoded.

Rows turned down here: `no_caption` (rejected: empty/missing caption, nothing to compare with),
`undecodable` (failed: the image bytes cannot be decoded), `low_clip_score` (rejected).
Model code lives in :mod:`curate.stages.clip_filter.model`; see docs/clip.md.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from curate.pipeline import columns as C
from curate.pipeline.configspec import ConfigError, option
from curate.pipeline.stage import Resources, Stage, StageError
from curate.stages.clip_filter.model import (
    MODEL_SCHEMAS,
    ClipModelError,
    ClipScorer,
    ModelSpec,
    check_checkpoint,
    get_scorer,
    hub_cache_dir,
    is_random_init,
    is_valid_device,
    log,
    looks_like_checkpoint_path,
    pretrained_tags,
    probe_weights,
    random_weights_message,
    resolve_device,
    resolve_precision,
    score_sort_keys,
    tag_weights,
    weights_help,
)

CLIP_SCORE = "clip_score"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"

REASON_NO_CAPTION = "no_caption"
REASON_UNDECODABLE = "undecodable"
REASON_LOW_SCORE = "low_clip_score"

CUDA_DEFAULT_BATCH = 1024
CPU_DEFAULT_BATCH = 64


@dataclass(frozen=True)
class ClipConfig:
    enabled: bool = option(True, help="Run the CLIP similarity filter.")
    model: str = option(
        "ViT-B-32",
        help="open_clip model name (e.g. ViT-B-32, ViT-L-14), or `hf-hub:org/repo` / `local-dir:/path` "
        "(then `pretrained` is ignored).",
    )
    model_config: str = option(
        "", help="Extra open_clip model config JSON to register first (its file stem becomes a model name).", path=True
    )
    pretrained: str = option(
        "laion2b_s34b_b79k",
        help="open_clip pretrained tag (downloaded from the HF hub into `cache_dir`), or a local checkpoint "
        "path (.pt/.pth/.bin via torch.load(weights_only=True), or .safetensors; a bare state_dict or "
        "{'state_dict': ...}, `module.` prefix stripped; a relative path that exists next to the config file "
        "resolves there, else against the working directory); '' = random init, seeded (one warning per run; "
        "tests, benchmarks and the demo only). Offline, a tag must already be in the cache: `curate validate` "
        "checks it.",
        path="if_exists",
    )
    cache_dir: str = option(
        "", help="Where open_clip caches downloaded weights ('' = the HF hub default cache).", path=True
    )
    device: str = option(
        "auto",
        help="`auto` (CUDA if visible, else CPU), `cpu`, `cuda` (the worker's current GPU: one worker per GPU) "
        "or `cuda:N`. Resolved on the machine that builds the run: set `cuda` when only remote workers have GPUs.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", help="Encoder precision: `auto` = bf16 autocast on CUDA, fp32 on CPU. fp32 is the reference."
    )
    batch_size: int = option(
        0, help=f"Pairs per model call (0 = {CUDA_DEFAULT_BATCH} on CUDA, {CPU_DEFAULT_BATCH} on CPU).", range=(0, None)
    )
    preprocess: Literal["auto", "reference", "tensor"] = option(
        "auto",
        help="Image pipeline: `reference` = Pillow decode + the model's own transform (exact); `tensor` = "
        "torchvision decode_jpeg (nvJPEG on CUDA, Pillow fallback per image) + batched resize/normalise on the "
        "device (scores within ~1e-2 of reference). `auto` = tensor on CUDA, reference on CPU.",
    )
    decode_workers: int = option(
        0, help="Threads decoding images with Pillow per worker (0 = min(8, CPU cores)).", range=(0, None)
    )
    cpu_threads: int = option(
        0, help="torch intra-op threads per worker process on CPU (0 = leave torch's default).", range=(0, None)
    )
    compile: bool = option(False, help="torch.compile the encoders (slow first batch; partial batches are padded).")
    threshold: float = option(
        0.28,
        help="Reject rows whose image-caption cosine similarity is below this (LAION used 0.28 with ViT-B/32). "
        "Ignored when `top_fraction` is set.",
        range=(-1, 1),
    )
    top_fraction: float | None = option(
        None,
        help="Instead of threshold: keep this fraction of scored rows with the highest score, run-wide (two "
        "passes; DataComp's CLIP-score baseline keeps 0.3).",
        range=(0, 1),
        open_low=True,
    )
    save_embeddings: bool = option(
        False,
        help="Also output L2-normalised float16 `image_embedding` and `text_embedding` per row "
        "(written to embeddings/part-*.parquet with the key, for semantic dedup).",
    )

    def validate(self, key_path: str) -> None:
        if not self.model:
            raise ConfigError(f"{key_path}.model", "must name an open_clip model, e.g. ViT-B-32")
        if not is_valid_device(self.device):
            raise ConfigError(f"{key_path}.device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.model_config and "://" not in self.model_config and not os.path.isfile(self.model_config):
            raise ConfigError(f"{key_path}.model_config", f"no such file: {self.model_config}")
        if "://" in self.pretrained:
            raise ConfigError(f"{key_path}.pretrained", "expected an open_clip tag or a local checkpoint path, not a URL")
        if (
            not self.model.startswith(MODEL_SCHEMAS)
            and looks_like_checkpoint_path(self.pretrained)
            and not os.path.isfile(self.pretrained)
        ):
            raise ConfigError(f"{key_path}.pretrained", f"checkpoint file not found: {self.pretrained}")


@dataclass(frozen=True)
class ClipDecision:
    """The run-wide decision of a two-pass run (small and picklable)."""

    scored: int  # rows with a score, run-wide
    keep: int  # rows the decision keeps (exactly, unless sort keys collide)
    sort_key_cutoff: int | None  # keep rows whose score_sort_keys() >= this; None = keep none
    score_cutoff: float  # the lowest kept score (for messages and logs)


class ClipFilterStage(Stage[ClipConfig]):
    name = "clip_filter"
    config_class = ClipConfig
    reason_hints = {
        REASON_LOW_SCORE: "check clip.pretrained (random weights score noise), then clip.threshold (LAION-400M "
                          "used 0.28 with ViT-B/32), or keep a share with clip.top_fraction",
    }
    requires = (C.IMAGE, C.CAPTION)
    adds = (pa.field(CLIP_SCORE, pa.float32()),)

    def __init__(self, config: ClipConfig, context: Any) -> None:
        super().__init__(config, context)
        self.counters: Counter[str] = Counter()
        self._device: str | None = None
        self._scorer: ClipScorer | None = None

    def __getstate__(self) -> dict[str, Any]:
        # shipped to Dask workers before or after setup: the model (threads, CUDA state) never travels
        state = self.__dict__.copy()
        state["_scorer"] = None
        state["_is_set_up"] = False
        return state

    # -- configuration-derived facts ---------------------------------------------------------
    @classmethod
    def run_wide(cls, config: ClipConfig) -> bool:
        """top_fraction needs every score before deciding anything."""
        return config.top_fraction is not None

    @classmethod
    def resources(cls, config: ClipConfig) -> Resources:
        """A GPU wherever the cluster offers one, unless `clip.device` pins the CPU."""
        return Resources(cpu_threads=max(1, config.cpu_threads), gpus=0 if config.device == "cpu" else 1)

    @classmethod
    def report_parts(cls, section: dict[str, Any]) -> Any:
        from curate.pipeline.report import ColumnMetric, ReportParts, value_facts

        note = "image-caption cosine similarity of the run's CLIP model"
        if section.get("pretrained") == "" and is_random_init(str(section.get("model", "")), ""):
            note = "RANDOM CLIP weights (clip.pretrained is empty): scores are noise"
        metric = ColumnMetric("CLIP score", "cosine similarity", (CLIP_SCORE,), integer=False,
                              clip_upper_quantile=None, note=note)
        if section.get("enabled", True) and section.get("top_fraction") is None and "threshold" in section:
            metric.markers.append((float(section["threshold"]), f"threshold {float(section['threshold']):g}"))
        labels = ((CLIP_SCORE, "CLIP"),)
        return ReportParts(metrics=(metric,), columns=(CLIP_SCORE,), facts=lambda row: value_facts(row, labels))

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    @property
    def batch_size(self) -> int:
        if self.config.batch_size:
            return self.config.batch_size
        return CUDA_DEFAULT_BATCH if self.device.startswith("cuda") else CPU_DEFAULT_BATCH

    @property
    def image_pipeline(self) -> Literal["reference", "tensor"]:
        if self.config.preprocess == "auto":
            return "tensor" if self.device.startswith("cuda") else "reference"
        return self.config.preprocess

    def model_spec(self) -> ModelSpec:
        has_schema = self.config.model.startswith(MODEL_SCHEMAS)
        return ModelSpec(
            model=self.config.model,
            pretrained="" if has_schema else self.config.pretrained,
            model_config=self.config.model_config,
            cache_dir=self.config.cache_dir,
            device=self.device,
            precision=resolve_precision(self.config.precision, self.device),
            compile=self.config.compile,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def preflight(self) -> None:
        """On the client, before any task: weights that cannot load fail here; random weights warn once."""
        config = self.config
        if not config.enabled:
            return
        if config.model.startswith("local-dir:") and not os.path.isdir(config.model[len("local-dir:"):]):
            raise ConfigError("clip.model", f"no such directory: {config.model[len('local-dir:'):]}")
        if config.model.startswith(MODEL_SCHEMAS):
            return
        if is_random_init(config.model, config.pretrained):
            self._known_model(registry_files_only=True)
            log.warning(random_weights_message(config.model))  # the run's only random-weights warning
            return
        if looks_like_checkpoint_path(config.pretrained):
            if not os.path.isfile(config.pretrained):
                raise ConfigError("clip.pretrained", f"checkpoint file not found: {config.pretrained}")
            self._preflight_checkpoint()
            return
        self._preflight_tag()

    def _known_model(self, registry_files_only: bool = False) -> None:
        """ConfigError unless `clip.model` names an open_clip model. `registry_files_only`: look for its config file
        (open_clip's registry is its `model_configs/*.json` plus `model_config`) without importing open_clip, which
        takes torch with it (~6 s and ~700 MB in the client): enough where nothing else needs open_clip here."""
        config = self.config
        name = config.model.replace("/", "-")
        if registry_files_only:
            found = importlib.util.find_spec("open_clip")
            folders = [Path(p) / "model_configs" for p in (found.submodule_search_locations or [])] if found else []
            if any((folder / f"{name}.json").is_file() for folder in folders) or (
                    config.model_config and Path(config.model_config).stem == name):
                return
        import open_clip

        if config.model_config and os.path.isfile(config.model_config):
            open_clip.add_model_config(config.model_config)
        if name not in open_clip.list_models():
            raise ConfigError("clip.model", f"unknown open_clip model {config.model!r} (open_clip.list_models() "
                                            "lists them; `model_config` registers your own)")

    def _preflight_checkpoint(self) -> None:
        # names and shapes only (meta-device model, memory-mapped file): a checkpoint that cannot load stops the
        # run here, not in every worker after its first partition's download
        self._known_model()
        try:
            check_checkpoint(self.config.model, self.config.pretrained, self.config.model_config)
        except ClipModelError as err:
            raise ConfigError("clip.pretrained", str(err)) from err

    def _preflight_tag(self) -> None:
        # open_clip (and torch with it) is imported only for tags and checkpoints: they need its registry
        self._known_model()
        config = self.config
        weights = tag_weights(config.model, config.pretrained, config.cache_dir)
        if weights is None:
            tags = pretrained_tags(config.model)
            listed = f"its tags: {_short_list(tags, config.pretrained)}" if tags else "it has no tags"
            raise ConfigError("clip.pretrained", f"{config.pretrained!r} is not an open_clip pretrained tag of "
                                                 f"{config.model} ({listed}); or give a local checkpoint file")
        if weights.cached_path:
            return
        unreachable = probe_weights(weights)  # one request, short timeout, no retries
        if unreachable:
            raise ConfigError("clip.pretrained", f"{config.pretrained!r} is not cached and {weights.source} is "
                                                 f"unreachable ({unreachable}). "
                                                 + weights_help(config.model, config.cache_dir))
        log.warning("clip.pretrained %r: weights not in the cache (%s); each worker downloads them from %s on first "
                    "use", config.pretrained, hub_cache_dir(config.cache_dir), weights.source)

    def setup(self) -> None:
        if self.config.cpu_threads:
            import torch

            torch.set_num_threads(self.config.cpu_threads)
        try:
            self._scorer = get_scorer(self.model_spec(), decode_workers=self.config.decode_workers)
        except Exception as err:
            # one paragraph, no traceback needed: ClipModelError says what failed and what to set
            raise StageError(str(err) if isinstance(err, ClipModelError) else f"clip_filter: {err}") from err
        spec = self._scorer.spec
        self.log.info(
            "clip model %s (%s) on %s, %s, batch %d, %s preprocessing",
            spec.model, spec.pretrained or "random init", spec.device, spec.precision,
            self.batch_size, self.image_pipeline,
        )

    @property
    def scorer(self) -> ClipScorer:
        if self._scorer is None:
            self.ensure_setup()
        assert self._scorer is not None
        return self._scorer

    # -- single pass -------------------------------------------------------------------------
    def process(self, table: pa.Table) -> pa.Table:
        if self.run_wide(self.config):
            raise StageError("clip_filter: clip.top_fraction needs the two-pass runner (score/decide/apply)")
        table = self.score(table)
        return self._reject_below(table, lambda scores, keys: scores >= self.config.threshold, self._threshold_msg)

    def _threshold_msg(self, score: float) -> str:
        return f"clip_score {score:.4f} < threshold {self.config.threshold:g}"

    # -- two passes --------------------------------------------------------------------------
    def score(self, table: pa.Table) -> pa.Table:
        """Add clip_score (and embeddings); mark rows that cannot be scored. Decides nothing else."""
        n = table.num_rows
        captions: list[str | None] = table.column(C.CAPTION).to_pylist()
        images: list[bytes] = table.column(C.IMAGE).to_pylist()
        reasons: list[str | None] = [None] * n
        messages: list[str | None] = [None] * n
        statuses: list[str | None] = [None] * n
        todo: list[int] = []
        for i in range(n):
            caption = captions[i]
            # rows without image bytes never get here: the runner fails them (`no_image`) first
            if caption is None or not caption.strip():
                reasons[i], messages[i], statuses[i] = REASON_NO_CAPTION, "empty caption", C.STATUS_REJECTED
            else:
                todo.append(i)

        result = self.scorer.score_pairs(
            [images[i] for i in todo],
            [captions[i] for i in todo],  # type: ignore[misc]
            batch_size=self.batch_size,
            pipeline=self.image_pipeline,
            embeddings=self.config.save_embeddings,
        )
        self.counters.update(result.counters)
        todo_idx = np.asarray(todo, dtype=np.int64)
        scored = np.zeros(n, dtype=bool)
        scored[todo_idx] = True
        for j, message in result.errors.items():
            i = todo[j]
            scored[i] = False
            reasons[i], messages[i], statuses[i] = REASON_UNDECODABLE, message, C.STATUS_FAILED
        scores = np.zeros(n, dtype=np.float32)
        scores[todo_idx] = result.scores
        table = C.set_column(table, CLIP_SCORE, pa.array(scores, type=pa.float32(), mask=~scored))
        if self.config.save_embeddings:
            assert result.image_embeddings is not None and result.text_embeddings is not None
            for column, values in ((IMAGE_EMBEDDING, result.image_embeddings), (TEXT_EMBEDDING, result.text_embeddings)):
                full = np.zeros((n, values.shape[1]), dtype=np.float16)
                full[todo_idx] = values
                table = C.set_column(table, column, embedding_array(full, scored))
        return self.reject(table, reasons, messages, statuses)  # type: ignore[arg-type]

    def summarize(self, table: pa.Table) -> np.ndarray:
        """uint64 sort keys (score, then key hash) of the alive scored rows of one partition."""
        scores, keys, alive = self._scored_rows(table)
        return score_sort_keys(scores[alive], [keys[i] for i in np.flatnonzero(alive)])

    def decide(self, summaries: Sequence[Any]) -> ClipDecision:
        """The cut-off keeping round(top_fraction × scored) rows; threshold mode: the threshold."""
        parts = [np.asarray(s, dtype=np.uint64) for s in summaries if s is not None and len(s)]
        sort_keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        total = int(sort_keys.size)
        if self.config.top_fraction is None:
            # lowest sort key a row at exactly the threshold can have (hash half zero)
            floor_key = int(score_sort_keys(np.array([self.config.threshold], np.float32), [""])[0]) >> 32 << 32
            kept = int(np.count_nonzero(sort_keys >= np.uint64(floor_key)))
            return ClipDecision(total, kept, floor_key, self.config.threshold)
        keep = min(total, math.floor(self.config.top_fraction * total + 0.5))
        if keep == 0:
            return ClipDecision(total, 0, None, math.inf)
        cutoff = int(np.partition(sort_keys, total - keep)[total - keep])
        return ClipDecision(total, keep, cutoff, _score_of_sort_key(cutoff))

    def apply(self, table: pa.Table, decision: ClipDecision) -> pa.Table:
        """Reject scored rows below the decision; reads only clip_score and key (never re-encodes)."""
        if self.config.top_fraction is None:
            return self._reject_below(table, lambda scores, keys: scores >= self.config.threshold, self._threshold_msg)
        cutoff = decision.sort_key_cutoff
        fraction = self.config.top_fraction

        def keep(scores: np.ndarray, keys: list[str]) -> np.ndarray:
            if cutoff is None:
                return np.zeros(len(scores), dtype=bool)
            return score_sort_keys(scores, keys) >= np.uint64(cutoff)

        def message(score: float) -> str:
            return f"clip_score {score:.4f} not in the top {fraction:.4g} (cut-off score {decision.score_cutoff:.4f})"

        return self._reject_below(table, keep, message)

    # -- helpers -----------------------------------------------------------------------------
    def _scored_rows(self, table: pa.Table) -> tuple[np.ndarray, list[str], np.ndarray]:
        if CLIP_SCORE not in table.column_names:
            raise StageError("clip_filter: partition has no clip_score column (score() did not run on it)")
        column = table.column(CLIP_SCORE)
        has_score = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        scores = np.asarray(column.fill_null(0.0).to_numpy(zero_copy_only=False), dtype=np.float32)
        alive = np.asarray([s == C.STATUS_SUCCESS for s in table.column(C.STATUS).to_pylist()], dtype=bool)
        if np.any(alive & ~has_score):
            raise StageError("clip_filter: alive rows without clip_score (score() did not run on them)")
        return scores, [str(k) for k in table.column(C.KEY).to_pylist()], alive & has_score

    def _reject_below(self, table: pa.Table, keep_fn: Any, message_fn: Any) -> pa.Table:
        scores, keys, scored = self._scored_rows(table)
        keep = np.asarray(keep_fn(scores, keys), dtype=bool)  # NaN compares False: rejected
        reasons: list[str | None] = [None] * table.num_rows
        messages: list[str | None] = [None] * table.num_rows
        for i in np.flatnonzero(scored & ~keep):
            reasons[i] = REASON_LOW_SCORE
            messages[i] = message_fn(float(scores[i]))
        return self.reject(table, reasons, messages)


def _short_list(tags: Sequence[str], given: str, budget: int = 230) -> str:
    """`tags` for a one-line message, closest to `given` first, cut to about `budget` characters."""
    import difflib

    close = difflib.get_close_matches(given, tags, n=3, cutoff=0.5)
    ordered = close + [t for t in tags if t not in close]
    shown: list[str] = []
    for tag in ordered:
        if shown and len(", ".join([*shown, tag])) > budget:
            return f"{', '.join(shown)} and {len(ordered) - len(shown)} more"
        shown.append(tag)
    return ", ".join(shown)


def embedding_array(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """float16 [n, d] → list<float16> with nulls where `valid` is False (no storage for them)."""
    dim = values.shape[1]
    flat = pa.array(np.ascontiguousarray(values[valid]).reshape(-1), type=pa.float16())
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    np.cumsum(valid.astype(np.int32) * dim, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~valid))


def _score_of_sort_key(sort_key: int) -> float:
    """Inverse of the score half of score_sort_keys (for messages)."""
    ordered = np.uint32(sort_key >> 32)
    bits = ordered & np.uint32(0x7FFFFFFF) if ordered & np.uint32(0x80000000) else ~ordered
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
