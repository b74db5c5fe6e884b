"""Fault injection: every failure a web server can throw at the download stage ends as a precise,
bounded row outcome (never a crash or a hang), with retries only where they can help."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from faultserver import (
    HTML_PAGE,
    CloseWithoutResponse,
    Drip,
    Fault,
    FaultServer,
    Flaky,
    HugeContentLength,
    Redirect,
    ResetMidBody,
    Respond,
    ShortBody,
    Stall,
    decompression_bomb_png,
    retry_after,
    truncated,
)

from curate.pipeline import columns as C
from curate.pipeline.stage import RunContext
from curate.stages.download import DownloadConfig, DownloadStage
from curate.stages.download.fetch import Fetcher, FetchError, FetchOptions

FAST = {
    "timeout": 1.0,
    "connect_timeout": 0.5,
    "retries": 1,
    "backoff_base": 0.02,
    "backoff_max": 0.05,
    "retry_after_max": 2.0,
    "allowed_networks": ("127.0.0.1/32",),
    "image_size": 128,
    "min_width": 40,
}


def run_stage(urls: list[str | None], **config: object) -> pa.Table:
    settings = {**FAST, **config}
    stage = DownloadStage(DownloadConfig(**settings), RunContext(output_path="", work_path=""))  # type: ignore[arg-type]
    table = pa.table({C.KEY: [f"{i:09d}" for i in range(len(urls))], C.URL: urls,
                      C.STATUS: [C.STATUS_SUCCESS] * len(urls)})
    try:
        return stage.process(table)
    finally:
        stage.teardown()


@pytest.fixture
def tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def fault_table(images: dict[str, bytes], tiny_png: bytes) -> dict[str, tuple[Callable[[], Fault] | None, str, str | None]]:
    """kind → (route factory or None for special URLs, expected status, expected reason)."""
    jpeg = images["astronaut.jpg"]
    return {
        "ok": (lambda: Respond(jpeg), "success", None),
        "ok_png_as_html": (lambda: Respond(images["horse.png"], content_type="text/html"), "success", None),
        "http_404": (lambda: Respond(b"missing", status=404, content_type="text/plain"), "failed", "http_404"),
        "http_500": (lambda: Respond(b"boom", status=500, content_type="text/plain"), "failed", "http_500"),
        "http_429": (lambda: retry_after(0.2), "failed", "http_429"),
        "flaky_429_then_ok": (lambda: Flaky(Respond(jpeg), failure=retry_after(0.2)), "success", None),
        "flaky_503_then_ok": (lambda: Flaky(Respond(jpeg)), "success", None),
        "refused": (None, "failed", "connect_error"),
        "stall_before_headers": (lambda: Stall(30), "failed", "timeout"),
        "drip_body": (lambda: Drip(interval=0.05), "failed", "timeout"),
        "drip_headers": (lambda: Drip(in_headers=True, interval=0.05), "failed", "timeout"),
        "reset_mid_body": (lambda: ResetMidBody(), "failed", "connection_reset"),
        "short_body": (lambda: ShortBody(), "failed", "incomplete_body"),
        "closed_without_response": (lambda: CloseWithoutResponse(), "failed", "connection_reset"),
        "truncated_jpeg": (lambda: Respond(truncated(jpeg, 0.5)), "failed", "truncated_image"),
        "html_as_jpeg": (lambda: Respond(HTML_PAGE, content_type="image/jpeg"), "failed", "not_an_image"),
        "zero_bytes": (lambda: Respond(b""), "failed", "empty_body"),
        "decompression_bomb": (lambda: Respond(decompression_bomb_png(), content_type="image/png"),
                               "failed", "decompression_bomb"),
        "redirect_loop": (None, "failed", "too_many_redirects"),
        "redirect_to_private": (lambda: Redirect("http://169.254.169.254/latest/meta-data/"),
                                "rejected", "private_address"),
        "huge_content_length": (lambda: HugeContentLength(), "failed", "too_large"),
        "x_robots_noai": (lambda: Respond(jpeg, headers={"X-Robots-Tag": "noai"}), "rejected", "opted_out"),
        "x_robots_ua_noimageai": (lambda: Respond(jpeg, headers={"X-Robots-Tag": "img2dataset: noimageai"}),
                                  "rejected", "opted_out"),
        "too_small": (lambda: Respond(tiny_png, content_type="image/png"), "rejected", "too_small"),
        "missing_url": (None, "failed", "missing_url"),
        "ftp_url": (None, "rejected", "unsupported_scheme"),
    }


def build_rows(srv: FaultServer, table: dict, kinds: list[str]) -> list[str | None]:
    urls: list[str | None] = []
    for i, kind in enumerate(kinds):
        factory = table[kind][0]
        path = f"/{kind}/{i}"
        if kind == "refused":
            urls.append(srv.refused_url(path))
        elif kind == "missing_url":
            urls.append(None if i % 2 else "  ")
        elif kind == "ftp_url":
            urls.append(f"ftp://127.0.0.1/{i}.jpg")
        elif kind == "redirect_loop":
            srv.routes[path] = Redirect(path if i % 2 else f"/{kind}/{i}b")
            srv.routes[f"/{kind}/{i}b"] = Redirect(path)
            urls.append(srv.url(path))
        else:
            srv.routes[path] = factory()  # a fresh Flaky per row: each row sees its own first failure
            urls.append(srv.url(path))
    return urls


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(max_fault_seconds=3.0, max_requests=20_000, max_connections=2048) as srv:
        yield srv


def test_each_fault_ends_with_its_reason(server: FaultServer, real_images: dict[str, bytes], tiny_png: bytes) -> None:
    table = fault_table(real_images, tiny_png)
    kinds = list(table)
    urls = build_rows(server, table, kinds)
    started = time.monotonic()
    out = run_stage(urls, threads=len(kinds), max_per_host=len(kinds))
    elapsed = time.monotonic() - started
    got = list(zip(out.column(C.STATUS).to_pylist(), out.column(C.REJECT_REASON).to_pylist(), strict=True))
    for kind, (status, reason), message in zip(kinds, got, out.column(C.ERROR_MESSAGE).to_pylist(), strict=True):
        assert (status, reason) == table[kind][1:], f"{kind}: got {status}/{reason} ({message})"
    # timeouts are bounded by timeout x attempts + backoff, whatever the server does
    assert elapsed < 2 * FAST["timeout"] + 4.0, elapsed  # generous: the CI machine may be busy
    ok = out.filter(pa.compute.equal(out.column(C.STATUS), "success"))
    assert set(ok.column(C.IMAGE_EXT).to_pylist()) == {"jpg"}
    assert all(m is None for m in ok.column(C.ERROR_MESSAGE).to_pylist())


def test_redirect_to_a_local_file_is_refused_with_allow_file(
    server: FaultServer, real_images: dict[str, bytes], tmp_path: Path
) -> None:
    photo = real_images["astronaut.jpg"]
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(photo)
    server.routes["/to-secret"] = Redirect(secret.as_uri())
    server.routes["/to-passwd"] = Redirect("file:///etc/passwd")
    out = run_stage([server.url("/to-secret"), server.url("/to-passwd"), secret.as_uri()], allow_file=True)
    rows = out.to_pylist()
    for row in rows[:2]:
        assert (row[C.STATUS], row[C.REJECT_REASON]) == ("rejected", "unsupported_scheme")
        assert all(row[field.name] is None for field in DownloadStage.adds), "nothing from the file in any column"
        assert "input URLs only" in row[C.ERROR_MESSAGE] and "root:" not in row[C.ERROR_MESSAGE]
    assert rows[2][C.STATUS] == "success"  # allow_file still serves input URLs


def test_retries_only_retryable_failures(server: FaultServer, real_images: dict[str, bytes]) -> None:
    server.routes.update({"/404": Respond(b"", status=404), "/500": Respond(b"", status=500),
                          "/501": Respond(b"", status=501), "/503": Respond(b"", status=503),
                          "/html": Respond(HTML_PAGE), "/noai": Respond(real_images["coffee.jpg"],
                                                                        headers={"X-Robots-Tag": "noai"})})
    out = run_stage([server.url(p) for p in ("/404", "/500", "/501", "/503", "/html", "/noai")], retries=2)
    assert out.column(C.REJECT_REASON).to_pylist() == ["http_404", "http_500", "http_501", "http_503",
                                                         "not_an_image", "opted_out"]
    assert dict(server.hits) == {"/404": 1, "/500": 3, "/501": 1, "/503": 3, "/html": 1, "/noai": 1}
    assert "after 3 attempts" in out.column(C.ERROR_MESSAGE)[1].as_py()


def test_retry_after_is_honoured_and_capped(server: FaultServer, real_images: dict[str, bytes]) -> None:
    server.routes["/later"] = Flaky(Respond(real_images["coffee.jpg"]), failure=retry_after(0.6))
    server.routes["/much-later"] = retry_after(3600)
    started = time.monotonic()
    out = run_stage([server.url("/later")], retries=1)
    assert out.column(C.STATUS).to_pylist() == ["success"]
    assert time.monotonic() - started >= 0.6, "the retry must wait for Retry-After"
    started = time.monotonic()
    out = run_stage([server.url("/much-later")], retries=3)
    assert out.column(C.REJECT_REASON).to_pylist() == ["http_429"]
    assert "Retry-After 3600s exceeds" in out.column(C.ERROR_MESSAGE)[0].as_py()
    assert time.monotonic() - started < 1.5 and server.hits["/much-later"] == 1


def test_backoff_is_exponential_with_jitter(server: FaultServer) -> None:
    server.routes["/500"] = Respond(b"", status=500)
    waits: list[float] = []
    fetcher = Fetcher(
        FetchOptions(retries=4, backoff_base=0.1, backoff_max=0.3, allowed_networks=("127.0.0.1/32",)),
        sleep=waits.append, rng=random.Random(1),
    )
    with pytest.raises(FetchError) as info:
        fetcher.fetch(server.url("/500"))
    assert info.value.attempts == 5
    ceilings = [0.1, 0.2, 0.3, 0.3]
    assert len(waits) == 4
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling
    assert len(set(waits)) == 4, "jitter: waits differ"


def test_total_time_per_row_caps_retries(server: FaultServer) -> None:
    server.routes["/stall"] = Stall(30)
    started = time.monotonic()
    out = run_stage([server.url("/stall")], timeout=0.5, retries=10, max_total_time=1.2, backoff_base=0.01)
    elapsed = time.monotonic() - started
    assert out.column(C.REJECT_REASON).to_pylist() == ["timeout"]
    assert elapsed < 3.0, elapsed  # 1.2 s budget, not 10 retries x 0.5 s


def test_thousand_mixed_requests(server: FaultServer, real_images: dict[str, bytes], tiny_png: bytes) -> None:
    """>= 1,000 mixed requests: no crash, no hang, every row accounted for with the right reason."""
    table = fault_table(real_images, tiny_png)
    # Real photos dominate, like a real crawl; every fault appears many times.
    for name, data in real_images.items():
        table[f"photo_{name}"] = (lambda data=data: Respond(data, content_type="image/jpeg"), "success", None)
    kinds = list(table)
    rng = random.Random(7)
    slow = {"stall_before_headers", "drip_body", "drip_headers"}
    weights = [1 if k in slow else 3 if k.startswith("photo_") or k == "ok" else 2 for k in kinds]
    row_kinds = kinds + rng.choices(kinds, weights=weights, k=1050 - len(kinds))
    urls = build_rows(server, table, row_kinds)

    result: dict[str, pa.Table] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            result["out"] = run_stage(urls, threads=64, max_per_host=64)
        except BaseException as err:  # surfaced below
            errors.append(err)

    started = time.monotonic()
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(60)
    elapsed = time.monotonic() - started
    assert not worker.is_alive(), "the stage hung"
    assert not errors, errors
    out = result["out"]
    assert out.num_rows == len(row_kinds)
    assert out.column(C.KEY).to_pylist() == [f"{i:09d}" for i in range(len(row_kinds))], "order must be kept"
    statuses = out.column(C.STATUS).to_pylist()
    reasons = out.column(C.REJECT_REASON).to_pylist()
    stages = out.column(C.REJECT_STAGE).to_pylist()
    mismatches = Counter()
    for kind, status, reason, stage in zip(row_kinds, statuses, reasons, stages, strict=True):
        expected_status, expected_reason = table[kind][1:]
        if (status, reason) != (expected_status, expected_reason):
            mismatches[(kind, status, reason)] += 1
        assert stage == (None if status == "success" else "download")
    assert not mismatches, mismatches
    assert set(statuses) == {"success", "failed", "rejected"}
    ok = out.filter(pa.compute.equal(out.column(C.STATUS), "success"))
    assert all(ok.column(C.IMAGE).to_pylist()) and None not in ok.column("sha256").to_pylist()
    print(f"{len(row_kinds)} rows in {elapsed:.1f}s; {Counter(reasons)}")
