"""A bounded, SSRF-safe HTTP(S) image fetcher with keep-alive, retries and opt-out handling.

Design (why not `urllib.request` like img2dataset):

* **Every connection goes to an address we vetted.** The connection classes resolve the host
  themselves, drop every address that is private, loopback, link-local, multicast, reserved or a
  cloud-metadata endpoint (unless allowed by `allow_private` / `allowed_networks`), and connect to
  one of the remaining addresses by IP, so a DNS answer that changes between check and connect
  (DNS rebinding) cannot redirect us. The peer address of the connected socket is checked again.
  Redirects are followed here, hop by hop, so every hop is re-checked (scheme, address, count).
* **A total deadline per attempt**, enforced by a watchdog thread that shuts the socket down when it
  expires: a server that drips one byte a second (even inside the headers) cannot hold a worker.
* **Bounded everything**: response bytes (Content-Length refused up front, body counted while read),
  redirects, header count/size (http.client limits), Retry-After waits, idle connections kept.
* **Keep-alive**: one small pool of idle connections per (scheme, host, port), LIFO, with a cap per
  host and in total; a request that fails on a reused connection before any response byte arrives
  is resent once on a fresh connection (the server closed the idle connection: not a failure).
* **Retries only when retrying can help** (connect errors, timeouts, resets, 429, most 5xx) with
  exponential backoff and jitter; 429/503 `Retry-After` is honoured, capped by `retry_after_max`
  and by the time left for the row.
* **Per-host concurrency cap** (a semaphore per host name) so one slow host cannot take all threads
  and no host sees more than `max_per_host` parallel requests from one worker.

Failures raise :class:`FetchError` with a stable `reason` (the row's reject reason) and a message.
"""

from __future__ import annotations

import email.utils
import errno
import heapq
import http.client
import ipaddress
import itertools
import random
import socket
import ssl
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit
from urllib.request import url2pathname

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_USER_AGENT = (
    "curate-pipeline/0.1 (image-text dataset curation; honours X-Robots-Tag noai/noimageai)"
)
DEFAULT_DISALLOWED_DIRECTIVES: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
DEFAULT_ROBOTS_TOKENS: tuple[str, ...] = ("curate", "img2dataset")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
NON_RETRYABLE_5XX = frozenset({501, 505})
_READ_CHUNK = 256 * 1024
_REDIRECT_BODY_DRAIN = 64 * 1024  # read at most this much of a redirect body to reuse the connection
_IDLE_CONNECTION_TTL = 30.0  # servers commonly close idle keep-alive connections after 5-60 s
# Cloud metadata endpoints that are not all covered by the generic private/link-local checks.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
# Robots directives that carry a value after a colon and so must not be read as a user-agent prefix.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


class FetchError(Exception):
    """A URL could not be fetched. `reason` is the stable reject reason; `policy` marks refusals."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        policy: bool = False,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.policy = policy
        self.attempts = 1

    def __reduce__(self) -> tuple:  # keep reason/message when pickled across processes
        return (_rebuild_fetch_error, (self.reason, self.message, self.retryable, self.retry_after, self.policy))


def _rebuild_fetch_error(
    reason: str, message: str, retryable: bool, retry_after: float | None, policy: bool
) -> FetchError:
    return FetchError(reason, message, retryable=retryable, retry_after=retry_after, policy=policy)


@dataclass(frozen=True)
class FetchOptions:
    """Fetcher behaviour; the download stage fills it from its config section."""

    timeout: float = 10.0
    connect_timeout: float = 5.0
    retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 10.0
    max_total_time: float = 60.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    max_per_host: int = 16
    max_idle_connections: int = 256
    user_agent: str = DEFAULT_USER_AGENT
    verify_tls: bool = True
    ca_bundle: str = ""  # PEM file of CAs to trust instead of the system store ("" = system store)
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    allow_file: bool = False
    disallowed_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    robots_tokens: tuple[str, ...] = DEFAULT_ROBOTS_TOKENS
    dns_cache_ttl: float = 300.0


@dataclass
class FetchResult:
    data: bytes
    url: str  # the final URL after redirects
    status: int
    content_type: str | None
    peer_ip: str | None
    redirects: int
    attempts: int
    reused_connection: bool = False


# ------------------------------------------------------------------------------------------------
# Address policy
# ------------------------------------------------------------------------------------------------
def address_category(ip: IPAddress) -> str | None:
    """Why an address is not publicly routable ("loopback", "private", ...), None if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            inner = address_category(mapped)
            return inner or None
        if ip.teredo is not None:
            return address_category(ip.teredo[1])
    if ip in METADATA_ADDRESSES:
        return "cloud-metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"  # e.g. 100.64.0.0/10 carrier-grade NAT
    return None


def parse_networks(cidrs: Sequence[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings → networks (host bits allowed, e.g. 127.0.0.1/32 or ::1). Raises ValueError."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


@dataclass(frozen=True)
class AddressPolicy:
    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    def refusal(self, ip_text: str) -> str | None:
        """None if connecting to `ip_text` is allowed, else the category that forbids it."""
        try:
            ip = ipaddress.ip_address(ip_text.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return "unparseable address"
        category = address_category(ip)
        if category is None or self.allow_private:
            return None
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        for net in self.allowed_networks:
            if any(c.version == net.version and c in net for c in candidates):
                return None
        return category


# ------------------------------------------------------------------------------------------------
# X-Robots-Tag
# ------------------------------------------------------------------------------------------------
def robots_opt_out(values: Sequence[str], tokens: Sequence[str], disallowed: Sequence[str]) -> str | None:
    """The first disallowed X-Robots-Tag directive that applies to us, or None.

    Each header value is `[user-agent:] directive[, directive...]`; a value without a user-agent
    applies to every crawler, one with a user-agent only if it is one of `tokens`. `none` means
    `noindex, nofollow`.
    """
    wanted = {d.strip().lower() for d in disallowed if d.strip()}
    if not wanted:
        return None
    ours = {t.strip().lower() for t in tokens}
    for value in values:
        for line in value.split("\n"):
            text = line.strip()
            agent = None
            if ":" in text:
                prefix, rest = text.split(":", 1)
                prefix_l = prefix.strip().lower()
                if "," not in prefix_l and prefix_l not in _VALUED_DIRECTIVES:
                    agent, text = prefix_l, rest
            if agent is not None and agent not in ours:
                continue
            for raw in text.split(","):
                directive = raw.strip().lower()
                expanded = {"noindex", "nofollow"} if directive == "none" else {directive}
                hit = expanded & wanted
                if hit:
                    return sorted(hit)[0]
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)  # lenient: servers sometimes send fractions
        return max(0.0, seconds) if seconds == seconds else None  # NaN guard
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# ------------------------------------------------------------------------------------------------
# Watchdog: enforces the total deadline on blocking socket calls
# ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Watch:
    conn: http.client.HTTPConnection
    deadline: float
    active: bool = True
    fired: bool = False


class _Watchdog:
    """One thread that shuts down the socket of any attempt that outlives its deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Watch]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="curate-fetch-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, conn: http.client.HTTPConnection, deadline: float) -> Iterator[_Watch]:
        entry = _Watch(conn, deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._counter), entry))
            if self._heap[0][2] is entry:
                self._cond.notify()
        try:
            yield entry
        finally:
            with self._cond:
                entry.active = False

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and (not self._heap[0][2].active or self._heap[0][0] <= now):
                    _, _, entry = heapq.heappop(self._heap)
                    if entry.active:
                        entry.fired = True
                        sock = entry.conn.sock
                        if sock is not None:
                            # the plain-socket shutdown, also for TLS: it wakes the blocked reader
                            # without tearing down SSL state under the other thread's feet
                            with suppress(OSError):
                                socket.socket.shutdown(sock, socket.SHUT_RDWR)
                wait = self._heap[0][0] - now if self._heap else None
                self._cond.wait(wait)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


# ------------------------------------------------------------------------------------------------
# Connections that connect only to vetted addresses
# ------------------------------------------------------------------------------------------------
class _VettedMixin:
    fetcher: Fetcher
    deadline: float
    peer_ip: str | None
    host: str
    port: int
    sock: socket.socket | None

    def _open_vetted_socket(self) -> socket.socket:
        sock, ip = self.fetcher._connect(self.host, self.port, self.deadline)
        self.peer_ip = ip
        return sock


class _VettedHTTPConnection(_VettedMixin, http.client.HTTPConnection):
    def __init__(self, host: str, port: int, fetcher: Fetcher) -> None:
        super().__init__(host, port)
        self.fetcher = fetcher
        self.deadline = 0.0
        self.peer_ip = None

    def connect(self) -> None:
        self.sock = self._open_vetted_socket()


class _VettedHTTPSConnection(_VettedMixin, http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, fetcher: Fetcher, context: ssl.SSLContext) -> None:
        super().__init__(host, port, context=context)
        self.fetcher = fetcher
        self.deadline = 0.0
        self.peer_ip = None
        self._tls_context = context

    def connect(self) -> None:
        raw = self._open_vetted_socket()
        try:
            # SNI and certificate checks use the host name, while the socket goes to the vetted IP.
            self.sock = self._tls_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


Connection = _VettedHTTPConnection | _VettedHTTPSConnection


# ------------------------------------------------------------------------------------------------
# The fetcher
# ------------------------------------------------------------------------------------------------
@dataclass
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal without brackets
    port: int
    request_path: str


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections_opened: int = 0
    connections_reused: int = 0


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class Fetcher:
    """Thread-safe: one instance serves all download threads of a worker process."""

    def __init__(
        self,
        options: FetchOptions,
        *,
        resolver: Resolver | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self.policy = AddressPolicy(options.allow_private, parse_networks(options.allowed_networks))
        self._resolver: Resolver = resolver or _system_resolver
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._watchdog = _Watchdog()
        self._lock = threading.Lock()
        self._idle: OrderedDict[tuple[str, str, int], deque[tuple[float, Connection]]] = OrderedDict()
        self._idle_count = 0
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._dns_cache: OrderedDict[tuple[str, int], tuple[float, list[str]]] = OrderedDict()
        # Lookups run on their own threads so a hanging resolver costs the row its deadline, not
        # forever; threads are started lazily, so the cap only matters when many hosts are new.
        self._dns_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="curate-dns")
        self.stats = _Stats()
        self._tls = ssl.create_default_context(cafile=options.ca_bundle or None)
        if not options.verify_tls:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE
        self._closed = False

    # -- public ----------------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        """GET `url` with retries. Raises FetchError (with `.attempts` set)."""
        opts = self.options
        row_deadline = time.monotonic() + opts.max_total_time
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._attempt(url, row_deadline)
                result.attempts = attempt
                return result
            except FetchError as err:
                err.attempts = attempt
                if not err.retryable or attempt > opts.retries:
                    raise
                remaining = row_deadline - time.monotonic()
                if err.retry_after is not None:
                    if err.retry_after > opts.retry_after_max or err.retry_after >= remaining:
                        err.message += f" (Retry-After {err.retry_after:g}s exceeds the time allowed; gave up)"
                        raise
                    wait = err.retry_after
                else:
                    ceiling = min(opts.backoff_max, opts.backoff_base * (2 ** (attempt - 1)))
                    with self._rng_lock:
                        wait = ceiling / 2 + self._rng.uniform(0, ceiling / 2)  # "equal jitter"
                    if wait >= remaining:
                        raise
                if wait > 0:
                    self._sleep(wait)

    def close(self) -> None:
        """Close idle connections and stop helper threads."""
        self._closed = True
        with self._lock:
            idle = [conn for q in self._idle.values() for _, conn in q]
            self._idle.clear()
            self._idle_count = 0
        for conn in idle:
            conn.close()
        self._watchdog.close()
        self._dns_pool.shutdown(wait=False, cancel_futures=True)

    # -- one attempt (all redirect hops) ---------------------------------------------------------
    def _attempt(self, url: str, row_deadline: float) -> FetchResult:
        opts = self.options
        deadline: float | None = None  # starts when the first hop gets its host slot
        redirects = 0
        visited: list[str] = []
        while True:
            # allow_file opens input URLs only: a server must never steer us onto the local disk.
            target = self._parse(url, allow_file=self.options.allow_file and redirects == 0)
            if target.scheme == "file":
                return self._read_file(url, target)
            visited.append(url)
            slot = self._slot(target.host)
            wait_until = row_deadline if deadline is None else deadline
            if not slot.acquire(timeout=max(0.0, wait_until - time.monotonic())):
                raise FetchError("timeout", f"no free connection slot for {target.host} in time", retryable=False)
            try:
                if deadline is None:
                    deadline = min(row_deadline, time.monotonic() + opts.timeout)
                outcome = self._exchange(target, url, deadline)
            finally:
                slot.release()
            if isinstance(outcome, FetchResult):
                outcome.redirects = redirects
                return outcome
            location = outcome
            redirects += 1
            if redirects > opts.max_redirects:
                loop = " (loop)" if location in visited else ""
                raise FetchError("too_many_redirects", f"more than {opts.max_redirects} redirects{loop}, last to {location}")
            url = location

    def _parse(self, url: str, *, allow_file: bool) -> _Target:
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as err:
            raise FetchError("invalid_url", f"unparseable URL: {err}") from err
        scheme = parts.scheme.lower()
        if scheme == "file":
            if not allow_file:
                why = "allow_file covers input URLs only" if self.options.allow_file else "download.allow_file"
                raise FetchError("unsupported_scheme", f"file:// URLs are refused ({why})", policy=True)
            return _Target("file", "", 0, parts.path)
        if scheme not in ("http", "https"):
            raise FetchError("unsupported_scheme", f"scheme {scheme or '(none)'!r} is not http/https", policy=True)
        host = parts.hostname
        if not host:
            raise FetchError("invalid_url", "URL has no host")
        if parts.username is not None or parts.password is not None:
            raise FetchError("invalid_url", "credentials in URLs are refused", policy=True)
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as err:
                raise FetchError("invalid_url", f"host {host!r} is not a valid host name: {err}") from err
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~-._?")
        return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)

    def _read_file(self, url: str, target: _Target) -> FetchResult:
        path = url2pathname(target.request_path)
        try:
            with open(path, "rb") as fh:
                data = fh.read(self.options.max_bytes + 1)
        except OSError as err:
            raise FetchError("file_error", f"{path}: {err.strerror or err}") from err
        if len(data) > self.options.max_bytes:
            raise FetchError("too_large", f"file is larger than max_bytes={self.options.max_bytes}")
        return FetchResult(data, url, 200, None, None, 0, 1)

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            slot = self._host_slots.get(host)
            if slot is None:
                slot = self._host_slots[host] = threading.BoundedSemaphore(self.options.max_per_host)
            return slot

    # -- connections -----------------------------------------------------------------------------
    def _get_connection(self, target: _Target) -> tuple[Connection, bool]:
        key = (target.scheme, target.host, target.port)
        now = time.monotonic()
        stale: list[Connection] = []
        conn: Connection | None = None
        with self._lock:
            queue = self._idle.get(key)
            while queue:
                since, candidate = queue.pop()
                self._idle_count -= 1
                if now - since < _IDLE_CONNECTION_TTL and candidate.sock is not None:
                    conn = candidate
                    break
                stale.append(candidate)
            if queue is not None and not queue:
                del self._idle[key]
        for old in stale:
            old.close()
        if conn is not None:
            with self.stats.lock:
                self.stats.connections_reused += 1
            return conn, True
        return self._get_connection_fresh(target)

    def _put_connection(self, target: _Target, conn: Connection) -> None:
        if self._closed or conn.sock is None:
            conn.close()
            return
        key = (target.scheme, target.host, target.port)
        evicted: list[Connection] = []
        with self._lock:
            queue = self._idle.setdefault(key, deque())
            queue.append((time.monotonic(), conn))
            self._idle.move_to_end(key)
            self._idle_count += 1
            if len(queue) > self.options.max_per_host:
                evicted.append(queue.popleft()[1])
                self._idle_count -= 1
            while self._idle_count > self.options.max_idle_connections and self._idle:
                oldest_key = next(iter(self._idle))
                oldest = self._idle[oldest_key]
                evicted.append(oldest.popleft()[1])
                self._idle_count -= 1
                if not oldest:
                    del self._idle[oldest_key]
        for old in evicted:
            old.close()

    def _resolve(self, host: str, port: int, deadline: float) -> list[str]:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            return [host]
        except ValueError:
            pass
        key = (host, port)
        now = time.monotonic()
        with self._lock:
            cached = self._dns_cache.get(key)
            if cached is not None and cached[0] > now:
                return cached[1]
        timeout = max(0.0, min(deadline, now + self.options.connect_timeout) - now)
        future = self._dns_pool.submit(self._resolver, host, port)
        try:
            ips = list(dict.fromkeys(future.result(timeout=timeout)))
        except FutureTimeout as err:
            future.cancel()
            raise FetchError("timeout", f"DNS lookup of {host} took longer than {timeout:.1f}s", retryable=True) from err
        except socket.gaierror as err:
            temporary = err.errno in (socket.EAI_AGAIN,)
            raise FetchError("dns_error", f"cannot resolve {host}: {err.strerror or err}", retryable=temporary) from err
        except (OSError, UnicodeError) as err:
            raise FetchError("dns_error", f"cannot resolve {host}: {err}") from err
        if not ips:
            raise FetchError("dns_error", f"{host} has no addresses")
        with self._lock:
            self._dns_cache[key] = (now + self.options.dns_cache_ttl, ips)
            self._dns_cache.move_to_end(key)
            while len(self._dns_cache) > 10_000:
                self._dns_cache.popitem(last=False)
        return ips

    def _connect(self, host: str, port: int, deadline: float) -> tuple[socket.socket, str]:
        """Resolve, vet every address, connect to a vetted one. Called from Connection.connect()."""
        ips = self._resolve(host, port, deadline)
        allowed = [ip for ip in ips if self.policy.refusal(ip) is None]
        if not allowed:
            refused = ", ".join(f"{ip} ({self.policy.refusal(ip)})" for ip in ips[:4])
            what = f"address {refused}" if ips == [host] else f"{host} resolves only to refused addresses: {refused}"
            raise FetchError("private_address", f"{what} is not allowed (download.allowed_networks)", policy=True)
        last_error: OSError | None = None
        for ip in allowed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(min(self.options.connect_timeout, remaining))
                sock.connect((ip, port))
                peer = sock.getpeername()[0]
                if self.policy.refusal(str(peer)) is not None:  # defence in depth: the real peer
                    raise FetchError("private_address", f"connected peer {peer} is refused", policy=True)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                with self.stats.lock:
                    self.stats.connections_opened += 1
                return sock, ip
            except FetchError:
                sock.close()
                raise
            except OSError as err:
                sock.close()
                last_error = err
        if last_error is None or isinstance(last_error, TimeoutError):
            raise FetchError("timeout", f"connect to {host}:{port} timed out", retryable=True)
        raise FetchError("connect_error", f"connect to {host}:{port} failed: {last_error}", retryable=True)

    # -- one HTTP exchange -----------------------------------------------------------------------
    def _exchange(self, target: _Target, url: str, deadline: float) -> FetchResult | str:
        """Send one GET; return the result, or the absolute URL of a redirect."""
        conn, reused = self._get_connection(target)
        try:
            return self._exchange_on(conn, reused, target, url, deadline)
        except _StaleConnection:
            conn.close()
            fresh, _ = self._get_connection_fresh(target)
            return self._exchange_on(fresh, False, target, url, deadline)

    def _get_connection_fresh(self, target: _Target) -> tuple[Connection, bool]:
        if target.scheme == "https":
            return _VettedHTTPSConnection(target.host, target.port, self, self._tls), False
        return _VettedHTTPConnection(target.host, target.port, self), False

    def _exchange_on(
        self, conn: Connection, reused: bool, target: _Target, url: str, deadline: float
    ) -> FetchResult | str:
        opts = self.options
        conn.deadline = deadline
        keep = False
        got_response = False
        try:
            with self._watchdog.watch(conn, deadline) as watch:
                try:
                    if conn.sock is not None:
                        conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    conn.request(
                        "GET",
                        target.request_path,
                        headers={
                            "User-Agent": opts.user_agent,
                            "Accept": "image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
                            "Accept-Encoding": "identity, gzip;q=0.5, deflate;q=0.5",
                            "Connection": "keep-alive",
                        },
                    )
                    resp = conn.getresponse()
                    got_response = True
                    result = self._handle_response(resp, conn, url, deadline, watch)
                    keep = not resp.will_close and resp.isclosed()
                    return result
                except FetchError:
                    # An HTTP error whose small body was read completely leaves a reusable connection.
                    keep = got_response and not resp.will_close and resp.isclosed() and conn.sock is not None
                    raise
                except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as err:
                    if reused and not got_response and not watch.fired and time.monotonic() < deadline:
                        raise _StaleConnection() from err
                    raise self._timeout_or(watch, deadline, "connection_reset", f"connection reset: {err}") from err
                except http.client.IncompleteRead as err:
                    raise self._timeout_or(
                        watch, deadline, "incomplete_body", f"body ended early: {len(err.partial)} bytes"
                    ) from err
                except ssl.SSLCertVerificationError as err:
                    raise FetchError("ssl_error", f"TLS certificate rejected: {err.verify_message}") from err
                except ssl.SSLError as err:
                    raise self._timeout_or(watch, deadline, "ssl_error", f"TLS error: {err}", retryable=False) from err
                except TimeoutError as err:
                    raise FetchError("timeout", f"no data before the {opts.timeout:g}s deadline", retryable=True) from err
                except (http.client.HTTPException, ValueError) as err:
                    # LineTooLong, too many headers, bad status line, bad chunk sizes ...
                    raise self._timeout_or(
                        watch, deadline, "protocol_error", f"bad HTTP response: {type(err).__name__}: {err}",
                        retryable=False,
                    ) from err
                except OSError as err:
                    reason = "connection_reset" if err.errno in (errno.ECONNRESET, errno.EPIPE) else "connect_error"
                    raise self._timeout_or(watch, deadline, reason, f"network error: {err}") from err
        finally:
            if keep:
                self._put_connection(target, conn)
            else:
                conn.close()

    @staticmethod
    def _timeout_or(
        watch: _Watch, deadline: float, reason: str, message: str, *, retryable: bool = True
    ) -> FetchError:
        if watch.fired or time.monotonic() >= deadline:
            return FetchError("timeout", "total deadline exceeded (connect + headers + body)", retryable=True)
        return FetchError(reason, message, retryable=retryable)

    def _handle_response(
        self, resp: http.client.HTTPResponse, conn: Connection, url: str, deadline: float, watch: _Watch
    ) -> FetchResult | str:
        opts = self.options
        status = resp.status
        if status in REDIRECT_CODES:
            location = resp.getheader("Location")
            self._drain(resp, conn, deadline)
            if not location:
                raise FetchError("bad_redirect", f"HTTP {status} without a Location header")
            try:
                return urljoin(url, location.strip())
            except ValueError as err:
                raise FetchError("bad_redirect", f"unusable Location {location!r}") from err
        if status != 200:
            retry_after = parse_retry_after(resp.getheader("Retry-After")) if status in (429, 503) else None
            retryable = status == 429 or (500 <= status < 600 and status not in NON_RETRYABLE_5XX)
            self._drain(resp, conn, deadline)
            raise FetchError(f"http_{status}", f"HTTP {status} {resp.reason}".strip(), retryable=retryable,
                             retry_after=retry_after)
        directive = robots_opt_out(resp.headers.get_all("X-Robots-Tag") or [], opts.robots_tokens,
                                   opts.disallowed_directives)
        if directive is not None:
            raise FetchError("opted_out", f"X-Robots-Tag: {directive}", policy=True)
        declared = resp.getheader("Content-Length")
        if declared is not None:
            try:
                declared_len = int(declared)
            except ValueError:
                declared_len = -1
            if declared_len > opts.max_bytes:
                raise FetchError("too_large", f"Content-Length {declared_len} > max_bytes {opts.max_bytes}")
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
            raise FetchError("unsupported_encoding", f"Content-Encoding {encoding!r}")
        chunks: list[bytes] = []
        total = 0
        while True:
            if time.monotonic() >= deadline:
                raise FetchError("timeout", f"body not complete before the {opts.timeout:g}s deadline",
                                 retryable=True)
            chunk = resp.read1(_READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > opts.max_bytes:
                raise FetchError("too_large", f"body exceeds max_bytes {opts.max_bytes}")
            chunks.append(chunk)
        if watch.fired or time.monotonic() >= deadline:  # the watchdog cut the body short
            raise FetchError("timeout", f"body not complete before the {opts.timeout:g}s deadline",
                             retryable=True)
        if resp.length:  # http.client's read1 does not raise on a short Content-Length body
            raise http.client.IncompleteRead(b"".join(chunks), resp.length)
        resp.read()  # marks the response complete so the connection can carry the next request
        data = b"".join(chunks)
        if encoding in ("gzip", "x-gzip", "deflate"):
            data = self._decompress(data, encoding)
        return FetchResult(data, url, status, resp.getheader("Content-Type"), conn.peer_ip, 0, 1)

    def _decompress(self, data: bytes, encoding: str) -> bytes:
        wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
        try:
            inflater = zlib.decompressobj(wbits)
            out = inflater.decompress(data, self.options.max_bytes + 1)
        except zlib.error as err:
            raise FetchError("protocol_error", f"bad {encoding} body: {err}") from err
        if len(out) > self.options.max_bytes or inflater.unconsumed_tail:
            raise FetchError("too_large", f"decompressed body exceeds max_bytes {self.options.max_bytes}")
        return out

    @staticmethod
    def _drain(resp: http.client.HTTPResponse, conn: Connection, deadline: float) -> None:
        """Read a small error/redirect body so the connection can be reused; drop it on big ones."""
        budget = _REDIRECT_BODY_DRAIN
        while budget > 0 and time.monotonic() < deadline:
            chunk = resp.read1(min(budget, 16 * 1024))
            if not chunk:
                resp.read()  # complete: the connection is reusable
                return
            budget -= len(chunk)
        conn.close()  # unread bytes remain: the connection cannot carry another request


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before it answered."""
