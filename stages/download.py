"""download stage: fetch image bytes for rows that carry a URL (skeleton config; see issue 4)."""

from __future__ import annotations

from dataclasses import dataclass

from curate.pipeline.configspec import option


@dataclass(frozen=True)
class DownloadConfig:
    enabled: bool = option(True, help="Run the download stage (rows that already carry image bytes skip it).")
    threads: int = option(32, help="Concurrent requests per partition.", range=(1, 1024))
    timeout: float = option(10.0, help="Total deadline per request in seconds (connect + headers + body).", range=(0, None), open_low=True)
    retries: int = option(2, help="Retries for retryable failures (connect errors, timeouts, 429, 5xx).", range=(0, 20))
    allow_private: bool = option(False, help="Allow private, loopback, link-local and metadata addresses (unsafe).")
    allowed_networks: tuple[str, ...] = option((), help="CIDRs allowed although private, e.g. ['127.0.0.1/32'].")
