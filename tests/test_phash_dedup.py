"""The phash_dedup stage: eval contamination (with and without verification) and within-corpus dedup."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from curate.pipeline.config import load_config
from curate.pipeline.configspec import ConfigError
from curate.pipeline.stage import RunContext, StageError
from curate.stages.phash_dedup import (
    DedupConfig,
    EvalSetSource,
    PhashDedupStage,
    evalsets,
    uniform_collision_rate,
)


def _context(tmp_path: Path) -> RunContext:
    return RunContext(output_path=str(tmp_path / "run"), work_path=str(tmp_path / "run" / "_work"))


def _table(rows: list[tuple[str, bytes]], **extra: list) -> pa.Table:
    data = {
        "key": [k for k, _ in rows],
        "url": [f"http://x/{k}" for k, _ in rows],
        "caption": ["c"] * len(rows),
        "status": ["success"] * len(rows),
        "image": pa.array([b for _, b in rows], pa.binary()),
        "sha256": [hashlib.sha256(b).hexdigest() for _, b in rows],
    }
    data.update(extra)
    return pa.table(data)


def _stage(tmp_path: Path, **cfg: object) -> PhashDedupStage:
    stage = PhashDedupStage(DedupConfig(**cfg), _context(tmp_path))  # type: ignore[arg-type]
    stage.ensure_setup()
    return stage


def _reencode(data: bytes, quality: int) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_eval_contamination_without_verification(real_images: dict[str, bytes], demo_dir: Path, tmp_path: Path) -> None:
    index = tmp_path / "index.parquet"
    evalsets.hash_evalset(str(demo_dir / "evalset"), str(index), name="demo", verify=False, workers=1)
    stage = _stage(tmp_path, indexes=(str(index),), verify=False, threshold=8)
    assert PhashDedupStage.run_wide(stage.config) is False
    rows = [(f"{i:09d}", data) for i, data in enumerate(real_images.values())]
    out = stage.process(_table(rows))
    assert out.column("key").to_pylist() == [k for k, _ in rows]  # same rows, same order
    by_name = dict(zip(real_images, out.to_pylist(), strict=True))
    assert by_name["chelsea.jpg"]["eval_match"] == "demo:animal/chelsea_text.jpg"
    assert by_name["coffee.jpg"]["eval_match"] == "demo:food/coffee_blur.jpg"
    assert by_name["astronaut.jpg"]["eval_match"] == "demo:person/astronaut_crop.jpg"
    assert by_name["astronaut.jpg"]["eval_distance"] == 8
    rejected = {n for n, r in by_name.items() if r["status"] == "rejected"}
    assert rejected == {"chelsea.jpg", "coffee.jpg", "astronaut.jpg"}
    for name in rejected:
        assert by_name[name]["reject_stage"] == "phash_dedup" and by_name[name]["reject_reason"] == "eval_duplicate"
    import imagehash

    for name, row in by_name.items():  # the row's phash is imagehash's string
        with Image.open(io.BytesIO(real_images[name])) as img:
            assert row["phash"] == str(imagehash.phash(img.convert("RGB")))
    # a stricter threshold lets the 8-bit astronaut crop through
    strict = _stage(tmp_path, indexes=(str(index),), verify=False, threshold=7).process(_table(rows))
    assert sum(s == "rejected" for s in strict.column("status").to_pylist()) == 2


def test_eval_sets_hashed_at_setup_with_verification(real_images: dict[str, bytes], demo_dir: Path, tmp_path: Path) -> None:
    source = EvalSetSource(path=str(demo_dir / "evalset"), name="mini")
    cache = tmp_path / "cache"
    stage = _stage(tmp_path, eval_sets=(source,), cache_dir=str(cache), verify=True, candidate_threshold=12)
    assert len(list(cache.glob("mini-*.parquet"))) == 1
    names = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "camera.jpg", "horse.png"]
    out = stage.process(_table([(f"{i:09d}", real_images[n]) for i, n in enumerate(names)]))
    result = dict(zip(names, out.to_pylist(), strict=True))
    assert result["chelsea.jpg"]["eval_match"] == "mini:animal/chelsea_text.jpg"
    assert result["astronaut.jpg"]["status"] == "rejected"  # crop: found and confirmed by the second signal
    for name in ("rocket.jpg", "camera.jpg", "horse.png"):
        assert result[name]["status"] == "success" and result[name]["eval_match"] is None
    assert stage.counters["eval_verified"] >= 2
    again = _stage(tmp_path, eval_sets=(source,), cache_dir=str(cache), verify=True)  # cache reused
    assert again._matcher is not None and len(list(cache.glob("mini-*.parquet"))) == 1


def test_threads_of_a_worker_share_one_matcher_per_run(demo_dir: Path, tmp_path: Path) -> None:
    """Each worker thread has its own stage instance; the eval matcher (the big read-only state) is built once."""
    from curate.stages.phash_dedup import stage as stage_mod

    index = tmp_path / "index.parquet"
    evalsets.hash_evalset(str(demo_dir / "evalset"), str(index), name="demo", verify=False, workers=1)
    first, second = (_stage(tmp_path, indexes=(str(index),), verify=False) for _ in range(2))
    assert first._matcher is not None and first._matcher is second._matcher
    other_run = PhashDedupStage(DedupConfig(indexes=(str(index),), verify=False), _context(tmp_path / "other"))
    other_run.ensure_setup()
    assert other_run._matcher is not first._matcher
    for stage in (first, second, other_run):
        stage.teardown()
    assert not [key for key in stage_mod._MATCHERS if key[1].startswith(str(tmp_path))]
    again = _stage(tmp_path, indexes=(str(index),), verify=False)
    assert again._matcher is not None and again._matcher is not first._matcher
    again.teardown()


def test_setup_streams_descriptors_from_the_index_file(demo_dir: Path, tmp_path: Path,
                                                      whole_descriptor_reads: list[object]) -> None:
    """The descriptor column (~19 KB per eval item) goes from the index file to the matcher's store in batches:
    setup never reads it whole into RAM (at 1M items that would be ~19 GB per worker at start-up)."""

    index = tmp_path / "index.parquet"
    evalsets.hash_evalset(str(demo_dir / "evalset"), str(index), name="demo", verify=True, workers=1)
    stage = _stage(tmp_path, indexes=(str(index),), verify=True)
    assert whole_descriptor_reads == []
    stored = [d for part in evalsets.iter_descriptors(str(index)) for d in part.to_pylist()]
    assert stage._matcher is not None and stage._matcher.descriptors is not None
    assert [stage._matcher.descriptors.get(i) for i in range(len(stored))] == stored
    stage.teardown()


def test_descriptors_are_read_from_the_file_a_piece_at_a_time(demo_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming must hold for an index written in one row group (what `hash-evalset` writes): Parquet's default
    reads a row group's column chunk whole, which for 1M items is every descriptor at once."""
    import pyarrow.parquet as pq

    small = tmp_path / "small.parquet"
    evalsets.hash_evalset(str(demo_dir / "evalset"), str(small), name="demo", verify=True, workers=1)
    table = pq.read_table(small)
    copies = [table.set_column(1, "item_id", pa.array([f"{i}#{k}" for i in table.column("item_id").to_pylist()]))
              for k in range(60)]
    index = tmp_path / "index.parquet"
    # no dictionary, no compression: 60 copies of 6 descriptors must take the room of 360 distinct ones
    pq.write_table(pa.concat_tables(copies).replace_schema_metadata(table.schema.metadata), index,
                   compression="none", use_dictionary=False)
    assert pq.ParquetFile(index).metadata.num_row_groups == 1
    column_bytes = pq.ParquetFile(index).metadata.row_group(0).column(5).total_compressed_size
    assert pq.ParquetFile(index).schema_arrow.names[5] == "descriptor" and column_bytes > 4 << 20

    largest: list[int] = []
    real_parquet_file = pq.ParquetFile

    class Recording(io.RawIOBase):
        def __init__(self, path: str) -> None:
            self.file = open(path, "rb")  # noqa: SIM115 - closed with the reader
        def readable(self) -> bool:
            return True
        def seekable(self) -> bool:
            return True
        def seek(self, offset: int, whence: int = 0) -> int:
            return self.file.seek(offset, whence)
        def tell(self) -> int:
            return self.file.tell()
        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            n = self.file.readinto(buffer)
            largest.append(n)
            return n
        def read(self, size: int = -1) -> bytes:
            data = self.file.read(size)
            largest.append(len(data))
            return data
        def close(self) -> None:
            self.file.close()
            super().close()

    def recording(source: object, *args: object, **kwargs: object) -> pq.ParquetFile:
        return real_parquet_file(Recording(str(source)), *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", recording)
    stored = [d for part in evalsets.iter_descriptors(str(index)) for d in part.to_pylist()]
    assert len(stored) == 60 * table.num_rows
    assert stored[: table.num_rows] == table.column("descriptor").to_pylist()
    assert max(largest) <= 2 << 20 < column_bytes  # a megabyte or so per read, never the column chunk


def test_verification_guard_rejects_a_phash_collision(demo_dir: Path, tmp_path: Path) -> None:
    """Two different flat pictures share a pHash; pHash alone rejects, verification keeps it."""
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    Image.new("RGB", (200, 200), (240, 240, 240)).save(eval_dir / "white.png")
    other = Image.new("RGB", (200, 200), (30, 90, 200))
    buf = io.BytesIO()
    other.save(buf, "PNG")
    corpus = _table([("000000001", buf.getvalue())])
    plain = _stage(tmp_path, eval_sets=(EvalSetSource(path=str(eval_dir)),), cache_dir=str(tmp_path / "c"),
                   verify=False).process(corpus)
    assert plain.column("reject_reason").to_pylist() == ["eval_duplicate"]
    guarded = _stage(tmp_path, eval_sets=(EvalSetSource(path=str(eval_dir)),), cache_dir=str(tmp_path / "c"))
    out = guarded.process(corpus)
    assert out.column("status").to_pylist() == ["success"]
    assert guarded.counters["eval_pHash_match_overruled"] == 1
    assert guarded.counters["eval_verify_calls"] == 1


def test_uniform_collision_rate_and_the_cost_warning(demo_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert uniform_collision_rate(0, 64) == 2.0**-64
    assert uniform_collision_rate(64, 64) == 1.0
    assert uniform_collision_rate(16, 64) == pytest.approx(3.87e-5, rel=1e-2)
    assert uniform_collision_rate(8, 16) == pytest.approx(39203 / 65536)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    Image.open(demo_dir / "images" / "chelsea.jpg").save(eval_dir / "chelsea.png")
    with caplog.at_level(logging.WARNING):
        _stage(tmp_path, eval_sets=(EvalSetSource(path=str(eval_dir)),), cache_dir=str(tmp_path / "c"))
    assert not [r for r in caplog.records if "candidates per row" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # 40 of 64 bits: a handful of eval hashes already floods every row
        _stage(tmp_path, eval_sets=(EvalSetSource(path=str(eval_dir)),), cache_dir=str(tmp_path / "c"),
               candidate_threshold=40)
    assert [r for r in caplog.records if "candidates per row" in r.getMessage()]


def _run_global(stage: PhashDedupStage, partitions: list[pa.Table]) -> list[pa.Table]:
    """What the runner does for a global stage: score all, summarise, decide once, apply."""
    scored = [stage.score(p) for p in partitions]
    alive = [s.filter(pa.compute.equal(s.column("status"), "success")) for s in scored]
    decision = stage.decide([stage.summarize(a) for a in alive if a.num_rows])
    return [stage.apply(a, decision) for a in alive]


def test_within_corpus_exact_and_near_duplicates_across_partitions(real_images: dict[str, bytes], tmp_path: Path) -> None:
    stage = _stage(tmp_path, within_corpus=True, within_corpus_threshold=4)
    assert PhashDedupStage.run_wide(stage.config) is True
    chelsea, rocket, horse = real_images["chelsea.jpg"], real_images["rocket.jpg"], real_images["horse.png"]
    rocket_q60 = _reencode(rocket, 60)  # different bytes, same picture
    part_a = _table([("000000003", chelsea), ("000000005", rocket_q60), ("000000006", horse)])
    part_b = _table([("000000001", chelsea), ("000000002", rocket), ("000000009", chelsea)])
    out_a, out_b = _run_global(stage, [part_a, part_b])
    rows = {r["key"]: r for r in out_a.to_pylist() + out_b.to_pylist()}
    assert rows["000000001"]["status"] == "success" and rows["000000001"]["dup_of"] is None
    assert rows["000000003"]["reject_reason"] == "exact_duplicate" and rows["000000003"]["dup_of"] == "000000001"
    assert rows["000000009"]["reject_reason"] == "exact_duplicate" and rows["000000009"]["dup_of"] == "000000001"
    assert rows["000000005"]["reject_reason"] == "near_duplicate" and rows["000000005"]["dup_of"] == "000000002"
    assert rows["000000002"]["status"] == rows["000000006"]["status"] == "success"
    assert out_a.column("key").to_pylist() == part_a.column("key").to_pylist()


def test_keep_highest_score_and_eval_rows_stay_out(real_images: dict[str, bytes], tmp_path: Path) -> None:
    stage = _stage(tmp_path, within_corpus=True, keep="highest_score", score_column="similarity")
    coffee = real_images["coffee.jpg"]
    part = _table([("000000001", coffee), ("000000002", _reencode(coffee, 50)), ("000000003", coffee),
                   ("000000004", real_images["camera.jpg"])], similarity=[0.2, 0.35, None, 0.3])
    (out,) = _run_global(stage, [part])
    rows = {r["key"]: r for r in out.to_pylist()}
    assert rows["000000002"]["status"] == "success"  # best score survives
    assert rows["000000001"]["reject_reason"] == "near_duplicate" and rows["000000001"]["dup_of"] == "000000002"
    # same bytes as a rejected row: points at the row that was kept, and says near (bytes differ from it)
    assert rows["000000003"]["dup_of"] == "000000002"
    assert rows["000000004"]["status"] == "success"


def test_setup_refuses_mismatched_indexes(demo_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    evalsets.hash_evalset(str(demo_dir / "evalset"), str(plain), verify=False, workers=1)
    with pytest.raises(StageError, match="no near-duplicate descriptors"):
        _stage(tmp_path, indexes=(str(plain),), verify=True)
    with pytest.raises(StageError, match="hash_size 8"):
        _stage(tmp_path, indexes=(str(plain),), verify=False, hash_size=16, threshold=20, candidate_threshold=20)
    with pytest.raises(StageError, match="dedup.indexes"):
        _stage(tmp_path, indexes=(str(tmp_path / "nope.parquet"),), verify=False)


def test_config_validation(tmp_path: Path) -> None:
    base = {"input": {"path": "in.csv"}, "output": {"path": str(tmp_path)}}
    with pytest.raises(ConfigError, match="dedup.candidate_threshold"):
        load_config(None, data={**base, "dedup": {"threshold": 10, "candidate_threshold": 6}})
    with pytest.raises(ConfigError, match="dedup.threshold"):
        load_config(None, data={**base, "dedup": {"hash_size": 4, "threshold": 16, "candidate_threshold": 16}})
    with pytest.raises(ConfigError, match=r"dedup.eval_sets\[0\].path"):
        load_config(None, data={**base, "dedup": {"eval_sets": [{"name": "x"}]}})
    cfg = load_config(None, data={**base, "dedup": {"within_corpus": True, "eval_sets": [{"path": "ev", "name": "e"}]}})
    assert cfg.dedup.within_corpus and cfg.dedup.eval_sets[0].name == "e"
