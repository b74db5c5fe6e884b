"""Shared fixtures: real images, a loopback HTTP server, a tiny random-init CLIP checkpoint."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "configs" / "demo"


@pytest.fixture
def whole_descriptor_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Sources of every `pyarrow.parquet.read_table` that takes an eval index's `descriptor` column (or all columns)
    while the test runs: streaming code must leave that column to `evalsets.iter_descriptors`."""
    import pyarrow.parquet as pq

    reads: list[object] = []
    real_read_table = pq.read_table

    def spy(source: object, *args: object, columns: list[str] | None = None, **kwargs: object) -> object:
        if columns is None or "descriptor" in columns:
            reads.append(source)
        return real_read_table(source, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    return reads


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_DIR


@pytest.fixture(scope="session")
def real_images() -> dict[str, bytes]:
    """Real photos (scikit-image's public-domain/CC0 set, bundled with the demo): name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted((DEMO_DIR / "images").iterdir())}


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 serving `routes` (path -> Route or callable(handler))."""

    routes: dict[str, Route | Callable[[http.server.BaseHTTPRequestHandler], None]]
    base_url: str = ""
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


def _make_handler(server: LoopbackServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            server.hits[path] = server.hits.get(path, 0) + 1
            route = server.routes.get(path)
            if route is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if callable(route):
                route(self)
                return
            self.send_response(route.status)
            for k, v in route.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)

    return Handler


@pytest.fixture(scope="session")
def route() -> type[Route]:
    """The Route class (test modules cannot import conftest under --import-mode=importlib)."""
    return Route


@pytest.fixture
def http_server() -> Iterator[Callable[[dict], LoopbackServer]]:
    """Factory: `srv = http_server({"/a.jpg": Route(body=...)})`; stopped after the test."""
    started: list[http.server.ThreadingHTTPServer] = []

    def start(routes: dict) -> LoopbackServer:
        srv = LoopbackServer(routes=dict(routes))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(srv))
        httpd.daemon_threads = True
        srv.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(httpd)
        return srv

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny random-init open_clip model saved as a local checkpoint (weights only).

    Returns the config keys that select it: model, model_config, pretrained (checkpoint path).
    """
    import open_clip
    import torch

    config_path = DEMO_DIR / "curate-tiny-clip.json"
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(0)
    model = open_clip.create_model("curate-tiny-clip", pretrained=None)
    ckpt = tmp_path_factory.mktemp("tiny_clip") / "tiny_clip.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return {"model": "curate-tiny-clip", "model_config": str(config_path), "pretrained": str(ckpt)}


@dataclass
class DemoImageServer:
    """configs/demo/ on 127.0.0.1: `base_url + "/images/astronaut.jpg"`. `delay` (s) slows every response so
    that a test can kill a run mid-download; `hits` counts requests, `paths` lists them (a run of an earlier
    test may still be finishing its downloads)."""

    base_url: str = ""
    delay: float = 0.0
    hits: int = 0
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def demo_image_server() -> Iterator[DemoImageServer]:
    state = DemoImageServer()
    files = {"/" + str(p.relative_to(DEMO_DIR)): p.read_bytes() for p in DEMO_DIR.rglob("*") if p.is_file()}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            with state.lock:
                state.hits += 1
                state.paths.append(self.path)
            if state.delay:
                time.sleep(state.delay)
            body = files.get(self.path.split("?", 1)[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "image/jpeg" if body is not None else "text/plain")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    class QuietServer(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # clients killed mid-request reset their connections: expected in crash tests

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield state
    httpd.shutdown()
    httpd.server_close()
