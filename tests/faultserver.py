"""A fault-injection HTTP/1.1 server for tests and benchmarks: loopback only, bounded in every way.

It serves a table of routes (path → :class:`Fault`) from an asyncio loop in a background thread,
so hundreds of concurrent slow or stalled connections cost no threads. Every fault a downloader
meets in the wild has a route type: plain responses (any status/headers/body, e.g. 404, 500, HTML
served as image/jpeg, 0 bytes), `Retry-After`, stalls before the headers, bodies dripped slowly,
resets mid-body, bodies shorter than their Content-Length, huge Content-Length, redirects, and
routes that fail a few times before they succeed. `refused_url()` gives a URL whose port refuses
connections.

Bounds: binds 127.0.0.1/::1 only; at most `max_connections` open connections (more are closed at
once), `max_requests` requests in total (then 503), request heads of at most 16 KiB, idle
keep-alive connections closed after `idle_timeout`, and every stall/drip capped by `max_fault_seconds`.
`stop()` closes everything. Per-path hit counts and connection counts are kept for assertions.

    with FaultServer({"/a.jpg": Respond(body=jpeg), "/slow": Stall(5)}) as srv:
        fetch(srv.url("/a.jpg"))
"""

from __future__ import annotations

import asyncio
import functools
import io
import random
import socket
import ssl
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
_MAX_HEAD_BYTES = 16 * 1024
_REASONS = {
    200: "OK", 301: "Moved Permanently", 302: "Found", 303: "See Other", 307: "Temporary Redirect",
    308: "Permanent Redirect", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 410: "Gone",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class Request:
    """One request being answered: what a Fault needs (method, path, the connection's writer)."""

    server: FaultServer
    method: str
    path: str
    writer: asyncio.StreamWriter

    def head(self, status: int, headers: Mapping[str, str], length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if length is not None and not any(k.lower() == "content-length" for k in headers):
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class Fault:
    """A route's behaviour. `serve` returns True when the connection may carry another request."""

    async def serve(self, ctx: Request) -> bool:
        raise NotImplementedError


@dataclass
class Respond(Fault):
    """A complete response. Also covers 404/500, HTML served as image/jpeg, 0 bytes, truncated JPEGs."""

    body: bytes = b""
    status: int = 200
    content_type: str | None = "image/jpeg"
    headers: dict[str, str] = field(default_factory=dict)

    async def serve(self, ctx: Request) -> bool:
        headers = dict(self.headers)
        if self.content_type is not None:
            headers.setdefault("Content-Type", self.content_type)
        await ctx.send(ctx.head(self.status, headers, len(self.body)))
        if ctx.method != "HEAD" and self.body:
            await ctx.send(self.body)
        return True


def retry_after(seconds: float | str = 1, status: int = 429) -> Respond:
    """429 (or 503) with a Retry-After header."""
    return Respond(b"slow down", status=status, content_type="text/plain", headers={"Retry-After": str(seconds)})


@dataclass
class Redirect(Fault):
    """A redirect to `location` (absolute or relative), e.g. to itself for a loop."""

    location: str
    status: int = 302

    async def serve(self, ctx: Request) -> bool:
        await ctx.send(ctx.head(self.status, {"Location": self.location}, 0))
        return True


@dataclass
class Stall(Fault):
    """Read the request, then send nothing for `seconds` (timeout before headers), then close."""

    seconds: float = 30.0

    async def serve(self, ctx: Request) -> bool:
        await asyncio.sleep(min(self.seconds, ctx.server.max_fault_seconds))
        return False


@dataclass
class Drip(Fault):
    """Send the headers, then the body `chunk` bytes every `interval` seconds (a slowloris server).

    With `in_headers=True` even the header block is dripped, which per-read socket timeouts do not catch.
    """

    body: bytes = b"\xff\xd8\xff" + b"\0" * 4096
    chunk: int = 1
    interval: float = 0.05
    in_headers: bool = False
    content_type: str = "image/jpeg"

    async def serve(self, ctx: Request) -> bool:
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + ctx.server.max_fault_seconds
        head = ctx.head(200, {"Content-Type": self.content_type}, len(self.body))
        payload = self.body
        if self.in_headers:
            payload = head + self.body
        else:
            await ctx.send(head)
        for i in range(0, len(payload), self.chunk):
            if loop.time() >= stop_at:
                return False
            await ctx.send(payload[i : i + self.chunk])
            await asyncio.sleep(self.interval)
        return True


@dataclass
class ResetMidBody(Fault):
    """Announce the full body, send `after` bytes, then reset the connection (TCP RST)."""

    body: bytes = b"\xff\xd8\xff" + b"\0" * 65536
    after: int = 1024

    async def serve(self, ctx: Request) -> bool:
        await ctx.send(ctx.head(200, {"Content-Type": "image/jpeg"}, len(self.body)))
        await ctx.send(self.body[: self.after])
        _reset(ctx.writer)
        return False


@dataclass
class ShortBody(Fault):
    """Announce the full body, send `after` bytes, then close cleanly (a body shorter than declared)."""

    body: bytes = b"\xff\xd8\xff" + b"\0" * 65536
    after: int = 1024

    async def serve(self, ctx: Request) -> bool:
        await ctx.send(ctx.head(200, {"Content-Type": "image/jpeg"}, len(self.body)))
        await ctx.send(self.body[: self.after])
        return False


@dataclass
class CloseWithoutResponse(Fault):
    """Read the request and close the connection without a byte of response."""

    reset: bool = False

    async def serve(self, ctx: Request) -> bool:
        if self.reset:
            _reset(ctx.writer)
        return False


@dataclass
class HugeContentLength(Fault):
    """Declare an enormous Content-Length and start sending zeros (bounded by max_fault_seconds)."""

    declared: int = 10**12
    content_type: str = "image/jpeg"

    async def serve(self, ctx: Request) -> bool:
        await ctx.send(ctx.head(200, {"Content-Type": self.content_type}, self.declared))
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + ctx.server.max_fault_seconds
        block = b"\0" * 65536
        sent = 0
        while sent < min(self.declared, 64 * 1024 * 1024) and loop.time() < stop_at:
            await ctx.send(block)
            sent += len(block)
        return False


@dataclass
class Flaky(Fault):
    """Answer with `failure` for the first `failures` requests to this route, then with `then`."""

    then: Fault
    failure: Fault = field(default_factory=lambda: Respond(b"oops", status=503, content_type="text/plain"))
    failures: int = 1
    seen: int = field(default=0, init=False)  # requests so far (the loop is single-threaded)

    async def serve(self, ctx: Request) -> bool:
        self.seen += 1
        return await (self.failure if self.seen <= self.failures else self.then).serve(ctx)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


RouteTable = Mapping[str, Fault]


class FaultServer:
    """The server. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        routes: RouteTable | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: tuple[float, float] = (0.0, 0.0),
        seed: int = 0,
        max_connections: int = 1024,
        max_requests: int = 1_000_000,
        idle_timeout: float = 5.0,
        max_fault_seconds: float = 30.0,
        fallback: Callable[[str], Fault | None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if host not in _LOOPBACK_HOSTS:
            raise ValueError(f"FaultServer binds loopback only ({', '.join(_LOOPBACK_HOSTS)}), not {host!r}")
        if latency[0] < 0 or latency[1] < latency[0]:
            raise ValueError(f"latency must be (low, high) with 0 <= low <= high, got {latency}")
        self.routes: dict[str, Fault] = dict(routes or {})
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self.latency = latency
        self.max_connections = max_connections
        self.max_requests = max_requests
        self.idle_timeout = idle_timeout
        self.max_fault_seconds = max_fault_seconds
        self.fallback = fallback
        self.ssl_context = ssl_context  # serve HTTPS with this server-side context
        self.hits: Counter[str] = Counter()
        self.request_headers: dict[str, dict[str, str]] = {}  # last request's headers per path
        self.connections_opened = 0
        self.requests_served = 0
        self._rng = random.Random(seed)
        self._open = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._refuser: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FaultServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._handle, self.host, self.port, limit=_MAX_HEAD_BYTES, backlog=1024, ssl=self.ssl_context
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as err:  # surface bind errors to the caller
                errors.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="faultserver", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None
        if self._refuser is not None:
            self._refuser.close()
            self._refuser = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def refused_url(self, path: str = "/refused") -> str:
        """A URL on a loopback port that is bound but not listening: connecting is refused (RST)."""
        if self._refuser is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self._refuser = socket.socket(family, socket.SOCK_STREAM)
            self._refuser.bind((self.host, 0))  # held, never listen(): no other process can take it
        port = self._refuser.getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}/{path.lstrip('/')}"

    # -- serving ---------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_opened += 1
        if self._open >= self.max_connections:
            writer.transport.abort()
            return
        self._open += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                    return
                keep_alive = await self._answer(head, writer)
                if not keep_alive:
                    return
        except (ConnectionError, OSError):
            return
        except asyncio.CancelledError:
            return  # stop(): end quietly instead of surfacing cancellation in asyncio's callback
        finally:
            self._open -= 1
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return False
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        self.hits[path] += 1
        self.request_headers[path] = headers
        self.requests_served += 1
        ctx = Request(self, method, path, writer)
        if self.requests_served > self.max_requests:
            await Respond(b"request budget exhausted", status=503, content_type="text/plain").serve(ctx)
            return False
        low, high = self.latency
        if high > 0:
            await asyncio.sleep(low + (high - low) * self._rng.random())
        fault = self.routes.get(path)
        if fault is None and self.fallback is not None:
            fault = self.fallback(path)
        if fault is None:
            fault = Respond(b"not found", status=404, content_type="text/plain")
        keep = await fault.serve(ctx)
        wants_close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        return keep and not wants_close


# ------------------------------------------------------------------------------------------------
# Payload makers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def decompression_bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few tens of KB that decode to 400 MP."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    out = io.BytesIO()
    out.write(b"\x89PNG\r\n\x1a\n")

    def chunk(kind: bytes, payload: bytes) -> None:
        out.write(struct.pack(">I", len(payload)) + kind + payload)
        out.write(struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    block = row * 256
    data = bytearray()
    for _ in range(height // 256):
        data += compressor.compress(block)
    data += compressor.compress(row * (height % 256))
    data += compressor.flush()
    chunk(b"IDAT", bytes(data))
    chunk(b"IEND", b"")
    return out.getvalue()


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` fraction of `data` (e.g. a JPEG cut off mid-scan)."""
    return data[: max(1, int(len(data) * keep))]


HTML_PAGE = b"<!DOCTYPE html><html><head><title>Not an image</title></head><body>login</body></html>"
