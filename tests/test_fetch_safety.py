"""Network safety of the fetcher: schemes, private addresses (also after DNS and redirects), limits."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import (
    Drip,
    Fault,
    FaultServer,
    HugeContentLength,
    Redirect,
    Request,
    Respond,
)

from curate.stages.download.fetch import (
    AddressPolicy,
    Fetcher,
    FetchError,
    FetchOptions,
    address_category,
    parse_networks,
    parse_retry_after,
    robots_opt_out,
)

LOOPBACK_ONLY = ("127.0.0.1/32",)


@pytest.fixture
def jpeg(real_images: dict[str, bytes]) -> bytes:
    return real_images["astronaut.jpg"]


@pytest.fixture
def server(jpeg: bytes) -> Iterator[FaultServer]:
    routes = {
        "/a.jpg": Respond(jpeg),
        "/to-a": Redirect("/a.jpg"),
        "/to-metadata": Redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-private": Redirect("http://10.20.30.40/x.jpg"),
        "/to-ftp": Redirect("ftp://example.com/x.jpg"),
        "/to-file": Redirect("file:///etc/passwd"),
        "/huge": HugeContentLength(),
    }
    with FaultServer(routes, max_fault_seconds=5) as srv:
        yield srv


def make_fetcher(**overrides: object) -> Fetcher:
    opts = {"timeout": 2.0, "connect_timeout": 1.0, "retries": 0, "allowed_networks": LOOPBACK_ONLY}
    opts.update(overrides)
    return Fetcher(FetchOptions(**opts))  # type: ignore[arg-type]


def fetch_error(fetcher: Fetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetcher.fetch(url)
    return info.value


# -- address classification ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud-metadata"),
        ("169.254.10.10", "link-local"),
        ("100.100.100.200", "cloud-metadata"),
        ("fd00:ec2::254", "cloud-metadata"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6 must not smuggle loopback through
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("100.64.0.1", "not globally routable"),
        ("fc00::1", "private"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_categories(address: str, category: str | None) -> None:
    assert address_category(ipaddress.ip_address(address)) == category


def test_allowed_networks_open_only_what_they_name() -> None:
    policy = AddressPolicy(allowed_networks=parse_networks(["127.0.0.1/32"]))
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # the same address, mapped
    assert policy.refusal("127.0.0.2") == "loopback"
    assert policy.refusal("10.0.0.1") == "private"
    assert policy.refusal("8.8.8.8") is None
    assert AddressPolicy(allow_private=True).refusal("169.254.169.254") is None


# -- schemes and URL forms -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.jpg", "gopher://example.com/", "data:image/png;base64,AAAA", "javascript:alert(1)",
            "file:///etc/passwd", "//example.com/a.jpg"],
)
def test_non_http_schemes_are_refused(url: str) -> None:
    err = fetch_error(make_fetcher(), url)
    assert (err.reason, err.policy) == ("unsupported_scheme", True)


def test_file_urls_only_when_allowed(tmp_path: Path, jpeg: bytes) -> None:
    path = tmp_path / "local.jpg"
    path.write_bytes(jpeg)
    assert fetch_error(make_fetcher(), path.as_uri()).reason == "unsupported_scheme"
    assert make_fetcher(allow_file=True).fetch(path.as_uri()).data == jpeg


def test_credentials_and_hostless_urls_are_refused() -> None:
    fetcher = make_fetcher()
    assert fetch_error(fetcher, "http://user:pw@8.8.8.8/a.jpg").reason == "invalid_url"
    assert fetch_error(fetcher, "http:///a.jpg").reason == "invalid_url"
    assert fetch_error(fetcher, "http://[::1/a.jpg").reason == "invalid_url"


# -- private addresses -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/a.jpg",
        "http://10.0.0.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/a.jpg",
        "http://[::ffff:127.0.0.1]:9/a.jpg",
        "http://0.0.0.0:9/",
        "http://2130706433:9/a.jpg",  # 127.0.0.1 as one decimal number: caught after resolution
        "http://0x7f.1:9/a.jpg",  # ... and in hex shorthand
    ],
)
def test_private_targets_refused_by_default_without_connecting(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not connect to a refused address")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    err = fetch_error(make_fetcher(allowed_networks=()), url)
    assert (err.reason, err.policy) == ("private_address", True), err.message


def test_loopback_allowed_by_allowed_networks_or_allow_private(server: FaultServer, jpeg: bytes) -> None:
    assert make_fetcher().fetch(server.url("/a.jpg")).data == jpeg
    assert make_fetcher(allowed_networks=(), allow_private=True).fetch(server.url("/a.jpg")).data == jpeg
    err = fetch_error(make_fetcher(allowed_networks=("127.0.0.2/32",)), server.url("/a.jpg"))
    assert err.reason == "private_address"


def test_connects_to_the_vetted_address_with_the_original_host_header(server: FaultServer, jpeg: bytes) -> None:
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return {"images.example": ["127.0.0.1"], "xn--bcher-kva.example": ["127.0.0.1"]}[host]

    fetcher = Fetcher(FetchOptions(timeout=2, retries=0, allowed_networks=LOOPBACK_ONLY), resolver=resolver)
    result = fetcher.fetch(f"http://images.example:{server.port}/a.jpg")
    assert result.data == jpeg and result.peer_ip == "127.0.0.1"
    assert server.request_headers["/a.jpg"]["host"] == f"images.example:{server.port}"
    # internationalised host names are resolved (and sent) in their IDNA form
    fetcher.fetch(f"http://bücher.example:{server.port}/a.jpg")
    assert calls == ["images.example", "xn--bcher-kva.example"]
    assert server.request_headers["/a.jpg"]["host"] == f"xn--bcher-kva.example:{server.port}"


def test_dns_answers_with_refused_addresses(server: FaultServer, jpeg: bytes) -> None:
    answers = {"evil.example": ["10.1.2.3", "169.254.169.254"], "mixed.example": ["10.1.2.3", "127.0.0.1"]}
    fetcher = Fetcher(
        FetchOptions(timeout=2, retries=0, allowed_networks=LOOPBACK_ONLY), resolver=lambda h, p: answers[h]
    )
    err = fetch_error(fetcher, f"http://evil.example:{server.port}/a.jpg")
    assert err.reason == "private_address" and "10.1.2.3" in err.message
    # refused addresses are skipped, never connected to; the allowed one is used
    result = fetcher.fetch(f"http://mixed.example:{server.port}/a.jpg")
    assert (result.data, result.peer_ip) == (jpeg, "127.0.0.1")


def test_dns_rebinding_cannot_switch_the_address_after_the_check(server: FaultServer, jpeg: bytes) -> None:
    """The resolver answers once with an allowed address and afterwards with a refused one. One
    lookup serves both the check and the connect (no second lookup an attacker could answer), and
    a later lookup is vetted again."""
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])
    calls = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    fetcher = Fetcher(
        FetchOptions(timeout=2, retries=0, allowed_networks=LOOPBACK_ONLY, dns_cache_ttl=0), resolver=resolver
    )
    assert fetcher.fetch(f"http://rebind.example:{server.port}/a.jpg").peer_ip == "127.0.0.1"
    assert len(calls) == 1
    fetcher.close()  # drop the keep-alive connection so the next fetch must resolve again
    fresh = Fetcher(
        FetchOptions(timeout=2, retries=0, allowed_networks=LOOPBACK_ONLY, dns_cache_ttl=0), resolver=resolver
    )
    assert fetch_error(fresh, f"http://rebind.example:{server.port}/a.jpg").reason == "private_address"


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/to-metadata", "private_address"), ("/to-private", "private_address"), ("/to-ftp", "unsupported_scheme"),
     ("/to-file", "unsupported_scheme")],
)
def test_every_redirect_hop_is_checked(server: FaultServer, path: str, reason: str) -> None:
    err = fetch_error(make_fetcher(allow_file=False), server.url(path))
    assert err.reason == reason


def test_allow_file_never_lets_a_redirect_reach_local_files(server: FaultServer, tmp_path: Path, jpeg: bytes) -> None:
    """allow_file opens input URLs only: a server's Location must not read our disk."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg)
    server.routes["/to-secret"] = Redirect(secret.as_uri())
    fetcher = make_fetcher(allow_file=True)
    for path in ("/to-secret", "/to-file"):
        err = fetch_error(fetcher, server.url(path))
        assert (err.reason, err.policy) == ("unsupported_scheme", True)
        assert "input URLs only" in err.message and "root:" not in err.message
    assert fetcher.fetch(secret.as_uri()).data == jpeg  # the input URL itself is still allowed


def test_redirect_to_other_loopback_address_outside_allowed_networks(server: FaultServer) -> None:
    server.routes["/to-127-0-0-2"] = Redirect(f"http://127.0.0.2:{server.port}/a.jpg")
    err = fetch_error(make_fetcher(), server.url("/to-127-0-0-2"))
    assert err.reason == "private_address" and "127.0.0.2" in err.message


def test_relative_redirect_is_followed(server: FaultServer, jpeg: bytes) -> None:
    result = make_fetcher().fetch(server.url("/to-a"))
    assert result.data == jpeg and result.redirects == 1 and result.url.endswith("/a.jpg")


# -- limits, headers, keep-alive -------------------------------------------------------------------
def test_huge_content_length_refused_before_reading(server: FaultServer) -> None:
    started = time.monotonic()
    err = fetch_error(make_fetcher(max_bytes=1_000_000), server.url("/huge"))
    assert err.reason == "too_large" and "Content-Length" in err.message
    assert time.monotonic() - started < 2.0  # the server would send 64 MB over 5 s


def test_body_larger_than_max_bytes_without_content_length(server: FaultServer) -> None:
    def chunked(n: int) -> bytes:
        part = b"\xff\xd8\xff" + b"\0" * 50_000
        body = b""
        for _ in range(n):
            body += f"{len(part):x}\r\n".encode() + part + b"\r\n"
        return body + b"0\r\n\r\n"

    class Chunked(Fault):
        async def serve(self, ctx: Request) -> bool:
            await ctx.send(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n")
            await ctx.send(chunked(5))
            return True

    server.routes["/chunked"] = Chunked()
    assert len(make_fetcher().fetch(server.url("/chunked")).data) == 5 * 50_003
    err = fetch_error(make_fetcher(max_bytes=120_000), server.url("/chunked"))
    assert err.reason == "too_large"


def test_user_agent_keep_alive_and_path_quoting(server: FaultServer, jpeg: bytes) -> None:
    server.routes["/caf%C3%A9%20noir.jpg"] = Respond(jpeg)
    fetcher = make_fetcher(user_agent="curate-test/1.0 (+https://example.org/bot)")
    before = server.connections_opened
    for _ in range(10):
        assert fetcher.fetch(server.url("/a.jpg")).data == jpeg
    assert server.connections_opened - before == 1, "sequential requests to one host must reuse the connection"
    assert server.request_headers["/a.jpg"]["user-agent"] == "curate-test/1.0 (+https://example.org/bot)"
    assert fetcher.fetch(server.url("/café noir.jpg")).data == jpeg


def test_stale_keep_alive_connection_is_replaced_transparently(jpeg: bytes) -> None:
    with FaultServer({"/a.jpg": Respond(jpeg)}, idle_timeout=0.2) as srv:
        fetcher = make_fetcher()
        assert fetcher.fetch(srv.url("/a.jpg")).data == jpeg
        time.sleep(0.5)  # the server closes the idle connection
        result = fetcher.fetch(srv.url("/a.jpg"))
        assert result.data == jpeg and result.attempts == 1
        assert srv.connections_opened == 2


def test_per_host_concurrency_cap(jpeg: bytes) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with FaultServer({"/a.jpg": Respond(jpeg)}, latency=(0.1, 0.1)) as srv:
        fetcher = make_fetcher(max_per_host=2, timeout=5.0)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: fetcher.fetch(srv.url("/a.jpg")), range(8)))
        elapsed = time.monotonic() - started
    assert all(r.data == jpeg for r in results)
    assert srv.connections_opened <= 2
    assert elapsed >= 0.38, f"8 requests of 0.1 s through 2 slots need >= 0.4 s, took {elapsed:.2f}"


def test_robots_and_retry_after_parsing() -> None:
    tokens, bad = ("curate", "img2dataset"), ("noai", "noimageai", "noindex", "noimageindex")
    assert robots_opt_out(["noai"], tokens, bad) == "noai"
    assert robots_opt_out(["noindex, nofollow"], tokens, bad) == "noindex"
    assert robots_opt_out(["none"], tokens, bad) == "noindex"
    assert robots_opt_out(["googlebot: noindex"], tokens, bad) is None
    assert robots_opt_out(["img2dataset: noimageai"], tokens, bad) == "noimageai"
    assert robots_opt_out(["CURATE: NoAI"], tokens, bad) == "noai"
    assert robots_opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST"], tokens, bad) is None
    assert robots_opt_out(["all", "nofollow"], tokens, bad) is None
    assert robots_opt_out(["noai"], tokens, ()) is None
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("soon") is None
    assert 9 <= (parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) or 0) <= 11


# -- HTTPS: the socket goes to the vetted IP, SNI and certificate checks use the host name ---------
@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test", "-addext", "basicConstraints=critical,CA:TRUE",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


def test_https_with_vetted_address_sni_and_hostname_check(tls_cert: tuple[str, str], jpeg: bytes) -> None:
    import ssl

    cert, key = tls_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    routes = {"/a.jpg": Respond(jpeg), "/drip": Drip(in_headers=True, interval=0.05)}
    with FaultServer(routes, ssl_context=server_ctx, max_fault_seconds=5) as srv:
        def resolver(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        url = f"https://images.test:{srv.port}/a.jpg"
        base = {"timeout": 2.0, "retries": 0, "allowed_networks": LOOPBACK_ONLY}
        untrusted = Fetcher(FetchOptions(**base), resolver=resolver)  # type: ignore[arg-type]
        assert fetch_error(untrusted, url).reason == "ssl_error"  # self-signed: not in the system store
        trusted = Fetcher(FetchOptions(**base, ca_bundle=cert), resolver=resolver)  # type: ignore[arg-type]
        for _ in range(5):
            result = trusted.fetch(url)
            assert result.data == jpeg and result.peer_ip == "127.0.0.1"
        # (the refused handshake never reaches the handler) the five fetches share one TLS connection
        assert srv.connections_opened == 1
        assert srv.request_headers["/a.jpg"]["host"] == f"images.test:{srv.port}"
        # the certificate is checked against the URL's host name, not the IP we connected to
        err = fetch_error(trusted, f"https://other.test:{srv.port}/a.jpg")
        assert err.reason == "ssl_error" and "other.test" in err.message
        insecure = Fetcher(FetchOptions(**base, verify_tls=False), resolver=resolver)  # type: ignore[arg-type]
        assert insecure.fetch(f"https://other.test:{srv.port}/a.jpg").data == jpeg
        # the watchdog deadline also cuts a TLS server that drips its headers
        started = time.monotonic()
        slow = Fetcher(FetchOptions(**{**base, "timeout": 0.8}, ca_bundle=cert), resolver=resolver)  # type: ignore[arg-type]
        assert fetch_error(slow, f"https://images.test:{srv.port}/drip").reason == "timeout"
        assert time.monotonic() - started < 2.5  # 0.8 s deadline; the drip lasts 5 s
