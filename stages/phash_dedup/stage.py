"""phash_dedup stage: drop eval-set contamination and within-corpus duplicates by perceptual hash.

Eval side (every partition): each row's pHash (of the decoded, EXIF-transposed RGB image) is matched
against the eval indexes loaded in :meth:`PhashDedupStage.setup` (prebuilt ``dedup.indexes`` and
``dedup.eval_sets`` hashed once into a cache) by :class:`curate.stages.phash_dedup.matcher.EvalMatcher`,
the same matcher `curate dedup-report` uses. With ``dedup.verify`` (default) the search runs at the
looser ``dedup.candidate_threshold`` against each eval image's hash and its variant hashes (mirror,
crops), and up to ``dedup.max_candidates`` candidates are confirmed with the second signal of
:mod:`curate.stages.phash_dedup.nearduplicate`; a row is rejected (``eval_duplicate``) only when one verifies.
Without it, a row is rejected when any eval hash is within ``dedup.threshold``. The row records
``eval_match`` (``evalset:item_id``) and ``eval_distance``. Bytes that do not decode fail the row
(``decode_error``); rows without bytes never get here (the runner fails them with ``no_image``).

Within the corpus (``dedup.within_corpus``): a run-wide pass. Every partition's surviving rows are
summarised (key, sha256, pHash, optional score); the decision, made once on the client, keeps one
row per group of exact duplicates (same sha256 of the image bytes: ``exact_duplicate``) and then
greedily one per pHash neighbourhood (``near_duplicate`` within ``dedup.within_corpus_threshold``):
rows are visited in keep-policy order and a row is rejected when a kept row is within the threshold.
``dup_of`` records the kept row's key. Keep policy ``first`` prefers the smallest key (keys follow
input order); ``highest_score`` prefers the largest ``dedup.score_column`` value (e.g. LAION's
``similarity``), missing scores last, ties by smallest key. Deterministic for a given input.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.pipeline import columns as C
from curate.pipeline.configspec import ConfigError, option
from curate.pipeline.stage import Command, RunContext, Stage, StageError

if TYPE_CHECKING:
    from curate.stages.phash_dedup.matcher import EvalMatcher


#: What the download stage hands over for a row when eval candidates are verified: the row's pHash and the eval
#: match decided from the very pixels it decoded (so a row with candidates is not decoded a second time here).
#: `item` is a row of this worker's merged eval index (null: no match); `counters` are the matcher's for the row.
MATCHED_PIXELS = pa.struct([
    pa.field("phash", pa.string()),
    pa.field("item", pa.int64()),
    pa.field("distance", pa.int32()),
    pa.field("score", pa.float64()),
    pa.field("check", pa.string()),
    pa.field("counters", pa.map_(pa.string(), pa.int64())),
])

#: (dedup config, run) -> [matcher, stage instances using it], per worker process
_MATCHERS: dict[tuple[Any, ...], list[Any]] = {}
_MATCHERS_LOCK = threading.Lock()


def _verifies(config: DedupConfig) -> bool:
    """Are eval candidates confirmed with the second signal (which needs the corpus row's pixels)?"""
    return config.verify and bool(config.indexes or config.eval_sets)


def uniform_collision_rate(threshold: int, n_bits: int) -> float:
    """Share of uniformly random `n_bits` hashes within `threshold` bits of a given one.

    Real pHashes cluster, so unrelated pictures collide more often than this (benchmarks/phash_collisions.py):
    it is a lower bound on how many candidates an eval index of that many hashes makes per row.
    """
    from curate.stages.phash_dedup.hamming import ball_size

    return ball_size(n_bits, threshold) / 2**n_bits


@dataclass(frozen=True)
class EvalSetSource:
    path: str = option("", help="Eval-set source: image folder (recursive), Parquet (image bytes or paths), WebDataset tars (file, folder, glob or brace pattern) or a Hugging Face dataset saved with save_to_disk.", path=True)
    name: str = option("", help="Eval-set name used in `eval_match` (defaults to the folder/file name).")
    format: Literal["auto", "folder", "parquet", "webdataset", "hf"] = option("auto", help="Source layout; `auto` detects it from the path.")

    def validate(self, key_path: str) -> None:
        if not self.path:
            raise ConfigError(f"{key_path}.path", "is required (the eval-set folder, file or pattern)")


@dataclass(frozen=True)
class DedupConfig:
    enabled: bool = option(True, help="Run the pHash dedup stage (eval-set contamination and, if `within_corpus`, duplicates inside the corpus).")
    indexes: tuple[str, ...] = option((), help="Prebuilt eval indexes (INDEX.parquet files from `curate hash-evalset`); loaded once per worker.", path=True)
    eval_sets: tuple[EvalSetSource, ...] = option((), help="Eval-set sources hashed at start-up; the index is cached in `cache_dir` keyed by the source's files (path, size, mtime) and the hash parameters.")
    threshold: int = option(8, help="Max Hamming distance (bits, of hash_size² = 64 by default) for a pHash match when `verify` is off; with `verify`, the reach of the detail check (`detail_check`).", range=(0, 1023))
    candidate_threshold: int = option(16, help="With `verify`: max Hamming distance (bits) for a pHash candidate that is then checked by the second signal. Must be >= `threshold`.", range=(0, 1023))
    verify: bool = option(True, help="Confirm pHash candidates with the near-duplicate descriptor (keypoints + aligned thumbnail) before rejecting; indexes must carry descriptors.")
    max_candidates: int = option(8, help="With `verify`: at most this many eval candidates per row are verified (nearest first); each costs one verify call (about 5 ms, plus ~7 ms once per row for its descriptor). See docs/dedup.md, cost at scale.", range=(1, None))
    detail_check: bool = option(True, help="With `verify`: a candidate within `threshold` of the eval image's own hash is confirmed without the keypoint model when neither picture is low-information and their thumbnails' fine detail agrees where it stands (docs/dedup.md, detail check); false = every candidate goes to the model.")
    hash_size: int = option(8, help="pHash side: the hash has hash_size² bits (8 → 64 bits, 16 hex digits). Eval indexes must use the same.", range=(2, 32))
    hash_decoded_pixels: bool = option(True, help="pHash the pixels the download stage already decoded (just before it encodes them) instead of decoding the stored bytes again, and with `verify` match eval candidates from them too: one decode per image. Rows whose stored bytes are re-encoded may then differ from a hash of the stored file by JPEG noise (measured in docs/dedup.md); false = always decode and hash the stored bytes.")
    hash_mode: Literal["exact", "fast"] = option("exact", help="`exact`: bit-identical to imagehash.phash. `fast`: JPEG draft decoding + batched DCT, several times faster, agreement with imagehash documented in docs/dedup.md.")
    cache_dir: str = option("", help="Cache folder for indexes of `eval_sets` ('' = $XDG_CACHE_HOME/curate/evalsets, else ~/.cache/curate/evalsets).", path=True)
    within_corpus: bool = option(False, help="Also drop duplicates inside the corpus (run-wide pass): same image bytes (sha256) and pHash within `within_corpus_threshold`.")
    within_corpus_threshold: int = option(4, help="Max Hamming distance (bits) for within-corpus near duplicates (0 = identical pHash only).", range=(0, 1023))
    keep: Literal["first", "highest_score"] = option("first", help="Which row of a duplicate group survives: `first` = smallest key (input order); `highest_score` = largest `score_column`, ties by smallest key.")
    score_column: str = option("similarity", help="Input column ranking duplicates for keep=highest_score (LAION: `similarity`); rows without it rank last.")

    def validate(self, key_path: str) -> None:
        bits = self.hash_size * self.hash_size
        for field_name in ("threshold", "candidate_threshold", "within_corpus_threshold"):
            value = getattr(self, field_name)
            if value >= bits:
                raise ConfigError(f"{key_path}.{field_name}", f"must be below the hash's {bits} bits, got {value}")
        if self.candidate_threshold < self.threshold:
            raise ConfigError(
                f"{key_path}.candidate_threshold",
                f"must be >= threshold ({self.threshold}), got {self.candidate_threshold}",
            )
        if self.keep == "highest_score" and not self.score_column:
            raise ConfigError(f"{key_path}.score_column", "is required for keep: highest_score")


def _index_mismatch(path: str, schema: Any, cfg: DedupConfig) -> str | None:
    """Why an eval index (its Parquet schema) cannot serve this config, or None. Read from the schema only."""
    from curate.stages.phash_dedup import evalsets

    try:
        params = evalsets.index_params(schema)
        meta = evalsets.index_metadata(schema)
    except (ValueError, KeyError) as err:
        return f"eval index {path}: {err}"
    if params.hash_size != cfg.hash_size:
        return (f"eval index {path} uses hash_size {params.hash_size}, dedup.hash_size is {cfg.hash_size}: rebuild it "
                f"(`curate hash-evalset --hash-size {cfg.hash_size}`) or set dedup.hash_size: {params.hash_size}")
    if _verifies(cfg):
        from curate.stages.phash_dedup.nearduplicate import DESCRIPTOR_VERSION

        if "descriptor" not in schema.names:
            return (f"eval index {path} has no near-duplicate descriptors: rebuild it with verification "
                    "(`curate hash-evalset` does so by default) or set dedup.verify: false")
        if meta.get("descriptor_version") != DESCRIPTOR_VERSION:
            return (f"eval index {path} has descriptors {meta.get('descriptor_version')!r}, this curate makes "
                    f"{DESCRIPTOR_VERSION!r}: rebuild it")
    return None


class PhashDedupStage(Stage[DedupConfig]):
    name = "phash_dedup"
    config_class = DedupConfig
    requires = (C.KEY, C.IMAGE)
    adds = (
        pa.field("phash", pa.string()),
        pa.field("eval_match", pa.string()),
        pa.field("eval_distance", pa.int32()),
        pa.field("dup_of", pa.string()),
    )

    def __init__(self, config: DedupConfig, context: RunContext) -> None:
        super().__init__(config, context)
        self.counters: collections.Counter[str] = collections.Counter()
        self._matcher: EvalMatcher | None = None
        self._matcher_key: tuple[Any, ...] | None = None
        self._params: Any = None
        self._nd: Any = None

    @classmethod
    def run_wide(cls, config: DedupConfig) -> bool:  # a run-wide pass only when within-corpus dedup is on
        return config.within_corpus

    @classmethod
    def pixel_type(cls, config: DedupConfig) -> pa.DataType | None:
        if not config.hash_decoded_pixels:
            return None
        return MATCHED_PIXELS if _verifies(config) else pa.string()

    def from_pixels(self, image: Any) -> str | dict[str, Any]:
        """The row's pHash (hex) from pixels decoded upstream: RGB first, as the engine's decode gives them.

        With verification, the row's eval match too (:data:`MATCHED_PIXELS`): the cascade needs the pixels of
        rows with candidates, and here it has them without decoding the stored bytes again. Same matcher, same
        per-row decision as :meth:`score` would make from these pixels; it runs on the producer's threads.
        """
        from curate.stages.phash_dedup.phash import phash_image, to_hex

        rgb = image if image.mode == "RGB" else image.convert("RGB")
        words = phash_image(rgb, self._params)[None, :]
        hex_value = to_hex(words, self._params.n_bits)[0]
        if not _verifies(self.config):
            return hex_value
        if self._matcher is None:
            raise StageError("no eval matcher: the stage is not set up")  # null: score() decodes the row
        found = self._matcher.match(words, lambda _rows: {0: rgb})
        hit = found.matches[0]
        item, distance, score, check = (None,) * 4 if hit is None else (hit.item, hit.distance, hit.score, hit.check)
        return {"phash": hex_value, "item": item, "distance": distance, "score": score, "check": check,
                "counters": dict(found.counters)}

    @classmethod
    def report_parts(cls, section: dict[str, Any]) -> Any:
        from curate.stages.phash_dedup.run_report import report_parts

        return report_parts(section)

    @classmethod
    def commands(cls) -> Sequence[Command]:
        from curate.stages.phash_dedup.commands import COMMANDS

        return COMMANDS

    # -- set-up ------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Missing or mismatched eval indexes and missing sources stop the run before it starts (exit 2), not on
        every worker after the cluster is up; `curate validate` runs this too."""
        import fsspec
        import pyarrow.parquet as pq

        for i, path in enumerate(self.config.indexes):
            fs, fs_path = fsspec.core.url_to_fs(path)
            if not fs.exists(fs_path):
                raise ConfigError(f"dedup.indexes[{i}]", f"eval index {path!r} does not exist "
                                  "(build it with `curate hash-evalset SOURCE -o INDEX.parquet`)")
            try:
                with fs.open(fs_path, "rb") as f:
                    schema = pq.read_schema(f)
            except Exception as err:  # not Parquet at all: the message says what the reader found
                raise ConfigError(f"dedup.indexes[{i}]", f"eval index {path!r} cannot be read: {err}") from err
            problem = _index_mismatch(path, schema, self.config)
            if problem is not None:
                raise ConfigError(f"dedup.indexes[{i}]", problem)
        for i, source in enumerate(self.config.eval_sets):
            if "://" in source.path or any(ch in source.path for ch in "*?{"):
                continue  # remote or pattern: resolved by the adapter, which reports what it cannot read
            if not os.path.exists(source.path):
                raise ConfigError(f"dedup.eval_sets[{i}].path", f"eval set {source.path!r} does not exist")
            # Its format and first item, cheaply (hashing it all is the workers' set-up, cached): an eval set the
            # adapters cannot read at all stops the run here, not in every worker's set-up.
            from curate.stages.phash_dedup import evalsets

            try:
                first = next(iter(evalsets.iter_eval_images(source.path, source.format)), None)
            except (ValueError, OSError) as err:
                raise ConfigError(f"dedup.eval_sets[{i}].path", str(err)) from err
            if first is None:
                raise ConfigError(f"dedup.eval_sets[{i}].path", f"eval set {source.path!r} holds no images")

    def setup(self) -> None:
        from curate.stages.phash_dedup.phash import PhashParams

        cfg = self.config
        self._params = PhashParams(hash_size=cfg.hash_size, mode=cfg.hash_mode)
        if _verifies(cfg):
            try:
                from curate.stages.phash_dedup import nearduplicate
            except ImportError as err:
                raise StageError(
                    "dedup.verify needs curate.stages.phash_dedup.nearduplicate, which is missing; set dedup.verify: false"
                ) from err
            self._nd = nearduplicate
            import cv2

            # A worker's parallelism is its processes and download threads; OpenCV's own thread pool on top of them
            # only adds hand-offs (matching a row with candidates: 6.1 -> 5.75 ms CPU with one OpenCV thread, 2 cores)
            # and, with many workers per machine, oversubscribes the cores.
            cv2.setNumThreads(1)
        # One matcher per worker process and run, shared by the process's threads: the index is the stage's big
        # read-only state (~0.9 KB per eval item), so threads_per_worker > 1 must not multiply it.
        key = (cfg, self.context.output_path)
        with _MATCHERS_LOCK:
            entry = _MATCHERS.get(key)
            if entry is None:
                entry = _MATCHERS[key] = [self._build_matcher(), 0]
            entry[1] += 1
        self._matcher, self._matcher_key = entry[0], key

    def teardown(self) -> None:
        if self._matcher_key is not None:
            with _MATCHERS_LOCK:
                entry = _MATCHERS.get(self._matcher_key)
                if entry is not None:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        del _MATCHERS[self._matcher_key]
        self._matcher, self._matcher_key = None, None
        self._is_set_up = False

    def _build_matcher(self) -> EvalMatcher | None:
        import pyarrow.parquet as pq

        from curate.stages.phash_dedup import evalsets

        cfg = self.config
        tables = []
        for path in cfg.indexes:
            try:
                # The descriptors (up to ~19 KB per item) stay on disk: they are streamed to the matcher's store.
                table = evalsets.load_index(path, descriptors=False)
            except ValueError as err:
                raise StageError(f"dedup.indexes: {err}") from err
            tables.append((path, table))
        for source in cfg.eval_sets:
            try:
                table, file, hit = evalsets.cached_index(
                    source.path, source.name or None, self._params, source.format, cfg.verify, cfg.cache_dir or None,
                    descriptors=False,
                )
            except (ValueError, OSError) as err:
                raise StageError(f"dedup.eval_sets: {source.path}: {err}") from err
            self.log.info("eval set %s: %d items (%s %s)", source.path, table.num_rows, "cached" if hit else "hashed", file)
            tables.append((str(file), table))
        for path, _table in tables:
            problem = _index_mismatch(path, pq.read_schema(path), cfg)  # the file's: `table` lacks the descriptors
            if problem is not None:
                raise StageError(problem)
        if not tables:
            return None
        from curate.stages.phash_dedup.matcher import EvalMatcher, MatchSettings

        merged = evalsets.concat_indexes([t for _p, t in tables])
        store = None
        if cfg.verify:
            from curate.stages.phash_dedup.matcher import DescriptorStore

            store = DescriptorStore(evalsets.descriptor_chunks([p for p, _t in tables], [t.num_rows for _p, t in tables]))
        matcher = EvalMatcher(merged, MatchSettings.from_config(cfg), self._params.n_bits, descriptors=store)
        del merged
        tables.clear()
        self.log.info("eval matcher: %.0f bytes per eval item in RAM", matcher.compact_nbytes / max(1, len(matcher.labels)))
        max_t = matcher.settings.search_threshold
        self.log.info("eval search: %d items, %d hashes, threshold %d", len(matcher.labels), len(matcher.hashes), max_t)
        if cfg.verify:
            chance = len(matcher.hashes) * uniform_collision_rate(max_t, matcher.n_bits)
            if chance >= 1.0:
                self.log.warning(
                    "dedup.candidate_threshold %d against %d eval hashes: even uniformly random hashes would make "
                    "%.1f candidates per row, and real pictures collide far more often (benchmarks/phash_collisions.py); "
                    "each costs a verify call up to dedup.max_candidates (%d). For large eval sets, consider a lower "
                    "candidate_threshold (docs/dedup.md, cost at scale).",
                    max_t, len(matcher.hashes), chance, cfg.max_candidates,
                )
        return matcher

    # -- per partition -----------------------------------------------------------------------------
    def process(self, table: pa.Table) -> pa.Table:
        if self.run_wide(self.config):  # the runner calls score/apply instead; keep process usable alone
            return self.apply(self.score(table), None)
        return self.score(table)

    def score(self, table: pa.Table) -> pa.Table:
        """pHash every row and reject eval-set matches (they never enter the within-corpus pass).

        Every row has image bytes: the runner fails rows without them (`no_image`) before this stage.
        """
        from curate.stages.phash_dedup.phash import from_hex, phash_bytes, to_hex

        params = self._params
        images = table.column(C.IMAGE).to_pylist()
        n = len(images)
        reasons: list[str | None] = [None] * n
        messages: list[str | None] = [None] * n
        statuses: list[str] = [C.STATUS_REJECTED] * n
        # One decode per image: hashes (and, with verification, eval matches) computed upstream from the decoded
        # pixels; the other rows are decoded here.
        pixel_col = C.pixel_column(self.name)
        given: list[Any] = [None] * n
        if pixel_col in table.column_names:
            given = table.column(pixel_col).to_pylist()
            table = table.drop_columns([pixel_col])  # done with it: not carried into a persisted pass
        matched_upstream = {i: v for i, v in enumerate(given) if isinstance(v, dict)}
        given = [v["phash"] if isinstance(v, dict) else v for v in given]
        todo = [i for i in range(n) if given[i] is None]
        hashed = np.zeros((n, params.n_words), dtype=np.uint64)
        errors: list[str | None] = [None] * n
        if len(todo) < n:
            done = [i for i in range(n) if given[i] is not None]
            hashed[done] = from_hex([given[i] for i in done], params.n_bits)
        self.counters["hashed_from_decoded_pixels"] += n - len(todo)
        if todo:
            todo_hashes, todo_errors = phash_bytes([images[i] for i in todo], params)
            hashed[todo] = todo_hashes
            for i, error in zip(todo, todo_errors, strict=True):
                errors[i] = error
        for i, error in enumerate(errors):
            if error:
                reasons[i], messages[i], statuses[i] = "decode_error", error, C.STATUS_FAILED
        ok = np.array([error is None for error in errors], dtype=bool)
        hex_values = to_hex(hashed, params.n_bits)
        phash_col = [hex_values[i] if ok[i] else None for i in range(n)]
        match: list[str | None] = [None] * n
        distance: list[int | None] = [None] * n
        if self._matcher is not None and ok.any():
            hits: dict[int, tuple[int, int, float | None, str | None]] = {}  # row -> item, distance, score, check
            for row, value in matched_upstream.items():
                self.counters.update(dict(value["counters"]))
                if value["item"] is not None:
                    hits[row] = (value["item"], value["distance"], value["score"], value["check"])
            self.counters["matched_from_decoded_pixels"] += len(matched_upstream)
            rows = np.array([i for i in np.flatnonzero(ok).tolist() if i not in matched_upstream], dtype=np.int64)
            if len(rows):
                found = self._matcher.match(hashed[rows], lambda wanted: {q: images[rows[q]] for q in wanted})
                self.counters.update(found.counters)
                for q, hit in enumerate(found.matches):
                    if hit is not None:
                        hits[int(rows[q])] = (hit.item, hit.distance, hit.score, hit.check)
            for row, (item, dist, score, check) in sorted(hits.items()):
                label = self._matcher.labels[item]
                note = ("" if score is None else f", verified by detail agreement {score:.2f}"
                        if check == "detail" else f", verified (probability {score:.2f})")
                match[row], distance[row] = label, dist
                reasons[row] = "eval_duplicate"
                messages[row] = f"matches eval image {label} at pHash distance {dist}{note}"
        table = C.set_column(table, "phash", phash_col)
        table = C.set_column(table, "eval_match", match)
        table = C.set_column(table, "eval_distance", distance)
        table = C.set_column(table, "dup_of", [None] * n)
        return self.reject(table, reasons, messages, statuses)

    # -- within-corpus pass --------------------------------------------------------------------------
    def summarize(self, table: pa.Table) -> dict[str, Any]:
        from curate.stages.phash_dedup.phash import from_hex

        keys = table.column(C.KEY).to_pylist()
        sha = table.column("sha256").to_pylist() if "sha256" in table.column_names else [None] * len(keys)
        images = table.column(C.IMAGE).to_pylist() if C.IMAGE in table.column_names else [None] * len(keys)
        digests = [
            bytes.fromhex(s) if s else hashlib.sha256(img or b"").digest()
            for s, img in zip(sha, images, strict=True)
        ]
        scores = np.full(len(keys), np.nan)
        column = self.config.score_column
        if self.config.keep == "highest_score" and column in table.column_names:
            values = table.column(column).cast(pa.float64()).to_numpy(zero_copy_only=False)
            scores = np.where(np.isfinite(values), values, np.nan)
        return {
            "keys": keys,
            "sha256": np.frombuffer(b"".join(d[:16] for d in digests), dtype="S16") if keys else np.zeros(0, "S16"),
            "phash": from_hex(table.column("phash").to_pylist(), self._bits()),
            "score": scores,
        }

    def _bits(self) -> int:
        return self.config.hash_size * self.config.hash_size

    def decide(self, summaries: Sequence[dict[str, Any]]) -> pa.Table:
        """Rejected keys with reason and kept duplicate, from every partition's summary (client side)."""
        from curate.stages.phash_dedup.hamming import self_pairs

        parts = [s for s in summaries if s and len(s["keys"])]
        if not parts:
            return _decision_table([], [], [], [])
        keys = np.array([k for s in parts for k in s["keys"]], dtype=object)
        sha = np.concatenate([s["sha256"] for s in parts])
        hashes = np.concatenate([s["phash"] for s in parts])
        scores = np.concatenate([s["score"] for s in parts])
        key_rank = np.argsort(np.argsort(keys.astype(str), kind="stable"), kind="stable")
        if self.config.keep == "highest_score":
            primary = np.where(np.isnan(scores), np.inf, -scores)  # missing scores rank last
            order = np.lexsort((key_rank, primary))
        else:
            order = np.argsort(key_rank, kind="stable")
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys))
        # exact: per sha256 the best-ranked row represents the group
        by_sha = np.lexsort((rank, sha))
        first = np.ones(len(keys), dtype=bool)
        first[1:] = sha[by_sha][1:] != sha[by_sha][:-1]
        group_rep = np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))
        rep_of = np.empty(len(keys), dtype=np.int64)
        rep_of[by_sha] = by_sha[group_rep]
        reps = np.flatnonzero(rep_of == np.arange(len(keys)))
        # near: greedy over representatives in rank order; a rep within the threshold of a kept rep goes
        kept_as = np.arange(len(keys))  # final kept row each row resolves to
        near_distance = np.zeros(len(keys), dtype=np.int64)
        pairs = self_pairs(hashes[reps], self.config.within_corpus_threshold, self._bits())
        if len(pairs):
            a = reps[np.concatenate([pairs.query, pairs.index])]
            b = reps[np.concatenate([pairs.index, pairs.query])]
            d = np.concatenate([pairs.distance, pairs.distance])
            neighbours: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
            for x, y, dist in zip(a.tolist(), b.tolist(), d.tolist(), strict=True):
                neighbours[x].append((y, dist))
            is_kept = np.ones(len(keys), dtype=bool)
            for x in sorted(neighbours, key=lambda r: rank[r]):
                kept_neighbours = [(dist, rank[y], y) for y, dist in neighbours[x] if rank[y] < rank[x] and is_kept[y]]
                if kept_neighbours:
                    dist, _r, y = min(kept_neighbours)
                    is_kept[x] = False
                    kept_as[x] = y
                    near_distance[x] = dist
        out_keys, out_reason, out_dup, out_msg = [], [], [], []
        for i in range(len(keys)):
            rep = rep_of[i]
            final = kept_as[rep]
            if final == i:
                continue
            exact = sha[i] == sha[final]
            out_keys.append(keys[i])
            out_reason.append("exact_duplicate" if exact else "near_duplicate")
            out_dup.append(keys[final])
            out_msg.append(
                f"same image bytes as {keys[final]}" if exact
                else f"pHash within {near_distance[rep]} bits of {keys[final]}"
            )
        return _decision_table(out_keys, out_reason, out_dup, out_msg)

    def apply(self, table: pa.Table, decision: pa.Table | None) -> pa.Table:
        if decision is None or decision.num_rows == 0 or table.num_rows == 0:
            return table
        where = pc.index_in(table.column(C.KEY), value_set=decision.column("key")).to_pylist()
        reasons_all = decision.column("reason").to_pylist()
        dup_all = decision.column("dup_of").to_pylist()
        msg_all = decision.column("message").to_pylist()
        reasons = [reasons_all[w] if w is not None else None for w in where]
        messages = [msg_all[w] if w is not None else None for w in where]
        old_dup = table.column("dup_of").to_pylist() if "dup_of" in table.column_names else [None] * table.num_rows
        dup_of = [dup_all[w] if w is not None else old for w, old in zip(where, old_dup, strict=True)]
        table = C.set_column(table, "dup_of", dup_of)
        return self.reject(table, reasons, messages)


def _decision_table(keys: list[str], reasons: list[str], dup_of: list[str], messages: list[str]) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "dup_of": pa.array(dup_of, pa.string()),
            "message": pa.array(messages, pa.string()),
        }
    )
