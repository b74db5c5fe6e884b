"""download stage: fetch, verify, resize and encode the image of every row.

Rows that already carry image bytes (webdataset input, e.g. an img2dataset download) are not
fetched: they are decode-verified and measured (width/height/sha256) and kept byte for byte unless
`reprocess_existing` is set. Every successful row also gets `exif`, the source bytes' EXIF tags in
img2dataset's JSON format (resize.original_exif). See docs/download.md for the behaviour and every reject reason.

Status semantics: network, protocol and decoding problems set status `failed` (http_404, timeout,
not_an_image, decompression_bomb, ...); policy decisions set `rejected` (opted_out, private_address,
unsupported_scheme, too_small, aspect_ratio).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import ipaddress
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pyarrow as pa

from curate.pipeline import columns as C
from curate.pipeline.configspec import ConfigError, option
from curate.pipeline.images import DEFAULT_INPUT_FORMATS, DEFAULT_MAX_PIXELS, SNIFFED_FORMATS, ImageError
from curate.pipeline.stage import RunContext, Stage
from curate.stages.download.blur import BadBoxes, parse_boxes
from curate.stages.download.fetch import (
    DEFAULT_DISALLOWED_DIRECTIVES,
    DEFAULT_ROBOTS_TOKENS,
    DEFAULT_USER_AGENT,
    Fetcher,
    FetchError,
    FetchOptions,
    Resolver,
)
from curate.stages.download.resize import (
    ImageFiltered,
    ImageSpec,
    Interpolation,
    OutputFormat,
    ProcessedImage,
    ReencodePolicy,
    ResizeMode,
    original_exif,
    process_image,
    verify_image,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from _typeshed import DataclassInstance

@dataclass(frozen=True)
class DownloadConfig:
    enabled: bool = option(True, help="Run the download stage (rows that already carry image bytes skip fetching).")
    # -- fetching --------------------------------------------------------------------------------
    threads: int = option(32, help="Concurrent requests per partition (threads per worker process).", range=(1, 1024))
    cpu_threads: int = option(
        0,
        help="Most download threads of one worker process doing image work at once (decode, resize, encode, and the "
        "later stages' work on the decoded pixels: pHash, eval match); the others wait for the network meanwhile. "
        "0 = this process's share of the machine's CPUs (its CPUs / worker processes on the machine).",
        range=(0, 1024),
    )
    max_per_host: int = option(
        16, help="Most concurrent requests to one host name from one worker process.", range=(1, 1024)
    )
    timeout: float = option(
        10.0,
        help="Total deadline in seconds for one attempt: connect + all redirect hops + headers + body. "
        "A server that drips bytes is cut off when it expires.",
        range=(0, None),
        open_low=True,
    )
    connect_timeout: float = option(
        5.0, help="Seconds allowed for DNS + TCP/TLS connect (within `timeout`).", range=(0, None), open_low=True
    )
    retries: int = option(
        2,
        help="Retries after the first attempt, only for retryable failures: connect errors, timeouts, "
        "resets, HTTP 429 and 5xx (not 501/505).",
        range=(0, 20),
    )
    backoff_base: float = option(
        0.5,
        help="Backoff before retry n (n = 1, 2, ...) is base * 2^(n-1) seconds, capped by `backoff_max`, "
        "with jitter: a uniform random time between half and all of it.",
        range=(0, None),
    )
    backoff_max: float = option(8.0, help="Cap on one backoff wait, seconds.", range=(0, None))
    retry_after_max: float = option(
        10.0,
        help="Honour a 429/503 Retry-After of at most this many seconds; a longer one fails the row at once.",
        range=(0, None),
    )
    max_total_time: float = option(
        60.0,
        help="Wall-clock budget per row in seconds for all attempts, backoff and Retry-After waits.",
        range=(0, None),
        open_low=True,
    )
    max_bytes: int = option(
        20 * 1024 * 1024,
        help="Largest response body accepted, bytes (default 20 MiB); a larger Content-Length is refused "
        "before reading.",
        range=(1, None),
    )
    max_redirects: int = option(5, help="Redirect hops followed per attempt (each hop is re-checked).", range=(0, 30))
    user_agent: str = option(DEFAULT_USER_AGENT, help="User-Agent header sent with every request.")
    robots_tokens: tuple[str, ...] = option(
        DEFAULT_ROBOTS_TOKENS,
        help="User-agent tokens whose X-Robots-Tag lines (`token: noai`) apply to us, besides lines "
        "without a token.",
    )
    disallowed_directives: tuple[str, ...] = option(
        DEFAULT_DISALLOWED_DIRECTIVES,
        help="X-Robots-Tag directives that reject the row as `opted_out`; empty list = ignore X-Robots-Tag.",
    )
    verify_hash_column: str = option(
        "",
        help="Input column holding the hex digest of each image's bytes as first downloaded (DataComp's `sha256`; "
        "img2dataset's `verify_hash`): bytes with another digest fail as `hash_mismatch` (the URL now serves "
        "something else) before any decoding; rows where it is null are not checked. '' = no check.",
    )
    verify_hash_type: Literal["sha256", "md5"] = option(
        "sha256", help="Digest of `verify_hash_column`: sha256 or md5."
    )
    blur_bbox_column: str = option(
        "",
        help="Input column of boxes to blur in each image (DataComp's `face_bboxes`, img2dataset's `bbox_col`): a "
        "list of [x_min, y_min, x_max, y_max] relative to the picture as stored (before EXIF orientation), or its "
        "JSON text; blurred in the output picture (docs/download.md). A value that cannot be read fails the row "
        "as `bad_blur_boxes`. '' = no blurring.",
    )
    verify_tls: bool = option(True, help="Verify HTTPS certificates (false = accept any certificate).")
    ca_bundle: str = option(
        "", help="PEM file of certificate authorities to trust instead of the system store ('' = system store).",
        path=True,
    )
    # -- network safety --------------------------------------------------------------------------
    allow_private: bool = option(
        False,
        help="Allow private, loopback, link-local, multicast, reserved and cloud-metadata addresses (unsafe).",
    )
    allowed_networks: tuple[str, ...] = option(
        (), help="CIDRs allowed although private, e.g. ['127.0.0.1/32']; all other private addresses stay refused."
    )
    allow_file: bool = option(False, help="Allow file:// URLs (local files; off because URLs come from the web).")
    # -- image -----------------------------------------------------------------------------------
    image_size: int = option(512, help="Target size in pixels used by `resize_mode`.", range=(1, 65535))
    resize_mode: ResizeMode = option(
        "keep_ratio",
        help="`none`: keep the size; `keep_ratio`: smaller side = image_size; `keep_ratio_largest`: larger "
        "side = image_size; `center_crop`: keep_ratio then a centred image_size square; `border`: "
        "keep_ratio_largest then pad to a square with white.",
    )
    resize_only_if_bigger: bool = option(
        True, help="Only shrink: images whose relevant side is <= image_size are not resized, cropped or padded."
    )
    downscale_interpolation: Interpolation = option(
        "area",
        help="Filter used when shrinking. `area` approximates OpenCV's INTER_AREA (img2dataset's default) with "
        "Pillow's hamming filter; `box` is Pillow's box filter, which aliases at non-integer factors.",
    )
    upscale_interpolation: Interpolation = option("lanczos", help="Filter used when enlarging.")
    min_width: int = option(0, help="Reject (`too_small`) images narrower than this, pixels, before resizing.", range=(0, None))
    min_height: int = option(0, help="Reject (`too_small`) images shorter than this, pixels, before resizing.", range=(0, None))
    max_aspect_ratio: float = option(
        0.0, help="Reject (`aspect_ratio`) images whose long/short side ratio exceeds this; 0 = no limit.",
        range=(0, None),
    )
    max_image_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        help="Decompression-bomb guard: images declaring more pixels fail with `decompression_bomb` before "
        "decoding (default: Pillow's limit, about 89.5 MP; at most 178956970).",
        range=(1, None),
    )
    input_formats: tuple[str, ...] = option(
        DEFAULT_INPUT_FORMATS,
        help="Image formats accepted, sniffed from the bytes (Pillow names: JPEG, PNG, WEBP, GIF, BMP, TIFF).",
    )
    fast_jpeg_decode: bool = option(
        True,
        help="Decode JPEGs that will be shrunk at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) where that keeps at "
        "least `jpeg_draft_margin` times the output size: much cheaper for big photos; false = always decode fully.",
    )
    jpeg_draft_margin: float = option(
        1.5,
        help="With fast_jpeg_decode, the reduced-scale decode keeps at least this multiple of the output size, "
        "leaving the antialiasing to the resize filter; 1 decodes at the smallest scale that covers the output: "
        "less CPU per image, more aliasing on fine textures (docs/download.md).",
        range=(1, 8),
    )
    output_format: OutputFormat = option("jpg", help="Encoding of stored images: jpg, png or webp.")
    quality: int = option(95, help="JPEG/WebP quality (1-100).", range=(1, 100))
    png_compression: int = option(6, help="PNG zlib compression level (0-9).", range=(0, 9))
    reencode: ReencodePolicy = option(
        "always",
        help="`always` re-encodes every image (strips metadata); `if_needed` keeps the original bytes when "
        "no resize/crop/pad/rotation was needed and the format already is `output_format`.",
    )
    reprocess_existing: bool = option(
        False,
        help="Also resize/re-encode rows that arrive with image bytes (default: verify and measure only).",
    )

    def validate(self, key_path: str) -> None:
        for i, cidr in enumerate(self.allowed_networks):
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError as err:
                raise ConfigError(f"{key_path}.allowed_networks[{i}]", f"not a CIDR network: {err}") from err
        for i, name in enumerate(self.input_formats):
            if name not in SNIFFED_FORMATS:
                raise ConfigError(
                    f"{key_path}.input_formats[{i}]", f"expected one of {', '.join(SNIFFED_FORMATS)}, got {name!r}"
                )
        if self.max_image_pixels > 2 * DEFAULT_MAX_PIXELS:  # beyond this Pillow's own guard refuses anyway
            raise ConfigError(
                f"{key_path}.max_image_pixels", f"must be <= {2 * DEFAULT_MAX_PIXELS}, got {self.max_image_pixels}"
            )
        if self.connect_timeout > self.timeout:
            raise ConfigError(f"{key_path}.connect_timeout", f"must be <= timeout ({self.timeout:g}), got {self.connect_timeout:g}")
        if not self.user_agent.strip() or any(c in self.user_agent for c in "\r\n"):
            raise ConfigError(f"{key_path}.user_agent", "must be a non-empty single line")

    def fetch_options(self) -> FetchOptions:
        return options_from(FetchOptions, self, keep_defaults=("max_idle_connections", "dns_cache_ttl"))

    def image_spec(self) -> ImageSpec:
        return options_from(
            ImageSpec, self, max_pixels="max_image_pixels", use_draft="fast_jpeg_decode", draft_margin="jpeg_draft_margin"
        )


_Options = TypeVar("_Options", bound="DataclassInstance")


def options_from(
    cls: type[_Options], config: DataclassInstance, *, keep_defaults: tuple[str, ...] = (), **renamed: str
) -> _Options:
    """Build the options dataclass `cls` from the config's fields of the same name.

    `renamed` maps a field of `cls` to the config field it comes from. Every other field of `cls`
    must exist in the config or be named in `keep_defaults`, so that renaming a config option fails
    here instead of silently leaving the default in force.
    """
    available = {f.name for f in dataclasses.fields(config)}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        source = renamed.get(f.name, f.name)
        if source in available:
            values[f.name] = getattr(config, source)
        elif f.name not in keep_defaults:
            raise TypeError(f"{type(config).__name__} has no field {source!r} for {cls.__name__}.{f.name}")
    return cls(**values)


@dataclass
class _RowOutcome:
    image: ProcessedImage | None = None
    exif: str | None = None
    reason: str | None = None
    message: str | None = None
    status: str = C.STATUS_FAILED
    pixels: dict[str, Any] | None = None  # later stages' values from this row's decoded pixels
    # per-row counters, summed by process() on its own thread: no lock shared by the download threads
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


_INT = pa.int32()
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


class DownloadStage(Stage[DownloadConfig]):
    """Fetch → verify → filter → resize → encode, `threads` rows at a time."""

    name = "download"
    config_class = DownloadConfig
    requires = ()  # `url` and/or `image`; a row with neither fails as missing_url
    adds = (
        pa.field(C.IMAGE, pa.binary()),
        pa.field(C.IMAGE_EXT, pa.string()),
        pa.field("width", _INT),
        pa.field("height", _INT),
        pa.field("original_width", _INT),
        pa.field("original_height", _INT),
        pa.field("sha256", pa.string()),
        pa.field("exif", pa.string()),  # img2dataset's column: JSON of the source's EXIF tags, or null
    )

    reason_hints = {
        "private_address": "the URLs point at private or loopback addresses: for a local server allow its network "
                           "(`download.allowed_networks: [\"127.0.0.1/32\"]`) or set download.allow_private: true",
        "timeout": "raise download.timeout, or lower download.threads if the servers throttle",
        "unsupported_scheme": "only http(s) URLs are fetched; local paths need download.allow_file: true",
        "hash_mismatch": "download.verify_hash_column must hold the digest of the bytes the row's image arrives as "
                         "(download.verify_hash_type: sha256 or md5); an img2dataset tar's own sha256 is of what it "
                         "downloaded, before re-encoding, so re-encoded shards never match it",
    }

    @classmethod
    def input_columns(cls, config: DownloadConfig) -> dict[str, str]:
        named = {"download.verify_hash_column": config.verify_hash_column,
                 "download.blur_bbox_column": config.blur_bbox_column}
        return {key: column for key, column in named.items() if column}

    @classmethod
    def report_parts(cls, section: dict[str, Any]) -> Any:
        from curate.stages.download.run_report import report_parts

        return report_parts(section)

    def __init__(self, config: DownloadConfig, context: RunContext, *, resolver: Resolver | None = None) -> None:
        super().__init__(config, context)
        self._resolver = resolver  # tests inject a resolver; production uses the system's
        self._spec = config.image_spec()
        # rows arriving with bytes that have boxes to blur: their size, the configured encoding
        self._as_stored = dataclasses.replace(self._spec, resize_mode="none", reencode="always")
        self._fetcher: Fetcher | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._cpu_gate: threading.BoundedSemaphore | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    def preflight(self) -> None:
        # img2dataset (urllib) goes through HTTP(S)_PROXY; this downloader connects directly (its address checks need
        # the real peer). On a cluster that can only reach the web through a proxy every row would fail as
        # connect_error/dns_error with no hint why: say it once, up front.
        proxies = sorted({name for name in os.environ if name.lower() in _PROXY_VARIABLES and os.environ[name]})
        if proxies and self.config.enabled:
            self.log.warning("%s set: curate's downloader does not use proxies, it connects to each host directly "
                             "(docs/download.md, Fetching)", " and ".join(proxies) + (" is" if len(proxies) == 1 else " are"))

    def __getstate__(self) -> dict[str, Any]:  # shipped to workers before setup(): no threads/sockets
        state = self.__dict__.copy()
        state.update(_fetcher=None, _pool=None, _cpu_gate=None, _is_set_up=False)
        return state

    def setup(self) -> None:
        self._fetcher = Fetcher(self.config.fetch_options(), resolver=self._resolver)
        self._pool = ThreadPoolExecutor(max_workers=self.config.threads, thread_name_prefix="curate-download")
        # Image work holds a core; dozens of threads doing it at once on a few cores only add GIL and cache
        # hand-offs (with an eval index, 32 threads took 9.3 ms CPU per row where 2 at a time took 5.6).
        self._cpu_gate = _cpu_gate(self.config.cpu_threads or self.context.cpus_per_process())

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None
        self._is_set_up = False

    # -- work ------------------------------------------------------------------------------------
    def process(self, table: pa.Table) -> pa.Table:
        self.ensure_setup()
        assert self._pool is not None
        n = table.num_rows
        urls = table.column(C.URL).to_pylist() if C.URL in table.column_names else [None] * n
        existing = table.column(C.IMAGE).to_pylist() if C.IMAGE in table.column_names else [None] * n
        expected = self._input_values(table, self.config.verify_hash_column)
        boxes = self._input_values(table, self.config.blur_bbox_column)
        outcomes = list(self._pool.map(self._one_row, urls, existing, expected, boxes))

        failed: list[str | None] = [None] * n
        rejected: list[str | None] = [None] * n
        messages: list[str | None] = [None] * n
        values: dict[str, list[Any]] = {field.name: [None] * n for field in self.adds}
        for i, out in enumerate(outcomes):
            self.counters.update(out.counts)
            if out.reason is not None:
                (failed if out.status == C.STATUS_FAILED else rejected)[i] = out.reason
                messages[i] = out.message
            elif out.image is not None:
                img = out.image
                values[C.IMAGE][i] = img.data
                values[C.IMAGE_EXT][i] = img.ext
                values["width"][i] = img.width
                values["height"][i] = img.height
                values["original_width"][i] = img.original_width
                values["original_height"][i] = img.original_height
                values["sha256"][i] = img.sha256
                values["exif"][i] = out.exif
        for field in self.adds:
            table = C.set_column(table, field.name, pa.array(values[field.name], type=field.type))
        table = self.set_pixel_columns(table, [out.pixels for out in outcomes])
        table = self.reject(table, failed, messages, status=C.STATUS_FAILED)
        return self.reject(table, rejected, messages, status=C.STATUS_REJECTED)

    def _done(self, image: ProcessedImage, source: bytes, counts: dict[str, int]) -> _RowOutcome:
        # One decode per image: the later stages' pixel values come from these pixels, which are then dropped.
        pixels = self.pixel_values(image.pixels) if image.pixels is not None and self.pixel_consumers else None
        image = dataclasses.replace(image, pixels=None)
        # EXIF of the bytes as received, like img2dataset: re-encoding has stripped it from `image`.
        return _RowOutcome(image, exif=original_exif(source), pixels=pixels, counts=counts)

    @staticmethod
    def _input_values(table: pa.Table, name: str) -> list[Any]:
        """Per row, the value of input column `name` ('' or absent: None for every row). A table input without the
        column stops at planning (`input_columns`); tar samples whose .json lacks the field have none."""
        column = C.input_column(name) if name else ""
        if not column or column not in table.column_names:
            return [None] * table.num_rows
        return table.column(column).to_pylist()

    def _hash_mismatch(self, data: bytes, expected: Any, counts: dict[str, int]) -> _RowOutcome | None:
        """A failed row when `data` is not what the input's digest says, else None (counted either way)."""
        if expected is None:
            counts["hash_unchecked"] = 1
            return None
        kind = self.config.verify_hash_type
        digest = hashlib.new(kind, data).hexdigest()
        if isinstance(expected, bytes):  # a binary column: the raw digest, or its hex as ASCII
            expected = expected.hex() if len(expected) * 2 == len(digest) else expected.decode("ascii", "replace")
        wanted = expected.strip().lower() if isinstance(expected, str) else expected
        if wanted == digest:
            counts["hash_verified"] = 1
            return None
        shown = repr(expected)[:80]
        if not isinstance(wanted, str) or len(wanted) != len(digest) or any(c not in "0123456789abcdef" for c in wanted):
            message = f"{self.config.verify_hash_column} value {shown} is not a {kind} hex digest"
        else:
            message = f"{kind} of the {len(data):,} bytes received is {digest}, the input says {wanted}"
        return _RowOutcome(reason="hash_mismatch", message=message, status=C.STATUS_FAILED, counts=counts)

    def _one_row(self, url: str | None, existing: bytes | None, expected: Any = None,
                 box_value: Any = None) -> _RowOutcome:
        """Never raises: every row ends with an image or a reason."""
        counts: dict[str, int] = {}
        try:
            assert self._cpu_gate is not None
            try:
                boxes = parse_boxes(box_value)
            except BadBoxes as err:
                return _RowOutcome(reason="bad_blur_boxes", message=f"{self.config.blur_bbox_column}: {err}",
                                   counts=counts)
            if boxes:
                counts["blurred_rows"] = 1
                counts["blurred_boxes"] = len(boxes)
            if existing is not None:
                counts["input_bytes"] = 1
                if self.config.verify_hash_column and (mismatch := self._hash_mismatch(existing, expected, counts)):
                    return mismatch
                with self._cpu_gate:
                    if self.config.reprocess_existing:
                        return self._done(process_image(existing, self._spec, blur=boxes), existing, counts)
                    if boxes:  # kept at its size, but never unblurred: re-encoded with the boxes blurred
                        return self._done(process_image(existing, self._as_stored, blur=boxes), existing, counts)
                    return self._done(verify_image(existing, self._spec), existing, counts)
            if url is None or not str(url).strip():
                return _RowOutcome(reason="missing_url", message="the row has no URL and no image bytes")
            assert self._fetcher is not None
            started = time.monotonic()
            result = self._fetcher.fetch(str(url))
            counts["fetched"] = 1
            counts["bytes_downloaded"] = len(result.data)
            if result.attempts > 1:
                counts["retried_rows"] = 1
            if result.redirects:
                counts["redirected"] = 1
            if self.config.verify_hash_column and (mismatch := self._hash_mismatch(result.data, expected, counts)):
                return mismatch
            with self._cpu_gate:
                image = process_image(result.data, self._spec, blur=boxes)
                counts["reencoded" if image.reencoded else "kept_original_bytes"] = 1
                counts["fetch_ms"] = int((time.monotonic() - started) * 1000)
                return self._done(image, result.data, counts)
        except FetchError as err:
            if err.attempts > 1:
                counts["retried_rows"] = 1
            status = C.STATUS_REJECTED if err.policy else C.STATUS_FAILED
            return _RowOutcome(reason=err.reason, message=_attempts_note(err.message, err.attempts), status=status,
                               counts=counts)
        except ImageError as err:
            return _RowOutcome(reason=err.reason, message=err.message, status=C.STATUS_FAILED, counts=counts)
        except ImageFiltered as err:
            return _RowOutcome(reason=err.reason, message=err.message, status=C.STATUS_REJECTED, counts=counts)
        except Exception as err:  # a bug must cost one row, not the partition
            self.log.exception("download: unexpected error for %r", url)
            return _RowOutcome(reason="internal_error", message=f"{type(err).__name__}: {err}", counts=counts)


_CPU_GATES: dict[int, threading.BoundedSemaphore] = {}
_CPU_GATES_LOCK = threading.Lock()


def _cpu_gate(size: int) -> threading.BoundedSemaphore:
    """The process's gate for image work: stage instances of one process (one per Dask worker thread) share it."""
    with _CPU_GATES_LOCK:
        return _CPU_GATES.setdefault(size, threading.BoundedSemaphore(size))


def _attempts_note(message: str, attempts: int) -> str:
    return f"{message} (after {attempts} attempts)" if attempts > 1 else message
