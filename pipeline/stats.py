"""Row accounting: per-partition stats, merging, the invariant, and the printed funnel.

Invariant for every partition and for the run: input_rows == kept + sum(rejected[stage][reason]).
Download failures count under `rejected.download.<reason>` too (their status is `failed`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from curate.pipeline import columns as C


class AccountingError(RuntimeError):
    """Rows were lost or invented: a bug, never a data problem."""


def partition_stats(final: pa.Table, input_rows: int, stage_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    status = final.column(C.STATUS).to_pylist()
    stages = final.column(C.REJECT_STAGE).to_pylist() if C.REJECT_STAGE in final.column_names else [None] * len(status)
    reasons = final.column(C.REJECT_REASON).to_pylist() if C.REJECT_REASON in final.column_names else [None] * len(status)
    rejected: dict[str, Counter[str]] = {}
    kept = 0
    by_status: Counter[str] = Counter()
    for st, stage, reason in zip(status, stages, reasons, strict=True):
        by_status[st] += 1
        if st == C.STATUS_SUCCESS:
            kept += 1
        else:
            rejected.setdefault(stage or "unknown", Counter())[reason or "unknown"] += 1
    stats = {
        "input_rows": input_rows,
        "kept": kept,
        "rejected": {s: dict(sorted(c.items())) for s, c in sorted(rejected.items())},
        "status": dict(sorted(by_status.items())),
        "stages": stage_info,
    }
    check_invariant(stats)
    return stats


def total_rejected(stats: dict[str, Any]) -> int:
    return sum(sum(reasons.values()) for reasons in stats["rejected"].values())


def check_invariant(stats: dict[str, Any]) -> None:
    if stats["input_rows"] != stats["kept"] + total_rejected(stats):
        raise AccountingError(
            f"input_rows={stats['input_rows']} != kept={stats['kept']} + rejected={total_rejected(stats)}")


def merge(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"input_rows": 0, "kept": 0, "rejected": {}, "status": {}, "stages": {},
                              "partitions": 0}
    for part in parts:
        merged["partitions"] += 1
        merged["input_rows"] += part["input_rows"]
        merged["kept"] += part["kept"]
        for stage, reasons in part["rejected"].items():
            target = merged["rejected"].setdefault(stage, {})
            for reason, count in reasons.items():
                target[reason] = target.get(reason, 0) + count
        for st, count in part.get("status", {}).items():
            merged["status"][st] = merged["status"].get(st, 0) + count
        for stage, info in part.get("stages", {}).items():
            target = merged["stages"].setdefault(stage, {"rows_in": 0, "rows_out": 0, "seconds": 0.0,
                                                         "counters": {}})
            target["rows_in"] += info.get("rows_in", 0)
            target["rows_out"] += info.get("rows_out", 0)
            target["seconds"] = round(target["seconds"] + info.get("seconds", 0.0), 4)
            for name, value in info.get("counters", {}).items():
                target["counters"][name] = target["counters"].get(name, 0) + value
    merged["rejected"] = {s: dict(sorted(r.items())) for s, r in sorted(merged["rejected"].items())}
    check_invariant(merged)
    return merged


def format_funnel(stats: dict[str, Any], stage_order: Sequence[str]) -> str:
    """The funnel printed at the end of a run: rows left after each stage, with reasons."""
    lines = [f"{'input rows':<22}{stats['input_rows']:>12,}"]
    remaining = stats["input_rows"]
    order = [C.INPUT_STAGE, *stage_order]  # the input's own rejects happen before every stage
    order += sorted(s for s in stats["rejected"] if s not in order)
    for stage in order:
        reasons = stats["rejected"].get(stage, {})
        lost = sum(reasons.values())
        if stage not in stage_order and not lost:
            continue
        remaining -= lost
        lines.append(f"{stage:<22}{remaining:>12,}   -{lost:,}")
        for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason:<30}{count:>10,}")
    lines.append(f"{'kept':<22}{stats['kept']:>12,}")
    lines.append(f"invariant: {stats['input_rows']:,} input = {stats['kept']:,} kept + "
                 f"{total_rejected(stats):,} rejected")
    return "\n".join(lines)


#: A run where one (stage, reason) turned down at least this share of the input gets a warning.
DOMINANT_REASON_SHARE = 0.9


def outcome_warnings(stats: dict[str, Any], hints: Mapping[tuple[str, str], str]) -> list[str]:
    """Warnings for a run that completed but kept nothing, or lost nearly everything to one reason, each with the
    fix where one is known (`hints`: (stage, reason) -> what to change). Empty for an unremarkable run."""
    total = int(stats.get("input_rows", 0))
    if not total:
        return ["the input has no rows"]
    counts = [((stage, reason), n) for stage, reasons in stats["rejected"].items() for reason, n in reasons.items()]
    if not counts:
        return []
    (stage, reason), top = max(counts, key=lambda item: (item[1], item[0]))
    hint = hints.get((stage, reason))
    fix = f"; {hint}" if hint else ""
    if stats["kept"] == 0:
        return [f"nothing was kept: {top:,} of {total:,} rows were turned down as {stage}/{reason}{fix}"]
    if top >= DOMINANT_REASON_SHARE * total:
        return [f"{top / total:.0%} of the rows were turned down as {stage}/{reason}{fix}"]
    return []
