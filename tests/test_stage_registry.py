"""The registry is the one place a stage is wired in, and the engine imports no stage.

A toy stage (tests/toy_stage/: one folder) is added with one registry line; the config section, its docs, the
output columns, the run, the accounting and the resume check all follow without any other edit.
"""

from __future__ import annotations

import ast
import gc
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curate.pipeline import columns as C
from curate.pipeline import registry
from curate.pipeline.cli import main
from curate.pipeline.config import config_reference_markdown, load_config

REPO = Path(__file__).resolve().parents[1]
TOY = registry.StageEntry("toy", "toy_stage:MinWordsStage", "Toy word-count filter.")
CAPTIONS = ["a cat", "a cat on a mat", "dog", "a horse in a field", "rocket", "two words"]


@pytest.fixture
def with_toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "STAGES", (*registry.STAGES, TOY))


def _tar_corpus(path: Path, image: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(CAPTIONS):
            for name, data in ((f"s{i:03d}.jpg", image), (f"s{i:03d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _config(tmp_path: Path, image: bytes) -> Path:
    _tar_corpus(tmp_path / "corpus.tar", image)
    config = tmp_path / "toy.yaml"
    config.write_text(
        "input: {path: corpus.tar, format: webdataset, shard_size: 4}\n"
        "output: {path: run}\n"
        "cluster: {processes: false, n_workers: 1, dashboard: false}\n"
        "download: {enabled: false}\ncaptions: {enabled: false}\ndedup: {enabled: false}\nclip: {enabled: false}\n"
        "toy: {min_words: 3}\n")
    return config


def test_one_registry_line_adds_a_configured_documented_stage(with_toy: None, tmp_path: Path) -> None:
    config = load_config(None, ["input.path=x", "output.path=y", "toy.min_words=5"], data={})
    assert config.section("toy").min_words == 5
    assert "| `toy.min_words` |" in config_reference_markdown()
    assert "caption_words" in C.known_schema().names
    with pytest.raises(ValueError, match=r"^toy.min_words: expected an integer >= 0"):
        load_config(None, ["input.path=x", "output.path=y", "toy.min_words=-1"], data={})


def test_toy_stage_runs_end_to_end_and_resume_refuses_its_changed_setting(
        with_toy: None, tmp_path: Path, real_images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, real_images["coffee.jpg"])
    assert main(["run", str(config), "--no-progress"]) == 0
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    too_short = sum(len(c.split()) < 3 for c in CAPTIONS)
    assert stats["input_rows"] == len(CAPTIONS)
    assert stats["rejected"] == {"min_words": {"too_few_words": too_short}}
    assert stats["kept"] == len(CAPTIONS) - too_short
    curated = pq.read_table(tmp_path / "run" / "curated")
    assert sorted(curated.column("caption_words").to_pylist()) == sorted(
        len(c.split()) for c in CAPTIONS if len(c.split()) >= 3)
    capsys.readouterr()
    assert main(["run", str(config), "--no-progress", "--set", "toy.min_words=4"]) == 2
    assert "different toy settings" in capsys.readouterr().err


def _parse(path: Path) -> ast.Module:
    # CPython 3.11 before 3.11.8 (gh-106905): a finalizer that the garbage collector runs inside the AST constructor
    # (here: an asyncio future left by an earlier in-process Dask run, logging its exception) raises "SystemError:
    # AST constructor recursion depth mismatch". Keep the collector out of the parse.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    finally:
        if enabled:
            gc.enable()


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_imports_no_stage_and_stages_import_no_other_stage() -> None:
    for path in sorted(REPO.glob("pipeline/**/*.py")):
        stage_imports = {n for n in _imports(path) if n.startswith("curate.stages")}
        assert not stage_imports, f"{path.relative_to(REPO)} imports {stage_imports}"
    for package in sorted(p for p in (REPO / "stages").iterdir() if (p / "__init__.py").exists()):
        own = f"curate.stages.{package.name}"
        for path in sorted(package.rglob("*.py")):
            others = {n for n in _imports(path) if n.startswith("curate.stages") and not n.startswith(own)}
            assert not others, f"{path.relative_to(REPO)} imports another stage: {others}"


def test_registry_entries_resolve_to_stages_with_class_level_contracts() -> None:
    sections = [r.section for r in registry.registered()]
    # captions first: it needs no image, so a row it rejects is never downloaded (next test)
    assert sections == ["captions", "download", "dedup", "clip"]
    for stage in registry.registered():
        assert stage.cls.name and stage.cls.config_class is not object
        assert all(isinstance(f, type(C.ENGINE_SCHEMA.field(0))) for f in stage.cls.adds)


def test_rows_whose_caption_is_rejected_are_never_downloaded(
    tmp_path: Path, http_server: Any, route: Any, real_images: dict[str, bytes]
) -> None:
    server = http_server({f"/{name}": route(body=real_images[name]) for name in ("chelsea.jpg", "coffee.jpg")})
    rows = [{"url": server.url("chelsea.jpg"), "caption": "A ginger tabby cat looking to the side on a sofa"},
            {"url": server.url("coffee.jpg"), "caption": "IMG_1234.JPG"}]  # a file name: rejected by captions
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    config = {
        "input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "run")},
        "cluster": {"processes": False, "n_workers": 1, "dashboard": False},
        "download": {"allowed_networks": ["127.0.0.1/32"], "retries": 0},
        "dedup": {"enabled": False}, "clip": {"enabled": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "config.yaml"), "--no-progress"]) == 0
    assert server.hits == {"/chelsea.jpg": 1}
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["kept"] == 1 and stats["rejected"] == {"clean_captions": {"filename": 1}}


def test_contract_facts_cannot_be_overridden_by_properties() -> None:
    from curate.pipeline.stage import Stage

    with pytest.raises(TypeError, match="class-level"):
        class NeedsInstance(Stage[object]):  # noqa: F841 - defining it is the test
            name = "needs_instance"

            @property
            def run_wide(self) -> bool:  # type: ignore[override]
                return True
