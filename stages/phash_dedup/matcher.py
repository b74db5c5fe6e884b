"""Eval-set matching: which eval image, if any, a corpus image is a copy of.

One answer for the dedup stage and `curate dedup-report`: both build an :class:`EvalMatcher` from the
merged eval index and :class:`MatchSettings` (taken from ``DedupConfig``), and call :meth:`EvalMatcher.match`.

Per corpus hash, every eval item with a hash within reach is a candidate: with verification, the item's
main hash and its variant hashes (mirror, crops) within ``candidate_threshold``, its distance the nearest
of them; without, the main hash within ``threshold``. Candidates are ranked by (distance, label).
Without verification the first one is the match. With it, at most ``max_candidates`` of them are checked
by :func:`curate.stages.phash_dedup.nearduplicate.verify` (one corpus descriptor per row, eval items
without a descriptor are skipped) and the first that verifies is the match.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from PIL import Image

    from curate.stages.phash_dedup.stage import DedupConfig

log = logging.getLogger("curate.dedup_matcher")

#: rows -> {row: image bytes, an already decoded image, or None}; called once per :meth:`EvalMatcher.match`,
#: with the rows that need verifying
ImageLoader = Callable[[Sequence[int]], Mapping[int, "bytes | Image.Image | None"]]


@dataclass(frozen=True)
class MatchSettings:
    """The ``dedup.*`` values that decide a match."""

    threshold: int
    candidate_threshold: int
    max_candidates: int
    verify: bool

    @classmethod
    def from_config(cls, config: DedupConfig) -> MatchSettings:
        return cls(config.threshold, config.candidate_threshold, config.max_candidates, config.verify)

    @property
    def search_threshold(self) -> int:
        return self.candidate_threshold if self.verify else self.threshold


@dataclass
class Candidate:
    """One (corpus row, eval item) pair the search found, and what verification said of it."""

    row: int
    item: int  # row of the merged eval index
    distance: int  # nearest of the item's searched hashes (main, and variants with verification)
    main_distance: int  # to the item's main hash
    verified: bool | None = None  # None: not verified (verification off, not reached, or not possible)
    score: float | None = None


@dataclass
class MatchResult:
    """Per corpus row: the accepted candidate (or None); every candidate in rank order; the counters."""

    matches: list[Candidate | None]
    candidates: list[Candidate]
    counters: collections.Counter[str] = field(default_factory=collections.Counter)


class EvalMatcher:
    """Built once (per worker, or per report) from a merged eval index (:func:`evalsets.concat_indexes`)."""

    def __init__(self, index: pa.Table, settings: MatchSettings, n_bits: int) -> None:
        from curate.stages.phash_dedup.hamming import HammingIndex
        from curate.stages.phash_dedup.phash import from_hex

        self.settings = settings
        self.n_bits = n_bits
        self.labels = [
            f"{s}:{i}"
            for s, i in zip(index.column("eval_set").to_pylist(), index.column("item_id").to_pylist(), strict=True)
        ]
        self.main_hashes = from_hex(index.column("phash").to_pylist(), n_bits)
        hashes = [self.main_hashes]
        owner = [np.arange(index.num_rows, dtype=np.int64)]
        # variants only help when verification can refuse what they bring in
        if settings.verify and "variant_hashes" in index.column_names:
            variants = index.column("variant_hashes")
            lengths = pc.fill_null(pc.list_value_length(variants), 0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(variants).to_pylist()
            if flat:
                hashes.append(from_hex(flat, n_bits))
                owner.append(np.repeat(np.arange(index.num_rows, dtype=np.int64), lengths))
        self.hashes = np.concatenate(hashes)
        self.owner = np.concatenate(owner)
        self.search_index = HammingIndex(self.hashes, n_bits, settings.search_threshold)
        self.descriptors: list[bytes | None] | None = None
        self._nd: Any = None
        if settings.verify:
            from curate.stages.phash_dedup import nearduplicate

            self._nd = nearduplicate
            self.descriptors = (
                index.column("descriptor").to_pylist() if "descriptor" in index.column_names else [None] * index.num_rows
            )

    def search(self, hashes: np.ndarray) -> dict[int, list[tuple[int, int]]]:
        """row -> [(eval item, distance), ...] ranked by (distance, label); rows without candidates absent."""
        found = self.search_index.search(hashes, self.settings.search_threshold)
        # nearest hash per (row, eval item): main and variants of one item count once
        best: dict[int, dict[int, int]] = collections.defaultdict(dict)
        for q, h, d in zip(found.query.tolist(), found.index.tolist(), found.distance.tolist(), strict=True):
            item = int(self.owner[h])
            if d < best[q].get(item, 1 << 30):
                best[q][item] = d
        return {
            row: sorted(items.items(), key=lambda kv: (kv[1], self.labels[kv[0]]))
            for row, items in sorted(best.items())
        }

    def match(self, hashes: np.ndarray, load_images: ImageLoader | None = None) -> MatchResult:
        """Match corpus hashes ``(n, words)``; `load_images` supplies image bytes for verification."""
        from curate.stages.phash_dedup.phash import hamming

        ranked = self.search(hashes)
        result = MatchResult([None] * len(hashes), [])
        images: Mapping[int, bytes | Image.Image | None] = {}
        if self.settings.verify and ranked:
            if load_images is None:
                raise ValueError("verification needs the corpus images: pass load_images")
            images = load_images(list(ranked))
        pair_rows = np.array([row for row, items in ranked.items() for _ in items], dtype=np.int64)
        pair_items = np.array([item for items in ranked.values() for item, _d in items], dtype=np.int64)
        main_distances = iter(hamming(hashes[pair_rows], self.main_hashes[pair_items]).tolist())
        for row, items in ranked.items():
            result.counters["eval_candidate_rows"] += 1
            row_candidates = [Candidate(row, item, d, next(main_distances)) for item, d in items]
            result.candidates.extend(row_candidates)
            if self.settings.verify:
                result.matches[row] = self._verify(row_candidates, images.get(row), result.counters)
            else:
                result.matches[row] = row_candidates[0]
        return result

    def _verify(
        self, ranked: list[Candidate], data: bytes | Image.Image | None, counters: collections.Counter[str]
    ) -> Candidate | None:
        """The nearest candidate the second signal confirms, or None. Descriptor made once per row."""
        from curate.stages.phash_dedup.phash import decode_rgb

        assert self.descriptors is not None
        if data is None:
            log.warning("corpus row %d: no image bytes to verify its eval candidates", ranked[0].row)
            return None
        try:
            corpus_desc = self._nd.descriptor(decode_rgb(data) if isinstance(data, bytes) else data)
        except Exception as err:  # noqa: BLE001 - an image that does not decode cannot confirm a match
            log.warning("corpus row %d: no descriptor, candidates left unverified: %s", ranked[0].row, err)
            return None
        for candidate in ranked[: self.settings.max_candidates]:
            eval_desc = self.descriptors[candidate.item]
            if eval_desc is None:
                continue
            counters["eval_verify_calls"] += 1
            same, score = self._nd.verify(eval_desc, corpus_desc, distance=candidate.distance, n_bits=self.n_bits)
            candidate.verified, candidate.score = bool(same), float(score)
            if candidate.verified:
                counters["eval_verified"] += 1
                if candidate.distance > self.settings.threshold:
                    counters["eval_verified_beyond_threshold"] += 1
                return candidate
            if candidate.distance <= self.settings.threshold:
                counters["eval_pHash_match_overruled"] += 1  # pHash alone would have rejected it
        return None
