"""`curate dedup-report`: which corpus images match which eval images, and a gallery to check them.

For a corpus (a finished run directory, WebDataset tars, or Parquet with image bytes or a `phash`
column) against one or more eval indexes (INDEX.parquet from `curate hash-evalset`):

* every corpus image is pHashed (a run's hashes, in its samples' JSON, are reused) and matched by
  :class:`curate.stages.phash_dedup.matcher.EvalMatcher`, the matcher of the dedup stage, with the
  stage's defaults (`DedupConfig`: threshold, candidate_threshold, max_candidates, verify);
* a reported match (`verified` true, or null without verification) is exactly a pair the stage
  would reject the corpus image for: at most one per corpus image. Pairs within `threshold` that the
  second signal refused are listed too, with `verified` false;
* output in DIR: `pairs.csv` / `pairs.json` (one row per match), `summary.json` (counts and rates
  per eval set, distance histogram), `index.html` (+ `page-N.html`): a paginated gallery of matched
  pairs side by side, thumbnails as files under `thumbs/` next to the pages, no scripts, no network.
"""

from __future__ import annotations

import csv
import glob
import html
import json
import logging
import os
import re
import shutil
import tarfile  # TarError only: tars are read through curate.pipeline.tario
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.pipeline import console, tario
from curate.stages.phash_dedup.matcher import Candidate, EvalMatcher, MatchSettings
from curate.stages.phash_dedup.stage import DedupConfig

log = logging.getLogger("curate.dedup_report")

PAIR_FIELDS = ("key", "eval_set", "item_id", "distance", "verified", "score", "check", "candidate_distance")
_IMAGE_BYTES_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes")


@dataclass(frozen=True)
class CorpusSource:
    """What kind of corpus a SOURCE string is, and its files."""

    kind: str  # "run" | "webdataset" | "parquet"
    files: tuple[str, ...]


# -- corpus ----------------------------------------------------------------------------------------
def resolve_corpus(source: str) -> CorpusSource:
    """Classify SOURCE: a run directory, WebDataset tars (file/folder/glob), or Parquet (file/folder/glob)."""
    path = Path(source)
    if path.is_dir() and (path / "shards").is_dir():
        shards = sorted(str(p) for p in (path / "shards").glob("*.tar"))
        if not shards:
            raise ValueError(f"run directory {source!r} has no shards/*.tar")
        return CorpusSource("run", tuple(shards))
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file())
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(glob.glob(source))
    if not files:
        raise ValueError(f"corpus {source!r}: no such file, folder or glob match")
    tars = tuple(f for f in files if f.endswith(".tar"))
    parquets = tuple(f for f in files if f.endswith(".parquet"))
    if tars:  # Parquet beside tars: img2dataset's per-shard metadata (00000.parquet), no images: the tars are the corpus
        return CorpusSource("webdataset", tars)
    if parquets:
        return CorpusSource("parquet", parquets)
    raise ValueError(
        f"corpus {source!r}: expected a run directory (shards/*.tar), WebDataset .tar files or .parquet files"
    )


def _iter_tar_images(path: str, stored_hashes: bool) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(key, image bytes or None, pHash hex from the sample's JSON or None) per sample, streaming the tar once.

    `stored_hashes`: read the `phash` a curate run wrote into each sample's JSON (its row's metadata)."""
    for key, fields in tario.iter_tar_samples(path):
        field = tario.image_field(fields)
        stored = None
        if stored_hashes and fields.get("json"):
            try:
                value = json.loads(fields["json"]).get("phash")
            except (ValueError, AttributeError):  # not a JSON object: nothing stored
                value = None
            stored = value if isinstance(value, str) else None
        yield key, fields[field] if field is not None else None, stored


def _parquet_columns(path: str) -> tuple[str | None, str | None, bool]:
    """(key column, image bytes column, has phash) of a corpus Parquet file."""
    schema = pq.read_schema(path)
    key_col = "key" if "key" in schema.names else None
    image_col = next(
        (c for c in _IMAGE_BYTES_COLUMNS if c in schema.names
         and (pa.types.is_binary(schema.field(c).type) or pa.types.is_large_binary(schema.field(c).type))),
        None,
    )
    return key_col, image_col, "phash" in schema.names


def iter_corpus(source: CorpusSource, with_images: bool = True) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(key, image bytes or None, stored phash hex or None) for every corpus sample, in a stable order."""
    if source.kind in ("run", "webdataset"):
        for file in source.files:
            for key, image, stored in _iter_tar_images(file, stored_hashes=source.kind == "run"):
                yield key, image if with_images else None, stored
        return
    row = 0
    for file in source.files:
        key_col, image_col, has_phash = _parquet_columns(file)
        if image_col is None and not has_phash:
            raise ValueError(f"corpus parquet {file!r}: needs image bytes (column `image`) or a `phash` column")
        columns = [c for c in (key_col, image_col, "phash" if has_phash else None) if c]
        if not with_images and image_col in columns and has_phash:
            columns.remove(image_col)
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256, columns=columns):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                key = str(data[key_col][i]) if key_col else f"{row:09d}"
                image = data[image_col][i] if image_col in data else None
                stored = data["phash"][i] if has_phash else None
                row += 1
                yield key, image, stored


# -- eval side -------------------------------------------------------------------------------------
def _load_indexes(paths: list[str], with_descriptors: bool) -> tuple[pa.Table, Any, list[dict[str, Any]], Any]:
    """(merged index without descriptors, hash params, each index's metadata, descriptor store or None).

    With `with_descriptors`, the descriptors go from each file to the matcher's disk-backed store a batch at a time,
    as in the dedup stage: a 1M-item index has ~10-19 GB of them, which must never be in RAM at once. The store is
    None when no index carries any.
    """
    from curate.stages.phash_dedup import evalsets
    from curate.stages.phash_dedup.matcher import DescriptorStore

    if not paths:
        raise ValueError("dedup-report needs at least one --index INDEX.parquet")
    tables, metas = [], []
    params = None
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"eval index {path!r} does not exist")
        table = evalsets.load_index(path, descriptors=False)
        these = evalsets.index_params(table)
        if params is not None and these.hash_size != params.hash_size:
            raise ValueError(f"eval index {path!r}: hash_size {these.hash_size}, the others use {params.hash_size}")
        params = these
        tables.append(table)
        metas.append(evalsets.index_metadata(table))
    store = None
    if with_descriptors and any(evalsets.has_descriptors(path) for path in paths):
        store = DescriptorStore(evalsets.descriptor_chunks(paths, [t.num_rows for t in tables]))
        if not store.present:
            store = None
    return evalsets.concat_indexes(tables), params, metas, store


def _read_reference(reference: str) -> bytes | None:
    """Bytes of an eval image from its index `path`: a file, `archive.tar::member`, or `table#row`."""
    try:
        if os.path.isfile(reference):
            return Path(reference).read_bytes()
        if "::" in reference:
            archive, member = reference.rsplit("::", 1)
            return next((data for name, data in tario.iter_members(archive) if name == member), None)
        if "#" in reference:
            file, row = reference.rsplit("#", 1)
            return _table_row_image(file, int(row))
    except (OSError, ValueError, KeyError, tarfile.TarError, pa.ArrowException) as err:
        log.warning("eval image %s not readable for the gallery: %s", reference, err)
    return None


def _table_row_image(file: str, row: int) -> bytes | None:
    if file.endswith(".parquet"):
        table = pq.read_table(file)
    else:  # a Hugging Face save_to_disk shard (Arrow IPC stream or file)
        try:
            with pa.memory_map(file) as source:
                table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(file) as source:
                table = pa.ipc.open_file(source).read_all()
    for field in table.schema:
        value = table.column(field.name)[row].as_py()
        if isinstance(value, bytes):
            return value
        if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
            return value["bytes"]
    return None


# -- thumbnails --------------------------------------------------------------------------------------------
def _thumbnail(data: bytes | None, target: Path, side: int) -> bool:
    from curate.stages.phash_dedup.phash import decode_rgb

    if data is None:
        return False
    try:
        img = decode_rgb(data)
        img.thumbnail((side, side))
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target, format="JPEG", quality=85)
        return True
    except Exception as err:  # noqa: BLE001 - a broken image gets a placeholder, not a failed report
        log.warning("thumbnail %s failed: %s", target.name, err)
        return False


# -- main entry ------------------------------------------------------------------------------------
def match_settings(
    threshold: int | None = None, verify: bool = True, candidate_threshold: int | None = None,
    max_candidates: int | None = None, n_bits: int = 64,
) -> MatchSettings:
    """The stage's settings (`DedupConfig` defaults) with the report's overrides; ValueError when out of range."""
    defaults = DedupConfig()
    settings = MatchSettings(
        threshold=defaults.threshold if threshold is None else int(threshold),
        candidate_threshold=defaults.candidate_threshold if candidate_threshold is None else int(candidate_threshold),
        max_candidates=defaults.max_candidates if max_candidates is None else int(max_candidates),
        verify=verify,
        detail_check=defaults.detail_check,
    )
    if not 0 <= settings.threshold < n_bits:
        raise ValueError(f"threshold must be in [0, {n_bits - 1}] bits, got {settings.threshold}")
    if verify and not settings.threshold <= settings.candidate_threshold < n_bits:
        raise ValueError(
            f"candidate_threshold must be in [threshold, {n_bits - 1}], got {settings.candidate_threshold}"
        )
    if settings.max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {settings.max_candidates}")
    return settings


def _shown(result_candidates: Sequence[Candidate], accepted: Sequence[Candidate | None], threshold: int) -> list[Candidate]:
    """The accepted match of each row, and the pHash matches (main distance within `threshold`) the second
    signal refused: the first are what the stage rejects, the second what it would have without verification."""
    chosen = {id(c) for c in accepted if c is not None}
    return [c for c in result_candidates
            if id(c) in chosen or (c.verified is False and c.main_distance <= threshold)]


def dedup_report(
    corpus: str,
    indexes: list[str],
    output_dir: str,
    threshold: int | None = None,
    verify: bool = True,
    *,
    candidate_threshold: int | None = None,
    max_candidates: int | None = None,
    page_size: int = 60,
    thumb_side: int = 160,
) -> dict[str, Any]:
    """Write the dedup report for `corpus` against `indexes` into `output_dir`; return the summary.

    Matching is the dedup stage's (:class:`EvalMatcher`) with `DedupConfig`'s defaults; `threshold`,
    `candidate_threshold` and `max_candidates` override them. With `verify` and descriptors in the
    index a match is a candidate the second signal confirmed; without, the nearest eval image within
    `threshold`. Raises ValueError for a bad corpus, index or threshold.
    """
    from curate.stages.phash_dedup.phash import from_hex, phash_bytes, to_hex

    index, params, metas, store = _load_indexes(list(indexes), with_descriptors=verify)
    n_bits = params.n_bits
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    has_descriptors = store is not None
    if verify and has_descriptors:
        from curate.stages.phash_dedup import nearduplicate as nd

        stale = {m.get("eval_set") for m in metas if m.get("verify") and m.get("descriptor_version")
                 not in (None, nd.DESCRIPTOR_VERSION)}
        if stale:
            raise ValueError(
                f"eval index(es) {sorted(stale)} carry descriptors of another version than "
                f"{nd.DESCRIPTOR_VERSION!r}: rebuild them with `curate hash-evalset` or pass verify=False"
            )
    elif verify:
        log.warning("eval indexes carry no descriptors: pairs are reported unverified (verified = null)")
    source = resolve_corpus(corpus)
    with_images = source.kind != "parquet" or all(_parquet_columns(f)[1] is not None for f in source.files)
    if verify and has_descriptors and not with_images:
        log.warning("corpus %s has no image bytes (phash only): pairs are reported unverified", corpus)
    verified_mode = verify and has_descriptors and with_images
    settings = match_settings(threshold, verified_mode, candidate_threshold, max_candidates, n_bits)
    out = _report_folder(Path(output_dir))
    matcher = EvalMatcher(index, settings, n_bits, descriptors=store if verified_mode else None)

    # One pass over the corpus, a chunk of samples at a time: hash (a run's stored hashes where they are trustworthy),
    # match, write the thumbnails of the chunk's shown rows, drop its images. Each row's match is its own (the
    # matcher ranks and verifies per row), so chunking changes nothing; memory stays one chunk plus the pairs.
    shown_keys: dict[int, str] = {}
    matches: list[Candidate] = []
    samples = unreadable = 0
    chunk: list[tuple[str, bytes | None, str | None]] = []  # (key, image, trusted stored hex)

    def flush() -> None:
        nonlocal unreadable
        first_row = samples - len(chunk)
        hexes = [known for _key, _image, known in chunk]
        todo = [i for i, (_key, image, known) in enumerate(chunk) if known is None and image is not None]
        unreadable += sum(known is None and image is None for _key, image, known in chunk)
        if todo:
            words, errors = phash_bytes([chunk[i][1] for i in todo], params)
            for i, value, error in zip(todo, to_hex(words, n_bits), errors, strict=True):
                hexes[i] = None if error else value
                unreadable += bool(error)
        hashed = [i for i, h in enumerate(hexes) if h is not None]
        if hashed:
            result = matcher.match(from_hex([hexes[i] for i in hashed], n_bits),
                                   lambda rows: {q: chunk[hashed[q]][1] for q in rows})
            for candidate in _shown(result.candidates, result.matches, settings.threshold):
                i = hashed[candidate.row]
                row = first_row + i
                if row not in shown_keys:
                    shown_keys[row] = chunk[i][0]
                    target = out / _corpus_thumb(row)
                    if not _thumbnail(chunk[i][1], target, thumb_side):
                        target.unlink(missing_ok=True)  # not one left from an earlier report in this folder
                matches.append(replace(candidate, row=row))  # search rows -> corpus rows
        chunk.clear()

    bar = console.progress_bar("matching corpus", "image")
    for key, image, stored in iter_corpus(source):
        bar.update()
        samples += 1
        trusted = stored if stored and len(stored) == params.hex_width and params.mode == "exact" else None
        chunk.append((key, image, trusted))
        if len(chunk) >= _CHUNK_SAMPLES:
            flush()
    if chunk:
        flush()
    bar.close()
    if not samples:
        raise ValueError(f"corpus {corpus!r} has no samples")

    eval_sets = index.column("eval_set").to_pylist()
    item_ids = index.column("item_id").to_pylist()
    refs = index.column("path").to_pylist()
    matches.sort(key=lambda m: (eval_sets[m.item], m.main_distance, shown_keys[m.row], item_ids[m.item]))
    pairs = [
        {
            "key": shown_keys[m.row],
            "eval_set": eval_sets[m.item],
            "item_id": item_ids[m.item],
            "distance": m.main_distance,
            "verified": m.verified,
            "score": m.score,
            "check": m.check,
            "candidate_distance": m.distance,
        }
        for m in matches
    ]
    summary = _summary(
        pairs, eval_sets, samples, settings.threshold, settings.candidate_threshold if verified_mode else None,
        verified_mode, unreadable, corpus, indexes,
    )
    _write_tables(out, pairs, summary)
    _write_gallery(out, pairs, matches, refs, summary, page_size, thumb_side)
    return summary


#: Corpus samples hashed and matched together by `dedup_report` (their images are held until the chunk is done).
_CHUNK_SAMPLES = 1024


def _corpus_thumb(row: int) -> str:
    return f"thumbs/corpus-{row}.jpg"


def _summary(
    pairs: list[dict[str, Any]], eval_sets: list[str], samples: int, threshold: int,
    candidate_threshold: int | None, verified_mode: bool, unreadable: int, corpus: str, indexes: list[str],
) -> dict[str, Any]:
    items_per_set = Counter(eval_sets)
    per_set: dict[str, dict[str, Any]] = {}
    for name, n_items in sorted(items_per_set.items()):
        these = [p for p in pairs if p["eval_set"] == name]
        confirmed = [p for p in these if p["verified"] is not False]
        matched_keys = {p["key"] for p in confirmed}
        matched_items = {p["item_id"] for p in confirmed}
        per_set[name] = {
            "eval_items": n_items,
            "pairs": len(these),
            "phash_matches": sum(p["distance"] <= threshold for p in these),
            "verified_true": sum(p["verified"] is True for p in these),
            "verified_false": sum(p["verified"] is False for p in these),
            "unverified": sum(p["verified"] is None for p in these),
            "found_by_candidates_only": sum(p["distance"] > threshold for p in these),
            "corpus_samples_matched": len(matched_keys),
            "corpus_match_rate": round(len(matched_keys) / samples, 6),
            "eval_items_matched": len(matched_items),
            "eval_match_rate": round(len(matched_items) / n_items, 6),
            "distance_histogram": _histogram(these),
        }
    all_confirmed = {p["key"] for p in pairs if p["verified"] is not False}
    return {
        "corpus": corpus,
        "indexes": list(indexes),
        "corpus_samples": samples,
        "corpus_unreadable": unreadable,
        "threshold": threshold,
        "candidate_threshold": candidate_threshold,
        "verify": verified_mode,
        "pairs": len(pairs),
        "corpus_samples_matched": len(all_confirmed),
        "corpus_match_rate": round(len(all_confirmed) / samples, 6),
        "distance_histogram": _histogram(pairs),
        "eval_sets": per_set,
    }


def _histogram(pairs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{distance: {"confirmed": n, "rejected": n}}; rejected = the second signal said no."""
    hist: dict[int, Counter[str]] = defaultdict(Counter)
    for p in pairs:
        hist[p["distance"]]["rejected" if p["verified"] is False else "confirmed"] += 1
    return {str(d): {"confirmed": hist[d]["confirmed"], "rejected": hist[d]["rejected"]} for d in sorted(hist)}


_REPORT_FILE = re.compile(r"(index|page-\d+)\.html|pairs\.(csv|json)|summary\.json")


def _report_folder(out: Path) -> Path:
    """`out`, created, or emptied of an earlier report's files (a bigger report's pages and thumbnails would
    otherwise stay behind, linked from nowhere). A folder holding anything else is refused: the report must not
    overwrite files it did not write (a website's index.html, a run folder's summary)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"report folder {out} is a file")
    entries = sorted(out.iterdir()) if out.exists() else []
    foreign = [e.name for e in entries if not (_REPORT_FILE.fullmatch(e.name) and e.is_file())
               and not (e.name == "thumbs" and e.is_dir())]
    if foreign:
        raise ValueError(f"report folder {out} holds files that are not a dedup report's ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty folder")
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_tables(out: Path, pairs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    with open(out / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PAIR_FIELDS)
        writer.writeheader()
        for p in pairs:
            writer.writerow({k: ("" if p[k] is None else p[k]) for k in PAIR_FIELDS})
    (out / "pairs.json").write_text(json.dumps(pairs, indent=1) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


# -- HTML ------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table.sets{border-collapse:collapse;font-size:13px}table.sets td,table.sets th{border:1px solid #ccc;padding:4px 8px;text-align:right}
table.sets th:first-child,table.sets td:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.pair{background:#fff;border:1px solid #ccc;border-radius:6px;padding:8px;width:348px}
.pair.rejected{border-color:#d33;background:#fff4f4}.pair.confirmed{border-color:#3a3}
.imgs{display:flex;gap:8px}.imgs figure{margin:0;width:164px;text-align:center;font-size:11px;color:#555}
.imgs img{max-width:160px;max-height:160px;border:1px solid #ddd}
.missing{width:160px;height:120px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
.meta{font-size:12px;margin-top:6px;word-break:break-all}.badge{font-weight:bold}
.nav{margin:16px 0;font-size:14px}.nav a,.nav span{margin-right:8px}
"""


def _page_name(page: int) -> str:
    return "index.html" if page == 1 else f"page-{page}.html"


def _histogram_svg(hist: dict[str, dict[str, int]]) -> str:
    if not hist:
        return "<p>No pairs.</p>"
    distances = [int(d) for d in hist]
    top = max(v["confirmed"] + v["rejected"] for v in hist.values())
    bar, gap, height = 18, 4, 120
    span = range(min(distances), max(distances) + 1)
    width = len(span) * (bar + gap) + 40
    parts = [f'<svg class="hist" width="{width}" height="{height + 20}" role="img" '
             f'aria-label="distance histogram">']
    for i, d in enumerate(span):
        counts = hist.get(str(d), {"confirmed": 0, "rejected": 0})
        x = 30 + i * (bar + gap)
        y = height
        for kind, colour in (("confirmed", "#3a3"), ("rejected", "#d33")):
            h = round(counts[kind] / top * (height - 10)) if top else 0
            if h:
                y -= h
                parts.append(f'<rect x="{x}" y="{y}" width="{bar}" height="{h}" fill="{colour}">'
                             f"<title>distance {d}: {counts[kind]} {kind}</title></rect>")
        parts.append(f'<text x="{x + bar / 2}" y="{height + 14}" font-size="10" text-anchor="middle">{d}</text>')
    parts.append("</svg>")
    return "".join(parts) + (f'<p class="meta">Hamming distance (bits) of the main pHash. Green: confirmed or '
                             f"unverified; red: rejected by the second signal. Tallest bar: {top} pairs.</p>")


def _write_gallery(
    out: Path, pairs: list[dict[str, Any]], matches: list[Candidate], refs: list[str],
    summary: dict[str, Any], page_size: int, thumb_side: int,
) -> None:
    """The paginated HTML gallery; corpus thumbnails were written while matching (`_corpus_thumb`)."""
    esc = html.escape
    n_pages = max(1, -(-len(pairs) // page_size))
    for old in out.glob("page-*.html"):  # a rerun with fewer pairs must not leave stale pages behind
        old.unlink()
    eval_thumbs: dict[int, str | None] = {}
    rows = []
    for name, s in summary["eval_sets"].items():
        rows.append(
            f"<tr><td>{esc(name)}</td><td>{s['eval_items']}</td><td>{s['pairs']}</td><td>{s['phash_matches']}</td>"
            f"<td>{s['verified_true']}</td><td>{s['verified_false']}</td><td>{s['found_by_candidates_only']}</td>"
            f"<td>{s['corpus_samples_matched']} ({s['corpus_match_rate']:.2%})</td>"
            f"<td>{s['eval_items_matched']} ({s['eval_match_rate']:.2%})</td></tr>"
        )
    overview = (
        f"<p>Corpus <code>{esc(summary['corpus'])}</code>: {summary['corpus_samples']} samples "
        f"({summary['corpus_unreadable']} unreadable); pHash threshold {summary['threshold']} bits"
        + (f", candidate threshold {summary['candidate_threshold']} bits with verification"
           if summary["verify"] else ", no verification")
        + f". {summary['pairs']} pairs; {summary['corpus_samples_matched']} corpus samples matched "
        f"({summary['corpus_match_rate']:.2%}).</p>"
        '<table class="sets"><tr><th>eval set</th><th>items</th><th>pairs</th><th>pHash matches</th>'
        "<th>verified</th><th>rejected</th><th>via candidates</th><th>corpus matched</th><th>eval matched</th></tr>"
        + "".join(rows) + "</table><h2>Distance histogram</h2>" + _histogram_svg(summary["distance_histogram"])
    )
    for page in range(1, n_pages + 1):
        chunk = range((page - 1) * page_size, min(len(pairs), page * page_size))
        cards = []
        for i in chunk:
            p, m = pairs[i], matches[i]
            if m.item not in eval_thumbs:
                rel = f"thumbs/eval-{m.item}.jpg"
                eval_thumbs[m.item] = rel if _thumbnail(_read_reference(refs[m.item]), out / rel,
                                                            thumb_side) else None
            corpus_rel = _corpus_thumb(m.row)
            if not (out / corpus_rel).exists():
                corpus_rel = ""
            state = {True: "confirmed", False: "rejected", None: "unverified"}[p["verified"]]
            verdict = {True: "verified: same picture", False: "verified: different picture",
                       None: "not verified"}[p["verified"]]
            score = "" if p["score"] is None else f", score {p['score']:.3f}"

            def figure(rel: str | None, caption: str, alt: str) -> str:
                img = (f'<img src="{esc(rel)}" alt="{esc(alt)}" loading="lazy">' if rel
                       else '<div class="missing">image not available</div>')
                return f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>"

            cards.append(
                f'<div class="pair {state}" data-key="{esc(p["key"])}" data-item="{esc(p["item_id"])}">'
                '<div class="imgs">'
                + figure(eval_thumbs[m.item], f"eval {p['eval_set']}:{p['item_id']}", f"eval {p['item_id']}")
                + figure(corpus_rel, f"corpus {p['key']}", f"corpus {p['key']}")
                + f'</div><div class="meta"><span class="badge">distance {p["distance"]}</span>'
                f" (candidate {p['candidate_distance']}) &middot; {verdict}{score}<br>"
                f"{esc(p['eval_set'])}:{esc(p['item_id'])} &harr; {esc(p['key'])}</div></div>"
            )
        nav = ['<div class="nav">Pages:']
        for other in range(1, n_pages + 1):
            nav.append(f"<span>{other}</span>" if other == page else f'<a href="{_page_name(other)}">{other}</a>')
        nav.append("</div>")
        first, last = (chunk.start + 1, chunk.stop) if pairs else (0, 0)
        body = (
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>curate dedup report"
            f"{'' if page == 1 else f' - page {page}'}</title><style>{_CSS}</style></head><body>"
            f"<h1>Eval-set dedup report</h1>{overview}<h2>Matched pairs {first}-{last} of {len(pairs)}</h2>"
            + "".join(nav)
            + (f'<div class="grid">{"".join(cards)}</div>' if cards else "<p>No matches.</p>")
            + "".join(nav) + "</body></html>\n"
        )
        (out / _page_name(page)).write_text(body, encoding="utf-8")

