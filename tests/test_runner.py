"""Runner tests with small fake stages: accounting, isolation of bad rows, contract checks, global passes,
resume, determinism, and input formats. The real stages have their own tests; the e2e test runs them all."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curate.pipeline import columns as C
from curate.pipeline import runner as runner_mod
from curate.pipeline.config import load_config
from curate.pipeline.configspec import ConfigError
from curate.pipeline.inputs import plan_input, read_partition
from curate.pipeline.stage import Stage


class RejectBadCaptions(Stage[Any]):
    name = "fake_filter"
    requires = (C.CAPTION,)

    def process(self, table: pa.Table) -> pa.Table:
        captions = table.column(C.CAPTION).to_pylist()
        if any(c == "boom" for c in captions):
            raise ValueError("cannot handle boom")
        return self.reject(table, ["bad_caption" if "bad" in (c or "") else None for c in captions])


class DropsRows(Stage[Any]):
    name = "dropper"

    def process(self, table: pa.Table) -> pa.Table:
        return table.slice(1)


class KeepLongestHalf(Stage[Any]):
    """A global stage: score = caption length, keep rows at or above the run-wide median."""

    name = "fake_global"

    @classmethod
    def run_wide(cls, config: Any) -> bool:
        return True

    def score(self, table: pa.Table) -> pa.Table:
        return C.set_column(table, "clip_score", [float(len(c or "")) for c in table.column(C.CAPTION).to_pylist()])

    def summarize(self, table: pa.Table) -> list[float]:
        return table.column("clip_score").to_pylist()

    def decide(self, summaries: Sequence[list[float]]) -> float:
        scores = sorted(s for part in summaries for s in part)
        return scores[len(scores) // 2]

    def apply(self, table: pa.Table, decision: float) -> pa.Table:
        return self.reject(table, ["below_median" if s < decision else None
                                   for s in table.column("clip_score").to_pylist()])


def make_tar(path: Path, images: dict[str, bytes], captions: list[str]) -> None:
    names = sorted(images)
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            name = names[i % len(names)]
            ext = name.rsplit(".", 1)[1]
            for member, data in ((f"s{i:04d}.{ext}", images[name]), (f"s{i:04d}.txt", caption.encode()),
                                 (f"s{i:04d}.json", json.dumps({"url": f"http://x/{name}", "width": 1}).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


CAPTIONS = ["a cat", "bad dog", "a very long caption about a coffee cup", "rocket", "bad", "a horse in a field",
            "gravel", "a clock on the wall", "coins on a table", "bad stuff here"]


@pytest.fixture
def tar_input(tmp_path: Path, real_images: dict[str, bytes]) -> Path:
    path = tmp_path / "in.tar"
    make_tar(path, real_images, CAPTIONS)
    return path


def config_for(tmp_path: Path, input_path: Path, **extra: Any) -> Any:
    overrides = [f"input.path={input_path}", f"output.path={tmp_path / 'run'}", "input.shard_size=4",
                 "download.enabled=false", "dedup.enabled=false", "clip.enabled=false",
                 "cluster.processes=false", "cluster.n_workers=1", "cluster.dashboard=false",
                 "write.shard_samples=3"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides, data={})


def run_with(monkeypatch: pytest.MonkeyPatch, stages: dict[str, type[Stage]], config: Any) -> runner_mod.RunResult:
    """Run `config` with these stage classes in place of the registry's (each with that section's config)."""
    monkeypatch.setattr(runner_mod, "stage_specs", lambda cfg: [
        runner_mod.StageSpec(section, cls, cfg.section(section)) for section, cls in stages.items()
        if cfg.section(section).enabled])
    return runner_mod.run(config, progress=False, echo=lambda _m: None)


def shard_digest(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "shards").glob("*.tar"))}


def test_accounting_outputs_and_shards(tmp_path: Path, tar_input: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_for(tmp_path, tar_input)
    result = run_with(monkeypatch, {"captions": RejectBadCaptions}, cfg)
    run = tmp_path / "run"
    stats = json.loads((run / "stats.json").read_text())
    assert stats["input_rows"] == 10
    assert stats["rejected"] == {"fake_filter": {"bad_caption": 3}}
    assert stats["kept"] == 7 == result.stats["kept"]
    assert stats["input_rows"] == stats["kept"] + sum(sum(r.values()) for r in stats["rejected"].values())
    # Each partition writes its own shards: 4 rows per partition at most 3 samples per shard -> shard numbers
    # 2p and 2p+1 reserved for partition p; partitions kept 3, 3 and 1 -> one shard each. Manifest with true sha256s.
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000.tar", "shard-00002.tar", "shard-00004.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["pattern"] == "shard-00000.tar::shard-00002.tar::shard-00004.tar"
    assert json.loads((run / "shards" / "sizes.json").read_text()) == {
        "shard-00000.tar": 3, "shard-00002.tar": 3, "shard-00004.tar": 1}
    for entry in manifest["shards"]:
        assert hashlib.sha256((run / "shards" / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    with tarfile.open(run / "shards" / "shard-00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000000.json").read())  # type: ignore[union-attr]
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"] or names[0].startswith("000000000.")
    assert meta["key"] == "000000000" and meta["caption"] == "a cat" and meta["source_key"] == "s0000"
    assert meta["input_width"] == 1  # an input column colliding with ours is kept under input_<name>
    curated = pq.read_table(run / "curated").to_pylist()
    rejected = pq.read_table(run / "rejected")
    assert len(curated) == 7 and rejected.num_rows == 3
    assert C.IMAGE not in rejected.column_names and C.IMAGE not in pq.read_schema(run / "curated/part-00000.parquet").names
    assert set(rejected.column("reject_reason").to_pylist()) == {"bad_caption"}
    assert set(rejected.column("status").to_pylist()) == {"rejected"}
    assert not list(run.rglob("*.tmp-*"))


def test_without_a_terminal_progress_comes_as_log_lines(tmp_path: Path, tar_input: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch job's log gets a progress line at most every PROGRESS_LOG_SECONDS (here: every partition)."""
    monkeypatch.setattr(runner_mod, "PROGRESS_LOG_SECONDS", 0.0)
    monkeypatch.setattr(runner_mod, "stage_specs", lambda cfg: [
        runner_mod.StageSpec("captions", RejectBadCaptions, cfg.section("captions"))])
    lines: list[str] = []
    runner_mod.run(config_for(tmp_path, tar_input), progress=False, echo=lines.append)
    progress = [line for line in lines if " done, rows " in line]
    assert [line.split(": ")[2].split(" ")[0] for line in progress] == ["1/3", "2/3"], lines  # 3/3: the end line


def test_exception_fails_only_the_offending_row(tmp_path: Path, real_images: dict[str, bytes],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "in.tar"
    make_tar(path, real_images, ["fine", "boom", "also fine", "bad one"])
    run_with(monkeypatch, {"captions": RejectBadCaptions}, config_for(tmp_path, path))
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["rejected"] == {"fake_filter": {"bad_caption": 1, "internal_error": 1}}
    assert stats["kept"] == 2
    rejected = pq.read_table(tmp_path / "run" / "rejected").to_pylist()
    boom = next(r for r in rejected if r["caption"] == "boom")
    assert boom["status"] == "failed" and "cannot handle boom" in boom["error_message"]


def test_stage_that_drops_rows_fails_the_run(tmp_path: Path, tar_input: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(runner_mod.RunFailed, match="never drop"):
        run_with(monkeypatch, {"captions": DropsRows}, config_for(tmp_path, tar_input))


def test_global_pass_decides_once_and_resumes(tmp_path: Path, tar_input: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_for(tmp_path, tar_input, **{"clip.enabled": "true"})
    run_with(monkeypatch, {"captions": RejectBadCaptions, "clip": KeepLongestHalf}, cfg)
    run = tmp_path / "run"
    stats = json.loads((run / "stats.json").read_text())
    # 7 rows survive the caption filter; lengths: 5,38,6,18,6,19,16 -> median 16 -> 4 kept
    assert stats["kept"] == 4
    assert stats["rejected"]["fake_global"] == {"below_median": 3}
    assert (run / "_work" / "pass-1" / "decision.pkl").exists()
    assert not list((run / "_work" / "pass-1").glob("*.arrow"))  # intermediates removed after finalize
    kept_scores = pq.read_table(run / "curated").column("clip_score").to_pylist()
    assert min(kept_scores) >= 16
    # Lose a finished partition after finalize: it is rescored and filtered with the saved decision.
    before = shard_digest(run)
    (run / "_work" / "done" / "part-00001.json").unlink()
    again = run_with(monkeypatch, {"captions": RejectBadCaptions, "clip": KeepLongestHalf}, cfg)
    assert again.stats["kept"] == 4 and shard_digest(run) == before


def test_resume_skips_done_partitions_and_output_is_identical(tmp_path: Path, tar_input: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_for(tmp_path, tar_input)
    first = run_with(monkeypatch, {"captions": RejectBadCaptions}, cfg)
    run = tmp_path / "run"
    before = shard_digest(run)
    stats_before = (run / "stats.json").read_text()
    second = run_with(monkeypatch, {"captions": RejectBadCaptions}, cfg)
    assert first.partitions_run == 3 and second.partitions_run == 0 and second.partitions_skipped == 3
    assert shard_digest(run) == before and (run / "stats.json").read_text() == stats_before
    # Lose one partition's marker and outputs after finalize: the resumed run redoes that partition only (the
    # others' shards are final already) and ends with byte-identical shards.
    (run / "_work" / "done" / "part-00001.json").unlink()
    (run / "curated" / "part-00001.parquet").unlink()
    (run / "shards" / "shard-00002.tar").unlink()
    third = run_with(monkeypatch, {"captions": RejectBadCaptions}, cfg)
    assert third.partitions_run == 1
    assert shard_digest(run) == before
    old, new = json.loads(stats_before), json.loads((run / "stats.json").read_text())
    assert (new["input_rows"], new["kept"], new["rejected"]) == (old["input_rows"], old["kept"], old["rejected"])


def test_changed_config_refuses_to_resume(tmp_path: Path, tar_input: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_with(monkeypatch, {"captions": RejectBadCaptions}, config_for(tmp_path, tar_input))
    with pytest.raises(ConfigError, match="output.path"):
        run_with(monkeypatch, {"captions": RejectBadCaptions},
                 config_for(tmp_path, tar_input, **{"write.shard_samples": 5}))


def test_table_inputs_laion_columns_extras_and_collisions(tmp_path: Path) -> None:
    rows = {"URL": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"], "TEXT": ["one", "1984", "three"],
            "similarity": [0.3, 0.2, 0.4], "status": ["x", "y", "z"]}
    pq.write_table(pa.table(rows), tmp_path / "laion.parquet")
    with open(tmp_path / "laion.csv", "w") as f:
        f.write("URL,TEXT,similarity,status\n")
        for i in range(3):
            f.write(f"{rows['URL'][i]},\"{rows['TEXT'][i]}\",{rows['similarity'][i]},{rows['status'][i]}\n")
    with open(tmp_path / "laion.tsv", "w") as f:
        f.write("URL\tTEXT\tsimilarity\tstatus\n")
        for i in range(3):
            f.write(f"{rows['URL'][i]}\t{rows['TEXT'][i]}\t{rows['similarity'][i]}\t{rows['status'][i]}\n")
    with open(tmp_path / "laion.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({k: v[i] for k, v in rows.items()}) + "\n")
    for name in ("laion.parquet", "laion.csv", "laion.tsv", "laion.jsonl"):
        cfg = load_config(None, [f"input.path={tmp_path / name}", f"output.path={tmp_path / 'o'}",
                                 "input.url_column=URL", "input.caption_column=TEXT", "input.shard_size=2"], data={})
        plan = plan_input(cfg.input, str(tmp_path / "work" / name))
        assert plan.total_rows == 3 and [p.num_rows for p in plan.partitions] == [2, 1]
        second = read_partition(plan.partitions[1], cfg.input)
        first = read_partition(plan.partitions[0], cfg.input)
        assert first.column("key").to_pylist() == ["000000000", "000000001"]
        assert second.column("key").to_pylist() == ["000000002"]
        assert first.column("url").to_pylist() == rows["URL"][:2]
        assert first.column("caption").to_pylist() == ["one", "1984"], name  # stays text
        assert first.column("similarity").to_pylist() == [0.3, 0.2]
        assert first.column("input_status").to_pylist() == ["x", "y"]
        assert first.column("status").to_pylist() == ["success", "success"]


def test_missing_column_and_missing_files_name_the_key(tmp_path: Path) -> None:
    pq.write_table(pa.table({"URL": ["u"], "TEXT": ["t"]}), tmp_path / "x.parquet")
    cfg = load_config(None, [f"input.path={tmp_path / 'x.parquet'}", "output.path=o"], data={})
    with pytest.raises(ConfigError, match=r"input.url_column: column 'url' not found"):
        plan_input(cfg.input, str(tmp_path / "w"))
    cfg = load_config(None, [f"input.path={tmp_path / 'nothing*.parquet'}", "output.path=o"], data={})
    with pytest.raises(ConfigError, match="input.path: no files match"):
        plan_input(cfg.input, str(tmp_path / "w"))


def test_malformed_csv_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text('url,caption\nhttp://a/1,"one"\nhttp://a/2,two,extra,fields\nhttp://a/3,three\n')
    cfg = load_config(None, [f"input.path={tmp_path / 'x.csv'}", "output.path=o"], data={})
    plan = plan_input(cfg.input, str(tmp_path / "w"))
    assert plan.total_rows == 3 and plan.malformed_lines == 1  # a malformed line is a (rejected) input row


def test_limit_and_brace_patterns(tmp_path: Path, real_images: dict[str, bytes]) -> None:
    for i in range(3):
        make_tar(tmp_path / f"part-{i:03d}.tar", real_images, [f"c{i}-{j}" for j in range(4)])
    cfg = load_config(None, [f"input.path={tmp_path}/part-{{000..002}}.tar", "output.path=o", "input.limit=10",
                             "input.shard_size=3"], data={})
    plan = plan_input(cfg.input, str(tmp_path / "w"))
    assert plan.format == "webdataset" and plan.total_rows == 10
    assert [p.num_rows for p in plan.partitions] == [3, 1, 3, 1, 2]
    last = read_partition(plan.partitions[-1], cfg.input)
    assert last.column("key").to_pylist() == ["000000008", "000000009"]
    assert last.column("caption").to_pylist() == ["c2-0", "c2-1"]
    assert all(v is not None for v in last.column("image").to_pylist())
    assert os.path.basename(last.column("source_shard")[0].as_py()) == "part-002.tar"


def test_parquet_outputs_read_in_pandas_polars_and_duckdb(tmp_path: Path, tar_input: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb
    import pandas as pd
    import polars as pl

    run_with(monkeypatch, {"captions": RejectBadCaptions}, config_for(tmp_path, tar_input))
    run = tmp_path / "run"
    (run / "curated" / ".part-00009.parquet.tmp-deadbeef").write_bytes(b"partial")  # a killed writer's leftover
    curated_glob, rejected_glob = str(run / "curated" / "*.parquet"), str(run / "rejected" / "*.parquet")
    frame = pd.read_parquet(run / "curated")  # directory read: hidden temporaries are skipped
    assert len(frame) == 7 and set(frame["status"]) == {"success"}
    assert pl.read_parquet(curated_glob).height == 7
    assert pl.read_parquet(rejected_glob).get_column("reject_reason").to_list() == ["bad_caption"] * 3
    con = duckdb.connect()
    kept = con.execute(f"select count(*), min(key) from read_parquet('{curated_glob}')").fetchone()
    reasons = con.execute(f"select reject_stage, reject_reason, count(*) from read_parquet('{rejected_glob}') "
                          "group by all").fetchall()
    assert kept == (7, "000000000")
    assert reasons == [("fake_filter", "bad_caption", 3)]



def test_extra_columns_agree_across_partitions_so_the_folders_read_as_one(
        tmp_path: Path, real_images: dict[str, bytes]) -> None:
    """Tar JSON fields are typed per partition from its own rows: `score` a number in one partition and text in
    the next, `tag` null throughout one, `late` only in some. pyarrow, pandas, polars and DuckDB then refused the
    curated/ folder. Finalize rewrites the files that differ to one schema, once; known columns keep their types."""
    import duckdb
    import pandas as pd
    import polars as pl

    names = sorted(real_images)
    path = tmp_path / "in.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            meta: dict[str, Any] = {"score": 0.5 + i, "tag": None, "n": i} if i < 3 else {"score": "high", "tag": "x",
                                                                                          "late": True, "n": 2.5}
            name = names[i % len(names)]
            for member, data in ((f"s{i}.{name.rsplit('.', 1)[1]}", real_images[name]), (f"s{i}.txt", b"a photo"),
                                 (f"s{i}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    overrides = [f"input.path={path}", f"output.path={tmp_path / 'run'}", "input.shard_size=3", "download.enabled=false",
                 "captions.enabled=false", "dedup.enabled=false", "clip.enabled=false", "cluster.processes=false",
                 "cluster.n_workers=1", "cluster.dashboard=false"]
    runner_mod.run(load_config(None, overrides, data={}), progress=False, echo=lambda _m: None)
    curated = tmp_path / "run" / "curated"
    schemas = [pq.read_schema(f) for f in sorted(curated.glob("*.parquet"))]
    assert len(schemas) == 2 and schemas[0].equals(schemas[1])
    assert [(n, str(schemas[0].field(n).type)) for n in ("score", "tag", "n", "late")] == [
        ("score", "string"), ("tag", "string"), ("n", "double"), ("late", "bool")]
    assert schemas[0].field("width").type == C.known_schema().field("width").type
    table = pq.read_table(curated)
    assert table.column("score").to_pylist() == ["0.5", "1.5", "2.5", "high", "high", "high"]
    assert table.column("late").to_pylist() == [None, None, None, True, True, True]
    assert len(pd.read_parquet(curated)) == 6 and pl.read_parquet(str(curated / "*.parquet")).height == 6
    assert duckdb.sql(f"select count(late) from '{curated}/*.parquet'").fetchall() == [(3,)]
    # the shards' dataset card types every .json field for Hugging Face `datasets` (which otherwise types them from
    # the first samples: `exif` null there, a string later, fails the load; checked by hand with datasets 5.2)
    card = (tmp_path / "run" / "shards" / "README.md").read_text()
    features = yaml.safe_load(card.split("---")[1])["dataset_info"]["features"]
    exts = sorted({name.rsplit(".", 1)[1] for name in (names[i % len(names)] for i in range(6))})
    assert [(f["name"], f.get("dtype")) for f in features[:-1]] == [(ext, "image") for ext in exts] + [("txt", "string")]
    fields = {f["name"]: f["dtype"] for f in features[-1]["struct"]}
    assert fields["exif"] == "string" and fields["width"] == "int32" and fields["clip_score"] == "float32"
    assert (fields["score"], fields["tag"], fields["n"], fields["late"]) == ("string", "string", "float64", "bool")
    before = {f.name: f.read_bytes() for f in curated.glob("*.parquet")}
    again = runner_mod.run(load_config(None, overrides, data={}), progress=False, echo=lambda _m: None)
    assert again.partitions_run == 0 and {f.name: f.read_bytes() for f in curated.glob("*.parquet")} == before


def test_conform_extra_columns_type_rules(tmp_path: Path) -> None:
    """The union of the partitions' extra columns: the shared type, mixed integers as int64, integers and floats as
    float64, anything else mixed as text (a struct as its JSON), null everywhere stays null; only differing files
    are rewritten, and a second pass rewrites none."""
    from curate.pipeline import sink

    tables = [
        pa.table({"key": ["a"], "i": pa.array([1], pa.int32()), "f": [1], "s": pa.array([{"x": 1}]), "z": pa.nulls(1)}),
        pa.table({"key": ["b"], "i": pa.array([2], pa.int64()), "f": [2.5], "s": ["text"], "z": pa.nulls(1)}),
        pa.table({"key": ["c"], "only": [True]}),
    ]
    paths = []
    for i, table in enumerate(tables):
        paths.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(C.conform(table), paths[-1])
    extras = [sink.file_extra_fields(path) for path in paths]
    config = sink.WriteConfig()
    assert sink.conform_extra_columns(paths, extras, config) == 3
    schemas = [pq.read_schema(path) for path in paths]
    assert all(schema.equals(schemas[0]) for schema in schemas)
    assert [(f.name, str(f.type)) for f in sink.file_extra_fields(paths[0])] == [
        ("i", "int64"), ("f", "double"), ("s", "string"), ("z", "null"), ("only", "bool")]
    assert pq.read_table(paths[0]).column("s").to_pylist() == ['{"x": 1}']
    assert pq.read_table(paths[2]).column("i").to_pylist() == [None]
    assert sink.conform_extra_columns(paths, extras, config) == 0  # conformed files are read back, not rewritten

class RecordsWorker(Stage[Any]):
    """Records which Dask worker ran it, and whether that worker advertises a GPU."""

    name = "cpu_recorder"
    gpus = 0.0

    @classmethod
    def resources(cls, config: Any) -> Any:
        from curate.pipeline.stage import Resources

        return Resources(gpus=cls.gpus)

    def process(self, table: pa.Table) -> pa.Table:
        from distributed import get_worker

        worker = get_worker()
        has_gpu = bool(worker.state.total_resources.get("GPU"))
        return C.set_column(table, f"{self.name}_on_gpu_worker", [has_gpu] * table.num_rows)


class GpuRecorder(RecordsWorker):
    name = "gpu_recorder"
    gpus = 1.0


def test_gpu_stage_tasks_go_to_gpu_workers_and_cpu_stages_stay_off_them(
        tmp_path: Path, tar_input: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import this module
    cfg = config_for(tmp_path, tar_input, **{"cluster.processes": "true", "cluster.gpu_workers": 1,
                                             "clip.enabled": "true"})
    run_with(monkeypatch, {"captions": RecordsWorker, "clip": GpuRecorder}, cfg)
    curated = pq.read_table(tmp_path / "run" / "curated")
    assert curated.num_rows == 10
    assert set(curated.column("gpu_recorder_on_gpu_worker").to_pylist()) == {True}
    assert set(curated.column("cpu_recorder_on_gpu_worker").to_pylist()) == {False}


def test_tar_samples_with_different_fields_get_nulls(tmp_path: Path) -> None:
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        add(tar, "a.jpg", b"x")
        add(tar, "a.txt", b"cap a")
        add(tar, "b.jpg", b"y")
        add(tar, "b.json", json.dumps({"url": "u", "extra": 3, "status": "ok"}).encode())
        add(tar, "c.txt", b"cap c")  # no image: later failed as no_image, never dropped
    cfg = load_config(None, [f"input.path={tmp_path / 'mixed.tar'}", "output.path=o"], data={})
    rows = read_partition(plan_input(cfg.input, str(tmp_path / "w")).partitions[0], cfg.input).to_pylist()
    assert [r["source_key"] for r in rows] == ["a", "b", "c"]
    assert [r["caption"] for r in rows] == ["cap a", None, "cap c"]
    assert [r["url"] for r in rows] == [None, "u", None]
    assert [r["extra"] for r in rows] == [None, 3, None]
    assert [r["input_status"] for r in rows] == [None, "ok", None]
    assert [r["image"] for r in rows] == [b"x", b"y", None]


def _worker_env(dask_worker: Any) -> dict[str, Any]:
    import os

    env: dict[str, Any] = {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}
    env["profiling"] = "profile" in dask_worker.periodic_callbacks
    return env


def test_workers_allocate_arrow_buffers_with_malloc_unless_a_pool_is_chosen(
        tmp_path: Path, tar_input: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrow's mimalloc pool re-faulted its huge pages for every partition; a task switches its process to the
    system allocator, once, and leaves a pool chosen with ARROW_DEFAULT_MEMORY_POOL alone."""
    try:
        mimalloc = pa.mimalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no mimalloc pool")
    previous = pa.default_memory_pool()
    try:
        pa.set_memory_pool(mimalloc)
        monkeypatch.setattr(runner_mod, "_ARROW_POOL_CHOSEN", False)
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
        run_with(monkeypatch, {"captions": RejectBadCaptions}, config_for(tmp_path, tar_input))
        assert pa.default_memory_pool().backend_name == "system"

        pa.set_memory_pool(mimalloc)
        monkeypatch.setattr(runner_mod, "_ARROW_POOL_CHOSEN", False)
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
        runner_mod._use_system_allocator()
        assert pa.default_memory_pool().backend_name == "mimalloc"
    finally:
        pa.set_memory_pool(previous)


def test_local_workers_keep_glibc_malloc_defaults_and_skip_the_profiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's MALLOC_TRIM_THRESHOLD_=65536 (which makes every decoded image page-fault in anew) is not set in our
    LocalCluster's workers; Dask's other pre-spawn variables are, and a value the user exported still applies.
    Dask's stack-sampling profiler runs in the workers only when `cluster.worker_profiler` asks for it."""
    from curate.pipeline.cluster import open_client
    from curate.pipeline.config import ClusterConfig

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    cfg = ClusterConfig(n_workers=1, processes=True, dashboard=False)
    with open_client(cfg, False, echo=lambda _line: None) as (client, _placement):
        (env,) = client.run(_worker_env).values()
    assert env == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1", "profiling": False}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    cfg = ClusterConfig(n_workers=1, processes=True, dashboard=False, worker_profiler=True)
    with open_client(cfg, False, echo=lambda _line: None) as (client, _placement):
        (env,) = client.run(_worker_env).values()
    assert env["MALLOC_TRIM_THRESHOLD_"] == "1048576"
    assert env["profiling"] is True



def _listening() -> set[str]:
    import psutil

    return {f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_a_threads_only_cluster_listens_on_loopback_and_links_to_it() -> None:
    """With `cluster.processes: false` Dask bound each worker's HTTP server (/metrics, /info) to every interface,
    and printed a dashboard link with the machine's address, where the dashboard (on 127.0.0.1) does not listen."""
    import urllib.request

    from curate.pipeline.cluster import open_client
    from curate.pipeline.config import ClusterConfig

    before = _listening()
    echoed: list[str] = []
    with open_client(ClusterConfig(n_workers=1, processes=False, dashboard=True), False, echo=echoed.append):
        opened = _listening() - before
        link = next(line.split()[-1] for line in echoed if "dashboard" in line)
        with urllib.request.urlopen(link.replace("/status", "/health"), timeout=10) as response:
            assert response.status == 200
    assert opened and all(address.startswith("127.0.0.1:") for address in opened), opened
    assert link.startswith("http://127.0.0.1:")

class RecordsItsContext(Stage[Any]):
    """Keeps every row; remembers the RunContext each worker-side instance was built with."""

    name = "context_probe"
    seen: list[Any] = []

    def process(self, table: pa.Table) -> pa.Table:
        RecordsItsContext.seen.append(self.context)
        return table


def test_stages_on_workers_learn_how_many_worker_processes_share_a_machine(
    tmp_path: Path, tar_input: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner asks the cluster (placement) and hands the answer to every task's stages: the download stage
    sizes its image-work gate by it (the machine's CPUs / worker processes on it)."""
    from curate.pipeline import cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "processes_per_host", lambda _client: 3)
    RecordsItsContext.seen = []
    run_with(monkeypatch, {"captions": RecordsItsContext}, config_for(tmp_path, tar_input))
    assert RecordsItsContext.seen and {c.processes_per_host for c in RecordsItsContext.seen} == {3}


class _FakeClient:
    def __init__(self, answers: dict[str, tuple[str, int]] | Exception) -> None:
        self.answers = answers

    def run(self, _function: Any, on_error: str = "raise") -> dict[str, tuple[str, int]]:
        if isinstance(self.answers, Exception):
            raise self.answers
        assert on_error == "ignore"  # one worker that cannot answer must not cost the others' answers
        return self.answers


def test_worker_processes_per_host_count_processes_not_workers() -> None:
    from curate.pipeline.cluster import processes_per_host

    two_machines = {"tcp://a:1": ("a", 10), "tcp://a:2": ("a", 11), "tcp://a:3": ("a", 12), "tcp://b:1": ("b", 10)}
    assert processes_per_host(_FakeClient(two_machines)) == 3
    threads_only = {"inproc://x/1": ("a", 7), "inproc://x/2": ("a", 7)}  # workers in one process
    assert processes_per_host(_FakeClient(threads_only)) == 1
    assert processes_per_host(_FakeClient(OSError("worker gone"))) == 1  # a sizing hint, never a failure
    assert processes_per_host(_FakeClient({})) == 1


def test_cpus_per_process_divides_the_machine_and_never_reaches_zero() -> None:
    from curate.pipeline.stage import RunContext, usable_cpus

    assert RunContext("", "").cpus_per_process() == usable_cpus()
    assert RunContext("", "", processes_per_host=usable_cpus()).cpus_per_process() == 1
    assert RunContext("", "", processes_per_host=10 * usable_cpus() + 1).cpus_per_process() == 1


def test_local_cluster_reports_its_worker_processes() -> None:
    from curate.pipeline.cluster import open_client
    from curate.pipeline.config import ClusterConfig

    with open_client(ClusterConfig(n_workers=2, processes=True, dashboard=False), False,
                     echo=lambda _line: None) as (_client, placement):
        assert placement.processes_per_host == 2
    with open_client(ClusterConfig(n_workers=2, processes=False, dashboard=False), False,
                     echo=lambda _line: None) as (_client, placement):
        assert placement.processes_per_host == 1
