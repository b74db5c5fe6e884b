"""Config validation (key paths in messages), CLI exit codes, docs/config.md in sync, and the built wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from curate.pipeline.cli import main
from curate.pipeline.config import config_reference_markdown, load_config
from curate.pipeline.configspec import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = ["input.path=in.parquet", "output.path=out"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("clip.threshold=high", "clip.threshold: expected a number in [-1, 1], got 'high'"),
        ("clip.threshold=1.5", "clip.threshold: expected a number in [-1, 1], got 1.5"),
        ("clip.thresold=0.3", "clip.thresold: unknown key; did you mean threshold?"),
        # the hint comes before the known keys, which a long section's message cuts off
        ("captions.min_char=3", "captions.min_char: unknown key; did you mean min_chars"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
        ("input.shard_size=0", "input.shard_size: expected an integer >= 1, got 0"),
        ("input.shard_size=ten", "input.shard_size: expected an integer >= 1, got 'ten'"),
        ("download.allow_private=maybe", "download.allow_private: expected a boolean"),
        ("input.format=xml", "input.format: expected one of"),
        ("captions.languages=en", "captions.languages: expected a list of strings"),
        ("write.shard_prefix=a/b", "write.shard_prefix: expected a non-empty file name prefix"),
        ("dedup.threshold=65", "dedup.threshold: must be below the hash's 64 bits, got 65"),
    ],
)
def test_bad_values_name_the_key_path(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, override], data={})
    assert message in str(err.value)


def test_required_keys_and_defaults() -> None:
    with pytest.raises(ConfigError, match=r"^input.path: is required"):
        load_config(None, ["output.path=o"], data={})
    with pytest.raises(ConfigError, match=r"^output.path: is required"):
        load_config(None, ["input.path=i"], data={})
    cfg = load_config(None, BASE, data={})
    assert cfg.clip.threshold == 0.28 and cfg.download.allow_private is False and cfg.input.shard_size == 10000
    with pytest.raises(AttributeError):
        cfg.clip.threshold = 0.5  # type: ignore[misc]  # frozen


def test_yaml_paths_relative_to_the_file_and_safe_load(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("input: {path: data/x.parquet}\noutput: {path: out}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.input.path == str(tmp_path / "data/x.parquet") and cfg.output.path == str(tmp_path / "out")
    (tmp_path / "evil.yaml").write_text("input: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")


def _shapes_only_checkpoint(path: Path, model: str) -> None:
    """A checkpoint of `model` whose tensors have names and shapes but no data (meta tensors, ~40 KB)."""
    import open_clip
    import torch

    with torch.device("meta"):
        torch.save(open_clip.create_model(model, pretrained=None, device="meta").state_dict(), path)


def test_shipped_configs_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.stages.phash_dedup.evalsets import hash_evalset

    assert main(["validate", str(REPO / "configs" / "demo.yaml")]) == 0
    # laion_subset.yaml names files that exist on a real machine: validate checks them as run does.
    laion = str(REPO / "configs" / "laion_subset.yaml")
    assert main(["validate", laion]) == 2
    assert "input.path: no files match '/data/laion400m/part-00000.parquet'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"URL": ["http://x/a.jpg"], "TEXT": ["a"]}), "part.parquet")
    assert main(["validate", laion, "--set", "input.path=part.parquet"]) == 2
    assert "dedup.indexes[0]" in capsys.readouterr().err
    (tmp_path / "idx").mkdir()
    hash_evalset(str(REPO / "configs" / "demo" / "evalset"), "idx/a.parquet", name="a")
    # --set paths are relative to the current directory, in lists too. Offline, the CLIP weights must be a file
    # that loads into the model: validate compares names and shapes, so a checkpoint without data will do.
    _shapes_only_checkpoint(tmp_path / "vit-b-32.pt", "ViT-B-32")
    assert main(["validate", laion, "--set", "input.path=part.parquet", "--set", "dedup.indexes=[idx/a.parquet]",
                 "--set", "output.path=out", "--set", "clip.pretrained=vit-b-32.pt"]) == 0
    assert f"output {tmp_path / 'out'}" in capsys.readouterr().out

    # datacomp.yaml reads the pool's sha256 and face_bboxes columns: a metadata file without them is refused
    datacomp = str(REPO / "configs" / "datacomp.yaml")
    (tmp_path / "pool").mkdir()
    pq.write_table(pa.table({"uid": ["0" * 32], "url": ["http://x/a.jpg"], "text": ["a"]}), "pool/0.parquet")
    _shapes_only_checkpoint(tmp_path / "vit-l-14.pt", "ViT-L-14")
    overrides = ["--set", "input.path=pool", "--set", "dedup.indexes=[idx/a.parquet]", "--set", "output.path=dc",
                 "--set", "clip.pretrained=vit-l-14.pt"]
    assert main(["validate", datacomp, *overrides]) == 2
    assert "download.verify_hash_column: column 'sha256' not found in" in capsys.readouterr().err
    pq.write_table(pa.table({"uid": ["0" * 32], "url": ["http://x/a.jpg"], "text": ["a"], "sha256": ["0" * 64],
                             "face_bboxes": pa.array([[[0.1, 0.1, 0.2, 0.2]]], pa.list_(pa.list_(pa.float64())))}),
                   "pool/0.parquet")
    assert main(["validate", datacomp, *overrides]) == 0



def test_validate_checks_that_eval_indexes_fit_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An index of another hash size, one without descriptors when verifying, or a file that is not an index at all
    used to pass `validate` and fail the run only in worker set-up, after the cluster had started."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.stages.phash_dedup.evalsets import hash_evalset

    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "caption": ["a"]}), "in.parquet")
    evalset = str(REPO / "configs" / "demo" / "evalset")
    hash_evalset(evalset, "h16.parquet", name="a", hash_size=16)
    hash_evalset(evalset, "plain.parquet", name="a", verify=False)
    base = ["validate", "/dev/null", "--set", "input.path=in.parquet", "--set", "output.path=out",
            "--set", "clip.enabled=false"]
    cases = {"h16.parquet": "uses hash_size 16, dedup.hash_size is 8", "plain.parquet": "no near-duplicate descriptors",
             "in.parquet": "not a curate eval index"}
    for index, message in cases.items():
        assert main([*base, "--set", f"dedup.indexes=[{index}]"]) == 2, index
        err = capsys.readouterr().err
        assert "dedup.indexes[0]" in err and message in err, err
    assert main([*base, "--set", "dedup.indexes=[plain.parquet]", "--set", "dedup.verify=false"]) == 0

def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("input: {path: x.parquet}\noutput: {path: o}\nclip: {threshold: high}\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "clip.threshold: expected a number in [-1, 1], got 'high'" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    # validate checks what run checks: the input exists, and offline the CLIP weights are a local file that loads
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "x.parquet").write_bytes(b"")
    assert main(["validate", str(tmp_path / "bad.yaml"), "--set", "clip.threshold=0.3"]) == 2
    assert "input.path: cannot read Parquet" in capsys.readouterr().err  # planning would refuse it too
    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "caption": ["a"]}), tmp_path / "x.parquet")
    (tmp_path / "weights.pt").write_bytes(b"")
    assert main(["validate", str(tmp_path / "bad.yaml"), "--set", "clip.threshold=0.3",
                 "--set", f"clip.pretrained={tmp_path / 'weights.pt'}"]) == 2
    assert "clip.pretrained: cannot read CLIP checkpoint" in capsys.readouterr().err
    _shapes_only_checkpoint(tmp_path / "weights.pt", "ViT-B-32")
    assert main(["validate", str(tmp_path / "bad.yaml"), "--set", "clip.threshold=0.3",
                 "--set", f"clip.pretrained={tmp_path / 'weights.pt'}"]) == 0
    assert main([]) == 2
    with pytest.raises(SystemExit) as err:
        main(["run"])  # usage error from argparse
    assert err.value.code == 2


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "curate.pipeline.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("run", "validate", "hash-evalset", "dedup-report", "report", "demo"):
        assert command in out
    assert "Exit codes: 0 ok, 1 run failure, 2 bad config or usage" in out


def test_docs_config_reference_is_in_sync() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    generated = config_reference_markdown()
    assert generated in doc, "docs/config.md is stale: run `python -m curate.pipeline.config_docs`"


def test_wheel_contains_every_subpackage(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(REPO)) for p in REPO.glob("pipeline/**/__init__.py")}
    packages |= {str(p.parent.relative_to(REPO)) for p in REPO.glob("stages/**/__init__.py")}
    for package in packages:
        assert f"curate/{package}/__init__.py" in names, package
    assert not any(n.startswith(("pipeline/", "stages/")) for n in names)  # never bare top-level packages
    for module in ("curate/pipeline/runner.py", "curate/stages/download/stage.py", "curate/stages/clip_filter/stage.py"):
        assert module in names
    modules = {f"curate/{p.relative_to(REPO)}" for p in (*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/**/*.py"))}
    assert modules <= set(names), sorted(modules - set(names))
    assert not any("faultserver" in n for n in names)  # a test fixture, not part of the package
    assert "curate/stages/clean_captions/en_lexicon.txt.gz" in names  # package data the stage loads
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "curate = curate.pipeline.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()
