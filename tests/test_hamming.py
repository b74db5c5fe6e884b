"""Exact Hamming range search: multi-index hashing returns exactly the brute-force pairs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from curate.stages.phash_dedup.hamming import (
    HammingIndex,
    Pairs,
    brute_force_pairs,
    make_plan,
    range_search,
    self_pairs,
)


def _random_codes(rng: np.random.Generator, n: int, n_bits: int) -> np.ndarray:
    n_words = (n_bits + 63) // 64
    codes = rng.integers(0, 2**64 - 1, size=(n, n_words), dtype=np.uint64, endpoint=True)
    top = n_bits - 64 * (n_words - 1)
    if top < 64:
        codes[:, 0] &= np.uint64((1 << top) - 1)
    return codes


def _flip(rng: np.random.Generator, codes: np.ndarray, n_bits: int, max_flips: int) -> np.ndarray:
    """Copies with 0..max_flips random bits flipped (planted near-duplicates at every distance)."""
    out = codes.copy()
    n_words = codes.shape[1]
    for row in out:
        for bit in rng.choice(n_bits, int(rng.integers(0, max_flips + 1)), replace=False):
            word = n_words - 1 - bit // 64
            row[word] ^= np.uint64(1) << np.uint64(bit % 64)
    return out


def _planted(seed: int, n_query: int, n_index: int, n_bits: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    index = _random_codes(rng, n_index, n_bits)
    near = _flip(rng, index[rng.integers(0, n_index, n_query // 2)], n_bits, t + 2)
    query = np.concatenate([near, _random_codes(rng, n_query - len(near), n_bits)])
    return query[rng.permutation(len(query))], index


@pytest.mark.parametrize(
    ("n_bits", "threshold"),
    [(64, 8), (64, 0), (64, 1), (64, 12), (64, 20), (256, 40), (256, 10), (36, 5), (16, 3), (100, 9)],
)
def test_mih_equals_brute_force(n_bits: int, threshold: int) -> None:
    query, index = _planted(n_bits * 100 + threshold, 1500, 2500, n_bits, threshold)
    found = range_search(query, index, threshold, n_bits, method="mih")
    expected = brute_force_pairs(query, index, threshold)
    assert len(expected) > 100  # the planted pairs are there, so the comparison means something
    assert found.as_set() == expected.as_set()
    assert len(found) == len(expected)  # and no pair is reported twice
    assert np.all(np.diff(found.query) >= 0)
    same_q = found.query[1:] == found.query[:-1]
    assert np.all(found.index[1:][same_q] > found.index[:-1][same_q])


def test_orientation_and_auto_method_give_identical_pairs() -> None:
    query, index = _planted(3, 3000, 400, 64, 8)  # query side larger: auto indexes it instead
    expected = brute_force_pairs(query, index, 8).as_set()
    for method in ("auto", "mih", "brute"):
        assert range_search(query, index, 8, method=method).as_set() == expected


def test_many_identical_codes_overflow_the_first_output_buffer() -> None:
    """Dense clusters (flat images all hash alike) give far more pairs than queries."""
    rng = np.random.default_rng(5)
    base = _random_codes(rng, 3, 64)
    index = _flip(rng, np.repeat(base, 400, axis=0), 64, 3)
    query = _flip(rng, np.repeat(base, 50, axis=0), 64, 3)
    found = HammingIndex(index, 64, 6, brute_force_max=0).search(query, n_threads=2)
    expected = brute_force_pairs(query, index, 6)
    assert len(expected) > 4 * len(query) * 10
    assert found.as_set() == expected.as_set() and len(found) == len(expected)


def test_one_query_with_more_pairs_than_several_buffers_resumes_where_it_stopped() -> None:
    """A single query colliding with thousands of hashes (a flat picture against a large eval index): the
    output grows several times and the search goes on from the query that did not fit, in every block."""
    rng = np.random.default_rng(9)
    base = _random_codes(rng, 2, 64)
    index = _flip(rng, np.repeat(base, 3000, axis=0), 64, 4)
    query = np.concatenate([_flip(rng, np.repeat(base, 3, axis=0), 64, 2), _random_codes(rng, 5, 64)])
    found = HammingIndex(index, 64, 10, brute_force_max=0).search(query, n_threads=1)
    expected = brute_force_pairs(query, index, 10)
    assert len(expected) > 4 * 1024  # the first buffer (1,024 pairs) fills more than twice
    assert np.array_equal(found.query, expected.query) and np.array_equal(found.index, expected.index)
    assert np.array_equal(found.distance, expected.distance)


def test_index_serves_any_threshold_up_to_its_maximum() -> None:
    query, index = _planted(11, 800, 1200, 64, 10)
    for brute_force_max in (0, len(index)):  # the compiled kernel, and the numpy scan of small indexes
        idx = HammingIndex(index, 64, 10, brute_force_max=brute_force_max)
        assert idx.brute_force == (brute_force_max > 0)
        for t in (0, 3, 7, 10):
            found, expected = idx.search(query, t), brute_force_pairs(query, index, t)
            assert found.as_set() == expected.as_set()
            assert np.array_equal(found.query, expected.query) and np.array_equal(found.index, expected.index)
        with pytest.raises(ValueError, match="threshold"):
            idx.search(query, 11)


def test_small_index_search_does_not_load_the_compiled_kernel() -> None:
    """A small eval set must not cost every worker numba's import and kernel load (~0.7 s CPU)."""
    code = (
        "import sys, numpy as np\n"
        "from curate.stages.phash_dedup.hamming import BRUTE_FORCE_MAX_INDEX, HammingIndex\n"
        "x = np.arange(1, BRUTE_FORCE_MAX_INDEX + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)\n"
        "found = HammingIndex(x, 64, 16).search(x[:50])\n"
        "assert len(found) >= 50\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_self_pairs_lists_each_pair_once() -> None:
    rng = np.random.default_rng(2)
    codes = _random_codes(rng, 500, 64)
    codes = np.concatenate([codes, _flip(rng, codes[:200], 64, 5)])
    pairs = self_pairs(codes, 5, method="mih")
    full = brute_force_pairs(codes, codes, 5)
    expected = {(q, i, d) for q, i, d in full.as_set() if q < i}
    assert pairs.as_set() == expected and len(pairs) == len(expected) >= 200


def test_plans_satisfy_the_pigeonhole_bound() -> None:
    for n_bits, t, n in [(64, 8, 10**6), (64, 8, 100), (64, 0, 10**7), (256, 40, 10**5), (64, 30, 10**4)]:
        plan = make_plan(n_bits, t, n, n)
        assert sum(b.radius + 1 for b in plan.blocks) >= t + 1
        assert all(b.key_bits <= 24 and 0 <= b.radius < b.key_bits for b in plan.blocks)
        spans = sorted((b.word, b.shift, b.shift + b.key_bits) for b in plan.blocks)
        assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:], strict=False))  # disjoint


def test_edge_cases() -> None:
    codes = np.arange(10, dtype=np.uint64)
    assert len(range_search(codes[:0], codes, 3)) == 0
    assert len(range_search(codes, codes[:0], 3)) == 0
    assert isinstance(range_search(codes, codes, 0), Pairs)
    assert range_search(codes, codes, 0).as_set() == {(i, i, 0) for i in range(10)}
    with pytest.raises(ValueError, match="threshold"):
        range_search(codes, codes, 64)
    with pytest.raises(ValueError, match="words"):
        brute_force_pairs(codes, np.zeros((3, 2), np.uint64), 1)
    with pytest.raises(ValueError, match="unsigned"):
        range_search(np.zeros(3, np.float32), codes, 1)
