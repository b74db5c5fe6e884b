"""What must hold when runs are started carelessly or configs and work files are hostile or broken: one run per
output folder, outputs that match the current plan, config values refused with their key path (from `validate`
as from `run`), and damaged work files named with a way out."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from curate.pipeline.cli import main
from curate.pipeline.runlock import _process_start

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted(p.name for p in (REPO / "configs" / "demo" / "images").iterdir())


def _corpus(path: Path, base_url: str, rows: int, query: str = "v") -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(rows):
            name = IMAGES[i % len(IMAGES)]
            writer.writerow([f"{base_url}/images/{name}?{query}={i}", f"A photograph of the {name.split('.')[0]}, view {i}"])


def _config(tmp_path: Path, base_url: str, rows: int = 12, name: str = "c.yaml", query: str = "v") -> Path:
    _corpus(tmp_path / "corpus.csv", base_url, rows, query)
    config = {
        "input": {"path": str(tmp_path / "corpus.csv"), "format": "csv", "shard_size": 3},
        "output": {"path": str(tmp_path / "run")},
        "cluster": {"n_workers": 1, "processes": False, "dashboard": False},
        "download": {"allowed_networks": ["127.0.0.1/32"], "retries": 0, "threads": 2},
        "captions": {"languages": []},
        "dedup": {"enabled": False},
        "clip": {"enabled": False},
        "write": {"shard_samples": 4},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def _stats(run: Path) -> dict[str, Any]:
    return json.loads((run / "stats.json").read_text())


def _consistent(run: Path) -> dict[str, Any]:
    """stats, manifest, shards and curated/ agree (what a reader of the folder relies on)."""
    stats = _stats(run)
    manifest = json.loads((run / "manifest.json").read_text())
    rejected = sum(n for reasons in stats["rejected"].values() for n in reasons.values())
    assert stats["input_rows"] == stats["kept"] + rejected
    assert manifest["total_samples"] == stats["kept"] == pq.read_table(run / "curated").num_rows
    assert sorted(s["name"] for s in manifest["shards"]) == sorted(p.name for p in (run / "shards").glob("*.tar"))
    return stats


# -- one run per output folder ------------------------------------------------------------------------

def test_second_run_on_a_busy_folder_refuses_at_once_and_the_first_finishes_whole(
        tmp_path: Path, demo_image_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, demo_image_server.base_url)
    demo_image_server.delay = 0.25
    try:
        first = subprocess.Popen([sys.executable, "-m", "curate.pipeline.cli", "run", str(config), "--no-progress"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        lock = tmp_path / "run" / ".curate-run.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), "the first run never took the lock"
        started = time.monotonic()
        assert main(["run", str(config), "--no-progress"]) == 2
        assert time.monotonic() - started < 5  # refused at once, not after waiting or working
        err = capsys.readouterr().err
        assert "in use by another curate run" in err and f"pid {first.pid}" in err
        _, first_err = first.communicate(timeout=120)
        assert first.returncode == 0, first_err.decode(errors="replace")[-2000:]
    finally:
        demo_image_server.delay = 0.0
    stats = _consistent(tmp_path / "run")
    assert stats["input_rows"] == 12 and not lock.exists()
    assert main(["run", str(config), "--no-progress"]) == 0  # and a third run: nothing to do, same answer
    assert _consistent(tmp_path / "run") == {**stats, "elapsed_seconds_last_run": _stats(tmp_path / "run")[
        "elapsed_seconds_last_run"]}


def test_stale_lock_of_a_killed_run_is_taken_over_but_a_live_or_foreign_one_is_not(
        tmp_path: Path, demo_image_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, demo_image_server.base_url, rows=3)
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / ".curate-run.lock"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "process_start": _process_start(sleeper.pid),
                  "started": "2026-01-01T00:00:00+00:00", "command": "curate run other.yaml"}
        lock.write_text(json.dumps(holder))
        assert main(["run", str(config), "--no-progress"]) == 2
        assert f"pid {sleeper.pid}" in capsys.readouterr().err
        lock.write_text(json.dumps({**holder, "host": "another-machine"}))
        assert main(["run", str(config), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "another-machine" in err and f"delete {lock}" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps(holder))  # its process is gone now: a killed run's lock
    assert main(["run", str(config), "--no-progress"]) == 0
    assert _consistent(tmp_path / "run")["input_rows"] == 3 and not lock.exists()


# -- outputs match the current plan -------------------------------------------------------------------

def test_rerun_after_deleting_work_with_a_smaller_limit_leaves_only_the_new_plans_files(
        tmp_path: Path, demo_image_server: Any) -> None:
    config = _config(tmp_path, demo_image_server.base_url, rows=12)
    assert main(["run", str(config), "--no-progress"]) == 0
    stray = tmp_path / "run" / "curated" / "part-00099.parquet"
    shutil.copy(tmp_path / "run" / "curated" / "part-00000.parquet", stray)
    shutil.rmtree(tmp_path / "run" / "_work")
    assert main(["run", str(config), "--no-progress", "--set", "input.limit=5"]) == 0
    stats = _consistent(tmp_path / "run")
    assert stats["input_rows"] == 5
    assert sorted(p.name for p in (tmp_path / "run" / "curated").iterdir()) == ["part-00000.parquet",
                                                                                "part-00001.parquet"]
    assert sorted(p.name for p in (tmp_path / "run" / "rejected").iterdir()) == ["part-00000.parquet",
                                                                                 "part-00001.parquet"]


def test_resume_refuses_input_files_changed_since_the_plan(
        tmp_path: Path, demo_image_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Partitions are matched to the plan by number: a resume over edited input would mix old and new rows."""
    config = _config(tmp_path, demo_image_server.base_url, rows=6)
    assert main(["run", str(config), "--no-progress"]) == 0
    corpus = tmp_path / "corpus.csv"
    original, stat = corpus.read_bytes(), corpus.stat()
    extra = b"http://127.0.0.1:9/new.jpg,one more row\n"
    corpus.write_bytes(original + extra)  # appended to in place
    for argv in (["run", str(config), "--no-progress"], ["validate", str(config)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        size = f"({len(original)} -> {len(original) + len(extra)} bytes)"
        assert f"input.path: {corpus} changed size {size}" in err, err
        assert "delete _work/plan.json there" in err and "new output.path" in err
    corpus.write_bytes(original)  # the same bytes again, but rewritten: refused as well (it cannot be told apart)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    capsys.readouterr()
    assert main(["run", str(config), "--no-progress"]) == 2
    assert f"{corpus} was modified" in capsys.readouterr().err
    (tmp_path / "run" / "_work" / "plan.json").unlink()  # the way out when the content is the same
    assert main(["run", str(config), "--no-progress"]) == 0
    assert _consistent(tmp_path / "run")["input_rows"] == 6


def test_input_changes_names_files_added_and_gone() -> None:
    from curate.pipeline.inputs import input_changes

    change = input_changes(["a.parquet", "b.parquet"], [{}, {}], ["a.parquet", "c.parquet", "d.parquet"])
    assert change == "the input files are not the planned ones: 2 new (first c.parquet), 1 gone (first b.parquet)"
    assert input_changes(["a", "b"], [{}, {}], ["b", "a"]) == "the input files are not the planned ones: another order"


# -- hostile and broken configs -----------------------------------------------------------------------

BASE = "input: {path: in.parquet}\noutput: {path: out}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("download: {timeout: .nan}\n", "download.timeout: expected a finite number"),
        ("clip: {threshold: .nan}\n", "clip.threshold: expected a finite number"),
        ("download: {timeout: .inf}\n", "download.timeout: expected a finite number"),
        ("input: {path: in.parquet, shard_size: 1000000000000000000000000000000}\noutput: {path: out}\n",
         "input.shard_size: expected an integer of at most"),
        ("cluster: {memory_limit: lots}\n", "cluster.memory_limit: expected 'auto' or a size"),
        ("clip: {threshold: 0.2}\nclip: {threshold: 0.9}\n", "duplicate key 'clip'"),
        ("input: {path: a, path: b}\noutput: {path: out}\n", "duplicate key 'path'"),
    ],
)
def test_bad_config_values_exit_2_naming_the_key_from_validate_and_run(
        tmp_path: Path, text: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text if text.startswith("input") else BASE + text)
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = "x:\n" + "\n".join("  " + line for line in levels) + "\ninput: {path: *a8}\noutput: {path: out}\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    started = time.monotonic()
    assert main(["validate", str(tmp_path / "bomb.yaml")]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 5
    assert "alias" in err and len(err) < 1000


def test_huge_values_are_cut_in_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text(BASE + "clip: {threshold: '" + "x" * 100_000 + "'}\n")
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: config error: clip.threshold: expected a number") and len(err) < 1000


def test_binary_config_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "not a text file" in err


# -- damaged work files -------------------------------------------------------------------------------

def test_truncated_work_files_name_the_file_and_a_corrupt_marker_redoes_its_partition(
        tmp_path: Path, demo_image_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, demo_image_server.base_url, rows=6)
    assert main(["run", str(config), "--no-progress"]) == 0
    before = _consistent(tmp_path / "run")
    work = tmp_path / "run" / "_work"
    (work / "done" / "part-00001.json").write_text('{"input_rows": 3, "ke')  # a crash mid-write
    assert main(["run", str(config), "--no-progress"]) == 0
    after = _consistent(tmp_path / "run")
    assert {k: after[k] for k in ("input_rows", "kept", "rejected")} == {
        k: before[k] for k in ("input_rows", "kept", "rejected")}
    for name, hint in (("plan.json", "plan again"), ("run.json", "config")):
        original = (work / name).read_bytes()
        (work / name).write_bytes(original[: len(original) // 2])
        capsys.readouterr()
        assert main(["run", str(config), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert str(work / name) in err and "corrupt" in err and hint in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3
        (work / name).write_bytes(original)


# -- failures end with one clear message --------------------------------------------------------------

def test_disk_full_stops_the_run_with_one_message(
        tmp_path: Path, demo_image_server: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from curate.pipeline.sink import PartitionWriter

    def full(self: Any, partition_id: int, table: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", f"/full/part-{partition_id:05d}.parquet")

    monkeypatch.setattr(PartitionWriter, "write_partition", full)
    config = _config(tmp_path, demo_image_server.base_url, rows=9)
    assert main(["run", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "no space left on the device writing /full/part-0000" in err and "re-run" in err
    assert "Traceback" not in err and len(lines) <= 3, err


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_prints_one_line(tmp_path: Path, demo_image_server: Any, presses: int) -> None:
    """Ctrl-C reaches the whole foreground process group (client and Dask workers), as from a terminal; pressed
    twice, the second lands while the run closes its cluster (it used to cancel that close and hang the exit)."""
    import signal

    # Its own query key: a run of an earlier test may still be finishing downloads from the same server.
    key = f"ctrl-c-{presses}"
    config = _config(tmp_path, demo_image_server.base_url, rows=30, query=key)
    text = yaml.safe_load(config.read_text())
    text["cluster"] = {"n_workers": 2, "processes": True, "dashboard": False}
    config.write_text(yaml.safe_dump(text))
    demo_image_server.delay = 0.2

    def downloading() -> bool:
        return any(f"?{key}=" in path for path in list(demo_image_server.paths))

    proc = None
    try:
        # A shell's background job starts with SIGINT ignored, and Python keeps an inherited SIG_IGN: restore the
        # default so the test does not depend on how the test run itself was launched.
        proc = subprocess.Popen([sys.executable, "-m", "curate.pipeline.cli", "run", str(config), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while not downloading() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # downloads under way on the workers
        for press in range(presses):
            if press:
                time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGINT)
        _, err_bytes = proc.communicate(timeout=60)
    finally:
        demo_image_server.delay = 0.0
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_bytes.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1, err
    assert lines[1:] == ["curate: interrupted; re-run the same command to resume"], err
    assert lines[0].startswith("curate: 30 input rows in 10 partition(s)"), err


def test_ctrl_c_while_starting_up_prints_the_same_one_line(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Before the run proper: the engine's imports and the stages' sub-commands (half a second), parsing."""
    import curate.pipeline.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["run", "c.yaml"]) == 1
    assert capsys.readouterr().err == "curate: interrupted; re-run the same command to resume\n"

INTERRUPT_IN_EXEC = """
import sys
import curate.pipeline.cli as cli

def interrupted():
    exec("raise KeyboardInterrupt")  # as a Ctrl-C inside a dataclass's or namedtuple's generated code

cli.build_parser = interrupted
sys.argv = ["curate", "run", "c.yaml"]
cli.entry()
"""


def test_ctrl_c_through_exec_still_exits_1_under_python_m(tmp_path: Path) -> None:
    """CPython marks a KeyboardInterrupt that passed through exec'd source text as unhandled even once caught,
    and `python -m` then ends the process with SIGINT (exit -2) unless the command exits on its own."""
    (tmp_path / "interrupt_probe.py").write_text(INTERRUPT_IN_EXEC)
    done = subprocess.run([sys.executable, "-m", "interrupt_probe"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr) == (1, "curate: interrupted; re-run the same command to resume\n")

WORKER_SIGINT = """
import signal
from curate.pipeline.cluster import open_client
from curate.pipeline.config import ClusterConfig

def sigint():
    return [signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []),
            signal.getsignal(signal.SIGINT) == signal.SIG_IGN]

if __name__ == "__main__":
    with open_client(ClusterConfig(n_workers=2, processes=True, dashboard=False), False, echo=print) as (c, _):
        print(sorted(c.run(sigint).values()))
    print(signal.pthread_sigmask(signal.SIG_BLOCK, []))
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="no signal masks (Windows)")
def test_local_workers_are_born_deaf_to_ctrl_c_and_the_client_still_hears_it(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches every process of the group, worker processes still importing their modules
    included: they are spawned with SIGINT blocked (in a fresh process, as from the CLI: multiprocessing's resource
    tracker, started on first use, would unblock it in the cluster's thread). A Ctrl-C held back that way in the
    client's main thread is raised there when the cluster has started."""
    import signal
    import threading

    from curate.pipeline.cluster import _ctrl_c_held_back

    script = tmp_path / "workers.py"
    script.write_text(WORKER_SIGINT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-2:] == ["[[True, True], [True, True]]", "set()"]

    with pytest.raises(KeyboardInterrupt), _ctrl_c_held_back():
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        time.sleep(0.05)
        held_back = True
    assert held_back


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv.gz"])
def test_a_missing_url_or_caption_column_is_found_by_validate_as_by_run(
        tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`validate` passed a table without the configured URL/caption column, which `run` then refused at planning:
    validate now reads each Parquet file's schema and each CSV/TSV file's header line."""
    import gzip

    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pa.table({"URL": ["http://127.0.0.1/a.jpg"], "caption": ["a cat"]})
    path = tmp_path / f"in{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path)
    else:
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink, pacsv.WriteOptions(delimiter="\t" if ".tsv" in suffix else ","))
        path.write_bytes(gzip.compress(sink.getvalue().to_pybytes()) if suffix.endswith(".gz") else
                         sink.getvalue().to_pybytes())
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{path: {path}}}\noutput: {{path: {tmp_path / 'out'}}}\nclip: {{enabled: false}}\n")
    for command in ("validate", "run"):
        assert main([command, str(config)]) == 2
        assert f"input.url_column: column 'url' not found in {path} (columns: URL, caption)" in capsys.readouterr().err
    assert main(["validate", str(config), "--set", "input.url_column=URL"]) == 0


@pytest.mark.parametrize("kind", ["broken_hf", "empty_folder", "single_image"])
def test_an_eval_set_that_cannot_be_read_is_refused_by_validate_naming_it(
        tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """It used to pass `validate` and stop the run in every worker's set-up ("phash_dedup could not set up"), with
    pyarrow's words naming no file ("File is too small: 15")."""
    import pyarrow as pa

    source = tmp_path / kind
    if kind == "broken_hf":
        source.mkdir()
        (source / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
        (source / "data-00000-of-00001.arrow").write_bytes(b"ARROW1\0\0cut")
        expected = "cannot read Hugging Face Arrow file"
    elif kind == "empty_folder":
        source.mkdir()
        expected = "holds no images"
    else:
        source = tmp_path / "one.jpg"
        source.write_bytes((REPO / "configs" / "demo" / "images" / IMAGES[0]).read_bytes())
        expected = "cannot tell the format"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"], "caption": ["a cat"]}), tmp_path / "in.parquet")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"input": {"path": str(tmp_path / "in.parquet")},
                                      "output": {"path": str(tmp_path / "out")}, "clip": {"enabled": False},
                                      "dedup": {"eval_sets": [{"path": str(source)}]}}))
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dedup.eval_sets[0].path: " in err and expected in err, err
