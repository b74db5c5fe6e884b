"""Eval-set adapters (folder, parquet, webdataset, HF save_to_disk), index files and the cache."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import imagehash
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from curate.stages.phash_dedup import evalsets as E
from curate.stages.phash_dedup.phash import PhashParams


def _imagehash_of(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return str(imagehash.phash(ImageOps.exif_transpose(img).convert("RGB")))


@pytest.fixture
def demo_evalset(demo_dir: Path) -> Path:
    return demo_dir / "evalset"


def _expected(demo_evalset: Path) -> dict[str, str]:
    return {p.relative_to(demo_evalset).as_posix(): _imagehash_of(p.read_bytes()) for p in demo_evalset.rglob("*.jpg")}


def test_folder_adapter_and_index_file(demo_evalset: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx" / "index.parquet"
    count = E.hash_evalset(str(demo_evalset), str(out), verify=False, workers=1)
    table = E.load_index(str(out))
    expected = _expected(demo_evalset)
    assert count == table.num_rows == len(expected) == 6
    assert table.column_names == ["eval_set", "item_id", "path", "phash"]
    assert set(table.column("eval_set").to_pylist()) == {"evalset"}  # default name: the folder's
    assert dict(zip(table.column("item_id").to_pylist(), table.column("phash").to_pylist(), strict=True)) == expected
    assert "person/astronaut_crop.jpg" in table.column("item_id").to_pylist()  # class subfolders kept
    assert all(Path(p).is_file() for p in table.column("path").to_pylist())
    meta = E.index_metadata(table)
    assert meta["format_version"] == E.INDEX_FORMAT_VERSION
    assert meta["phash"]["hash_size"] == 8 and meta["phash"]["mode"] == "exact"
    assert meta["source_format"] == "folder" and meta["items"] == 6 and meta["verify"] is False
    assert E.index_params(table) == PhashParams()


def test_parallel_hashing_and_other_hash_sizes(demo_evalset: Path, tmp_path: Path) -> None:
    one = E.build_index_table(str(demo_evalset), params=PhashParams(hash_size=16), verify=False, workers=1)
    two = E.build_index_table(str(demo_evalset), params=PhashParams(hash_size=16), verify=False, workers=2)
    assert one.column("phash").to_pylist() == two.column("phash").to_pylist()
    assert all(len(h) == 64 for h in one.column("phash").to_pylist())
    assert E.index_hashes(one).shape == (6, 4)


def test_parquet_adapters_bytes_paths_and_hf_struct(demo_evalset: Path, tmp_path: Path) -> None:
    files = sorted(demo_evalset.rglob("*.jpg"))
    expected = [_imagehash_of(f.read_bytes()) for f in files]
    names = [f.name for f in files]
    pq.write_table(pa.table({"id": names, "jpg": [f.read_bytes() for f in files]}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"image_path": [str(f.relative_to(demo_evalset)) for f in files]}),
                   demo_copy := tmp_path / "paths.parquet")
    shutil.copytree(demo_evalset, tmp_path / "person", dirs_exist_ok=True)  # paths are relative to the file
    struct = pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in files],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "label": list(range(len(files)))}), tmp_path / "hf_style.parquet")

    by_bytes = E.build_index_table(str(tmp_path / "bytes.parquet"), verify=False)
    assert by_bytes.column("item_id").to_pylist() == names and by_bytes.column("phash").to_pylist() == expected
    assert by_bytes.column("eval_set")[0].as_py() == "bytes"
    shutil.copytree(demo_evalset, tmp_path, dirs_exist_ok=True)
    by_path = E.build_index_table(str(demo_copy), verify=False)
    assert by_path.column("phash").to_pylist() == expected
    assert by_path.column("item_id").to_pylist() == [str(i) for i in range(len(files))]  # no id column: row
    hf = E.build_index_table(str(tmp_path / "hf_style.parquet"), name="hfp", verify=False)
    assert hf.column("phash").to_pylist() == expected
    # the struct's `path` is a bare file name, not a file here: the index points at the row, which the
    # dedup report reads back for its thumbnails
    hf_paths = hf.column("path").to_pylist()
    assert hf_paths == [f"{tmp_path / 'hf_style.parquet'}#{row}" for row in range(len(files))]
    from curate.stages.phash_dedup.report import _read_reference

    assert [_read_reference(p) for p in hf_paths] == [f.read_bytes() for f in files]
    # several files as a glob: ids carry the file name
    both = E.build_index_table(str(tmp_path / "[bh]*.parquet"), name="glob", fmt="parquet", verify=False)
    assert both.num_rows == 2 * len(files)


def test_webdataset_tars_with_brace_pattern(demo_evalset: Path, tmp_path: Path) -> None:
    files = sorted(demo_evalset.rglob("*.jpg"))
    for shard, chunk in enumerate((files[:3], files[3:])):
        with tarfile.open(tmp_path / f"eval-{shard:03d}.tar", "w") as tar:
            for i, f in enumerate(chunk):
                key = f"s{shard}/{i:04d}"
                for name, data in ((f"{key}.jpg", f.read_bytes()), (f"{key}.txt", b"a caption"),
                                   (f"{key}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    table = E.build_index_table(str(tmp_path / "eval-{000..001}.tar"), verify=False)
    assert table.column("item_id").to_pylist() == ["s0/0000", "s0/0001", "s0/0002", "s1/0000", "s1/0001", "s1/0002"]
    assert table.column("phash").to_pylist() == [_imagehash_of(f.read_bytes()) for f in files]
    assert table.column("path")[0].as_py().endswith("eval-000.tar::s0/0000.jpg")
    from curate.stages.phash_dedup.report import _read_reference  # the report's thumbnails read them back

    assert [_read_reference(p) for p in table.column("path").to_pylist()] == [f.read_bytes() for f in files]
    assert E.detect_format(str(tmp_path)) == "webdataset"
    assert E.build_index_table(str(tmp_path), verify=False).num_rows == 6


def _save_to_disk(folder: Path, images: list[bytes], shards: int = 1) -> None:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files + state + info JSON."""
    folder.mkdir(parents=True)
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per = -(-len(images) // shards)
    data_files = []
    for s in range(shards):
        part = images[s * per : (s + 1) * per]
        table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in part], struct_type),
                          "label": pa.array(list(range(len(part))), pa.int64())})
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data_files.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": data_files, "_fingerprint": "x", "_split": None}))
    features = {"image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))


def test_hf_save_to_disk_dataset_and_dataset_dict(demo_evalset: Path, tmp_path: Path) -> None:
    files = sorted(demo_evalset.rglob("*.jpg"))
    blobs = [f.read_bytes() for f in files]
    _save_to_disk(tmp_path / "ds", blobs, shards=2)
    table = E.build_index_table(str(tmp_path / "ds"), verify=False)
    assert E.detect_format(str(tmp_path / "ds")) == "hf"
    assert table.column("item_id").to_pylist() == [str(i) for i in range(6)]  # rows continue across shards
    assert table.column("phash").to_pylist() == [_imagehash_of(b) for b in blobs]
    root = tmp_path / "dd"
    _save_to_disk(root / "validation", blobs[:2])
    _save_to_disk(root / "test", blobs[2:])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["validation", "test"]}))
    dd = E.build_index_table(str(root), verify=False)
    assert dd.column("item_id").to_pylist() == ["validation/0", "validation/1", "test/0", "test/1", "test/2", "test/3"]
    assert dd.column("eval_set")[0].as_py() == "dd"


def test_verification_columns_stored_when_asked(demo_evalset: Path, tmp_path: Path) -> None:
    from curate.stages.phash_dedup import nearduplicate

    table = E.build_index_table(str(demo_evalset), verify=True)
    assert {"variant_hashes", "descriptor"} <= set(table.column_names)
    assert all(len(d) > 0 for d in table.column("descriptor").to_pylist())
    assert all(len(h) == 16 for v in table.column("variant_hashes").to_pylist() for h in v)
    assert E.index_metadata(table)["descriptor_version"] == nearduplicate.DESCRIPTOR_VERSION


def test_index_is_written_a_row_group_at_a_time_with_the_metadata_of_the_whole_set(
    demo_evalset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hash-evalset` never holds the whole index (every descriptor: ~15 GB at a million items): row groups of
    `_ROW_GROUP_ITEMS` go to a scratch file and are copied under the finished schema (item and skip counts in the
    metadata, known only at the end). The file reads back as the in-memory table does; nothing else is left."""
    (tmp_path / "set").mkdir()
    for p in demo_evalset.rglob("*.jpg"):
        shutil.copy(p, tmp_path / "set" / p.name)
    (tmp_path / "set" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    monkeypatch.setattr(E, "_ROW_GROUP_ITEMS", 2)
    out = tmp_path / "out" / "index.parquet"
    assert E.hash_evalset(str(tmp_path / "set"), str(out), verify=True, workers=1) == 6
    written = pq.ParquetFile(out)
    assert written.metadata.num_row_groups == 3
    in_memory = E.build_index_table(str(tmp_path / "set"), verify=True, workers=1)
    table = E.load_index(str(out))
    assert table.to_pylist() == in_memory.to_pylist() and table.schema.metadata == in_memory.schema.metadata
    assert E.index_metadata(table)["items"] == 6 and E.index_metadata(table)["skipped"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.parquet"]  # no scratch file left
    (tmp_path / "bad").mkdir()
    shutil.copy(tmp_path / "set" / "broken.jpg", tmp_path / "bad" / "broken.jpg")
    with pytest.raises(ValueError, match="no readable images"):
        E.hash_evalset(str(tmp_path / "bad"), str(tmp_path / "none" / "index.parquet"), workers=1)
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_parallel_hashing_keeps_a_bounded_number_of_batches_in_flight() -> None:
    """The eval images are read as the pool hashes them, not all up front (ImageNet's train split is ~140 GB):
    at most `in_flight` batches are read and waiting, and the results come back in input order."""
    from concurrent.futures import ThreadPoolExecutor

    produced: list[int] = []
    consumed: list[int] = []
    ahead: list[int] = []

    def batches():  # type: ignore[no-untyped-def]
        for i in range(20):
            produced.append(i)
            ahead.append(len(produced) - len(consumed))
            yield [f"batch-{i}"], [b"not an image"]

    with ThreadPoolExecutor(2) as pool:
        for batch, hashed in E._in_order(pool, batches(), PhashParams(), False, in_flight=3):  # type: ignore[arg-type]
            consumed.append(int(batch[0].split("-")[1]))
            assert len(hashed) == 1 and hashed[0][0] is None  # not an image: an error, not a hash
    assert consumed == list(range(20))
    assert max(ahead) <= 3


def test_cache_hits_then_misses_on_change(demo_evalset: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(demo_evalset, source)
    cache = tmp_path / "cache"
    first, file1, hit1 = E.cached_index(str(source), cache_dir=cache)
    second, file2, hit2 = E.cached_index(str(source), cache_dir=cache)
    assert (hit1, hit2) == (False, True) and file1 == file2 and first.equals(second)
    other, file3, hit3 = E.cached_index(str(source), params=PhashParams(hash_size=6), cache_dir=cache)
    assert not hit3 and file3 != file1  # parameters are part of the key
    (source / "food" / "coffee_blur.jpg").unlink()
    changed, file4, hit4 = E.cached_index(str(source), cache_dir=cache)
    assert not hit4 and file4 != file1 and changed.num_rows == 5  # content is part of the key
    file4.write_bytes(b"garbage")  # a damaged cache entry is rebuilt
    again, _f, hit5 = E.cached_index(str(source), cache_dir=cache)
    assert not hit5 and again.num_rows == 5


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        E.hash_evalset(str(tmp_path / "missing"), str(tmp_path / "o.parquet"), verify=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no readable images"):
        E.hash_evalset(str(tmp_path / "empty"), str(tmp_path / "o.parquet"), verify=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(bad / "ok.png")
    assert E.hash_evalset(str(bad), str(tmp_path / "b.parquet"), verify=False, workers=1) == 1  # skipped, warned
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        E.load_index(str(tmp_path / "plain.parquet"))
    pq.write_table(pa.table({c: ["x"] for c in E.INDEX_COLUMNS}), tmp_path / "nometa.parquet")
    with pytest.raises(ValueError, match="not a curate eval index"):
        E.load_index(str(tmp_path / "nometa.parquet"))
    with pytest.raises(ValueError, match="no image column"):
        E.hash_evalset(str(tmp_path / "plain.parquet"), str(tmp_path / "c.parquet"), verify=False)
    with pytest.raises(ValueError, match="cannot read eval index"):
        E.load_index(str(tmp_path / "nothing.parquet"))


def test_brace_expansion() -> None:
    assert E.expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert E.expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]


def test_index_paths_are_absolute_so_reports_find_eval_images_from_anywhere(
        demo_evalset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo_evalset.parent)
    E.hash_evalset(demo_evalset.name, str(tmp_path / "idx.parquet"), name="demo", workers=1)
    monkeypatch.chdir(tmp_path)
    paths = pq.read_table(tmp_path / "idx.parquet").column("path").to_pylist()
    assert paths and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def test_descriptors_of_several_indexes_line_up_with_the_merged_index(demo_evalset: Path, tmp_path: Path) -> None:
    """One store for the stage and `dedup-report`: each file's descriptors in merged order, nulls for an index
    built without them, and the store says how many items can be verified."""
    from curate.stages.phash_dedup.matcher import DescriptorStore

    with_d, without = tmp_path / "with.parquet", tmp_path / "without.parquet"
    E.hash_evalset(str(demo_evalset), str(with_d), name="a", verify=True, workers=1)
    E.hash_evalset(str(demo_evalset), str(without), name="b", verify=False, workers=1)
    paths = [str(without), str(with_d)]
    tables = [E.load_index(p) for p in paths]
    store = DescriptorStore(E.descriptor_chunks(paths, [t.num_rows for t in tables]))
    merged = E.concat_indexes(tables)
    assert len(store) == merged.num_rows == 12 and store.present == 6
    assert [store.get(i) for i in range(12)] == merged.column("descriptor").to_pylist()
    assert store.get(0) is None and store.get(11) is not None
