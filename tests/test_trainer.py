"""Proven in trainers: shards made by a real `curate` run feed (1) a webdataset + torch DataLoader training loop of
a tiny open_clip model with open_clip's ClipLoss, (2) open_clip_train's own data loader, which takes the sample count
from shards/sizes.json, and (3) the real `open_clip_train.main`, in a subprocess, with the command line
docs/operations.md shows (no --train-num-samples, the custom model config as `--model local-dir:DIR`)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
TINY_MODEL = "curate-tiny-clip"


@pytest.fixture(scope="module")
def image_server(demo_image_server: Any) -> str:
    """configs/demo/ served read-only on 127.0.0.1 (module-wide: the pipeline run is shared by the tests)."""
    return demo_image_server.base_url


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory: pytest.TempPathFactory, image_server: str, tiny_clip: dict[str, str]) -> Path:
    """A real pipeline run (download from loopback, captions, tiny CLIP scoring) over the demo corpus."""
    from curate.pipeline.config import load_config
    from curate.pipeline.runner import run

    root = tmp_path_factory.mktemp("trainer")
    corpus = root / "corpus.csv"
    with open(DEMO / "corpus.csv", newline="", encoding="utf-8") as src, open(corpus, "w", newline="") as dst:
        writer = csv.writer(dst)
        for i, row in enumerate(csv.reader(src)):
            writer.writerow(row if i == 0 else [f"{image_server}/{row[0]}", row[1]])
    config = load_config(None, [
        f"input.path={corpus}", f"output.path={root / 'run'}", "input.shard_size=8",
        "cluster.processes=false", "cluster.n_workers=1", "cluster.dashboard=false",
        "download.allowed_networks=['127.0.0.1/32']", "download.timeout=10",
        "dedup.enabled=false",
        f"clip.model={tiny_clip['model']}", f"clip.model_config={tiny_clip['model_config']}",
        f"clip.pretrained={tiny_clip['pretrained']}", "clip.threshold=-1",
        "write.shard_samples=6",
    ], data={})
    result = run(config, progress=False, echo=lambda _msg: None)
    assert result.stats["kept"] >= 8, result.funnel  # enough samples for a few batches
    return root / "run"


def local_model_dir(tiny_clip: dict[str, str], parent: Path) -> Path:
    """The tiny config as open_clip's `local-dir:` schema reads it (how docs/operations.md registers a custom
    config with the unmodified open_clip_train.main): DIR/open_clip_config.json = {"model_cfg": ...}, no weights."""
    model_dir = parent / "curate-tiny-clip"
    model_dir.mkdir(exist_ok=True)
    model_cfg = json.loads(Path(tiny_clip["model_config"]).read_text())
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return model_dir


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


def _brace_pattern(run: Path) -> str:
    """The shard pattern exactly as the manifest gives it (what a user pastes into --train-data)."""
    return str(run / "shards" / _manifest(run)["pattern"])


def test_shards_feed_a_webdataset_dataloader_and_train_tiny_clip(curated_run: Path, tiny_clip: dict[str, str]
                                                                  ) -> None:
    import open_clip
    import torch
    import webdataset as wds
    from open_clip.loss import ClipLoss

    manifest = _manifest(curated_run)
    assert len(manifest["shards"]) >= 2
    curated = pq.read_table(curated_run / "curated").to_pylist()
    expected = {r["key"]: r for r in curated}

    # Raw pass: every sample has image + caption + metadata, bytes match the recorded sha256.
    raw = list(wds.WebDataset(_brace_pattern(curated_run), shardshuffle=False))
    assert sorted(s["__key__"] for s in raw) == sorted(expected)
    for sample in raw:
        ext = next(e for e in ("jpg", "png", "webp") if e in sample)
        meta = json.loads(sample["json"])
        assert hashlib.sha256(sample[ext]).hexdigest() == meta["sha256"] == expected[sample["__key__"]]["sha256"]
        assert sample["txt"].decode() == expected[sample["__key__"]]["caption"]

    open_clip.add_model_config(tiny_clip["model_config"])
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=tiny_clip["pretrained"],
                                                                 output_dict=True)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    dataset = (wds.WebDataset(_brace_pattern(curated_run), shardshuffle=False)
               .decode("pilrgb")
               .to_tuple("jpg;png;webp", "txt", "__key__")
               .map_tuple(preprocess, lambda text: tokenizer([text])[0], lambda key: key))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=0)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]

    def batch_loss(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        out = model(images, texts)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    model.train()
    seen: list[str] = []
    losses: list[float] = []
    for _epoch in range(2):
        for images, texts, keys in loader:
            assert images.shape[1:] == (3, 64, 64) and texts.shape[1] == 77
            loss = batch_loss(images, texts)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            seen += list(keys)
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses)
    assert sorted(set(seen)) == sorted(expected) and len(seen) == 2 * len(expected)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    # It learns from these pairs: the contrastive loss on one fixed batch drops after a few more steps on it.
    images, texts, _keys = next(iter(loader))
    with torch.no_grad():
        start = float(batch_loss(images, texts))
    for _ in range(6):
        loss = batch_loss(images, texts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert float(batch_loss(images, texts)) < start


def test_open_clip_train_data_loader_reads_the_sample_count_from_sizes_json(
    curated_run: Path, tiny_clip: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --train-num-samples open_clip_train sums shards/sizes.json; its own get_data yields the batches."""
    pytest.importorskip("open_clip_train", reason="open_clip_train ships in the open_clip_torch wheel")
    import functools

    import open_clip
    import open_clip_train.data as ocd
    import torch
    import webdataset
    from open_clip_train.params import parse_args
    from webdataset.tariterators import tar_file_expander

    manifest = _manifest(curated_run)
    sizes = json.loads((curated_run / "shards" / "sizes.json").read_text())
    assert sizes == {s["name"]: s["samples"] for s in manifest["shards"]}
    assert sum(sizes.values()) == manifest["total_samples"]

    model_name = f"local-dir:{local_model_dir(tiny_clip, tmp_path)}"
    _model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)

    if int(webdataset.__version__.split(".")[0]) >= 1:  # the shim docs/operations.md describes
        monkeypatch.setattr(ocd, "tar_file_expander", functools.partial(tar_file_expander, eof_value=None))
    batch_size = 4
    args = parse_args(["--train-data", _brace_pattern(curated_run), "--dataset-type", "webdataset",
                       "--model", model_name, "--batch-size", str(batch_size), "--workers", "0", "--seed", "0"])
    args.world_size, args.rank, args.distributed = 1, 0, False  # what main's init_distributed_device sets
    assert args.train_num_samples is None
    assert ocd.get_dataset_size(args.train_data) == (manifest["total_samples"], len(manifest["shards"]))

    train = ocd.get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=tokenizer)["train"]
    expected_batches = math.ceil(manifest["total_samples"] / batch_size)
    assert train.dataloader.num_batches == expected_batches
    assert train.dataloader.num_samples == expected_batches * batch_size
    train.set_epoch(0)
    batches = list(train.dataloader)
    assert len(batches) == expected_batches
    for images, texts in batches:
        assert images.shape == (batch_size, 3, 64, 64) and texts.shape == (batch_size, 77)
        assert torch.isfinite(images).all()


# The wrapper records which samples open_clip_train's own webdataset pipeline yields and runs its unmodified
# `main`. open_clip_train pins webdataset<=0.2.86 (its [training] extra); with webdataset>=1.0 the tar expander ends
# each shard with an empty EOF record that open_clip_train's grouping cannot read, so the wrapper asks for 0.2.86's
# behaviour (no EOF record).
TRAIN_WRAPPER = '''
import functools, json, sys
import webdataset
import open_clip_train.data as ocd
from webdataset.tariterators import tar_file_expander

if int(webdataset.__version__.split(".")[0]) >= 1:
    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
seen_path = sys.argv[1]
original_filter = ocd.filter_no_caption_or_no_image

def recording_filter(sample):
    with open(seen_path, "a") as f:
        f.write(json.dumps({"key": sample["__key__"], "url": sample["__url__"]}) + "\\n")
    return original_filter(sample)

ocd.filter_no_caption_or_no_image = recording_filter
from open_clip_train.main import main
main(sys.argv[2:])
'''


def test_open_clip_train_main_trains_on_curate_shards(curated_run: Path, tiny_clip: dict[str, str],
                                                       tmp_path: Path) -> None:
    pytest.importorskip("open_clip_train", reason="open_clip_train ships in the open_clip_torch wheel")
    manifest = _manifest(curated_run)
    n_samples = manifest["total_samples"]
    wrapper = tmp_path / "train.py"
    wrapper.write_text(TRAIN_WRAPPER)
    seen_path = tmp_path / "seen.jsonl"
    logs = tmp_path / "logs"
    model_dir = local_model_dir(tiny_clip, tmp_path)
    # The command line of docs/operations.md, scaled down: CPU, fp32, no workers, no wandb/tensorboard. The sample
    # count comes from shards/sizes.json.
    args = ["--train-data", _brace_pattern(curated_run),
            "--dataset-type", "webdataset", "--model", f"local-dir:{model_dir}", "--batch-size", "4", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1",
            "--report-to", "", "--logs", str(logs), "--name", "curate-shards", "--save-frequency", "1",
            "--log-every-n-steps", "1", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(wrapper), str(seen_path), *args],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env, check=False)
    log_text = (logs / "curate-shards" / "out.log").read_text() if (logs / "curate-shards" / "out.log").exists() \
        else ""
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # Its own pipeline read our shards: keys and shard URLs are the run's.
    seen = [json.loads(line) for line in seen_path.read_text().splitlines()]
    curated_keys = set(pq.read_table(curated_run / "curated", columns=["key"]).column("key").to_pylist())
    assert {s["key"] for s in seen} == curated_keys
    assert {Path(s["url"]).name for s in seen} == {s["name"] for s in manifest["shards"]}
    # It trained: one logged step per batch of 4 with a finite contrastive loss, and saved a checkpoint.
    steps = re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+).*?Contrastive_loss: ([0-9.naninf]+)", log_text)
    assert len(steps) == math.ceil(n_samples / 4), log_text[-3000:]
    assert all(math.isfinite(float(loss)) for _, _, loss in steps)
    assert (logs / "curate-shards" / "checkpoints" / "epoch_1.pt").is_file()
