"""The stage contract.

A stage transforms one partition (a `pyarrow.Table`) into another. The runner hands a stage only the
rows that are still alive (`status == "success"`); the stage returns the **same rows in the same
order**, with columns added and, for rows it turns down, `status`, `reject_stage`, `reject_reason`
(and optionally `error_message`) set. Rows are never dropped: the runner checks the count and moves
turned-down rows aside itself, so the first failure always wins.

Heavy set-up (models, indexes) happens in :meth:`Stage.setup`, which the runner calls once per worker
process; the stage instance is then reused for every partition that worker runs.

A stage that needs a run-wide decision before it can filter (e.g. keep the top 30% by CLIP score)
returns True from :meth:`Stage.run_wide` for that config and implements :meth:`score`, :meth:`summarize`,
:meth:`decide` and :meth:`apply`: the runner scores every partition first, computes the decision once from
the summaries, then applies it without recomputing anything.

One decode per image: a stage that decodes every image it passes on (download) hands the pixels to
:meth:`Stage.pixel_values`, which asks the later stages of the same task (:meth:`Stage.from_pixels`, wired by
the runner) for what they need from them; it lands in internal ``pixels.<stage>`` columns, and the later stage
decodes only rows where its value is missing.

Everything the engine needs to plan a run is class-level (as NeMo Curator's `ProcessingStage`): `name`,
`config_class`, `requires`, `adds`, and the classmethods `run_wide(config)` and `resources(config)`. The
client never builds a stage to learn them; it builds one instance per stage, for `preflight` and `decide`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import pyarrow as pa

from curate.pipeline import columns as C

if TYPE_CHECKING:
    from PIL import Image

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class Resources:
    """What one running instance of a stage uses on its worker.

    `gpus > 0` means "runs on a GPU where the cluster offers one": on a cluster with GPU workers its tasks ask for
    that share of the Dask resource `GPU`; on a CPU-only cluster the stage runs on the CPU like every other.
    """

    cpu_threads: int = 1
    gpus: float = 0.0

    @property
    def dask_resources(self) -> dict[str, float]:
        """Abstract Dask worker resources (`dask worker --resources GPU=1`)."""
        return {"GPU": self.gpus} if self.gpus > 0 else {}


@dataclass(frozen=True)
class RunContext:
    """Run-wide facts a stage may need: where the run writes, its scratch folder, how the cluster shares a machine."""

    output_path: str
    work_path: str
    #: Worker processes on one machine (the most on any machine of the cluster): a stage that sizes its CPU-bound
    #: work per process divides the machine's CPUs by this (:func:`cpus_per_process`).
    processes_per_host: int = 1

    def cpus_per_process(self) -> int:
        """This process's share of the CPUs it may run on, at least 1."""
        return max(1, usable_cpus() // max(1, self.processes_per_host))

    @property
    def work_dir(self) -> Path:
        return Path(self.work_path)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class StageError(RuntimeError):
    """A stage broke the contract or could not set up (not a row-level failure)."""


class StageSetupError(StageError):
    """setup() failed on a worker (model or index could not load): the whole run stops at once."""


@dataclass(frozen=True)
class Command:
    """A `curate` subcommand that a stage provides (the dedup stage: `hash-evalset`, `dedup-report`).

    `run` returns the exit code; a ValueError or FileNotFoundError it raises is a usage error (exit 2).
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# Class-level facts of the contract: a subclass sets them as plain class attributes, never as properties, so
# the engine can read them from the class without building (or setting up) an instance.
_CLASS_LEVEL = ("name", "config_class", "requires", "adds", "reason_hints", "run_wide", "resources", "report_parts",
                "commands", "pixel_type", "input_columns")


class Stage(Generic[ConfigT]):
    """Base class for pipeline stages. Subclasses set the class attributes and `process`."""

    #: Name used in `reject_stage`, stats and logs.
    name: ClassVar[str] = ""
    #: The frozen dataclass of the stage's config section (it must have `enabled: bool`).
    config_class: ClassVar[type] = object
    #: Columns the stage reads (the runner checks them before each partition). A stage that requires
    #: `columns.IMAGE` gets only rows with image bytes: the runner fails the others (`no_image`) before it.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Columns the stage adds or rewrites, with their Arrow types: every output Parquet carries the added
    #: columns of every registered stage (null where a stage did not run), in registry order.
    adds: ClassVar[tuple[pa.Field, ...]] = ()
    #: reason -> what to change when that reason turns down (nearly) every row, printed at the end of such a run.
    reason_hints: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr in _CLASS_LEVEL:
            if isinstance(cls.__dict__.get(attr), property):
                raise TypeError(f"{cls.__name__}.{attr} is class-level in the stage contract; "
                                "it must not be a property")

    def __init__(self, config: ConfigT, context: RunContext) -> None:
        self.config = config
        self.context = context
        self.log = logging.getLogger(f"curate.stages.{self.name}")
        self._is_set_up = False
        #: (pixel column, its type, from_pixels) of the later stages of this stage's task; set by the runner
        self.pixel_consumers: tuple[tuple[str, pa.DataType, Callable[[Image.Image], Any]], ...] = ()

    # -- class-level facts that depend on the config ---------------------------------------------
    @classmethod
    def run_wide(cls, config: ConfigT) -> bool:
        """True when, with this config, the stage needs a run-wide decision (score/summarize/decide/apply)."""
        return False

    @classmethod
    def resources(cls, config: ConfigT) -> Resources:
        return Resources()

    @classmethod
    def input_columns(cls, config: ConfigT) -> Mapping[str, str]:
        """With this config, the input's columns the stage reads besides URL and caption, as {config key path:
        column name in the input file}: a table input without one stops the run (and `validate`) with a config
        error naming that key. In a row the column is `columns.input_column(name)` (`input_<name>` where the name
        is one of curate's own columns)."""
        return {}

    @classmethod
    def pixel_type(cls, config: ConfigT) -> pa.DataType | None:
        """With this config, the Arrow type of what :meth:`from_pixels` returns; None: it needs no pixels."""
        return None

    @classmethod
    def report_parts(cls, section: dict[str, Any]) -> Any:
        """What this stage adds to the run report (`curate.pipeline.report.ReportParts`), or None.

        `section` is the stage's config section as the run saved it (plain data: old runs may lack keys).
        """
        return None

    @classmethod
    def commands(cls) -> Sequence[Command]:
        """Extra `curate` subcommands this stage provides (tools around it, not pipeline steps)."""
        return ()

    # -- lifecycle ---------------------------------------------------------------------------

    def preflight(self) -> None:
        """Cheap checks on the client before any task runs (files exist, options agree).

        Raise `ConfigError("section.key", ...)` for problems the user must fix: the run stops with exit code 2
        before starting a cluster. Do not load models here.
        """

    def setup(self) -> None:
        """Load models / indexes. Called once per worker before the first partition."""

    def ensure_setup(self) -> None:
        if not self._is_set_up:
            self.setup()
            self._is_set_up = True

    def teardown(self) -> None:
        """Release what setup() took (optional)."""

    # -- work --------------------------------------------------------------------------------
    def process(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    # -- one decode per image ----------------------------------------------------------------
    def from_pixels(self, image: Image.Image) -> Any:
        """What this stage needs from an image's pixels (a value of :meth:`pixel_type`), computed by the stage that
        decoded them, in its worker thread.

        `image` is exactly what the row's image bytes hold after that stage (EXIF-transposed; alpha
        matted on white where the bytes are JPEG), so the value must not depend on how it was obtained. Called
        only after :meth:`setup`, once per image on the producer's threads; must be thread-safe. Per-row work that
        needs the pixels belongs here rather than in a second decode (dedup matches eval candidates here), but
        rows a stage between producer and consumer turns down have then been worked on for nothing. The value arrives in
        the internal column ``columns.pixel_column(name)``; rows where it is null (no producer ran, or the
        producer failed) are the stage's to decode.
        """
        raise NotImplementedError

    def pixel_values(self, image: Image.Image) -> dict[str, Any]:
        """For a producer: every consumer's value for these pixels. A consumer that raises gets null (it decodes)."""
        values: dict[str, Any] = {}
        for column, _type, compute in self.pixel_consumers:
            try:
                values[column] = compute(image)
            except Exception as err:  # noqa: BLE001 - the consumer falls back to decoding the bytes itself
                self.log.debug("%s: no pixel value: %r", column, err)
                values[column] = None
        return values

    def set_pixel_columns(self, table: pa.Table, values: Sequence[Mapping[str, Any] | None]) -> pa.Table:
        """For a producer: add the consumers' pixel columns from per-row :meth:`pixel_values` (None = no image)."""
        for column, arrow_type, _compute in self.pixel_consumers:
            table = C.set_column(table, column, pa.array([v.get(column) if v else None for v in values], arrow_type))
        return table

    # -- optional run-wide decision ----------------------------------------------------------
    def score(self, table: pa.Table) -> pa.Table:
        """Pass 1 of a global stage: add the columns the decision needs, decide nothing."""
        raise NotImplementedError

    def summarize(self, table: pa.Table) -> Any:
        """Pass 1: a small picklable summary of one scored partition."""
        raise NotImplementedError

    def decide(self, summaries: Sequence[Any]) -> Any:
        """Between passes, on the client: the run-wide decision from all summaries."""
        raise NotImplementedError

    def apply(self, table: pa.Table, decision: Any) -> pa.Table:
        """Pass 2: filter a scored partition with the run-wide decision."""
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------------
    def reject(
        self,
        table: pa.Table,
        reasons: Sequence[str | None],
        messages: Sequence[str | None] | None = None,
        status: str = C.STATUS_REJECTED,
    ) -> pa.Table:
        """Mark rows whose reason is not None as rejected (or failed) by this stage."""
        return mark_rows(table, self.name, reasons, messages, status)


def mark_rows(
    table: pa.Table,
    stage_name: str,
    reasons: Sequence[str | None],
    messages: Sequence[str | None] | None = None,
    status: str | Sequence[str | None] = C.STATUS_REJECTED,
) -> pa.Table:
    """Set status/reject_stage/reject_reason/error_message on rows with a reason.

    Rows already turned down keep their first reason. `status` may be one value or one per row.
    """
    n = table.num_rows
    if len(reasons) != n:
        raise StageError(f"{stage_name}: {len(reasons)} reasons for {n} rows")
    statuses = [status] * n if isinstance(status, str) else list(status)
    old_status = table.column(C.STATUS).to_pylist() if C.STATUS in table.column_names else [C.STATUS_SUCCESS] * n

    def old(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [None] * n

    old_stage, old_reason, old_msg = old(C.REJECT_STAGE), old(C.REJECT_REASON), old(C.ERROR_MESSAGE)
    new_status, new_stage, new_reason, new_msg = [], [], [], []
    for i in range(n):
        reason = reasons[i]
        if reason is not None and old_status[i] == C.STATUS_SUCCESS:
            new_status.append(statuses[i] or C.STATUS_REJECTED)
            new_stage.append(stage_name)
            new_reason.append(reason)
            new_msg.append(messages[i] if messages is not None else old_msg[i])
        else:
            new_status.append(old_status[i])
            new_stage.append(old_stage[i])
            new_reason.append(old_reason[i])
            new_msg.append(old_msg[i])
    table = C.set_column(table, C.STATUS, new_status)
    table = C.set_column(table, C.REJECT_STAGE, new_stage)
    table = C.set_column(table, C.REJECT_REASON, new_reason)
    return C.set_column(table, C.ERROR_MESSAGE, new_msg)
