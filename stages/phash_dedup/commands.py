"""The dedup stage's `curate` subcommands: `hash-evalset` (build an eval index) and `dedup-report`."""

from __future__ import annotations

import argparse

from curate.pipeline.stage import Command


def _hash_evalset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="eval set: folder, .parquet, tar(s) / brace pattern, or HF save_to_disk folder")
    p.add_argument("--name", default=None, help="eval-set name (default: the folder/file name)")
    p.add_argument("-o", "--output", required=True, help="INDEX.parquet to write")
    p.add_argument("--hash-size", type=int, default=8, help="pHash size (8 -> 64-bit hashes)")
    p.add_argument("--mode", choices=("exact", "fast"), default="exact",
                   help="exact = bit-identical to imagehash.phash; fast = batched DCT (see docs/dedup.md)")
    p.add_argument("--format", dest="fmt", default="auto",
                   choices=("auto", "folder", "parquet", "webdataset", "hf"), help="source format")


def _hash_evalset(args: argparse.Namespace) -> int:
    from curate.stages.phash_dedup.evalsets import hash_evalset

    n = hash_evalset(args.source, args.output, name=args.name, hash_size=args.hash_size, mode=args.mode,
                     fmt=args.fmt)
    print(f"curate: hashed {n:,} eval images -> {args.output}")
    return 0


def _dedup_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True, help="run directory, parquet file or WebDataset tars")
    p.add_argument("--index", dest="indexes", action="append", required=True, help="INDEX.parquet, repeatable")
    p.add_argument("-o", "--output", required=True, help="report directory")
    p.add_argument("--threshold", type=int, default=None,
                   help="max Hamming distance for a pHash match (default: dedup.threshold, 8)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="plain pHash only, without the second-signal check")


def _dedup_report(args: argparse.Namespace) -> int:
    from curate.stages.phash_dedup.report import dedup_report

    summary = dedup_report(args.corpus, args.indexes, args.output, threshold=args.threshold, verify=args.verify)
    print(f"curate: dedup report -> {args.output}/index.html")
    print(summary_table(summary))
    return 0


def summary_table(summary: dict) -> str:
    """Matches per eval set as a small aligned table (the full numbers are in summary.json)."""
    header = ("eval set", "eval items", "corpus matched", "corpus rate", "eval items matched")
    rows = [header]
    for name, info in (summary.get("eval_sets") or {}).items():
        rows.append((name, f"{info['eval_items']:,}", f"{info['corpus_samples_matched']:,}",
                     f"{info['corpus_match_rate']:.2%}", f"{info['eval_items_matched']:,}"))
    rows.append(("all", "", f"{summary.get('corpus_samples_matched', 0):,}",
                 f"{summary.get('corpus_match_rate', 0.0):.2%}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.append(f"{summary.get('corpus_samples', 0):,} corpus samples; pHash threshold {summary.get('threshold')}"
                 f", verification {'on' if summary.get('verify') else 'off'}")
    return "\n".join(lines)


COMMANDS = (
    Command("hash-evalset", help="build a pHash index (INDEX.parquet) of an eval set",
            description="Hash an eval set (image folder, parquet, WebDataset tars or a Hugging Face dataset saved "
                        "to disk) into an index for `dedup.indexes`.",
            add_arguments=_hash_evalset_arguments, run=_hash_evalset),
    Command("dedup-report", help="report near-duplicates between a corpus and eval indexes",
            description="Match a corpus (a finished run directory, parquet or WebDataset tars) against eval "
                        "indexes; writes index.html, pairs.csv, pairs.json, summary.json.",
            add_arguments=_dedup_report_arguments, run=_dedup_report),
)
