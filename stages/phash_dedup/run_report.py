"""What the dedup stage adds to the run report: the pHash-distance histogram, match facts on sample cards, and
the matched eval image shown beside each row rejected as an eval duplicate."""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow.parquet as pq

from curate.pipeline.report import ColumnMetric, ReportParts, value_facts

log = logging.getLogger("curate.report")

_FACTS = (("eval_match", "eval match"), ("eval_distance", "pHash dist"), ("dup_of", "duplicate of"))


def report_parts(section: dict[str, Any]) -> ReportParts:
    metric = ColumnMetric("pHash distance to nearest eval item", "Hamming distance, bits of 64", ("eval_distance",),
                          integer=True, clip_upper_quantile=None,
                          note="only rows the dedup stage compared within its search radius")
    if section.get("enabled", True) and "threshold" in section:
        metric.markers.append((float(section["threshold"]) + 0.5, f"threshold {int(section['threshold'])}"))
    return ReportParts(
        metrics=(metric,),
        columns=tuple(name for name, _label in _FACTS),
        facts=lambda row: value_facts(row, _FACTS),
        related_images=lambda rows: _matched_eval_images(section, rows),
    )


def _matched_eval_images(section: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """{row key: ("matched evalset:item", local eval image path)} for the shown rows that matched an eval item."""
    wanted = {str(r["eval_match"]) for r in rows if r.get("eval_match")}
    paths = _eval_image_paths(section, wanted)
    return {str(r["key"]): (f"matched {r['eval_match']}", paths[r["eval_match"]])
            for r in rows if r.get("eval_match") in paths}


def _eval_image_paths(section: dict[str, Any], wanted: set[str]) -> dict[str, str]:
    """`eval_set:item_id` -> local image path, from the run's eval sets and indexes, for the wanted matches only."""
    if not wanted:
        return {}
    paths: dict[str, str] = {}
    # Eval sets given as folders: item_id is the file's path relative to the folder.
    for source in section.get("eval_sets") or []:
        folder = source.get("path") if isinstance(source, dict) else None
        if not isinstance(folder, str) or not os.path.isdir(folder):
            continue
        name = source.get("name") or os.path.basename(folder.rstrip("/"))
        root = os.path.realpath(folder)
        for ref in wanted:
            if ref.startswith(f"{name}:"):
                candidate = os.path.realpath(os.path.join(root, ref[len(name) + 1:]))
                if candidate.startswith(root + os.sep) and os.path.isfile(candidate):
                    paths[ref] = candidate
    for index in section.get("indexes") or []:
        if not isinstance(index, str) or not os.path.isfile(index):
            continue
        try:
            names = pq.read_schema(index).names
            if not {"eval_set", "item_id", "path"} <= set(names):
                continue
            table = pq.read_table(index, columns=["eval_set", "item_id", "path"])
        except (OSError, ValueError) as err:
            log.warning("report: cannot read eval index %s: %s", index, err)
            continue
        base = os.path.dirname(os.path.abspath(index))
        for ev, item, path in zip(*(table.column(c).to_pylist() for c in ("eval_set", "item_id", "path")),
                                  strict=True):
            ref = f"{ev}:{item}"
            if ref not in wanted or not path:
                continue
            # An index records paths absolute or relative to the index file (older ones: to where it was built).
            local = next((p for p in (os.path.join(base, str(path)), str(path)) if os.path.isfile(p)), None)
            if local is not None:
                paths[ref] = local
    return paths
