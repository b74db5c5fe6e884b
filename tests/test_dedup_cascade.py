"""The eval matcher's cascade: fine codes, the cheap check, descriptors read on demand."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from curate.stages.phash_dedup import evalsets
from curate.stages.phash_dedup import nearduplicate as nd
from curate.stages.phash_dedup.matcher import DescriptorStore, EvalMatcher, MatchSettings
from curate.stages.phash_dedup.phash import decode_rgb, from_ints, phash_int

EVAL = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "hubble.jpg")


def _fine_distance(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def _jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_fine_code_separates_copies_from_other_pictures(real_images: dict[str, bytes]) -> None:
    photos = {name: decode_rgb(real_images[name]) for name in EVAL}
    codes = {name: nd.fine_code(img) for name, img in photos.items()}
    assert all(len(c) == nd.FINE_CODE_BYTES for c in codes.values())
    for name, img in photos.items():
        copy = decode_rgb(_jpeg(img.resize((img.width // 3, img.height // 3)), 40))
        near = _fine_distance(codes[name], nd.fine_code(copy))
        others = [_fine_distance(codes[name], codes[o]) for o in photos if o != name]
        assert near < 40 < min(others), (name, near, others)
        # the cheap check passes the copy even at the largest candidate distance it is fitted for
        assert nd.cheap_check(np.array([near]), np.array([16]))[0]


def test_variant_codes_follow_candidate_hashes(real_images: dict[str, bytes]) -> None:
    img = decode_rgb(real_images["chelsea.jpg"])
    codes = nd.variant_codes(img)
    assert codes[0] == (phash_int(img), nd.fine_code(img))
    assert [h for h, _f in codes[1:]] == nd.candidate_hashes(img)
    mirror_code = nd.fine_code(ImageOps.mirror(img))
    assert mirror_code in [f for _h, f in codes[1:]]
    assert nd.variant_codes(Image.new("RGB", (4, 4)))[0][1] == nd.fine_code(Image.new("RGB", (4, 4)))


def test_descriptor_store_reads_back_every_row_across_chunks() -> None:
    rng = np.random.default_rng(0)
    values: list[bytes | None] = [rng.bytes(int(n)) for n in rng.integers(0, 300, 70_000)]
    values[5] = None
    values[69_999] = None
    column = pa.chunked_array([pa.array(values[:100], pa.binary()), pa.array(values[100:], pa.binary())])
    store = DescriptorStore(column)
    assert len(store) == len(values)
    for row in (0, 5, 99, 100, 65_535 + 100, 65_536 + 100, 69_998, 69_999):
        assert store.get(row) == values[row], row


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, real_images: dict[str, bytes]) -> pa.Table:
    folder: Path = tmp_path_factory.mktemp("evalset")
    for name in EVAL:
        (folder / name).write_bytes(real_images[name])
    return evalsets.build_index_table(str(folder), "demo", verify=True)


def test_index_carries_fine_codes_for_main_and_variant_hashes(index: pa.Table) -> None:
    for blob, variants in zip(index.column("fine_codes").to_pylist(), index.column("variant_hashes").to_pylist(),
                              strict=True):
        assert len(blob) == nd.FINE_CODE_BYTES * (1 + len(variants))


def test_matcher_lines_up_each_searched_hash_with_its_own_fine_code() -> None:
    """Main hashes first, then the variants in index order: the fine codes are cut from the blobs the same way,
    and blobs that are not whole codes (or disagree with the variants) turn the cheap check off."""
    n_fine = nd.FINE_CODE_BYTES
    n_variants = [2, 0, 3, 1]
    code = {(item, k): bytes([item * 16 + k]) * n_fine for item in range(4) for k in range(4)}
    table = pa.table({
        "eval_set": ["s"] * 4, "item_id": [f"i{item}" for item in range(4)],
        "phash": [f"{item + 1:016x}" for item in range(4)],
        "variant_hashes": [[f"{(item + 1) << 8 | k:016x}" for k in range(1, n + 1)] for item, n in enumerate(n_variants)],
        "fine_codes": [b"".join(code[item, k] for k in range(n + 1)) for item, n in enumerate(n_variants)],
    })
    matcher = EvalMatcher(table.slice(0), MatchSettings(8, 12, 8, True), 64)
    assert matcher.fine is not None
    expected = [code[item, 0] for item in range(4)] + [code[item, k] for item, n in enumerate(n_variants)
                                                       for k in range(1, n + 1)]
    assert [row.tobytes() for row in matcher.fine] == expected
    assert [int(h) for h in matcher.hashes[:, 0]] == [1, 2, 3, 4, 0x101, 0x102, 0x301, 0x302, 0x303, 0x401]
    ragged = table.set_column(4, "fine_codes", pa.array([b"x" * (n_fine + 1)] + table.column("fine_codes").to_pylist()[1:]))
    assert EvalMatcher(ragged, MatchSettings(8, 12, 8, True), 64).fine is None
    short = table.set_column(4, "fine_codes", pa.array([code[item, 0] for item in range(4)]))
    assert EvalMatcher(short, MatchSettings(8, 12, 8, True), 64).fine is None


def test_cheap_check_spares_verify_calls_and_keeps_the_answer(
    index: pa.Table, real_images: dict[str, bytes]
) -> None:
    chelsea = decode_rgb(real_images["chelsea.jpg"])
    corpus = [
        ImageOps.mirror(chelsea),
        chelsea.crop((20, 15, chelsea.width - 10, chelsea.height - 25)),
        decode_rgb(real_images["camera.jpg"]),
        decode_rgb(real_images["coins.jpg"]),
    ]
    hashes = from_ints([phash_int(img) for img in corpus])
    settings = MatchSettings(threshold=8, candidate_threshold=30, max_candidates=8, verify=True)
    with_cascade = EvalMatcher(index, settings, 64)
    without = EvalMatcher(index.drop(["fine_codes"]), settings, 64)
    assert with_cascade.fine is not None and without.fine is None
    got = with_cascade.match(hashes, lambda rows: {r: corpus[r] for r in rows})
    plain = without.match(hashes, lambda rows: {r: corpus[r] for r in rows})
    labels = [with_cascade.labels[m.item] if m else None for m in got.matches]
    assert labels == ["demo:chelsea.jpg", "demo:chelsea.jpg", None, None]
    assert labels == [without.labels[m.item] if m else None for m in plain.matches]
    # at 30 bits unrelated photos are candidates; the cheap check turns most of them away unverified
    assert got.counters["eval_cheap_checks"] > got.counters["eval_cheap_passed"]
    assert got.counters["eval_verify_calls"] < plain.counters["eval_verify_calls"]
    assert with_cascade.compact_nbytes > 0


def test_mirrored_keypoints_confirm_a_mirror_only_when_allowed(real_images: dict[str, bytes]) -> None:
    img = decode_rgb(real_images["chelsea.jpg"])
    mirrored = nd.descriptor(ImageOps.mirror(img))
    eval_desc = nd.descriptor(img, with_mirror=True)
    assert len(eval_desc) > len(nd.descriptor(img))  # the second keypoint set is stored (eval side only)
    found = nd.evidence(eval_desc, mirrored)
    assert found.inliers >= 20 and found.match, found
    assert nd.evidence(nd.descriptor(img), mirrored).inliers < 6  # ORB alone is not mirror-invariant
    refused = nd.evidence(eval_desc, mirrored, allow_mirror=False)
    assert refused.inliers < 6 and not refused.match


def test_detail_agreement_tells_a_copy_from_another_photo_and_abstains_on_flat_pictures(
    real_images: dict[str, bytes],
) -> None:
    photo = decode_rgb(real_images["chelsea.jpg"])
    eval_desc = nd.descriptor(photo, with_mirror=True)
    copy = decode_rgb(_jpeg(photo.resize((photo.width // 2, photo.height // 2)), 30))
    copy_agreement = nd.detail_agreement(eval_desc, nd.prepare(copy))
    other_agreement = nd.detail_agreement(eval_desc, nd.prepare(decode_rgb(real_images["coffee.jpg"])))
    assert copy_agreement is not None and copy_agreement >= nd.DETAIL_NCC
    assert other_agreement is not None and other_agreement < 0.3
    # a cut-out on a flat page is low-information on either side: only the model may decide
    page = Image.new("RGB", (400, 300), "white")
    page.paste(photo.resize((120, 90)), (140, 105))
    assert nd.prepare(page).low_info
    assert nd.detail_agreement(eval_desc, nd.prepare(page)) is None
    assert nd.detail_agreement(nd.descriptor(page, with_mirror=True), nd.prepare(copy)) is None
    # prepare() is the first part of descriptor(): same bytes either way
    assert nd.descriptor(copy, prepared=nd.prepare(copy)) == nd.descriptor(copy)


def test_detail_check_confirms_detailed_copies_without_keypoints(
    index: pa.Table, real_images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    chelsea = decode_rgb(real_images["chelsea.jpg"])
    corpus = [
        decode_rgb(_jpeg(chelsea.resize((chelsea.width // 2, chelsea.height // 2)), 30)),  # within 8 bits
        chelsea.rotate(4, resample=Image.Resampling.BICUBIC, expand=False),  # only the model confirms it
        decode_rgb(real_images["camera.jpg"]),
    ]
    hashes = from_ints([phash_int(img) for img in corpus])
    settings = MatchSettings(threshold=8, candidate_threshold=16, max_candidates=8, verify=True)
    matcher = EvalMatcher(index, settings, 64)
    described: list[int] = []
    real_descriptor = nd.descriptor
    monkeypatch.setattr(nd, "descriptor", lambda img, **kw: described.append(1) or real_descriptor(img, **kw))
    got = matcher.match(hashes, lambda rows: {r: corpus[r] for r in rows})
    first = got.matches[0]
    assert first is not None and first.check == "detail" and first.main_distance <= 8
    assert first.score is not None and first.score >= nd.DETAIL_NCC
    assert got.counters["eval_detail_accepted"] >= 1
    second = got.matches[1]
    assert second is not None and matcher.labels[second.item] == "demo:chelsea.jpg" and second.check == "model"
    assert got.matches[2] is None
    # keypoints were computed for the rows the detail check left open, never for the first
    assert len(described) == sum(1 for row in (1, 2) if any(c.row == row and c.check == "model" for c in got.candidates))

    off = EvalMatcher(index, MatchSettings(8, 16, 8, True, detail_check=False), 64)
    plain = off.match(hashes, lambda rows: {r: corpus[r] for r in rows})
    assert plain.matches[0] is not None and plain.matches[0].check == "model"
    assert "eval_detail_accepted" not in plain.counters


def test_search_ranks_by_distance_then_label_with_variants_counted_once() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)  # few distinct pictures: many ties and collisions
    main = base[rng.integers(0, len(base), n)] ^ (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64))
    variants = [[f"{int(v):016x}" for v in base[rng.integers(0, len(base), int(k))]] for k in rng.integers(0, 4, n)]
    labels = [(f"set{int(s)}", f"img{int(i):05d}.jpg") for s, i in zip(rng.integers(0, 3, n), rng.permutation(n), strict=True)]
    table = pa.table({
        "eval_set": [s for s, _ in labels], "item_id": [i for _, i in labels],
        "phash": [f"{int(h):016x}" for h in main], "variant_hashes": variants,
    })
    matcher = EvalMatcher(table, MatchSettings(threshold=8, candidate_threshold=12, max_candidates=8, verify=True), 64)
    queries = from_ints([int(h) for h in base[:10]] + [int(rng.integers(0, 2**63))])
    got = matcher.search(queries)

    def reference(q: int) -> list[tuple[int, int]]:
        nearest: dict[int, int] = {}
        for item in range(n):
            hashes = [int(main[item])] + [int(v, 16) for v in variants[item]]
            d = min(bin(h ^ q).count("1") for h in hashes)
            if d <= 12:
                nearest[item] = d
        return sorted(nearest.items(), key=lambda kv: (kv[1], f"{labels[kv[0]][0]}:{labels[kv[0]][1]}"))

    for row, q in enumerate(int(h) for h in base[:10]):
        assert got[row] == reference(q), row
    assert sum(len(v) for v in got.values()) > 1000  # the test exercises ties, not a handful of hits


def test_ranking_rows_in_chunks_gives_what_one_batch_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The matcher searches and ranks a few rows at a time (sized by pairs per row): any split, same answer."""
    from curate.stages.phash_dedup import matcher as matcher_module

    rng = np.random.default_rng(4)
    n = 2000
    base = rng.integers(0, 2**63, 30, dtype=np.uint64)
    main = base[rng.integers(0, len(base), n)] ^ (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64))
    variants = [[f"{int(v):016x}" for v in base[rng.integers(0, len(base), int(k))]] for k in rng.integers(0, 4, n)]
    table = pa.table({
        "eval_set": ["set"] * n, "item_id": [f"img{i:05d}" for i in rng.permutation(n)],
        "phash": [f"{int(h):016x}" for h in main], "variant_hashes": variants,
    })
    matcher = EvalMatcher(table, MatchSettings(threshold=8, candidate_threshold=12, max_candidates=8, verify=True), 64)
    # rows with many candidates, rows with none (random hashes), in runs, so chunk edges fall on both kinds
    picks = [int(base[i % len(base)]) if (i // 7) % 3 else int(rng.integers(0, 2**63)) for i in range(300)]
    queries = from_ints(picks)
    monkeypatch.setattr(matcher_module, "_FIRST_RANKED_ROWS", 10_000)
    monkeypatch.setattr(matcher_module, "_MAX_RANKED_ROWS", 10_000)
    one_batch = matcher.search(queries)
    monkeypatch.setattr(matcher_module, "_FIRST_RANKED_ROWS", 3)
    monkeypatch.setattr(matcher_module, "_RANKED_PAIRS_PER_CHUNK", 200)  # ~1-3 rows per chunk after the first
    in_chunks = matcher.search(queries)
    assert in_chunks == one_batch
    assert len(one_batch) > 150 and any(row not in one_batch for row in range(300))


def test_a_corpus_image_that_cannot_be_described_leaves_its_candidates_unverified(
    index: pa.Table, real_images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chelsea = decode_rgb(real_images["chelsea.jpg"])
    corpus = [chelsea, chelsea.copy()]
    broken = corpus[1]

    def prepare(img: Image.Image) -> nd.Prepared:
        if img is broken:
            raise ValueError("cannot describe")
        return real_prepare(img)

    real_prepare = nd.prepare
    monkeypatch.setattr(nd, "prepare", prepare)
    matcher = EvalMatcher(index, MatchSettings(8, 16, 8, True), 64)
    with caplog.at_level("WARNING", logger="curate.dedup_matcher"):
        got = matcher.match(from_ints([phash_int(img) for img in corpus]), lambda rows: {r: corpus[r] for r in rows})
    assert got.matches[0] is not None and matcher.labels[got.matches[0].item] == "demo:chelsea.jpg"
    assert got.matches[1] is None
    assert "corpus row 1: no descriptor, candidates left unverified: cannot describe" in caplog.text
