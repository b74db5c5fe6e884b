"""Hostile inputs through a real run: every input row is counted (kept or turned down at stage `input` with a
reason), none is lost, and no partition crashes or exhausts memory."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import resource
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline import inputs, tario
from curate.pipeline.config import ConfigError, load_config
from curate.pipeline.runner import run


def run_stats(tmp_path: Path, input_path: Path, *extra: str) -> dict[str, Any]:
    overrides = [f"input.path={input_path}", f"output.path={tmp_path / 'run'}", "input.shard_size=2",
                 "download.enabled=false", "captions.enabled=false", "dedup.enabled=false", "clip.enabled=false",
                 "cluster.processes=false", "cluster.n_workers=1", "cluster.dashboard=false", *extra]
    run(load_config(None, overrides, data={}), progress=False, echo=lambda _m: None)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    rejected = sum(sum(r.values()) for r in stats["rejected"].values())
    assert stats["input_rows"] == stats["kept"] + rejected
    return stats


def output_rows(tmp_path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for folder in ("curated", "rejected"):
        if (tmp_path / "run" / folder).exists() and list((tmp_path / "run" / folder).glob("*.parquet")):
            rows += pq.read_table(tmp_path / "run" / folder).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# -- WebDataset grouping -----------------------------------------------------------------------------

@contextmanager
def streamed_tars(monkeypatch: pytest.MonkeyPatch, stream: bool) -> Iterator[None]:
    """Force the non-seekable (one pass, front to back) reader when `stream`."""
    if stream:
        @contextmanager
        def open_stream(path: str) -> Iterator[tuple[tarfile.TarFile, bool]]:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*", **tario._READ_OPTIONS) as tar:
                yield tar, False

        monkeypatch.setattr(tario, "_open_tar", open_stream)
    yield


@pytest.mark.parametrize("stream", [False, True], ids=["seekable", "stream"])
def test_tar_members_are_grouped_by_key_in_any_order(tmp_path: Path, real_images: dict[str, bytes],
                                                      monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    jpg = next(data for name, data in real_images.items() if name.endswith(".jpg"))
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "b.jpg", "b.txt", "a.txt", "c.jpg", "c.txt", "d.txt", "a.jpg", "d.jpg"):
            add(tar, name, jpg if name.endswith(".jpg") else f"caption {name[0]}".encode())
    with streamed_tars(monkeypatch, stream):
        samples = list(tario.iter_tar_samples(str(path)))
        assert [(k, sorted(f)) for k, f in samples] == [
            ("a", ["jpg", "txt"]), ("b", ["jpg", "txt"]), ("c", ["jpg", "txt"]), ("d", ["jpg", "txt"]), ("a", ["jpg"])]
        stats = run_stats(tmp_path, path)
    # a, b, c, d, then the second a.jpg as a row of its own: 5 input rows, none lost
    assert stats["input_rows"] == 5 and stats["kept"] == 4
    assert stats["rejected"] == {"input": {"duplicate_key": 1}}
    rows = output_rows(tmp_path)
    assert [(r["source_key"], r["caption"], r["status"]) for r in rows] == [
        ("a", "caption a", "success"), ("b", "caption b", "success"), ("c", "caption c", "success"),
        ("d", "caption d", "success"), ("a", None, "rejected")]
    assert rows[4]["reject_stage"] == "input" and "'a.jpg'" in rows[4]["error_message"]
    written = []
    for shard in sorted((tmp_path / "run" / "shards").glob("*.tar")):  # each partition writes its own shard(s)
        with tarfile.open(shard) as tar:
            written += [n for n in tar.getnames() if n.endswith(".jpg")]
    assert len(written) == 4


def test_partition_reads_only_its_own_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            add(tar, f"s{i}.jpg", b"img")
        for i in range(6):
            add(tar, f"s{i}.txt", f"cap {i}".encode())
    read: list[str] = []
    real_read = tario._read

    def spy(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
        read.append(info.name)
        return real_read(tar, info)

    monkeypatch.setattr(tario, "_read", spy)
    cfg = load_config(None, [f"input.path={path}", "output.path=o", "input.shard_size=2"], data={})
    plan = inputs.plan_input(cfg.input, str(tmp_path / "w"))
    assert plan.total_rows == 6 and not read  # planning reads headers only
    table = inputs.read_partition(plan.partitions[1], cfg.input)
    assert table.column("caption").to_pylist() == ["cap 2", "cap 3"]
    assert table.column("key").to_pylist() == ["000000002", "000000003"]
    assert sorted(read) == ["s2.jpg", "s2.txt", "s3.jpg", "s3.txt"]



# -- damaged tars ---------------------------------------------------------------------------------------

def plain_tar(members: list[tuple[str, bytes]], **options: Any) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", **options) as tar:
        for name, data in members:
            add(tar, name, data)
    return buf.getvalue()


def header_offsets(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: info.offset for info in tar}


def scan_summary(path: Path) -> tuple[list[tuple[str, bool]], list[str]]:
    found = tario.scan_tar(str(path))
    return ([(m.name, m.truncated) for row in found.rows for m in row.members],
            [d.reason.split(":")[0].split(" (")[0].split(",")[0] for d in found.damage])


@pytest.mark.parametrize("stream", [False, True], ids=["seekable", "stream"])
def test_damaged_tars_keep_what_can_be_read_and_say_what_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 stream: bool) -> None:
    """tarfile alone stops at a corrupt header as if the archive ended there (every later member silently gone) and
    raises on a file cut inside a member. The scan steps over the bad blocks, marks a cut-off member, and names the
    byte ranges it could not read (seekable files; a stream can only tell a cut-off member)."""
    members = [(f"{i}.{ext}", bytes([i + 1]) * 3000 if ext == "jpg" else b"caption") for i in range(4)
               for ext in ("jpg", "txt")]
    whole = plain_tar(members)
    at = header_offsets(whole)
    cut_in_data = at["3.jpg"] + 512 + 1000
    files = {
        "whole": whole,
        "cut_in_data": whole[:cut_in_data],
        "cut_in_header": whole[:at["3.jpg"] + 100],
        "corrupt_header": whole[:at["1.jpg"]] + b"x" * 512 + whole[at["1.jpg"] + 512:],
        "stray_tail": whole + b"junk" * 20,
        "no_end_marker": whole[:at["3.txt"] + 1024],
        "concatenated": whole + plain_tar([("4.jpg", b"\1" * 10), ("4.txt", b"caption")]),
        "global_header": plain_tar(members, format=tarfile.PAX_FORMAT, pax_headers={"comment": "git archive"}),
    }
    names = [name for name, _ in members]
    with streamed_tars(monkeypatch, stream):
        for label, data in files.items():
            (tmp_path / f"{label}.tar").write_bytes(data)
        got = {label: scan_summary(tmp_path / f"{label}.tar") for label in files}
    assert got["whole"] == ([(n, False) for n in names], [])
    assert got["global_header"] == got["whole"]
    assert got["concatenated"] == ([(n, False) for n in [*names, "4.jpg", "4.txt"]], [])
    assert got["cut_in_data"] == ([(n, n == "3.jpg") for n in names[:7]], ["the file ends inside member '3.jpg'"])
    # what only a seekable file can show: bytes tarfile stepped over
    hidden = [] if stream else ["unreadable data"]
    assert got["corrupt_header"] == ([(n, False) for n in names if n != "1.jpg"], hidden)
    assert got["stray_tail"] == ([(n, False) for n in names], hidden)
    assert got["cut_in_header"] == ([(n, False) for n in names[:6]], hidden)
    assert got["no_end_marker"] == ([(n, False) for n in names], [] if stream else ["no end-of-archive marker after the last member"])
    # the cut-off member is never read; reading the others does not fail
    rows = tario.index_rows(str(tmp_path / "cut_in_data.tar"))
    read = list(tario.read_members(str(tmp_path / "cut_in_data.tar"), [r.members for r in rows]))
    assert [sorted(fields) for fields in read] == [["jpg", "txt"]] * 3 + [[]]


def test_a_run_over_a_cut_off_tar_counts_every_sample_it_can_name(tmp_path: Path, real_images: dict[str, bytes],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted download: the last sample's image is cut off. The run does not fail: that sample is a failed
    row (`input` / `truncated_member`), the others go on, and stats.json and the console name the damage."""
    jpg = next(data for name, data in real_images.items() if name.endswith(".jpg"))
    members = [(f"s{i}.{ext}", jpg if ext == "jpg" else f"caption {i}".encode()) for i in range(3) for ext in ("txt", "jpg")]
    whole = plain_tar(members)
    path = tmp_path / "cut.tar"
    path.write_bytes(whole[:header_offsets(whole)["s2.jpg"] + 512 + len(jpg) // 2])
    messages: list[str] = []
    overrides = [f"input.path={path}", f"output.path={tmp_path / 'run'}", "download.enabled=false",
                 "captions.enabled=false", "dedup.enabled=false", "clip.enabled=false", "cluster.processes=false",
                 "cluster.n_workers=1", "cluster.dashboard=false"]
    run(load_config(None, overrides, data={}), progress=False, echo=messages.append)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["input_rows"] == 3 and stats["kept"] == 2
    assert stats["rejected"] == {"input": {"truncated_member": 1}}
    assert [d["reason"].split(" (")[0] for d in stats["input_damage"]] == ["the file ends inside member 's2.jpg', "
                                                                          f"{len(jpg):,} bytes from byte "
                                                                          f"{header_offsets(whole)['s2.jpg'] + 512:,}"]
    cut = next(r for r in output_rows(tmp_path) if r["source_key"] == "s2")
    assert cut["status"] == "failed" and cut["caption"] == "caption 2" and "'s2.jpg'" in cut["error_message"]
    warnings = [m for m in messages if m.startswith("curate: warning:") and "cut.tar" in m]
    assert warnings and "inside member 's2.jpg'" in warnings[0]
    funnel = next(m for m in messages if m.startswith("input rows"))
    assert funnel.splitlines()[1].split() == ["input", "2", "-1"]  # the input's own rejects come first
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Damaged input: 1 range(s)" in report and "inside member &#x27;s2.jpg&#x27;" in report

# -- oversized members ---------------------------------------------------------------------------------

def write_sparse_tar(path: Path, members: list[tuple[str, bytes | int]]) -> None:
    """A tar whose int-sized members are holes: the header claims the size, the disk holds nothing."""
    with open(path, "wb") as f:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = content if isinstance(content, int) else len(content)
            f.write(info.tobuf(format=tarfile.GNU_FORMAT))
            padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if isinstance(content, int):
                f.seek(padded, io.SEEK_CUR)
            else:
                f.write(content + b"\0" * (padded - len(content)))
        f.write(b"\0" * tarfile.RECORDSIZE)


def test_huge_members_fail_their_sample_without_being_read(tmp_path: Path, real_images: dict[str, bytes]) -> None:
    jpg = next(data for name, data in real_images.items() if name.endswith(".jpg"))
    path = tmp_path / "huge.tar"
    write_sparse_tar(path, [
        ("good.jpg", jpg), ("good.txt", b"a good sample"),
        ("big.jpg", 3 << 30), ("big.txt", b"caption of the huge one"),
        ("wordy.jpg", jpg), ("wordy.txt", inputs.MAX_TEXT_MEMBER_BYTES + 1),
        ("after.jpg", jpg), ("after.json", json.dumps({"caption": "after the hole", "url": "u"}).encode()),
    ])
    assert path.stat().st_size > 3 << 30 and path.stat().st_blocks * 512 < 10 << 20  # sparse on disk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = run_stats(tmp_path, path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500
    assert stats["input_rows"] == 4 and stats["kept"] == 2
    assert stats["rejected"] == {"input": {"member_too_large": 2}}
    rows = {r["source_key"]: r for r in output_rows(tmp_path)}
    assert rows["good"]["status"] == "success" and rows["after"]["caption"] == "after the hole"
    big = rows["big"]
    assert big["status"] == "failed" and big["reject_stage"] == "input"
    assert "'big.jpg'" in big["error_message"] and "3,221,225,472" in big["error_message"]
    assert big["caption"] == "caption of the huge one"  # the small members of the sample are still read
    assert "'wordy.txt'" in rows["wordy"]["error_message"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["total_samples"] == 2


# -- column types ---------------------------------------------------------------------------------------

def test_non_string_caption_and_url_columns(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    urls = ["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg"]
    tables = {
        "a_list": pa.table({"url": urls, "caption": pa.array([["a", "dog"], [], None], pa.list_(pa.string()))}),
        "b_struct": pa.table({"url": urls, "caption": pa.array([{"t": "x"}, None, {"t": "y"}],
                                                                pa.struct([("t", pa.string())]))}),
        "c_binary": pa.table({"url": urls, "caption": pa.array([b"caf\xc3\xa9", b"\xff\xfe", None], pa.binary())}),
        "d_int": pa.table({"url": urls, "caption": pa.array([1984, None, 7], pa.int64())}),
        "e_url_list": pa.table({"url": pa.array([["http://x/4.jpg"], ["http://x/5.jpg", "http://x/6.jpg"], None],
                                                pa.list_(pa.string())), "caption": ["one", "two", "three"]}),
    }
    for name, table in tables.items():
        pq.write_table(table, folder / f"{name}.parquet")
    stats = run_stats(tmp_path, folder)
    # Without downloads, every row that survives the input rules fails later as no_image; none is lost.
    assert stats["input_rows"] == 15 and stats["kept"] == 0
    assert stats["rejected"] == {"input": {"bad_caption_type": 3, "bad_url_type": 1, "no_image": 11}}
    rows = output_rows(tmp_path)
    captions = [r["caption"] for r in rows]
    assert captions[0:3] == ["a dog", None, None]  # list of strings: joined with a space
    assert captions[3:6] == [None, None, None]  # struct: rejected
    assert captions[6:9] == ["café", None, None]  # binary: UTF-8, or rejected
    assert captions[9:12] == ["1984", None, "7"]  # numbers: as text
    assert [r["url"] for r in rows[12:15]] == ["http://x/4.jpg", None, None]  # a one-element list is its URL
    reasons = [r["reject_reason"] for r in rows]
    assert reasons[3:6] == ["bad_caption_type", "no_image", "bad_caption_type"]
    assert reasons[6:9] == ["no_image", "bad_caption_type", "no_image"]
    assert reasons[12:15] == ["no_image", "bad_url_type", "no_image"]
    assert "struct" in rows[3]["error_message"] and "not valid UTF-8" in rows[7]["error_message"]


# -- malformed text lines ------------------------------------------------------------------------------

def test_malformed_csv_lines_become_rejected_rows_in_place(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    long_tail = "z" * 2000
    path.write_text('url,caption\nhttp://a/1,"one"\nhttp://a/2,two,extra,fields\nhttp://a/3,"multi\nline"\n'
                    f'http://a/4\n\nhttp://a/5,five\nhttp://a/6,six,{long_tail}\n')
    stats = run_stats(tmp_path, path)
    assert stats["input_rows"] == 6 and stats["kept"] == 0
    assert stats["rejected"] == {"input": {"malformed_line": 3, "no_image": 3}}
    assert stats["input_malformed_lines"] == 3
    rows = output_rows(tmp_path)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(6)]
    assert [r["reject_reason"] for r in rows] == ["no_image", "malformed_line", "no_image", "malformed_line",
                                                  "no_image", "malformed_line"]
    assert [r["url"] for r in rows] == ["http://a/1", None, "http://a/3", None, "http://a/5", None]
    messages = [r["error_message"] for r in rows]
    assert messages[1].startswith("line 3: expected 2 fields, found 4: http://a/2,two,extra,fields")
    assert messages[3].startswith("line 6: expected 2 fields, found 1: http://a/4")
    assert messages[5].startswith("line 9: ") and len(messages[5]) < 600


def test_malformed_tsv_and_jsonl_lines(tmp_path: Path) -> None:
    tsv = tmp_path / "x.tsv"
    tsv.write_text("url\tcaption\nhttp://a/1\tone\nbroken line\nhttp://a/2\ttwo\n")
    stats = run_stats(tmp_path, tsv)
    assert stats["input_rows"] == 3 and stats["rejected"]["input"]["malformed_line"] == 1
    assert output_rows(tmp_path)[1]["error_message"].startswith("line 3: expected 2 fields, found 1")

    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"url": "http://a/1", "caption": "one"}\n{"url": "http://a/2", "capt\n'
                     '[1, 2]\n{"url": "http://a/3", "caption": 3}\n{"url": "http://a/4", "caption": {"x": 1}}\n')
    tmp2 = tmp_path / "second"
    tmp2.mkdir()
    stats = run_stats(tmp2, jsonl)
    assert stats["input_rows"] == 5
    assert stats["rejected"] == {"input": {"bad_caption_type": 1, "malformed_line": 2, "no_image": 2}}
    rows = output_rows(tmp2)
    assert [r["reject_reason"] for r in rows] == ["no_image", "malformed_line", "malformed_line", "no_image",
                                                  "bad_caption_type"]
    assert rows[1]["error_message"].startswith("line 2: invalid JSON")
    assert rows[2]["error_message"].startswith("line 3: a JSON list")
    assert rows[3]["caption"] == "3"


def test_jsonl_extra_field_whose_type_changes_between_lines_becomes_text(tmp_path: Path) -> None:
    """Scraped JSONL often has a field that is a number on one line and text on another: pyarrow refuses such a
    file, and the run used to stop on it with a config error. The field becomes text (JSON for non-strings), the
    rule a tar sample's .json fields and finalize's unified schema follow; agreeing fields keep their types."""
    jsonl = tmp_path / "x.jsonl"
    lines = [{"url": f"http://a/{i}", "caption": f"c {i}", "width": 640 if i % 2 else "640px",
              "tags": ["a", "b"] if i < 2 else "a,b", "score": 1 if i < 3 else 0.5, "n": i, "deep": {"k": i}}
             for i in range(4)]
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    stats = run_stats(tmp_path, jsonl)
    assert stats["input_rows"] == 4 and stats["rejected"] == {"input": {"no_image": 4}}
    table = pq.read_table(tmp_path / "run" / "rejected")
    assert table.column("input_width").to_pylist() == ["640px", "640", "640px", "640"]  # `width` is curate's
    assert table.column("tags").to_pylist() == ['["a", "b"]', '["a", "b"]', "a,b", "a,b"]
    assert table.column("score").to_pylist() == [1.0, 1.0, 1.0, 0.5]
    assert table.schema.field("n").type == pa.int64() and table.column("deep").to_pylist()[3] == {"k": 3}


# -- text tables: encodings, compression, brace patterns --------------------------------------------------

def test_invalid_utf8_in_a_csv_value_is_that_rows_problem_not_the_files(tmp_path: Path,
                                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """One caption with bytes that are not UTF-8 (common in scraped TSVs) used to refuse the whole file."""
    (tmp_path / "t.tsv").write_bytes(b"url\tcaption\tnote\nhttp://x/1.jpg\tgood\tok\nhttp://x/2.jpg\tbad \xff\xfe text\t"
                                     b"n\xe9e\nhttp://x/3.jpg\tcaf\xc3\xa9\tok\n")
    stats = run_stats(tmp_path, tmp_path / "t.tsv")
    assert stats["input_rows"] == 3 and stats["rejected"]["input"]["bad_caption_type"] == 1
    rows = output_rows(tmp_path)
    assert [r["caption"] for r in rows] == ["good", None, "café"]
    assert rows[1]["reject_reason"] == "bad_caption_type" and "not valid UTF-8" in rows[1]["error_message"]
    assert [r["note"] for r in rows] == [b"ok", b"n\xe9e", b"ok"]  # an extra column keeps its bytes
    # a line with the wrong number of fields *and* invalid UTF-8: pyarrow cannot hand it over; a clear error, and no
    # "Exception ignored" traceback from inside pyarrow on stderr
    (tmp_path / "m.csv").write_bytes(b"url,caption\nhttp://x/1.jpg,good\nhttp://x/2.jpg,bad \xff,extra\n")
    cfg = load_config(None, [f"input.path={tmp_path / 'm.csv'}", "output.path=o"], data={})
    with pytest.raises(ConfigError, match="also not valid UTF-8"):
        inputs.plan_input(cfg.input, str(tmp_path / "w"))
    assert "Exception ignored" not in capfd.readouterr().err


def test_compressed_tables_are_read_and_a_cut_off_one_is_a_clear_error(tmp_path: Path) -> None:
    text = "url,caption\n" + "".join(f"http://x/{i}.jpg,caption {i}\n" for i in range(500))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "in" / "b.jsonl.xz").write_bytes(lzma.compress(b'{"url": "http://y/1.jpg", "caption": "y"}\n'))
    cfg = load_config(None, [f"input.path={tmp_path / 'in' / 'a.csv.gz'}", "output.path=o"], data={})
    plan = inputs.plan_input(cfg.input, str(tmp_path / "w"))
    assert plan.format == "csv" and plan.total_rows == 500
    cfg = load_config(None, [f"input.path={tmp_path / 'in' / 'b.jsonl.xz'}", "output.path=o"], data={})
    assert inputs.plan_input(cfg.input, str(tmp_path / "w2")).total_rows == 1
    squeezed = gzip.compress(text.encode())
    (tmp_path / "cut.csv.gz").write_bytes(squeezed[: len(squeezed) // 2])
    cfg = load_config(None, [f"input.path={tmp_path / 'cut.csv.gz'}", "output.path=o"], data={})
    with pytest.raises(ConfigError, match="compressed data is cut short or corrupt"):
        inputs.plan_input(cfg.input, str(tmp_path / "w3"))


def test_a_brace_pattern_naming_a_missing_file_is_an_error(tmp_path: Path) -> None:
    """`part-{000..002}.tar` names three shards; silently running on two would lose the third's rows uncounted."""
    for name in ("part-000.tar", "part-002.tar"):
        (tmp_path / name).write_bytes(plain_tar([("a.jpg", b"x"), ("a.txt", b"caption")]))
    cfg = load_config(None, [f"input.path={tmp_path}/part-{{000..002}}.tar", "output.path=o"], data={})
    with pytest.raises(ConfigError, match=r"1 of the 3 paths .* do not exist \(first: .*part-001\.tar"):
        inputs.plan_input(cfg.input, str(tmp_path / "w"))
    cfg = load_config(None, [f"input.path={tmp_path}/part-*.tar", "output.path=o"], data={})  # a glob takes what is there
    assert inputs.plan_input(cfg.input, str(tmp_path / "w")).total_rows == 2


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path: Path) -> None:
    """input.path = a folder, output.path inside it: the run's own lock and plan (.json) made the first run refuse
    ("cannot pick a format"), and its Parquet outputs would have become input rows of the next."""
    pq.write_table(pa.table({"url": [f"http://x/{i}.jpg" for i in range(5)], "caption": ["c"] * 5}),
                   tmp_path / "in.parquet")
    overrides = [f"input.path={tmp_path}", f"output.path={tmp_path / 'run'}", "download.enabled=false",
                 "captions.enabled=false", "dedup.enabled=false", "clip.enabled=false", "cluster.processes=false",
                 "cluster.n_workers=1", "cluster.dashboard=false"]
    first = run(load_config(None, overrides, data={}), progress=False, echo=lambda _m: None)
    again = run(load_config(None, overrides, data={}), progress=False, echo=lambda _m: None)
    assert first.stats["input_rows"] == again.stats["input_rows"] == 5
    assert again.partitions_skipped == again.partitions_total == 1 and again.partitions_run == 0


def test_an_img2dataset_output_folder_is_read_as_webdataset(tmp_path: Path) -> None:
    """img2dataset writes 00000.parquet and 00000_stats.json beside each 00000.tar (curate writes sizes.json beside
    its shards): `input.format: auto` refused such a folder ("cannot pick a format"). The tars are the samples."""
    (tmp_path / "00000.tar").write_bytes(plain_tar([("000000000.jpg", b"x"), ("000000000.txt", b"caption")]))
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text('{"count": 1}')
    cfg = load_config(None, [f"input.path={tmp_path}", "output.path=o"], data={})
    plan = inputs.plan_input(cfg.input, str(tmp_path / "w"))
    assert plan.format == "webdataset" and plan.total_rows == 1 and [Path(s).name for s in plan.sources] == ["00000.tar"]
    (tmp_path / "00000.tar").unlink()  # without tars a mix of tables is still a question for the user
    with pytest.raises(ConfigError, match="cannot pick a format"):
        inputs.plan_input(cfg.input, str(tmp_path / "w"))
