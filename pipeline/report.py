"""The run report: one self-contained HTML page (`RUN_DIR/report.html`) that explains what a run kept and why.

It shows
- the funnel: rows left after each stage, with every reject reason and its count (from `stats.json`);
- histograms of CLIP score, pHash distance to the nearest eval-set item, caption length and image size, kept
  and turned-down rows stacked (from the `curated/` and `rejected/` Parquet files);
- a gallery of kept samples (thumbnails read from `shards/*.tar`) and, per stage and reason, turned-down rows.

Rejected rows carry no image bytes (the run never stores them), so their cards show what is known: the URL as a
plain link (never fetched by the page), caption, reason and error message. A thumbnail appears only where the
image exists locally: the URL is a local path or `file://` URL that still exists, or, for pHash matches, the
matched eval-set image (path from the eval index) is shown beside the card.

Stage-specific parts (a stage's histograms, an image to show beside a turned-down row such as the eval image it
matched) come from the stages themselves: `Stage.report_parts(section)` returns a :class:`ReportParts`.

The page is static and offline: inline CSS, inline SVG charts, thumbnails as `data:` JPEGs, no JavaScript, and
a Content-Security-Policy that forbids loading anything else. It scales with the corpus: metrics are streamed
column by column (two passes over small numeric columns, never whole tables), and galleries hold at most
`samples_per_reason` rows per reason and `kept_samples` kept samples.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import html
import io
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.pipeline import columns as C
from curate.pipeline import registry, storage
from curate.pipeline.layout import WORK_DIR, RunLayout
from curate.pipeline.tario import TarDamage, iter_members, split_sample_name

log = logging.getLogger("curate.report")

# Besides the runner's `_work/run.json` ({"config": ...}), a run folder assembled by hand may hold its config here.
CONFIG_FILES = ("config.json", "config.yaml")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEPT_COLOR = "#2a9d8f"
REJECTED_COLOR = "#e76f51"
# Bounded sample of each metric used to place the histogram's upper edge at a high quantile.
QUANTILE_SAMPLE = 200_000


# ---------------------------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------------------------
def _parquet_files(folder: str) -> list[str]:
    return storage.listdir(folder, ".parquet")


@contextlib.contextmanager
def _open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file on a local path or fsspec URL, closed on exit (runs may have thousands of parts)."""
    with fsspec.open(path, "rb") as f:
        yield pq.ParquetFile(f)


def _columns_of(path: str, wanted: Sequence[str]) -> pa.Table:
    """Only the wanted columns that exist in the file (all rows); missing ones as nulls."""
    with _open_parquet(path) as pf:
        names = set(pf.schema_arrow.names)
        present = [c for c in wanted if c in names]
        table = pf.read(columns=present)
    for c in wanted:
        if c not in names:
            table = table.append_column(c, pa.nulls(table.num_rows))
    return table


def _read_run_config(run_dir: str) -> dict[str, Any]:
    """The run's resolved config (first found): stage sections for their report parts, the input folder."""
    for path in (RunLayout.of(run_dir).run_json, *(f"{run_dir}/{name}" for name in CONFIG_FILES)):
        if not storage.exists(path):
            continue
        try:
            with fsspec.open(path, "rb") as f:
                raw = f.read()
            if path.endswith(".json"):
                data = json.loads(raw)
            else:
                import yaml

                data = yaml.safe_load(raw)
        except (OSError, ValueError) as err:
            log.warning("report: cannot read %s: %s", path, err)
            continue
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]
        if isinstance(data, dict):
            return data
    return {}


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# Metrics and histograms
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Metric:
    """One histogram: a value per row, computed from a few columns of a Parquet file."""

    title: str
    unit: str
    columns: tuple[str, ...]
    integer: bool
    clip_upper_quantile: float | None  # None: the range is the exact [min, max]
    note: str = ""
    markers: list[tuple[float, str]] = field(default_factory=list)

    def values(self, table: pa.Table) -> np.ndarray:
        raise NotImplementedError


class ColumnMetric(Metric):
    def values(self, table: pa.Table) -> np.ndarray:
        col = table.column(self.columns[0])
        if pa.types.is_null(col.type):
            return np.empty(0)
        arr = pc.drop_null(col).to_numpy(zero_copy_only=False).astype(np.float64)
        return arr[np.isfinite(arr)]


class CaptionLength(Metric):
    def values(self, table: pa.Table) -> np.ndarray:
        col = table.column(self.columns[0])
        if pa.types.is_null(col.type):
            return np.empty(0)
        return pc.drop_null(pc.utf8_length(col)).to_numpy(zero_copy_only=False).astype(np.float64)


#: {row key: (label, local image path)} of an image to show beside each given turned-down row (rows as dicts).
RelatedImages = Callable[[list[dict[str, Any]]], dict[str, tuple[str, str]]]


@dataclass
class ReportParts:
    """What one stage contributes to the run report."""

    #: Histograms of the stage's columns.
    metrics: Sequence[Metric] = ()
    #: Row columns that `facts` and `related_images` read.
    columns: Sequence[str] = ()
    #: (label, value) lines for a sample's card, from the row (a kept sample's JSON or a rejected row).
    facts: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None
    related_images: RelatedImages | None = None


def value_facts(row: dict[str, Any], labels: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(label, formatted value) for each (column, label) whose value is present."""
    facts = []
    for name, label in labels:
        value = row.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            facts.append((label, _fmt(value)))
    return facts


def _stage_parts(config: dict[str, Any]) -> list[ReportParts]:
    parts = []
    for stage in registry.registered():
        part = stage.cls.report_parts(_section(config, stage.section))
        if part is not None:
            parts.append(part)
    return parts


@dataclass
class Histogram:
    metric: Metric
    edges: np.ndarray | None = None
    kept: np.ndarray | None = None
    rejected: np.ndarray | None = None
    overflow: bool = False
    n_kept: int = 0
    n_rejected: int = 0


def _metrics(config: dict[str, Any]) -> list[Metric]:
    """The engine's histogram (caption length), then each stage's in registry order."""
    parts = _stage_parts(config)
    caption = CaptionLength("Caption length", "characters", (C.CAPTION,), integer=True, clip_upper_quantile=0.995,
                            note="cleaned caption")
    return [caption, *(m for part in parts for m in part.metrics)]


def _histograms(run_dir: str, metrics: list[Metric], bins: int = 30) -> list[Histogram]:
    """Two streaming passes over only the metric columns: range (with a bounded quantile sample), then counts."""
    layout = RunLayout.of(run_dir)
    groups = {"kept": _parquet_files(layout.curated_dir), "rejected": _parquet_files(layout.rejected_dir)}
    columns = sorted({c for m in metrics for c in m.columns})
    rng = np.random.default_rng(0)
    lo = [math.inf] * len(metrics)
    hi = [-math.inf] * len(metrics)
    samples: list[list[np.ndarray]] = [[] for _ in metrics]
    sampled = [0] * len(metrics)

    def tables() -> Iterator[tuple[str, pa.Table]]:
        for group, paths in groups.items():
            for path in paths:
                with _open_parquet(path) as pf:
                    present = [c for c in columns if c in pf.schema_arrow.names]
                    for batch in pf.iter_batches(batch_size=65536, columns=present):
                        table = pa.Table.from_batches([batch])
                        for c in columns:
                            if c not in table.column_names:
                                table = table.append_column(c, pa.nulls(table.num_rows))
                        yield group, table

    for _group, table in tables():
        for i, metric in enumerate(metrics):
            values = metric.values(table)
            if not values.size:
                continue
            lo[i], hi[i] = min(lo[i], float(values.min())), max(hi[i], float(values.max()))
            if metric.clip_upper_quantile is not None and sampled[i] < QUANTILE_SAMPLE:
                take = values if values.size <= QUANTILE_SAMPLE - sampled[i] else rng.choice(
                    values, QUANTILE_SAMPLE - sampled[i], replace=False)
                samples[i].append(take)
                sampled[i] += take.size

    hists: list[Histogram] = []
    for i, metric in enumerate(metrics):
        hist = Histogram(metric)
        if math.isinf(lo[i]):
            hists.append(hist)
            continue
        lower, upper = lo[i], hi[i]
        if metric.clip_upper_quantile is not None and samples[i]:
            q = float(np.quantile(np.concatenate(samples[i]), metric.clip_upper_quantile))
            if q < upper:
                upper, hist.overflow = q, True
        for value, _label in metric.markers:  # keep configured thresholds inside the drawn range
            pad = 1.0 if metric.integer else 0.02 * max(upper - lower, 0.05)
            lower, upper = min(lower, value - pad), max(upper, value + pad)
        hist.edges = _edges(lower, upper, bins, metric.integer)
        hist.kept = np.zeros(len(hist.edges) - 1, dtype=np.int64)
        hist.rejected = np.zeros(len(hist.edges) - 1, dtype=np.int64)
        hists.append(hist)

    for group, table in tables():
        for hist in hists:
            if hist.edges is None:
                continue
            values = hist.metric.values(table)
            if not values.size:
                continue
            # The last bin also takes everything above the drawn range (labelled "+" on the axis).
            counts, _ = np.histogram(np.clip(values, hist.edges[0], hist.edges[-1]), bins=hist.edges)
            if group == "kept":
                hist.kept += counts
                hist.n_kept += values.size
            else:
                hist.rejected += counts
                hist.n_rejected += values.size
    return hists


def _edges(lo: float, hi: float, bins: int, integer: bool) -> np.ndarray:
    if integer:
        lo_i, hi_i = math.floor(lo), math.floor(hi)
        width = max(1, math.ceil((hi_i - lo_i + 1) / bins))
        n = max(1, math.ceil((hi_i - lo_i + 1) / width))
        # Half-integer edges so each integer value falls inside one bin.
        return lo_i - 0.5 + width * np.arange(n + 1, dtype=np.float64)
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.05
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, bins + 1)


# ---------------------------------------------------------------------------------------------------------------
# Samples for the galleries
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Card:
    key: str
    caption: str
    url: str | None = None
    thumbnail: str | None = None  # data: URI
    thumbnail_note: str = ""
    facts: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    extra_thumbnail: str | None = None
    extra_label: str = ""


def _thumbnail(data: bytes, px: int) -> str | None:
    """A small JPEG data URI, or None for bytes Pillow refuses (the decompression-bomb guard stays on)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (px * 2, px * 2))  # JPEG: decode at reduced scale, much faster for big photos
            img = img.convert("RGB")
            img.thumbnail((px, px))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=82)
    except Exception as err:  # noqa: BLE001 - any undecodable image just gets no thumbnail
        log.debug("report: no thumbnail: %s", err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _facts(row: dict[str, Any], parts: Sequence[ReportParts]) -> list[tuple[str, str]]:
    return [fact for part in parts if part.facts is not None for fact in part.facts(row)]


def _iter_shard_samples(path: str, limit: int) -> Iterator[dict[str, bytes]]:
    """The first `limit` samples of one of our shards, as {extension: bytes}, reading the tar from its start only.

    Our shards keep a sample's members together, so grouping adjacent members is enough here (and reads a few
    samples, not every header of the shard, which at 10k samples per shard costs seconds)."""
    grouped = itertools.groupby(iter_members(path), key=lambda item: split_sample_name(item[0])[0])
    for key, members in itertools.islice(grouped, max(limit, 0)):
        yield {"__key__": key.encode(), **{split_sample_name(name)[1]: data for name, data in members}}


def _kept_cards(run_dir: str, manifest: dict[str, Any], limit: int, px: int, parts: Sequence[ReportParts]
                ) -> list[Card]:
    """Up to `limit` kept samples spread over the shards (a few from the start of evenly spaced shards)."""
    if limit <= 0:
        return []
    names = [s["name"] for s in manifest.get("shards", []) if s.get("samples")]
    if not names:
        names = [os.path.basename(p) for p in storage.listdir(RunLayout.of(run_dir).shards_dir, ".tar")]
    if not names:
        return []
    picks = sorted({round(i * (len(names) - 1) / max(1, min(limit, len(names)) - 1))
                    for i in range(min(limit, len(names)))})
    per_shard = math.ceil(limit / len(picks))
    cards: list[Card] = []
    for idx in picks:
        for sample in _iter_shard_samples(RunLayout.of(run_dir).shard(names[idx]), per_shard):
            meta: dict[str, Any] = {}
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except ValueError:
                    meta = {}
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else meta.get(C.CAPTION) or ""
            card = Card(key=sample["__key__"].decode(), caption=caption, url=meta.get(C.URL),
                        thumbnail=_thumbnail(image, px) if image else None, facts=_facts(meta, parts))
            card.facts.append(("shard", names[idx]))
            cards.append(card)
            if len(cards) >= limit:
                return cards
    return cards


_REJECT_COLUMNS = (C.KEY, C.URL, C.CAPTION, C.CAPTION_ORIGINAL, C.STATUS, C.REJECT_STAGE, C.REJECT_REASON,
                   C.ERROR_MESSAGE)


def _rejected_rows(run_dir: str, limit: int, columns: Sequence[str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Up to `limit` rows per (stage, reason), first ones in partition order."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if limit <= 0:
        return found
    for path in _parquet_files(RunLayout.of(run_dir).rejected_dir):
        head = _columns_of(path, (C.REJECT_STAGE, C.REJECT_REASON))
        stages = head.column(C.REJECT_STAGE).to_pylist()
        reasons = head.column(C.REJECT_REASON).to_pylist()
        wanted: list[int] = []
        targets: list[tuple[str, str]] = []
        taken: dict[tuple[str, str], int] = {}
        for i, (stage, reason) in enumerate(zip(stages, reasons, strict=True)):
            group_key = (stage or "unknown", reason or "unknown")
            have = len(found.setdefault(group_key, [])) + taken.get(group_key, 0)
            if have < limit:
                wanted.append(i)
                targets.append(group_key)
                taken[group_key] = taken.get(group_key, 0) + 1
        if not wanted:
            continue
        with _open_parquet(path) as pf:
            present = list(dict.fromkeys(c for c in (*_REJECT_COLUMNS, *columns) if c in pf.schema_arrow.names))
            rows = pf.read(columns=present).take(pa.array(wanted)).to_pylist()
        for group_key, row in zip(targets, rows, strict=True):
            found[group_key].append(row)
    return found


def _local_image(url: str | None, base_dirs: Sequence[str]) -> str | None:
    if not url or "://" in url and not url.startswith("file://"):
        return None
    path = url[len("file://"):] if url.startswith("file://") else url
    candidates = [path] if os.path.isabs(path) else [os.path.join(b, path) for b in base_dirs]
    return next((p for p in candidates if os.path.isfile(p)), None)


def _read_small_file(path: str, max_bytes: int = 64 << 20) -> bytes | None:
    try:
        if os.path.getsize(path) > max_bytes:
            return None
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _rejected_cards(run_dir: str, config: dict[str, Any], limit: int, px: int, parts: Sequence[ReportParts]
                    ) -> dict[tuple[str, str], list[Card]]:
    rows_by_reason = _rejected_rows(run_dir, limit, [c for part in parts for c in part.columns])
    shown = [row for rows in rows_by_reason.values() for row in rows]
    related: dict[str, tuple[str, str]] = {}
    if storage.is_local(run_dir):
        for part in parts:
            if part.related_images is not None:
                related.update(part.related_images(shown))
    input_path = _section(config, "input").get("path")
    base_dirs = [os.path.dirname(input_path)] if isinstance(input_path, str) and "://" not in input_path else []
    out: dict[tuple[str, str], list[Card]] = {}
    for group, rows in rows_by_reason.items():
        cards = []
        for row in rows:
            card = Card(key=str(row.get(C.KEY) or ""), caption=row.get(C.CAPTION) or row.get(C.CAPTION_ORIGINAL) or "",
                        url=row.get(C.URL), facts=_facts(row, parts), error=row.get(C.ERROR_MESSAGE))
            local = _local_image(card.url, base_dirs) if storage.is_local(run_dir) else None
            data = _read_small_file(local) if local else None
            if data:
                card.thumbnail, card.thumbnail_note = _thumbnail(data, px), "local file"
            if card.key in related:
                label, path = related[card.key]
                data = _read_small_file(path)
                if data:
                    card.extra_thumbnail, card.extra_label = _thumbnail(data, px), label
            cards.append(card)
        out[group] = cards
    return out


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(*parts: str) -> str:
    return "r-" + "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") or "x" for p in parts)


def _link(url: str | None) -> str:
    """http(s) URLs become links (rel=noreferrer, never loaded by the page); anything else stays text."""
    if not url:
        return ""
    short = url if len(url) <= 90 else url[:87] + "…"
    if re.match(r"^https?://", url, re.IGNORECASE):
        return (f'<a class="url" href="{_e(url)}" rel="noopener noreferrer nofollow" target="_blank">'
                f"{_e(short)}</a>")
    return f'<span class="url">{_e(short)}</span>'


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "–"


def _stage_order(stats: dict[str, Any]) -> list[str]:
    order = [C.INPUT_STAGE] if C.INPUT_STAGE in stats.get("rejected", {}) else []  # before every stage
    order += [name for name in stats.get("stage_order") or [] if name not in order]
    for name in stats.get("stages", {}):
        if name not in order:
            order.append(name)
    for stage in registry.registered():
        if stage.cls.name in stats.get("rejected", {}) and stage.cls.name not in order:
            order.append(stage.cls.name)
    for name in stats.get("rejected", {}):
        if name not in order:
            order.append(name)
    return order


def _funnel_html(stats: dict[str, Any]) -> str:
    total = int(stats.get("input_rows", 0))
    remaining = total
    rows = [f'<tr class="stage"><td>input rows</td><td class="n">{total:,}</td><td></td>'
            f'<td class="barcell"><div class="bar kept" style="width:100%"></div></td></tr>']
    for stage in _stage_order(stats):
        reasons = stats.get("rejected", {}).get(stage, {})
        lost = sum(reasons.values())
        # The sink and stages that did not run have nothing to say in a funnel unless they turned rows down.
        if not lost and (stage not in stats.get("stages", {}) or stage == "write"):
            continue
        remaining -= lost
        width = 100.0 * remaining / total if total else 0.0
        lost_w = 100.0 * lost / total if total else 0.0
        rows.append(
            f'<tr class="stage"><td>after <b>{_e(stage)}</b></td><td class="n">{remaining:,}</td>'
            f'<td class="n lost">{"−" + format(lost, ",") if lost else ""}</td>'
            f'<td class="barcell"><div class="bar kept" style="width:{width:.2f}%"></div>'
            f'<div class="bar lost" style="width:{lost_w:.2f}%"></div></td></tr>')
        for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append(
                f'<tr class="reason"><td><a href="#{_slug(stage, reason)}">{_e(reason)}</a></td>'
                f'<td class="n"></td><td class="n lost">{count:,} <span class="pct">({_pct(count, total)})</span></td>'
                f'<td class="barcell"><div class="bar lost" style="width:{100.0 * count / total if total else 0:.2f}%">'
                f"</div></td></tr>")
    kept = int(stats.get("kept", remaining))
    rows.append(f'<tr class="stage final"><td><b>kept</b></td><td class="n"><b>{kept:,}</b></td>'
                f'<td class="n">{_pct(kept, total)}</td><td class="barcell"><div class="bar kept" '
                f'style="width:{100.0 * kept / total if total else 0:.2f}%"></div></td></tr>')
    return ('<table class="funnel"><thead><tr><th>stage / reason</th><th>rows left</th><th>removed</th>'
            '<th class="barcell"></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:  # counts and integer metrics: whole-number ticks only
        step = max(1.0, float(round(step)) if step >= 1 else 1.0)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _svg_histogram(hist: Histogram) -> str:
    m = hist.metric
    if hist.edges is None or hist.kept is None or hist.rejected is None:
        return (f'<figure class="chart"><figcaption><b>{_e(m.title)}</b></figcaption>'
                f'<div class="empty">no values in this run ({_e(m.note or m.unit)})</div></figure>')
    w, h, left, right, top, bottom = 440, 210, 48, 12, 10, 40
    pw, ph = w - left - right, h - top - bottom
    edges = hist.edges
    lo, hi = float(edges[0]), float(edges[-1])
    totals = hist.kept + hist.rejected
    ymax = max(1, int(totals.max()))

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw if hi > lo else left

    def y(v: float) -> float:
        return top + ph - v / ymax * ph

    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="{_e(m.title)} histogram" xmlns="http://www.w3.org/2000/svg">']
    for t in _nice_ticks(0, ymax, 4, integer=True):
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(t) + 4:.1f}" class="tick" text-anchor="end">{_fmt(int(t))}</text>')
    for i in range(len(edges) - 1):
        x0, x1 = x(float(edges[i])), x(float(edges[i + 1]))
        bw = max(0.5, x1 - x0 - 1)
        k, r = int(hist.kept[i]), int(hist.rejected[i])
        label = f"{_fmt(float(edges[i]))} – {_fmt(float(edges[i + 1]))}: {k:,} kept, {r:,} turned down"
        if k:
            parts.append(f'<rect x="{x0:.1f}" y="{y(k):.1f}" width="{bw:.1f}" height="{y(0) - y(k):.1f}" '
                         f'fill="{KEPT_COLOR}"><title>{_e(label)}</title></rect>')
        if r:
            parts.append(f'<rect x="{x0:.1f}" y="{y(k + r):.1f}" width="{bw:.1f}" height="{y(k) - y(k + r):.1f}" '
                         f'fill="{REJECTED_COLOR}"><title>{_e(label)}</title></rect>')
    parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" class="axis"/>')
    ticks = _nice_ticks(lo, hi, 5, integer=m.integer)
    for t in ticks:
        label = _fmt(int(t)) if m.integer else f"{t:g}"
        if hist.overflow and t == ticks[-1] and hi - t < (hi - lo) / 10:
            label += "+"
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y(0):.1f}" y2="{y(0) + 4:.1f}" class="axis"/>'
                     f'<text x="{x(t):.1f}" y="{y(0) + 16:.1f}" class="tick" text-anchor="middle">{_e(label)}</text>')
    for value, text in m.markers:
        if lo <= value <= hi:
            right_half = x(value) > left + pw * 0.6
            tx, anchor = (x(value) - 4, "end") if right_half else (x(value) + 4, "start")
            parts.append(f'<line x1="{x(value):.1f}" x2="{x(value):.1f}" y1="{top}" y2="{y(0):.1f}" class="marker"/>'
                         f'<text x="{tx:.1f}" y="{top + 11}" class="marker-text" text-anchor="{anchor}">'
                         f"{_e(text)}</text>")
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 4}" class="axis-label" text-anchor="middle">'
                 f'{_e(m.unit)}{" (last bin: everything above)" if hist.overflow else ""}</text></svg>')
    caption = (f'<figcaption><b>{_e(m.title)}</b> <span class="muted">{hist.n_kept:,} kept · '
               f'{hist.n_rejected:,} turned down{" · " + _e(m.note) if m.note else ""}</span></figcaption>')
    return f'<figure class="chart">{caption}{"".join(parts)}</figure>'


def _card_html(card: Card, kind: str) -> str:
    if card.thumbnail:
        thumb = f'<img src="{card.thumbnail}" alt="{_e(card.key)}" loading="lazy">'
        if card.thumbnail_note:
            thumb += f'<span class="badge">{_e(card.thumbnail_note)}</span>'
    else:
        thumb = '<div class="noimg">no image stored</div>'
    extra = ""
    if card.extra_thumbnail:
        extra = (f'<div class="match"><img src="{card.extra_thumbnail}" alt="{_e(card.extra_label)}">'
                 f"<span>{_e(card.extra_label)}</span></div>")
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in card.facts)
    error = f'<div class="err">{_e(card.error)}</div>' if card.error else ""
    caption = card.caption if len(card.caption) <= 300 else card.caption[:297] + "…"
    return (f'<div class="card {kind}"><div class="thumbs"><div class="thumb">{thumb}</div>{extra}</div>'
            f'<div class="body"><div class="key">{_e(card.key)}</div>'
            f'<div class="cap">{_e(caption) if caption else "<i>no caption</i>"}</div>{error}'
            f'<dl>{facts}</dl>{_link(card.url)}</div></div>')


CSS = """
:root { --kept: @KEPT@; --lost: @LOST@; --ink: #1d2433; --muted: #6b7280; --line: #e5e7eb; --bg: #f7f7f8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: #1d2433; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header .sub { color: #c7cbd6; font-size: 13px; margin-top: 2px; word-break: break-all; }
nav { display: flex; gap: 18px; padding: 8px 32px; background: #fff; border-bottom: 1px solid var(--line); }
nav a { color: var(--ink); text-decoration: none; font-weight: 500; }
main { padding: 20px 32px 48px; max-width: 1400px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 20px; margin: 0 0 20px; }
h2 { font-size: 17px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 18px 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.warn { margin-top: 12px; padding: 8px 12px; border-left: 4px solid #c0392b; background: #fdf2f0; }
.stat { background: var(--bg); border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.stat .v { font-size: 22px; font-weight: 650; } .stat .l { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; }
.funnel { width: 100%; }
.funnel th { text-align: left; color: var(--muted); font-weight: 500; font-size: 12px; padding: 4px 8px; }
.funnel td { padding: 3px 8px; border-top: 1px solid var(--line); white-space: nowrap; }
.funnel tr.reason td { border-top: none; font-size: 13px; }
.funnel tr.reason td:first-child { padding-left: 28px; }
.funnel tr.final td { border-top: 2px solid var(--ink); }
.n { text-align: right; font-variant-numeric: tabular-nums; } .lost { color: #b4442a; } .pct { color: var(--muted); }
.barcell { width: 45%; } .bar { display: inline-block; height: 12px; vertical-align: middle; }
.bar.kept { background: var(--kept); } .bar.lost { background: var(--lost); opacity: .85; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 16px; }
figure.chart { margin: 0; } figcaption { margin-bottom: 4px; } .muted { color: var(--muted); font-size: 12px; }
svg .grid { stroke: var(--line); } svg .axis { stroke: #9ca3af; } svg .tick { font-size: 10px; fill: var(--muted); }
svg .axis-label { font-size: 11px; fill: var(--muted); } svg .marker { stroke: #1d2433; stroke-dasharray: 4 3; }
svg .marker-text { font-size: 10px; fill: #1d2433; }
.legend span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; border-radius: 2px; }
.empty { color: var(--muted); padding: 40px 0; text-align: center; border: 1px dashed var(--line); border-radius: 8px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; }
.card { display: flex; gap: 10px; border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fff;
        border-left: 4px solid var(--kept); min-width: 0; }
.card.rejected { border-left-color: var(--lost); }
.thumbs { display: flex; flex-direction: column; gap: 4px; }
.thumb { width: 112px; height: 112px; flex: none; position: relative; background: var(--bg); border-radius: 6px;
         display: flex; align-items: center; justify-content: center; overflow: hidden; }
.thumb img { max-width: 112px; max-height: 112px; }
.badge { position: absolute; bottom: 2px; left: 2px; background: rgba(0,0,0,.6); color: #fff; font-size: 10px;
         padding: 0 4px; border-radius: 3px; }
.noimg { color: var(--muted); font-size: 11px; text-align: center; padding: 4px; }
.match { width: 112px; font-size: 10px; color: var(--muted); text-align: center; word-break: break-all; }
.match img { max-width: 112px; max-height: 80px; display: block; margin: 0 auto 2px; outline: 2px solid var(--lost); }
.body { min-width: 0; flex: 1; font-size: 12.5px; }
.key { font-family: ui-monospace, "DejaVu Sans Mono", monospace; color: var(--muted); font-size: 11px; }
.cap { margin: 2px 0 4px; overflow-wrap: anywhere; }
.err { color: #b4442a; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 11px;
       overflow-wrap: anywhere; margin-bottom: 4px; }
dl { display: grid; grid-template-columns: auto 1fr; gap: 0 8px; margin: 0 0 4px; font-size: 11.5px; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
.url { font-size: 11px; color: #2563eb; overflow-wrap: anywhere; display: block; }
span.url { color: var(--muted); }
.reasonhead { display: flex; align-items: baseline; gap: 10px; }
.timings td, .timings th { padding: 3px 10px; border-top: 1px solid var(--line); text-align: left; }
.timings th { color: var(--muted); font-weight: 500; font-size: 12px; }
footer { color: var(--muted); font-size: 12px; padding: 0 32px 24px; }
""".replace("@KEPT@", KEPT_COLOR).replace("@LOST@", REJECTED_COLOR)


def _stat(value: str, label: str) -> str:
    return f'<div class="stat"><div class="v">{_e(value)}</div><div class="l">{_e(label)}</div></div>'


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _timings_html(stats: dict[str, Any]) -> str:
    stages = stats.get("stages") or {}
    if not stages:
        return ""
    rows = []
    for name in _stage_order(stats):
        info = stages.get(name)
        if not isinstance(info, dict):
            continue
        seconds = float(info.get("seconds", 0.0))
        rows_in = int(info.get("rows_in", 0))
        rate = f"{rows_in / seconds:,.0f}" if seconds > 0 else "–"
        counters = ", ".join(f"{k}: {_fmt(v)}" for k, v in sorted((info.get("counters") or {}).items()))
        rows.append(f"<tr><td><b>{_e(name)}</b></td><td class='n'>{rows_in:,}</td>"
                    f"<td class='n'>{int(info.get('rows_out', 0)):,}</td><td class='n'>{seconds:,.1f}</td>"
                    f"<td class='n'>{rate}</td><td>{_e(counters)}</td></tr>")
    return ('<section id="stages"><h2>Stages</h2><table class="timings"><thead><tr><th>stage</th><th>rows in</th>'
            "<th>rows out</th><th>task seconds (sum)</th><th>rows / task-second</th><th>counters</th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table></section>")


def _damage_html(damage: list[dict[str, Any]], shown: int = 20) -> str:
    """Input tar ranges no member could be read from (stats.json input_damage): no count covers what was stored
    there, so it must not hide behind a balanced funnel."""
    if not damage:
        return ""
    items = "".join(f"<li>{_e(str(d.get('source', '?')))}: "
                    f"{_e(TarDamage(int(d.get('start', 0)), d.get('end'), str(d.get('reason', ''))).describe())}</li>"
                    for d in damage[:shown])
    more = f"<li>{len(damage) - shown:,} more in stats.json input_damage</li>" if len(damage) > shown else ""
    return (f'<div class="warn"><b>Damaged input: {len(damage):,} range(s) of the input tars could not be read.</b> '
            f"Samples stored there, if any, are in no count.<ul>{items}{more}</ul></div>")


def render_report(run_dir: str, *, samples_per_reason: int = 12, kept_samples: int = 24, thumb_px: int = 112,
                  bins: int = 30) -> str:
    """The report page of `run_dir` as an HTML string (see module docstring)."""
    layout = RunLayout.of(run_dir)
    stats: dict[str, Any] = {}
    if storage.exists(layout.stats):
        stats = storage.read_json(layout.stats)
    manifest: dict[str, Any] = {}
    if storage.exists(layout.manifest):
        manifest = storage.read_json(layout.manifest)
    config = _read_run_config(run_dir)
    parts = _stage_parts(config)

    total = int(stats.get("input_rows", 0))
    kept = int(stats.get("kept", 0))
    shard_list = manifest.get("shards", [])
    shard_bytes = sum(int(s.get("bytes", 0)) for s in shard_list)
    summary = "".join([
        _stat(f"{total:,}", "input rows"),
        _stat(f"{kept:,}", f"kept ({_pct(kept, total)})"),
        _stat(f"{total - kept:,}", "turned down (failed + rejected)"),
        _stat(f"{len(shard_list):,}", f"shards ({_human_bytes(shard_bytes)})"),
        _stat(f"{int(manifest.get('total_samples', 0)):,}", "samples in shards"),
    ])
    if manifest.get("pattern"):
        summary += _stat(manifest["pattern"], "WebDataset pattern (shards/)")
    damage_html = _damage_html(stats.get("input_damage") or [])

    hists = _histograms(run_dir, _metrics(config), bins=bins)
    charts = "".join(_svg_histogram(h) for h in hists)
    legend = (f'<div class="legend muted"><span style="background:{KEPT_COLOR}"></span>kept'
              f'<span style="background:{REJECTED_COLOR}"></span>turned down (any stage)</div>')

    kept_cards = _kept_cards(run_dir, manifest, kept_samples, thumb_px, parts)
    kept_html = ('<div class="gallery">' + "".join(_card_html(c, "kept") for c in kept_cards) + "</div>"
                 if kept_cards else '<div class="empty">no kept samples in shards/</div>')

    rejected_cards = _rejected_cards(run_dir, config, samples_per_reason, thumb_px, parts)
    counts = {(s, r): n for s, reasons in stats.get("rejected", {}).items() for r, n in reasons.items()}
    order = {s: i for i, s in enumerate(_stage_order(stats))}
    groups = sorted(set(counts) | set(rejected_cards),
                    key=lambda g: (order.get(g[0], len(order)), -counts.get(g, 0), g[1]))
    rejected_parts = []
    for stage, reason in groups:
        cards = rejected_cards.get((stage, reason), [])
        n = counts.get((stage, reason), len(cards))
        shown = f"showing {len(cards)} of {n:,}" if cards else f"{n:,} rows, none in rejected/"
        rejected_parts.append(
            f'<h3 id="{_slug(stage, reason)}" class="reasonhead"><span>{_e(stage)} · {_e(reason)}</span>'
            f'<span class="muted">{shown}</span></h3>'
            '<div class="gallery">' + "".join(_card_html(c, "rejected") for c in cards) + "</div>")
    rejected_html = "".join(rejected_parts) or '<div class="empty">nothing was turned down</div>'

    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>curate run report · {_e(os.path.basename(run_dir.rstrip('/')) or run_dir)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>curate run report</h1><div class="sub">{_e(run_dir)} · generated {generated}</div></header>
<nav><a href="#summary">Summary</a><a href="#funnel">Funnel</a><a href="#distributions">Distributions</a>
<a href="#stages">Stages</a><a href="#kept">Kept samples</a><a href="#rejected">Turned down</a></nav>
<main>
<section id="summary"><h2>Summary</h2><div class="cards">{summary}</div>{damage_html}</section>
<section id="funnel"><h2>Funnel by stage and reason</h2>{_funnel_html(stats)}
<p class="muted">Every input row is either kept or counted under exactly one stage and reason
(input rows = kept + turned down). Reasons link to their samples below.</p></section>
<section id="distributions"><h2>Distributions</h2>{legend}<div class="charts">{charts}</div></section>
{_timings_html(stats)}
<section id="kept"><h2>Kept samples</h2><p class="muted">Up to {kept_samples} samples read from the start of
evenly spaced shards; thumbnails are made from the shard images.</p>{kept_html}</section>
<section id="rejected"><h2>Turned down, by stage and reason</h2><p class="muted">Up to {samples_per_reason} rows
per reason (first in partition order). Rejected rows keep no image bytes: links point at the original URL and are
not loaded by this page; a thumbnail appears only where the image exists locally (a local path or file:// URL, or
the matched eval-set image for pHash matches).</p>{rejected_html}</section>
</main>
<footer>Self-contained page: no scripts, no external resources. Regenerate with <code>curate report RUN_DIR</code>.
</footer>
</body></html>
"""


def write_run_report(run_dir: str, **options: Any) -> str:
    """(Re)write `run_dir/report.html` atomically; return its path. Options as for :func:`render_report`."""
    run_dir = run_dir.rstrip("/") or run_dir
    if not storage.exists(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    layout = RunLayout.of(run_dir)
    if not (storage.exists(layout.stats) or storage.exists(layout.run_json)):  # never write a page into just any folder
        raise FileNotFoundError(f"{run_dir}: not a curate run directory (no stats.json, no {WORK_DIR}/run.json)")
    page = render_report(run_dir, **options)
    path = layout.report
    storage.write_bytes(path, page.encode("utf-8"))
    return path
