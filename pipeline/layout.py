"""The run directory (`output.path`): every path the engine, the report and the dedup report use, in one place.

    stats.json  manifest.json  report.html  .curate-run.lock (while a run works here)
    curated/part-NNNNN.parquet   rejected/part-NNNNN.parquet   embeddings/part-NNNNN.parquet
    shards/{prefix}-NNNNN.tar  shards/sizes.json
    _work/            run.json (config + fingerprints), plan.json, finalized.json
      input/          CSV/TSV/JSONL inputs converted to Parquet
      done/           part-NNNNN.json: the partition's stats; its presence means the partition is finished
      pass-K/         part-NNNNN.arrow + .summary.pkl of a partition scored in pass K; decision.pkl
"""

from __future__ import annotations

from dataclasses import dataclass

WORK_DIR = "_work"
#: At most this many run-wide passes (a pass per stage with a run-wide decision).
MAX_PASSES = 7


def part_name(partition_id: int, suffix: str) -> str:
    return f"part-{partition_id:05d}{suffix}"


@dataclass(frozen=True)
class RunLayout:
    root: str

    @classmethod
    def of(cls, path: str) -> RunLayout:
        return cls(path.rstrip("/"))

    # -- finished outputs ------------------------------------------------------------------------
    @property
    def stats(self) -> str:
        return f"{self.root}/stats.json"

    @property
    def manifest(self) -> str:
        return f"{self.root}/manifest.json"

    @property
    def report(self) -> str:
        return f"{self.root}/report.html"

    @property
    def shards_dir(self) -> str:
        return f"{self.root}/shards"

    @property
    def curated_dir(self) -> str:
        return f"{self.root}/curated"

    @property
    def rejected_dir(self) -> str:
        return f"{self.root}/rejected"

    @property
    def embeddings_dir(self) -> str:
        return f"{self.root}/embeddings"

    @property
    def shard_sizes(self) -> str:
        """{shard file name: samples}, as open_clip_train and webdataset tools read it."""
        return f"{self.shards_dir}/sizes.json"

    def curated(self, partition_id: int) -> str:
        return f"{self.curated_dir}/{part_name(partition_id, '.parquet')}"

    def rejected(self, partition_id: int) -> str:
        return f"{self.rejected_dir}/{part_name(partition_id, '.parquet')}"

    def embeddings(self, partition_id: int) -> str:
        return f"{self.embeddings_dir}/{part_name(partition_id, '.parquet')}"

    def shard(self, name: str) -> str:
        return f"{self.shards_dir}/{name}"

    @property
    def lock(self) -> str:
        """Held while a run works on this folder (pipeline/runlock.py); hidden, so readers skip it."""
        return f"{self.root}/.curate-run.lock"

    # -- work files ------------------------------------------------------------------------------
    @property
    def work(self) -> str:
        return f"{self.root}/{WORK_DIR}"

    @property
    def run_json(self) -> str:
        return f"{self.work}/run.json"

    @property
    def plan(self) -> str:
        return f"{self.work}/plan.json"

    @property
    def finalized(self) -> str:
        return f"{self.work}/finalized.json"

    @property
    def input_dir(self) -> str:
        return f"{self.work}/input"

    def done_marker(self, partition_id: int) -> str:
        return f"{self.work}/done/{part_name(partition_id, '.json')}"

    def pass_file(self, pass_index: int, partition_id: int, suffix: str) -> str:
        return f"{self.work}/pass-{pass_index}/{part_name(partition_id, suffix)}"

    def decision(self, pass_index: int) -> str:
        return f"{self.work}/pass-{pass_index}/decision.pkl"

    def written_dirs(self) -> tuple[str, ...]:
        """Every folder the engine writes into (where a killed run may leave hidden temporaries)."""
        return (self.root, self.curated_dir, self.rejected_dir, self.embeddings_dir, self.shards_dir, self.work,
                f"{self.work}/done", self.input_dir,
                *(f"{self.work}/pass-{k}" for k in range(1, MAX_PASSES + 1)))
