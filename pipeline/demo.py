"""`curate demo`: a real run on the bundled offline corpus, served by a loopback HTTP server we start.

The corpus (configs/demo/corpus.csv) lists image paths relative to configs/demo/; the demo serves that folder
on 127.0.0.1 (a free port), writes the table with full URLs into the run's `_work/`, and runs configs/demo.yaml
with `input.path` pointing at it. Each demo run starts fresh (the loopback port changes between runs).
"""

from __future__ import annotations

import csv
import functools
import http.server
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from curate.pipeline.configspec import ConfigError
from curate.pipeline.layout import RunLayout

REPO_ROOT = Path(__file__).resolve().parents[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve `root` read-only on 127.0.0.1 (free port); yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def find_demo_config(config_path: str | None) -> Path:
    candidates = [Path(config_path)] if config_path else [Path("configs/demo.yaml"), REPO_ROOT / "configs/demo.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError("", "configs/demo.yaml not found: run `curate demo` from a checkout of the repository "
                      "(the demo corpus is not part of the wheel) or pass --config")


def run_demo(output: str, config_path: str | None = None, overrides: Sequence[str] = ()) -> None:
    from curate.pipeline.config import load_config
    from curate.pipeline.runner import run

    config_file = find_demo_config(config_path)
    base = load_config(config_file, [*overrides, f"output.path={output}"])
    corpus = Path(base.input.path)
    out = Path(base.output.path)
    work = Path(RunLayout.of(str(out)).work)
    if (work / "demo.json").exists():
        shutil.rmtree(out)  # a previous demo run: URLs pointed at another port
    elif out.exists() and any(out.iterdir()):
        raise ConfigError("output.path", f"{out} exists and is not a demo run; choose another -o")
    work.mkdir(parents=True, exist_ok=True)
    (work / "demo.json").write_text("{}\n")
    with serve_directory(corpus.parent) as base_url:
        table = work / "demo" / "corpus.csv"
        table.parent.mkdir(parents=True, exist_ok=True)
        with open(corpus, newline="", encoding="utf-8") as src, open(table, "w", newline="", encoding="utf-8") as dst:
            reader = csv.DictReader(src)
            writer = csv.DictWriter(dst, fieldnames=reader.fieldnames or ["url", "caption"])
            writer.writeheader()
            for row in reader:
                row["url"] = f"{base_url}/{row['url']}"
                writer.writerow(row)
        print(f"curate demo: serving {corpus.parent} at {base_url}")
        config = load_config(config_file, [*overrides, f"output.path={out}", f"input.path={table}"])
        run(config)
    layout = RunLayout.of(str(out))
    print(f"curate demo: done. Shards: {layout.shards_dir}/  report: {layout.report}  stats: {layout.stats}")
