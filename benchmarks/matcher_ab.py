"""Component A/B: the eval matcher of another git revision against this tree's, same index, same rows.

For changes that must not change a decision (search, ranking, set-up), this measures what they save and checks
that they save it without changing anything: both `EvalMatcher`s are built from one padded eval index
(benchmarks/dedup_cost.py's, same seed) and `match` the same 385 corpus rows, alternating (A B, then B A), and
every match, counter and judged candidate is compared. CPU by `time.process_time` (one process, OpenCV
single-threaded as in the stage's workers); matcher build CPU is timed too (worker set-up).

The other revision's `stages/phash_dedup/{hamming,matcher,phash}.py` are read with `git show` into a temporary
folder and imported under other names; the rest (nearduplicate, the descriptor store) is this tree's, so only
those three files differ between A and B.

    python benchmarks/matcher_ab.py --rev 1c17d77 1000000@16,12 100000@16   # writes results/matcher_ab.json

Runs against the same revision are merged into the saved JSON (a setting measured again is replaced).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
import dedup_cost as D  # noqa: E402

from curate.stages.phash_dedup import matcher as this_matcher  # noqa: E402
from curate.stages.phash_dedup.phash import from_ints  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "matcher_ab.json"
FILES = ("hamming", "matcher", "phash")


def other_matcher(rev: str, folder: Path):  # noqa: ANN201 - a module
    """The matcher module of `rev`, importing that revision's hamming and phash modules."""
    for name in FILES:
        text = subprocess.run(["git", "show", f"{rev}:stages/phash_dedup/{name}.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        for other in FILES:
            text = text.replace(f"curate.stages.phash_dedup.{other} import", f"ab_{other} import")
        (folder / f"ab_{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("ab_matcher")


def key(result) -> tuple:  # noqa: ANN001
    """Everything a run decides: matches, counters, judged candidates."""
    matches = [None if m is None else (m.item, m.distance, m.verified, m.score, m.check) for m in result.matches]
    judged = [(c.row, c.item, c.distance, c.main_distance, c.verified, c.score, c.check) for c in result.candidates]
    return matches, sorted(result.counters.items()), judged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="git revision to compare with (A); B is this tree")
    parser.add_argument("settings", nargs="+", help="ITEMS@THRESHOLD[,THRESHOLD...], e.g. 1000000@16,12")
    args = parser.parse_args()
    import cv2

    cv2.setNumThreads(1)
    D.B.fetch_debs()
    records, _build = D.real_pool()
    corpus = D.corpus_batch()
    hashes = from_ints([D.B.phash_int(img) for img in corpus])
    store = this_matcher.DescriptorStore(pa.chunked_array([pa.array([r["descriptor"] for r in records], pa.binary())]))
    rng = np.random.default_rng(0)
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"A": other_matcher(rev, Path(tmp)), "B": this_matcher}
        for spec in args.settings:
            items, thresholds = spec.split("@")
            table, source = D.padded_table(records, int(items), rng)
            for t in [int(x) for x in thresholds.split(",")]:
                row: dict = {"items": int(items), "candidate_threshold": t, "max_candidates": 8,
                             "corpus_rows": len(corpus)}
                matchers, decided = {}, {}
                for name in ("A", "B", "A", "B"):  # build twice each, alternating; keep the second
                    module = modules[name]
                    t0 = time.process_time()
                    matchers[name] = module.EvalMatcher(table, module.MatchSettings(8, t, 8, True), 64)
                    row.setdefault(f"{name}_build_cpu_s", []).append(round(time.process_time() - t0, 2))
                    matchers[name].descriptors = D.AliasStore(store, source)
                for order in (("A", "B"), ("B", "A")):
                    for name in order:
                        t0 = time.process_time()
                        result = matchers[name].match(hashes, lambda rows: {r: corpus[r] for r in rows})
                        row.setdefault(f"{name}_cpu_ms_per_row", []).append(
                            round((time.process_time() - t0) * 1000 / len(corpus), 2))
                        decided.setdefault(name, key(result))
                        print(items, t, name, row[f"{name}_cpu_ms_per_row"][-1], "ms/row", flush=True)
                row["identical_decisions"] = decided["A"] == decided["B"]
                row["counters"] = dict(decided["B"][1])
                row["cpu_A_over_B_per_repeat"] = [round(a / b, 2) for a, b in
                                                  zip(row["A_cpu_ms_per_row"], row["B_cpu_ms_per_row"], strict=True)]
                row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                row["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                print(json.dumps(row), flush=True)
                runs[f"{items}@{t}"] = row
                del matchers
    out = {
        "benchmark": "matcher_ab",
        "what": "component A/B (not the CLI): EvalMatcher.match of revision A vs this tree (B) on "
                "benchmarks/dedup_cost.py's padded index and corpus rows; decisions compared",
        "A": rev, "B": "working tree at " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                           capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(),
                    "note": "shared 2-core sandbox; CPU by time.process_time; compare A and B within a row"},
        "runs": runs,
    }
    if RESULT.exists():  # settings measured before (against the same revision) are kept; each run has its date
        saved = json.loads(RESULT.read_text())
        if saved.get("A") == rev:
            out["runs"] = {**saved["runs"], **runs}
    RESULT.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", RESULT)


if __name__ == "__main__":
    main()
