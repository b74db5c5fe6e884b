"""Eval-set matching: which eval image, if any, a corpus image is a copy of.

One answer for the dedup stage and `curate dedup-report`: both build an :class:`EvalMatcher` from the
merged eval index and :class:`MatchSettings` (taken from ``DedupConfig``), and call :meth:`EvalMatcher.match`.

Per corpus hash, every eval item with a hash within reach is a candidate: with verification, the item's
main hash and its variant hashes (mirror, crops) within ``candidate_threshold``, its distance the nearest
of them; without, the main hash within ``threshold``. Candidates are ranked by (distance, label).
Without verification the first one is the match. With it, verification is a cascade:

1. cheap check, on every candidate: the 256-bit fine code (:func:`nearduplicate.fine_code`) of the corpus
   image against that of the eval hash the candidate was found through (:func:`nearduplicate.cheap_check`;
   one XOR and popcount, vectorised). Candidates it rules out are never verified.
2. on what is left, at most ``max_candidates`` per row, nearest first: the detail check
   (:func:`nearduplicate.detail_agreement`; with ``detail_check``, for a candidate within ``threshold`` of the
   item's main hash when neither picture is low-information: thumbnails compared as they stand, ~0.1 ms),
   then the expensive check :func:`curate.stages.phash_dedup.nearduplicate.verify` (one corpus descriptor
   per row, its keypoints computed only when a candidate gets that far; eval items without a descriptor are
   skipped). The first candidate either check confirms is the match.

Only the compact part lives in RAM (hashes, fine codes, owners, labels as Arrow arrays: a few hundred
bytes per eval item); the full descriptors (7-11 KB each) are spilled to an uncompressed Arrow IPC file
that is memory-mapped and read on demand (:class:`DescriptorStore`). Indexes without fine codes (built
before the cascade) skip the cheap check.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    detail_check: bool = True

    @classmethod
    def from_config(cls, config: DedupConfig) -> MatchSettings:
        return cls(config.threshold, config.candidate_threshold, config.max_candidates, config.verify,
                   config.detail_check)

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
    # None: not verified (verification off, not reached, or not possible); False also when the cheap check
    # ruled it out (score 0.0)
    verified: bool | None = None
    # the model's probability; for check "detail" the thumbnails' detail agreement (high-pass NCC)
    score: float | None = None
    check: str | None = None  # which check decided: "cheap" (ruled out), "detail" (confirmed), "model"


@dataclass
class MatchResult:
    """Per corpus row: the accepted candidate (or None); the candidates a check decided (each row's in rank
    order: cheap-check refusals within ``threshold``, then those the detail check or the model judged; without
    verification, each row's match); the counters. Candidates no check looked at are not listed."""

    matches: list[Candidate | None]
    candidates: list[Candidate]
    counters: collections.Counter[str] = field(default_factory=collections.Counter)


#: :meth:`EvalMatcher._ranked` searches and ranks rows in chunks of about this many raw pairs (a few hundred KB of
#: arrays: the sorts stay in cache), starting with `_FIRST_RANKED_ROWS` rows and never more than `_MAX_RANKED_ROWS`.
_RANKED_PAIRS_PER_CHUNK = 32_768
_FIRST_RANKED_ROWS = 4
_MAX_RANKED_ROWS = 4_096


@dataclass(frozen=True)
class _Ranked:
    """The candidates of a chunk of rows as parallel arrays, each row's ranked by (distance, label).

    Row ``rows[k]``'s candidates are ``[bounds[k], bounds[k + 1])``; `hit` is the searched hash each came
    through (main or variant), `main_distance` the distance to the item's main hash.
    """

    rows: np.ndarray
    bounds: np.ndarray
    item: np.ndarray
    distance: np.ndarray
    hit: np.ndarray
    main_distance: np.ndarray

    @staticmethod
    def empty() -> _Ranked:
        none = np.zeros(0, dtype=np.int64)
        return _Ranked(none, np.zeros(1, dtype=np.int64), none, none, none, none)

    def candidate(self, row: int, i: int) -> Candidate:
        return Candidate(row, int(self.item[i]), int(self.distance[i]), int(self.main_distance[i]))


class _Labels:
    """``evalset:item_id`` of each merged-index row, built on demand from Arrow arrays (no Python string per item)."""

    def __init__(self, eval_set: pa.ChunkedArray, item_id: pa.ChunkedArray) -> None:
        self._eval_set = eval_set.combine_chunks()
        self._item_id = item_id.combine_chunks()

    def __len__(self) -> int:
        return len(self._item_id)

    def __getitem__(self, row: int) -> str:
        return f"{self._eval_set[row].as_py()}:{self._item_id[row].as_py()}"

    @property
    def nbytes(self) -> int:
        return int(self._eval_set.nbytes + self._item_id.nbytes)

    def ranks(self) -> np.ndarray:
        """int32 per row: its position when all labels are sorted (as Python sorts the strings; ties by row)."""
        joined = pc.binary_join_element_wise(pc.cast(self._eval_set, pa.large_string()),
                                             pc.cast(self._item_id, pa.large_string()), pa.scalar(":", pa.large_string()))
        order = pc.sort_indices(joined).to_numpy()  # UTF-8 byte order = code point order; stable
        ranks = np.empty(len(order), dtype=np.int32)
        ranks[order] = np.arange(len(order), dtype=np.int32)
        return ranks


class DescriptorStore:
    """Full near-duplicate descriptors on disk, read on demand.

    The column is written once to an uncompressed Arrow IPC file and memory-mapped; a descriptor is a
    zero-copy slice of the map, so only the pages of descriptors actually verified are read, and they sit
    in the (shared, reclaimable) page cache instead of the worker's heap. The file is unlinked at once
    (the mapping keeps it alive until the store is dropped), so nothing is left behind.
    """

    def __init__(self, column: pa.ChunkedArray | Iterable[pa.Array], folder: str | None = None) -> None:
        """`column`: the descriptors in merged-index order, as one column or as a stream of arrays (so that an
        index file's descriptors can go from disk to the store without ever being held in RAM)."""
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else column
        fd, path = tempfile.mkstemp(prefix="curate-descriptors-", suffix=".arrow", dir=folder)
        os.close(fd)
        try:
            schema = pa.schema([pa.field("descriptor", pa.binary())])
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for chunk in chunks:
                    chunk = chunk.cast(pa.binary())
                    for start in range(0, len(chunk), 65536):
                        writer.write_batch(pa.record_batch([chunk.slice(start, 65536)], schema=schema))
            self._map = pa.memory_map(path, "r")
            self._column = pa.ipc.open_file(self._map).read_all().column(0)
        finally:
            with contextlib.suppress(OSError):  # POSIX: the map stays valid after unlinking
                os.unlink(path)
        self._starts = np.cumsum([0] + [len(c) for c in self._column.chunks])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def present(self) -> int:
        """Items that have a descriptor (not null)."""
        return len(self) - self._column.null_count

    def get(self, row: int) -> bytes | None:
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._column.chunks[chunk][row - int(self._starts[chunk])].as_py()


class EvalMatcher:
    """Built once (per worker, or per report) from a merged eval index (:func:`evalsets.concat_indexes`)."""

    def __init__(self, index: pa.Table, settings: MatchSettings, n_bits: int,
                 descriptors: DescriptorStore | None = None) -> None:
        """`descriptors`: the store, when the caller streamed it from the index files (the index table then need
        not carry its `descriptor` column); otherwise it is built from that column."""
        from curate.stages.phash_dedup.hamming import HammingIndex
        from curate.stages.phash_dedup.phash import from_hex

        self.settings = settings
        self.n_bits = n_bits
        self.labels = _Labels(index.column("eval_set"), index.column("item_id"))
        n_items = index.num_rows
        hashes = [from_hex(index.column("phash"), n_bits)]
        owner = [np.arange(n_items, dtype=np.int32)]
        # variants only help when verification can refuse what they bring in
        if settings.verify and "variant_hashes" in index.column_names:
            variants = index.column("variant_hashes")
            lengths = pc.fill_null(pc.list_value_length(variants), 0).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(variants)
            if len(flat):
                hashes.append(from_hex(flat, n_bits))
                owner.append(np.repeat(np.arange(n_items, dtype=np.int32), lengths))
        self.hashes = np.concatenate(hashes)
        self.main_hashes = self.hashes[:n_items]  # a view: the main hashes come first
        self.owner = np.concatenate(owner)
        self.search_index = HammingIndex(self.hashes, n_bits, settings.search_threshold)
        self._label_rank = self.labels.ranks()  # candidate ranking's tie-break, without a string per item
        self.fine: np.ndarray | None = None  # (hashes, 4) uint64, fine code of each searched hash
        self.descriptors: DescriptorStore | None = None
        self._nd: Any = None
        if settings.verify:
            from curate.stages.phash_dedup import nearduplicate

            self._nd = nearduplicate
            if descriptors is not None:
                if len(descriptors) != n_items:
                    raise ValueError(f"{len(descriptors)} descriptors for {n_items} eval items")
                self.descriptors = descriptors
            elif "descriptor" in index.column_names:
                self.descriptors = DescriptorStore(index.column("descriptor"))
            if "fine_codes" in index.column_names:
                self.fine = _fine_codes_by_hash(index, len(self.hashes), len(hashes) > 1)

    @property
    def compact_nbytes(self) -> int:
        """Bytes of what the matcher keeps in RAM (hashes, owners, fine codes, labels, the search index)."""
        fine = self.fine.nbytes if self.fine is not None else 0
        return int(self.hashes.nbytes + self.owner.nbytes + fine + self.labels.nbytes + self._label_rank.nbytes
                   + self.search_index.nbytes)

    def search(self, hashes: np.ndarray) -> dict[int, list[tuple[int, int]]]:
        """row -> [(eval item, distance), ...] ranked by (distance, label); rows without candidates absent."""
        out: dict[int, list[tuple[int, int]]] = {}
        for ranked in self._ranked(hashes):
            pairs = list(zip(ranked.item.tolist(), ranked.distance.tolist(), strict=True))
            bounds = ranked.bounds.tolist()
            out.update({row: pairs[a:b] for row, a, b in zip(ranked.rows.tolist(), bounds, bounds[1:], strict=False)})
        return out

    def _ranked(self, hashes: np.ndarray) -> list[_Ranked]:
        """Every (row, eval item) candidate as parallel arrays, ranked per row by (distance, label); one part per
        chunk of rows (rows numbered as in `hashes`), parts without candidates left out.

        Searched and ranked a few rows at a time (each row's ranking is its own, so the result does not depend on
        the split), and the parts are not joined: against a large eval index a row has tens of thousands of raw
        pairs, and sorting (or concatenating) a whole batch's at once ran out of cache and memory bandwidth
        (measured at 1M items and 16 bits, 385 rows: 74-87 ms per row in one batch, 17-19 in single rows). The
        chunk is sized from the mean pairs per row so far.
        """
        parts: list[_Ranked] = []
        start, rows, raw_pairs = 0, _FIRST_RANKED_ROWS, 0
        while start < len(hashes):
            stop = min(len(hashes), start + rows)
            part, found = self._ranked_chunk(hashes[start:stop])
            if len(part.rows):
                parts.append(replace(part, rows=part.rows + start))
            start, raw_pairs = stop, raw_pairs + found
            rows = int(np.clip(_RANKED_PAIRS_PER_CHUNK * start // max(1, raw_pairs), 1, _MAX_RANKED_ROWS))
        return parts

    def _ranked_chunk(self, hashes: np.ndarray) -> tuple[_Ranked, int]:
        """:meth:`_ranked` of a few rows, and how many raw pairs (searched hashes) the search found for them."""
        found = self.search_index.search(hashes, self.settings.search_threshold)
        query = np.asarray(found.query, dtype=np.int64)
        if len(query) == 0:
            return _Ranked.empty(), 0
        hit = np.asarray(found.index, dtype=np.int64)
        distance = np.asarray(found.distance, dtype=np.int64)
        item = self.owner[hit].astype(np.int64)
        if len(self.hashes) > len(self.main_hashes):
            # nearest hash per (row, eval item): main and variants of one item count once (the first found of equals)
            order = np.lexsort((np.arange(len(query)), distance, item, query))
            query, item, distance, hit = query[order], item[order], distance[order], hit[order]
            first = np.r_[True, (query[1:] != query[:-1]) | (item[1:] != item[:-1])]
            query, item, distance, hit = query[first], item[first], distance[first], hit[first]
        # per row by (distance, label)
        order = np.lexsort((self._label_rank[item], distance, query))
        query, item, distance, hit = query[order], item[order], distance[order], hit[order]
        starts = np.flatnonzero(np.r_[True, query[1:] != query[:-1]])
        from curate.stages.phash_dedup.phash import hamming

        main_distance = hamming(hashes[query], self.main_hashes[item])
        return _Ranked(query[starts], np.r_[starts, len(query)], item, distance, hit, main_distance), len(found)

    def match(self, hashes: np.ndarray, load_images: ImageLoader | None = None) -> MatchResult:
        """Match corpus hashes ``(n, words)``; `load_images` supplies image bytes for verification.

        Candidates are kept as arrays; a :class:`Candidate` object is made only for the ones a check decides
        (and, without verification, for each row's match), so a row with thousands of pHash collisions costs
        array operations, not objects.
        """
        parts = self._ranked(hashes)
        result = MatchResult([None] * len(hashes), [])
        if not parts:
            return result
        result.counters["eval_candidate_rows"] += sum(len(ranked.rows) for ranked in parts)
        if not self.settings.verify:
            for ranked in parts:
                for row, a in zip(ranked.rows.tolist(), ranked.bounds[:-1].tolist(), strict=False):
                    candidate = ranked.candidate(row, a)
                    result.matches[row] = candidate
                    result.candidates.append(candidate)
            return result
        if load_images is None:
            raise ValueError("verification needs the corpus images: pass load_images")
        images = load_images([row for ranked in parts for row in ranked.rows.tolist()])  # one call: may read a file
        for ranked in parts:
            bounds = ranked.bounds.tolist()
            for row, a, b in zip(ranked.rows.tolist(), bounds, bounds[1:], strict=False):
                result.matches[row] = self._verify(ranked, row, a, b, images.get(row), result)
        return result

    def _decode(self, row: int, data: bytes | Image.Image | None) -> Image.Image | None:
        from curate.stages.phash_dedup.phash import decode_rgb

        if data is None:
            log.warning("corpus row %d: no image bytes to verify its eval candidates", row)
            return None
        try:
            return decode_rgb(data) if isinstance(data, bytes) else data
        except Exception as err:  # noqa: BLE001 - an image that does not decode cannot confirm a match
            log.warning("corpus row %d: image does not decode, candidates left unverified: %s", row, err)
            return None

    def _verify(self, ranked: _Ranked, row: int, a: int, b: int, data: bytes | Image.Image | None,
                result: MatchResult) -> Candidate | None:
        """The nearest of the row's candidates ``ranked[a:b]`` the cascade confirms, or None. Fine code and
        descriptor made once per row; the candidates a check decides are added to ``result.candidates``."""
        assert self._nd is not None
        counters = result.counters
        image = self._decode(row, data)
        if image is None:
            return None
        threshold = self.settings.threshold
        unsure = np.arange(a, b)
        if self.fine is not None:
            corpus_fine = np.frombuffer(self._nd.fine_code(image), dtype=np.uint64)
            fine_distance = np.bitwise_count(self.fine[ranked.hit[a:b]] ^ corpus_fine).sum(axis=1)
            keep = self._nd.cheap_check(fine_distance, ranked.distance[a:b])
            counters["eval_cheap_checks"] += b - a
            counters["eval_cheap_passed"] += int(keep.sum())
            unsure = unsure[keep]
            # refusals of what pHash alone would have matched: counted, and kept for the report
            for i in np.flatnonzero(~keep & (ranked.distance[a:b] <= threshold)).tolist():
                refused = ranked.candidate(row, a + i)
                refused.verified, refused.score, refused.check = False, 0.0, "cheap"
                result.candidates.append(refused)
                counters["eval_pHash_match_overruled"] += 1
        if not len(unsure) or self.descriptors is None:
            return None
        prepared: Any = None
        corpus_desc: bytes | None = None
        for i in unsure[: self.settings.max_candidates].tolist():
            candidate = ranked.candidate(row, i)
            eval_desc = self.descriptors.get(candidate.item)
            if eval_desc is None:
                continue
            # the corpus side: thumbnail first, keypoints only once the model is asked
            prepared = prepared or _corpus_side(row, self._nd.prepare, image)
            if prepared is None:
                return None
            result.candidates.append(candidate)
            if self.settings.detail_check and candidate.main_distance <= threshold:
                agreement = self._nd.detail_agreement(eval_desc, prepared)
                if agreement is not None and agreement >= self._nd.DETAIL_NCC:
                    candidate.verified, candidate.score, candidate.check = True, round(agreement, 4), "detail"
                    counters["eval_verified"] += 1
                    counters["eval_detail_accepted"] += 1
                    return candidate
            corpus_desc = corpus_desc or _corpus_side(row, self._nd.descriptor, image, prepared=prepared)
            if corpus_desc is None:
                return None
            counters["eval_verify_calls"] += 1
            same, score = self._nd.verify(eval_desc, corpus_desc, distance=candidate.distance, n_bits=self.n_bits)
            candidate.verified, candidate.score, candidate.check = bool(same), float(score), "model"
            if candidate.verified:
                counters["eval_verified"] += 1
                if candidate.distance > threshold:
                    counters["eval_verified_beyond_threshold"] += 1
                return candidate
            if candidate.distance <= threshold:
                counters["eval_pHash_match_overruled"] += 1  # pHash alone would have rejected it
        return None


def _corpus_side(row: int, make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`make(*args, **kwargs)`, or None (logged) when the corpus image cannot be described: no match then."""
    try:
        return make(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - a bad corpus image leaves its candidates unverified, the run goes on
        log.warning("corpus row %d: no descriptor, candidates left unverified: %s", row, err)
        return None


def _fine_codes_by_hash(index: pa.Table, n_hashes: int, with_variants: bool) -> np.ndarray | None:
    """(searched hashes, 4) uint64: the fine code of each searched hash (main hashes first, then variants).

    None when any item lacks fine codes (an index built before the cascade): the cheap check is then off.
    """
    from curate.stages.phash_dedup.nearduplicate import FINE_CODE_BYTES

    column = index.column("fine_codes")
    if column.null_count:
        return None
    blobs = column.combine_chunks().cast(pa.large_binary())
    n_items = len(blobs)
    offsets = np.frombuffer(blobs.buffers()[1], np.int64)[blobs.offset : blobs.offset + n_items + 1]
    # Each blob is whole codes, main hash's first: cut the data into codes without a Python object per item.
    if n_items == 0 or np.any((offsets - offsets[0]) % FINE_CODE_BYTES) or np.any(np.diff(offsets) < FINE_CODE_BYTES):
        return None  # not whole codes: do not guess
    # one 32-byte item per code (numpy gathers those far faster than rows of a 2-D array)
    codes = np.frombuffer(blobs.buffers()[2], np.dtype((np.void, FINE_CODE_BYTES)),
                          count=int(offsets[-1] - offsets[0]) // FINE_CODE_BYTES, offset=int(offsets[0]))
    first = (offsets[:-1] - offsets[0]) // FINE_CODE_BYTES  # each item's main-hash code
    if with_variants and len(codes) != n_hashes:
        return None  # variant hashes and fine codes disagree: do not guess
    words = FINE_CODE_BYTES // 8
    out = np.empty((n_hashes if with_variants else n_items, words), dtype=np.uint64)
    out[:n_items] = codes[first].view(np.uint64).reshape(-1, words)
    if with_variants:
        is_variant = np.ones(len(codes), dtype=bool)
        is_variant[first] = False
        out[n_items:] = codes[is_variant].view(np.uint64).reshape(-1, words)
    return out
