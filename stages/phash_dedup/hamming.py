"""Exact Hamming range search over binary hashes: every pair within a distance threshold.

Hashes are ``uint64`` arrays of shape ``(n, words)`` (see :mod:`curate.stages.phash_dedup.phash`).

Method: multi-index hashing (Norouzi et al., 2012) with the generalised pigeonhole principle. The
code's bits are split into ``m`` disjoint blocks with radii ``r_i`` such that ``sum(r_i + 1) = t + 1``;
if two codes differ in at most ``t`` bits, at least one block differs in at most ``r_i`` bits. The
index keeps, per block, the codes bucketed by that block's value (a dense CSR table over at most
2^24 keys; wider blocks are keyed on their first 24 bits, which keeps the filter exact because a
sub-block never differs more than its block). A query probes, per block, every key within ``r_i``
bits of its own and verifies each candidate's full distance. A pair found through block ``i`` is
reported only if no earlier block ``j < i`` is within ``r_j`` (it was reported there), so the output
has no duplicates and needs no sort-unique pass. The result is exactly the brute-force result
(tests/test_hamming.py checks it against :func:`brute_force_pairs`).

The block count is chosen from a cost model (probes + expected random candidates, per query), and
:func:`range_search` falls back to brute force when that is cheaper (small inputs). The inner loops
are numba-compiled (``nogil``) and run on a thread pool over query chunks.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

MAX_KEY_BITS = 24  # dense bucket tables: 2^24 int64 offsets = 128 MiB per block at most
_MAX_PROBES_PER_BLOCK = 1 << 20  # masks enumerated per block; guards against silly plans
#: Indexes of at most this many hashes are searched by a numpy scan of all of them (~10 ns per hash and query row,
#: <= ~0.1 ms per row) instead of the compiled kernel, whose first use costs ~0.7 s CPU per process (importing numba
#: and loading the cached machine code): a small eval set (hundreds of images) would pay that in every worker.
BRUTE_FORCE_MAX_INDEX = 8192
_MAX_FIRST_BUFFER = 1 << 22  # pairs (20 bytes each) a search's output starts with at most


@dataclass(frozen=True)
class Pairs:
    """Search result: parallel arrays, sorted by (query, index)."""

    query: np.ndarray  # int64 row numbers into the query hashes
    index: np.ndarray  # int64 row numbers into the indexed hashes
    distance: np.ndarray  # int32 Hamming distances

    def __len__(self) -> int:
        return len(self.query)

    @staticmethod
    def empty() -> Pairs:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))

    def sorted(self) -> Pairs:
        order = np.lexsort((self.index, self.query))
        return Pairs(self.query[order], self.index[order], self.distance[order])

    def as_set(self) -> set[tuple[int, int, int]]:
        return set(zip(self.query.tolist(), self.index.tolist(), self.distance.tolist(), strict=True))


def as_words(hashes: np.ndarray) -> np.ndarray:
    """Coerce ``(n,)`` or ``(n, words)`` unsigned hashes to a C-contiguous ``(n, words)`` uint64 array."""
    arr = np.asarray(hashes)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"expected hashes of shape (n,) or (n, words), got {arr.shape}")
    if arr.dtype != np.uint64:
        if arr.dtype.kind not in "ui":
            raise ValueError(f"expected unsigned integer hashes, got dtype {arr.dtype}")
        arr = arr.astype(np.uint64)
    return np.ascontiguousarray(arr)


def _check_threshold(threshold: int, n_bits: int) -> None:
    if not 0 <= threshold < n_bits:
        raise ValueError(f"threshold must be in [0, {n_bits - 1}] for {n_bits}-bit hashes, got {threshold}")


# -- brute force (reference and small inputs) ------------------------------------------------------

def brute_force_pairs(query: np.ndarray, index: np.ndarray, threshold: int, chunk_cells: int = 1 << 24) -> Pairs:
    """All pairs within `threshold` by a vectorised numpy all-pairs scan (O(n*m) time)."""
    q = as_words(query)
    x = as_words(index)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query has {q.shape[1]} words per hash, index {x.shape[1]}")
    if len(q) == 0 or len(x) == 0:
        return Pairs.empty()
    rows = max(1, chunk_cells // max(1, len(x) * q.shape[1]))
    out_q: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    out_d: list[np.ndarray] = []
    for start in range(0, len(q), rows):
        block = q[start : start + rows]
        dist = np.zeros((len(block), len(x)), dtype=np.int32)
        for w in range(q.shape[1]):
            dist += np.bitwise_count(block[:, w, None] ^ x[None, :, w])
        qi, ii = np.nonzero(dist <= threshold)
        out_q.append(qi.astype(np.int64) + start)
        out_i.append(ii.astype(np.int64))
        out_d.append(dist[qi, ii])
    return Pairs(np.concatenate(out_q), np.concatenate(out_i), np.concatenate(out_d).astype(np.int32))


# -- planning ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    word: int  # which uint64 word
    shift: int  # key = (word >> shift) & ((1 << key_bits) - 1)
    key_bits: int  # bits used as the bucket key (<= MAX_KEY_BITS; the block may be wider)
    radius: int  # probe every key within this many bits


@dataclass(frozen=True)
class Plan:
    blocks: tuple[Block, ...]
    threshold: int
    probes_per_query: int
    candidate_fraction: float  # expected fraction of the index probed per query, for random codes

    def cost(self, n_queries: int, n_index: int) -> float:
        # A probe (bucket lookup) costs a few candidate checks; building costs a sort per block.
        return n_queries * (3.0 * self.probes_per_query + self.candidate_fraction * n_index) + 4.0 * n_index * len(
            self.blocks
        )


def ball_size(bits: int, radius: int) -> int:
    """How many `bits`-bit codes lie within `radius` of a given one."""
    return sum(math.comb(bits, k) for k in range(min(radius, bits) + 1))


def _valid_bits_per_word(n_bits: int) -> list[int]:
    n_words = (n_bits + 63) // 64
    first = n_bits - 64 * (n_words - 1)
    return [first] + [64] * (n_words - 1)


def make_plan(n_bits: int, threshold: int, n_index: int, n_queries: int) -> Plan:
    """Pick blocks/radii minimising the expected cost for random codes (exact for any data)."""
    _check_threshold(threshold, n_bits)
    per_word = _valid_bits_per_word(n_bits)
    key_cap = max(4, min(MAX_KEY_BITS, math.ceil(math.log2(max(2, n_index))) + 2))
    best: Plan | None = None
    for m in range(1, min(n_bits, threshold + 1) + 1):
        # blocks spread over the words in proportion to their bits, never straddling a word
        counts = [max(1, round(m * b / n_bits)) for b in per_word]
        while sum(counts) > m and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
        while sum(counts) < m:
            ratios = [b / c for b, c in zip(per_word, counts, strict=True)]
            counts[ratios.index(max(ratios))] += 1
        if sum(counts) != m or any(c > b for c, b in zip(counts, per_word, strict=True)):
            continue
        widths_words: list[tuple[int, int, int]] = []  # (word, shift, width)
        for word, (bits, count) in enumerate(zip(per_word, counts, strict=True)):
            base, extra = divmod(bits, count)
            shift = 0
            for k in range(count):
                width = base + (1 if k < extra else 0)
                widths_words.append((word, shift, width))
                shift += width
        # radii: sum(r + 1) = t + 1, the wider blocks get the larger radii
        total = threshold + 1
        base_r, extra_r = divmod(total, m)
        order = sorted(range(m), key=lambda i: -widths_words[i][2])
        radii = [base_r - 1] * m
        for rank, i in enumerate(order):
            if rank < extra_r:
                radii[i] += 1
        blocks = []
        probes = 0
        fraction = 0.0
        usable = True
        for (word, shift, width), radius in zip(widths_words, radii, strict=True):
            if radius < 0:
                continue  # more blocks than t + 1 need: this one carries no probe
            key_bits = min(width, key_cap)
            if radius >= key_bits:
                usable = False  # every key would be probed: no filtering at all
                break
            ball = ball_size(key_bits, radius)
            if ball > _MAX_PROBES_PER_BLOCK:
                usable = False
                break
            blocks.append(Block(word, shift, key_bits, radius))
            probes += ball
            fraction += ball / float(1 << key_bits)
        if not usable or not blocks:
            continue
        plan = Plan(tuple(blocks), threshold, probes, min(1.0, fraction))
        if best is None or plan.cost(n_queries, n_index) < best.cost(n_queries, n_index):
            best = plan
    if best is None:
        raise ValueError(f"no multi-index plan for {n_bits} bits at threshold {threshold}; use brute force")
    return best


def _block_keys(hashes: np.ndarray, blocks: tuple[Block, ...]) -> np.ndarray:
    keys = np.empty((len(hashes), len(blocks)), dtype=np.int64)
    for b, block in enumerate(blocks):
        mask = np.uint64((1 << block.key_bits) - 1)
        keys[:, b] = ((hashes[:, block.word] >> np.uint64(block.shift)) & mask).astype(np.int64)
    return keys


def _masks(bits: int, radius: int) -> np.ndarray:
    out = [0]
    for r in range(1, radius + 1):
        for combo in combinations(range(bits), r):
            value = 0
            for bit in combo:
                value |= 1 << bit
            out.append(value)
    return np.array(out, dtype=np.int64)


# -- numba kernel -----------------------------------------------------------------------------------

def _popcount64(x: Any) -> Any:
    """SWAR popcount of a uint64 (LLVM lowers it to POPCNT where the CPU has it)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


def _probe(
    q_sorted_hashes: Any, q_keys: Any, q_order: Any, start: int, stop: int,
    sorted_hashes: Any, sorted_ids: Any, offsets: Any, offset_base: Any,
    index_keys: Any, masks: Any, mask_start: Any, radii: Any, threshold: int,
    out_q: Any, out_i: Any, out_d: Any, count: int, resume_block: int, resume_position: int,
) -> tuple[int, int, int]:
    """Probe-and-verify loop from (`resume_block`, `resume_position`), writing pairs after the first `count`.

    Block-outer, and within a block the queries go in order of their key (`q_order[b, start:stop]`):
    neighbouring queries then probe neighbouring buckets, which keeps the offset table and the
    bucket contents in cache instead of paying a memory miss per probe.

    Returns ``(count, block, position)``: ``block == n_blocks`` when done; otherwise the output is full and
    the pairs of query ``(block, position)`` were taken back, so the caller grows the output and resumes there.
    """
    n_blocks = q_keys.shape[1]
    n_words = q_sorted_hashes.shape[2]
    capacity = out_q.shape[0]
    for b in range(resume_block, n_blocks):
        first = resume_position if b == resume_block else start
        for position in range(first, stop):
            query_count = count  # where this query's pairs start: taken back if they do not all fit
            q = q_order[b, position]
            key = q_keys[q, b]
            base = offset_base[b]
            for m in range(mask_start[b], mask_start[b + 1]):
                bucket = base + (key ^ masks[m])
                for p in range(offsets[bucket], offsets[bucket + 1]):
                    dist = np.int64(0)
                    for w in range(n_words):
                        dist += _popcount64(q_sorted_hashes[b, position, w] ^ sorted_hashes[b, p, w])
                    if dist > threshold:
                        continue
                    j = sorted_ids[b, p]
                    seen = False  # reported through an earlier block already?
                    for e in range(b):
                        if _popcount64(np.uint64(q_keys[q, e] ^ index_keys[j, e])) <= radii[e]:
                            seen = True
                            break
                    if seen:
                        continue
                    if count == capacity:
                        return query_count, b, position
                    out_q[count] = q
                    out_i[count] = j
                    out_d[count] = dist
                    count += 1
    return count, n_blocks, stop


_KERNEL: Callable[..., tuple[int, int, int]] | None = None
_KERNEL_LOCK = threading.Lock()  # download threads may make the first single-row search at once


def _kernel() -> Callable[..., tuple[int, int, int]]:
    """Compile (or load from numba's on-disk cache) the probe loop; numba is imported only here."""
    global _KERNEL, _popcount64
    if _KERNEL is None:  # the lock only while loading: every search, one per row on the download threads, gets here
        with _KERNEL_LOCK:
            if _KERNEL is None:
                import numba

                _popcount64 = numba.njit(nogil=True, cache=True)(_popcount64)
                _KERNEL = numba.njit(nogil=True, cache=True, boundscheck=False)(_probe)
    return _KERNEL


class HammingIndex:
    """Multi-index hash table over `hashes` for exact range queries up to `max_threshold` bits.

    Build once (e.g. per worker for an eval index), then :meth:`search` any number of query
    batches with any threshold ``<= max_threshold``. An index of at most `brute_force_max` hashes is
    searched by :func:`brute_force_pairs` (same result; see :data:`BRUTE_FORCE_MAX_INDEX`).
    """

    def __init__(
        self, hashes: np.ndarray, n_bits: int, max_threshold: int, expected_queries: int = 100_000,
        brute_force_max: int = BRUTE_FORCE_MAX_INDEX,
    ) -> None:
        self.hashes = as_words(hashes)
        self.brute_force = len(self.hashes) <= brute_force_max
        self.n_bits = n_bits
        if self.hashes.shape[1] != (n_bits + 63) // 64:
            raise ValueError(f"{n_bits}-bit hashes need {(n_bits + 63) // 64} words, got {self.hashes.shape[1]}")
        _check_threshold(max_threshold, n_bits)
        self.max_threshold = max_threshold
        self.plan = make_plan(n_bits, max_threshold, len(self.hashes), expected_queries)
        blocks = self.plan.blocks
        n = len(self.hashes)
        # keys have at most 24 bits and ids fit 32 bits: int32 halves the per-hash memory of the index
        self.keys = _block_keys(self.hashes, blocks).astype(np.int32)
        sizes = [1 << b.key_bits for b in blocks]
        self._offset_base = np.cumsum([0] + [s + 1 for s in sizes[:-1]]).astype(np.int64)
        self._offsets = np.zeros(sum(s + 1 for s in sizes), dtype=np.int64)
        self._sorted_ids = np.empty((len(blocks), n), dtype=np.int32 if n < (1 << 31) else np.int64)
        # Per block, a copy of the hashes in bucket order: candidate checks then read memory sequentially.
        self._sorted_hashes = np.empty((len(blocks), n, self.hashes.shape[1]), dtype=np.uint64)
        for b, size in enumerate(sizes):
            order = np.argsort(self.keys[:, b], kind="stable")
            self._sorted_ids[b] = order
            self._sorted_hashes[b] = self.hashes[order]
            counts = np.bincount(self.keys[:, b], minlength=size)
            base = self._offset_base[b]
            self._offsets[base + 1 : base + 1 + size] = np.cumsum(counts)
        masks = [_masks(b.key_bits, b.radius) for b in blocks]
        self._mask_start = np.cumsum([0] + [len(m) for m in masks]).astype(np.int64)
        self._masks = np.concatenate(masks)
        self._radii = np.array([b.radius for b in blocks], dtype=np.int64)
        self._pairs_per_query = 0.0  # moving average (weight 0.1 per search): sizes the first output buffer

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def nbytes(self) -> int:
        """Memory of the index's own arrays (the bucket offset tables are a fixed cost per block)."""
        arrays = (self.hashes, self.keys, self._offsets, self._sorted_ids, self._sorted_hashes, self._masks)
        return int(sum(a.nbytes for a in arrays))

    def search(self, query: np.ndarray, threshold: int | None = None, n_threads: int | None = None) -> Pairs:
        """All (query row, index row, distance) with distance <= threshold, sorted by (query, index)."""
        t = self.max_threshold if threshold is None else threshold
        if not 0 <= t <= self.max_threshold:
            raise ValueError(f"threshold must be in [0, {self.max_threshold}] for this index, got {t}")
        q = as_words(query)
        if q.shape[1] != self.hashes.shape[1]:
            raise ValueError(f"query has {q.shape[1]} words per hash, index {self.hashes.shape[1]}")
        if len(q) == 0 or len(self) == 0:
            return Pairs.empty()
        if self.brute_force:
            return brute_force_pairs(q, self.hashes, t)
        q_keys = _block_keys(q, self.plan.blocks)
        q_order = np.ascontiguousarray(np.argsort(q_keys, axis=0, kind="stable").T)
        q_sorted = q[q_order]  # (blocks, n, words): each block's queries in probe order, read sequentially
        kernel = _kernel()
        n_threads = n_threads or min(os.cpu_count() or 1, 8)
        chunk = max(256, min(65_536, -(-len(q) // (4 * n_threads))))
        starts = list(range(0, len(q), chunk))

        n_blocks = len(self.plan.blocks)
        pairs_per_query = self._pairs_per_query

        def run(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            stop = min(len(q), start + chunk)
            # room for twice the average so far, within bounds: one flat picture's thousands of pairs must not make
            # the next batch ask for gigabytes up front (the buffer grows when it has to)
            capacity = int(min(max(1024, 2 * pairs_per_query * (stop - start)), _MAX_FIRST_BUFFER))
            out_q = np.empty(capacity, np.int64)
            out_i = np.empty(capacity, np.int64)
            out_d = np.empty(capacity, np.int32)
            count, block, position = 0, 0, start
            while True:
                count, block, position = kernel(
                    q_sorted, q_keys, q_order, start, stop, self._sorted_hashes, self._sorted_ids, self._offsets,
                    self._offset_base, self.keys, self._masks, self._mask_start, self._radii, t,
                    out_q, out_i, out_d, count, block, position,
                )
                if block == n_blocks:
                    # fold this chunk into the average (a data race here only costs a resize)
                    self._pairs_per_query = 0.9 * self._pairs_per_query + 0.1 * count / (stop - start)
                    return out_q[:count], out_i[:count], out_d[:count]
                # Full: grow and go on from the query that did not fit (a query colliding with thousands of
                # eval hashes is common at large indexes; re-running the whole chunk doubled the search's cost).
                capacity *= 2
                out_q, out_i, out_d = (np.concatenate([a[:count], np.empty(capacity - count, a.dtype)])
                                       for a in (out_q, out_i, out_d))

        if n_threads == 1 or len(starts) == 1:
            parts = [run(s) for s in starts]
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                parts = list(pool.map(run, starts))
        pairs = Pairs(
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
        )
        return pairs.sorted()


def range_search(
    query: np.ndarray, index: np.ndarray, threshold: int, n_bits: int = 64, method: str = "auto",
    n_threads: int | None = None,
) -> Pairs:
    """All pairs (query row, index row) within `threshold` bits, sorted; identical to brute force.

    `method`: ``auto`` (multi-index hashing on the larger side, or brute force when the cost model
    says it is cheaper), ``mih`` (the compiled kernel, whatever the sizes) or ``brute``.
    """
    q = as_words(query)
    x = as_words(index)
    _check_threshold(threshold, n_bits)
    if method not in ("auto", "mih", "brute"):
        raise ValueError(f"method must be auto, mih or brute, got {method!r}")
    if len(q) == 0 or len(x) == 0:
        return Pairs.empty()
    if method == "auto":
        small, large = sorted((len(q), len(x)))
        plan = make_plan(n_bits, threshold, large, small)
        brute_cost = float(len(q)) * len(x) * q.shape[1] * 2.0
        method = "brute" if brute_cost <= plan.cost(small, large) else "mih"
    if method == "brute":
        return brute_force_pairs(q, x, threshold)
    if len(q) > len(x):  # index the larger side: fewer probes for the same candidates
        found = HammingIndex(q, n_bits, threshold, expected_queries=len(x), brute_force_max=0).search(
            x, threshold, n_threads)
        return Pairs(found.index, found.query, found.distance).sorted()
    return HammingIndex(x, n_bits, threshold, expected_queries=len(q), brute_force_max=0).search(q, threshold, n_threads)


def self_pairs(hashes: np.ndarray, threshold: int, n_bits: int = 64, method: str = "auto") -> Pairs:
    """Pairs (i, j) with i < j within `threshold` bits among `hashes` themselves, sorted."""
    found = range_search(hashes, hashes, threshold, n_bits, method)
    keep = found.query < found.index
    return Pairs(found.query[keep], found.index[keep], found.distance[keep])
