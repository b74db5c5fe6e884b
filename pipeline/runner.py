"""The runner: plans partitions, runs every partition through the stages on Dask, writes, resumes, finalizes.

    input ─plan─> partitions ─(Dask task per partition)─> read → the registry's stages in order
          → write Parquet parts, the partition's shards, marker ──(all done)──> manifest, sizes.json, stats, report

The client (`Runner`) plans and submits; the worker side (`run_steps`) executes one group of steps of one
partition. Which stages run, in what order, with which config section, comes from pipeline/registry.py.

A stage with a run-wide decision (`Stage.run_wide(config)`, e.g. CLIP top-fraction or within-corpus dedup) splits the
partition's journey into passes: pass k ends by scoring with that stage and persisting the partition under
`_work/pass-k/`; once every partition has a summary, the decision is made once on the client, saved, and
broadcast to pass k+1, which applies it without recomputing anything.

Resume: each partition's last act is writing `_work/done/part-NNNNN.json` (its stats). A re-run skips partitions
with a marker, and within a multi-pass run also reuses persisted passes and saved decisions. Outputs are written
atomically under names derived from the partition id, so a task Dask runs twice rewrites identical files.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import gc
import hashlib
import json
import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from curate.pipeline import columns as C
from curate.pipeline import inputs, registry, runlock, shards, sink, stats, storage, tario
from curate.pipeline.config import RunConfig, to_dict
from curate.pipeline.configspec import ConfigError
from curate.pipeline.layout import MAX_PASSES, RunLayout, part_name
from curate.pipeline.sink import PartitionWriter, WriteConfig
from curate.pipeline.stage import RunContext, Stage, StageError, StageSetupError, mark_rows

log = logging.getLogger("curate.runner")

# Engine sections whose values change what a run writes; with every registered stage's section, a resumed run
# must use the same ones.
ENGINE_SEMANTIC_SECTIONS = ("input", "write")


class RunFailed(RuntimeError):
    """The run could not complete (some partitions failed). Finished partitions are kept for resume."""


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StageSpec:
    """An enabled stage of this run: its class and its config section."""

    section: str
    cls: type[Stage]
    config: Any

    @property
    def fingerprint(self) -> str:
        return _digest(to_dict(self.config))


@dataclass
class PartitionState:
    """A partition on its way through the stages (travels between Dask tasks)."""

    partition_id: int
    input_rows: int
    alive: pa.Table
    #: Rows a stage has turned down (failed or rejected), set aside without their image bytes.
    turned_down: list[pa.Table] = field(default_factory=list)
    stage_info: dict[str, dict[str, Any]] = field(default_factory=dict)


class StepKind(enum.Enum):
    READ = "read"  # read the partition's input rows
    LOAD = "load"  # load the partition as persisted by the previous pass
    REQUIRE_IMAGES = "require_images"  # fail rows without image bytes (`no_image`)
    PROCESS = "process"  # a stage's process()
    SCORE = "score"  # a run-wide stage's score() + summarize(), then persist: ends a pass
    APPLY = "apply"  # a run-wide stage's apply() with the saved decision: starts the next pass
    WRITE = "write"  # the sink, then the partition's done marker


@dataclass(frozen=True)
class Step:
    kind: StepKind
    stage: StageSpec | None = None
    pass_index: int = 0
    #: REQUIRE_IMAGES: the name rows without image bytes are failed under (the stage that should have made them).
    blame: str = ""


@dataclass
class RunResult:
    output_path: str
    stats: dict[str, Any]
    partitions_total: int
    partitions_run: int
    partitions_skipped: int
    shards: list[dict[str, Any]]
    funnel: str


# -- worker side -------------------------------------------------------------------------------------

_STAGE_CACHE: dict[tuple[str, str, str, int], Stage] = {}
_STAGE_LOCK = threading.Lock()


def _stage_instance(spec: StageSpec, context: RunContext) -> Stage:
    """One set-up instance per (stage, config, run) per worker thread.

    With the default one thread per worker process that is one per process. With several threads, each gets
    its own instance so per-partition state (counters) never mixes; stages that hold big read-only state
    (the CLIP model) share it per process themselves.
    """
    key = (spec.section, spec.fingerprint, context.output_path, threading.get_ident())
    with _STAGE_LOCK:
        instance = _STAGE_CACHE.get(key)
        if instance is None:
            instance = spec.cls(spec.config, context)
            try:
                instance.ensure_setup()
            except Exception as err:
                raise StageSetupError(f"{spec.cls.name} could not set up: {err}") from err
            _STAGE_CACHE[key] = instance
            # What exists now (imports, models, indexes) lives as long as the worker: take it out of the cyclic
            # GC's reach, so full collections stop re-traversing it while rows are processed.
            gc.collect()
            gc.freeze()
    return instance


def teardown_stages() -> int:
    """Release every cached stage in this worker process (thread pools, models). Run via client.run()."""
    with _STAGE_LOCK:
        instances = list(_STAGE_CACHE.values())
        _STAGE_CACHE.clear()
    for instance in instances:
        try:
            instance.teardown()
        except Exception as err:  # shutting down: log, never fail the run here
            log.warning("teardown of %s failed: %r", instance.name, err)
    return len(instances)


def _split_alive(state: PartitionState) -> None:
    """Move rows turned down by the last stage from `alive` to `turned_down` (dropping image bytes)."""
    mask = pc.equal(state.alive.column(C.STATUS), C.STATUS_SUCCESS)
    if pc.all(mask).as_py() is not False:
        return
    gone = state.alive.filter(pc.invert(mask))
    state.turned_down.append(gone.drop_columns([c for c in gone.column_names if C.is_internal(c)]))
    state.alive = state.alive.filter(mask)


def _guarded(stage: Stage, method: Callable[[pa.Table], pa.Table], table: pa.Table) -> pa.Table:
    """Run a stage method; if it raises, isolate the offending rows instead of losing the partition."""
    try:
        return _checked(stage, table, method(table))
    except StageError:
        raise
    except Exception as err:  # a row the stage could not handle: find it, fail only it
        log.warning("%s raised %r on a partition of %d rows; retrying row by row", stage.name, err, table.num_rows)
    pieces = []
    for i in range(table.num_rows):
        row = table.slice(i, 1)
        try:
            pieces.append(_checked(stage, row, method(row)))
        except StageError:
            raise
        except Exception as err:
            message = f"{type(err).__name__}: {err}"[:500]
            pieces.append(mark_rows(row, stage.name, ["internal_error"], [message], C.STATUS_FAILED))
    return pa.concat_tables(pieces, promote_options="default") if pieces else table


def _checked(stage: Stage, before: pa.Table, after: pa.Table) -> pa.Table:
    if after.num_rows != before.num_rows:
        raise StageError(f"stage {stage.name} returned {after.num_rows} rows for {before.num_rows}: "
                         "stages must mark rows, never drop them")
    if before.num_rows and after.column(C.KEY).to_pylist() != before.column(C.KEY).to_pylist():
        raise StageError(f"stage {stage.name} reordered or changed row keys")
    return after


def _run_stage(state: PartitionState, stage: Stage, method_name: str, *args: Any) -> None:
    missing = [c for c in stage.requires if c not in state.alive.column_names]
    if missing and state.alive.num_rows:
        raise StageError(f"stage {stage.name} needs column(s) {missing}; partition has {state.alive.column_names}")
    rows_in = state.alive.num_rows
    start = time.perf_counter()
    if rows_in:
        method = getattr(stage, method_name)
        state.alive = _guarded(stage, (lambda t: method(t, *args)) if args else method, state.alive)
    _split_alive(state)
    info = state.stage_info.setdefault(stage.name, {"rows_in": 0, "rows_out": 0, "seconds": 0.0, "counters": {}})
    info["rows_in"] += rows_in if method_name != "apply" else 0
    info["rows_out"] = state.alive.num_rows
    info["seconds"] = round(info["seconds"] + time.perf_counter() - start, 4)
    counters = getattr(stage, "counters", None)
    if counters:
        for name, value in counters.items():
            info["counters"][name] = info["counters"].get(name, 0) + int(value)
        counters.clear()


def _require_images(state: PartitionState, blame: str) -> None:
    """The one "has image bytes" check: rows that would reach a consumer of image bytes without them fail here,
    as `no_image` of the stage that should have produced them (or of `input`), never later or elsewhere."""
    t = state.alive
    if not t.num_rows:
        return
    if C.IMAGE not in t.column_names:
        reasons = ["no_image"] * t.num_rows
    else:
        reasons = ["no_image" if not v else None for v in t.column(C.IMAGE).to_pylist()]
    if any(reasons):
        message = "the input row has no image bytes" if blame == "input" else f"{blame} produced no image bytes"
        messages = [message if r else None for r in reasons]
        state.alive = mark_rows(t, blame, reasons, messages, C.STATUS_FAILED)
        _split_alive(state)


def _persist(state: PartitionState, layout: RunLayout, pass_index: int, summary: Any) -> None:
    tables = [state.alive, *state.turned_down]
    table = pa.concat_tables([C.conform(t, keep_internal=True) for t in tables], promote_options="default")
    meta = {b"curate.input_rows": str(state.input_rows).encode(),
            b"curate.stage_info": json.dumps(state.stage_info).encode()}
    table = table.replace_schema_metadata(meta)
    with storage.atomic_path(layout.pass_file(pass_index, state.partition_id, ".arrow")) as tmp, \
            pa.OSFile(tmp, "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    # The summary is written last: its presence means the persisted partition is complete.
    storage.write_bytes(layout.pass_file(pass_index, state.partition_id, ".summary.pkl"),
                        pickle.dumps(summary, protocol=pickle.HIGHEST_PROTOCOL))


def _load(layout: RunLayout, pass_index: int, partition_id: int) -> PartitionState:
    with fsspec.open(layout.pass_file(pass_index, partition_id, ".arrow"), "rb") as source:
        table = ipc.open_file(source).read_all()
    meta = table.schema.metadata or {}
    state = PartitionState(partition_id, int(meta[b"curate.input_rows"]), table.replace_schema_metadata(None),
                           stage_info=json.loads(meta[b"curate.stage_info"]))
    _split_alive(state)
    return state


def _sink(config: WriteConfig, input_cfg: Any, context: RunContext) -> PartitionWriter:
    return PartitionWriter(config, RunLayout.of(context.output_path), input_cfg.shard_size)


_ARROW_POOL_CHOSEN = False


def _use_system_allocator() -> None:
    """Make this worker process allocate Arrow buffers with the C library's malloc (once per process).

    Arrow's default pool in the Linux wheels, mimalloc, backs its segments with transparent huge pages and hands
    freed ones back to the OS, so every partition's buffers (image bytes, IPC files, Parquet) were faulted in
    again, the kernel zeroing 2 MiB per fault: 7.5% of a download-only run's CPU (perf, 3,000 rows), 0.2% with
    malloc, which keeps freed memory for the next partition (docs/operations.md, Memory). A pool the user chose
    with ARROW_DEFAULT_MEMORY_POOL is left alone.
    """
    global _ARROW_POOL_CHOSEN
    if _ARROW_POOL_CHOSEN:
        return
    _ARROW_POOL_CHOSEN = True
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        pa.set_memory_pool(pa.system_memory_pool())


def run_steps(
    payload: inputs.PartitionSpec | PartitionState,
    steps: Sequence[Step],
    context: RunContext,
    input_cfg: Any,
    decisions: dict[int, Any],
    write_cfg: WriteConfig,
) -> PartitionState | dict[str, Any] | Any:
    """Execute one group of steps for one partition (a Dask task)."""
    _use_system_allocator()
    layout = RunLayout.of(context.output_path)
    # Set up every stage of this task before its first step: a model that cannot load fails the run before any
    # row is downloaded, and a retried task never repeats downloads for a set-up that cannot succeed.
    instances = [_stage_instance(step.stage, context) for step in steps if step.stage is not None]
    _wire_pixels(instances)
    state = payload if isinstance(payload, PartitionState) else None
    for step in steps:
        kind = step.kind
        if kind is StepKind.READ:
            assert isinstance(payload, inputs.PartitionSpec)
            table = inputs.read_partition(payload, input_cfg)
            # Input rows as the plan counted them from the input itself: a row the reader loses breaks the
            # partition's accounting instead of vanishing.
            state = PartitionState(payload.partition_id, payload.num_rows, table)
            if C.STATUS in table.column_names:  # rows the reader already turned down (stage `input`)
                _split_alive(state)
            continue
        if kind is StepKind.LOAD:
            assert isinstance(payload, inputs.PartitionSpec)
            state = _load(layout, step.pass_index, payload.partition_id)
            continue
        assert state is not None
        if kind is StepKind.REQUIRE_IMAGES:
            _require_images(state, step.blame)
        elif kind is StepKind.PROCESS:
            assert step.stage is not None
            _run_stage(state, _stage_instance(step.stage, context), "process")
        elif kind is StepKind.APPLY:
            assert step.stage is not None
            _run_stage(state, _stage_instance(step.stage, context), "apply", decisions[step.pass_index])
        elif kind is StepKind.SCORE:
            assert step.stage is not None
            stage = _stage_instance(step.stage, context)
            _run_stage(state, stage, "score")
            summary = stage.summarize(state.alive) if state.alive.num_rows else None
            _persist(state, layout, step.pass_index, summary)
            return summary
        elif kind is StepKind.WRITE:
            return _write(state, _sink(write_cfg, input_cfg, context), layout)
    return state


def _wire_pixels(instances: list[Stage]) -> None:
    """One decode per image: each stage of the task may fill what the later ones need from its decoded pixels."""
    for i, producer in enumerate(instances):
        consumers = []
        for consumer in instances[i + 1:]:
            arrow_type = type(consumer).pixel_type(consumer.config)
            if arrow_type is not None and consumer is not producer:
                consumers.append((C.pixel_column(consumer.name), arrow_type, consumer.from_pixels))
        producer.pixel_consumers = tuple(consumers)


def _write(state: PartitionState, writer: PartitionWriter, layout: RunLayout) -> dict[str, Any]:
    tables = [C.conform(t, keep_internal=True) for t in [state.alive, *state.turned_down]]
    final = pa.concat_tables(tables, promote_options="default")
    start = time.perf_counter()
    outputs = writer.write_partition(state.partition_id, final)
    state.stage_info[writer.name] = {"rows_in": final.num_rows, "rows_out": outputs.counters["curated_rows"],
                                     "seconds": round(time.perf_counter() - start, 4), "counters": outputs.counters}
    part_stats = stats.partition_stats(final, state.input_rows, state.stage_info)
    part_stats["partition"] = state.partition_id
    part_stats["shards"] = [dataclasses.asdict(info) for info in outputs.shards]  # the client builds the manifest
    part_stats["extra_columns"] = outputs.extra_columns  # and makes these agree across partitions
    part_stats["image_exts"] = outputs.image_exts
    storage.write_json(layout.done_marker(state.partition_id), part_stats)
    return part_stats


# -- client side -------------------------------------------------------------------------------------

#: Fixes for reasons the engine itself gives (stage `input`), like the stages' `reason_hints`.
INPUT_HINTS = {
    "no_image": "the rows carry no image bytes and no stage fetched any: enable `download` for URL tables, or "
                "check that the tars have .jpg/.png/.webp members",
}


def _damage_warnings(damaged: Sequence[dict[str, Any]], shown: int = 5) -> list[str]:
    """One line per damaged input tar range (the first `shown`), then how many more."""
    lines = []
    for d in damaged[:shown]:
        lines.append(f"{d['source']}: {tario.TarDamage(d['start'], d.get('end'), d['reason']).describe()} "
                     "(stats.json input_damage)")
    if len(damaged) > shown:
        lines.append(f"{len(damaged) - shown} more damaged range(s) in the input tars: stats.json input_damage")
    return lines


def _reason_hints() -> dict[tuple[str, str], str]:
    hints = {("input", reason): hint for reason, hint in INPUT_HINTS.items()}
    for stage in registry.registered():
        hints.update({(stage.cls.name, reason): hint for reason, hint in stage.cls.reason_hints.items()})
    return hints


def stage_specs(config: RunConfig) -> list[StageSpec]:
    """The registry's stages that this config enables, in pipeline order."""
    specs = []
    for stage in registry.registered():
        section_cfg = config.section(stage.section)
        if section_cfg.enabled:
            specs.append(StageSpec(stage.section, stage.cls, section_cfg))
    return specs


def semantic_sections() -> tuple[str, ...]:
    """Sections whose values change what a run writes: a resumed run must use the same ones."""
    return (*ENGINE_SEMANTIC_SECTIONS, *(stage.section for stage in registry.registered()))


def _fingerprint(config: RunConfig) -> dict[str, str]:
    return {s: _digest(to_dict(config.section(s)))[:16] for s in semantic_sections()}


def _check_resume_compatible(config: RunConfig, layout: RunLayout, *, record: bool) -> None:
    """An existing run folder must have been made with the same semantic settings; `record` saves them if new."""
    current = _fingerprint(config)
    if storage.exists(layout.run_json):
        try:
            previous = storage.read_json(layout.run_json).get("fingerprint", {})
        except storage.CorruptFile as err:
            raise RunFailed(f"{err}: it records which config made this run; delete it only if you are sure the "
                            "config is unchanged (the run then resumes with the current one), or use a new "
                            "output.path") from err
        changed = [s for s in current if previous.get(s) != current[s]]
        if changed:
            raise ConfigError(
                "output.path",
                f"{config.output.path} holds a run made with different {', '.join(changed)} settings; "
                "resume needs the same config: use a new output.path or delete the old run")
        return
    if record:
        storage.write_json(layout.run_json, {"fingerprint": current, "config": to_dict(config)})


def plan_passes(specs: list[StageSpec], write_cfg: WriteConfig) -> list[list[Step]]:
    """Steps of each pass. Run-wide stages end a pass with SCORE; the next pass starts with LOAD + APPLY.

    The "has image bytes" check goes right after the last stage that adds image bytes (`adds` holds
    `columns.IMAGE`), or right after reading, whenever a later stage (or the sink) requires them.
    """
    consumers = [i for i, spec in enumerate(specs) if C.IMAGE in spec.cls.requires]
    if C.IMAGE in PartitionWriter.requires(write_cfg):
        consumers.append(len(specs))
    check_after = -1  # index of the stage after which to check; -1 = after reading
    if consumers:
        producers = [i for i, spec in enumerate(specs[: consumers[0]])
                     if any(f.name == C.IMAGE for f in spec.cls.adds)]
        check_after = producers[-1] if producers else -1

    def image_check(after: int) -> list[Step]:
        if not consumers or after != check_after:
            return []
        return [Step(StepKind.REQUIRE_IMAGES, blame=specs[after].cls.name if after >= 0 else "input")]

    passes: list[list[Step]] = [[Step(StepKind.READ), *image_check(-1)]]
    for i, spec in enumerate(specs):
        if spec.cls.run_wide(spec.config):
            pass_index = len(passes)
            if pass_index > MAX_PASSES:
                raise ConfigError(spec.section, f"at most {MAX_PASSES} stages with a run-wide decision per run")
            passes[-1].append(Step(StepKind.SCORE, spec, pass_index=pass_index))
            passes.append([Step(StepKind.LOAD, pass_index=pass_index),
                           Step(StepKind.APPLY, spec, pass_index=pass_index)])
        else:
            passes[-1].append(Step(StepKind.PROCESS, spec))
        passes[-1].extend(image_check(i))
    passes[-1].append(Step(StepKind.WRITE))
    return passes


def _group_by_resources(steps: list[Step], placement: Any) -> list[tuple[list[Step], dict]]:
    """Consecutive steps with the same resource needs run as one task.

    On a cluster with GPU workers, GPU stages become `GPU=1` tasks and, where workers advertise `CPU`, all other
    steps become `CPU=1` tasks, so CPU work never occupies a GPU worker. Elsewhere a partition is one task.
    """
    if not placement.gpu:
        return [(steps, {})]
    groups: list[tuple[list[Step], dict]] = []
    for step in steps:
        res: dict[str, float] = {}
        if step.stage is not None:
            res = step.stage.cls.resources(step.stage.config).dask_resources
        if not res and placement.cpu_tagged:
            res = {"CPU": 1}
        if groups and groups[-1][1] == res:
            groups[-1][0].append(step)
        else:
            groups.append(([step], res))
    return groups


def _stops_the_run(err: BaseException) -> str | None:
    """The message to stop the whole run with, for failures no other partition can escape; else None."""
    if isinstance(err, StageSetupError):
        return str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {err.filename}" if err.filename else ""
        return (f"no space left on the device{where} ({err.strerror}); free space (or point output.path at a "
                "bigger disk) and re-run the same command: finished partitions are kept")
    return None


PROGRESS_LOG_SECONDS = 30.0


class _ProgressLines:
    """The progress bar's stand-in without a terminal: one line at most every PROGRESS_LOG_SECONDS."""

    def __init__(self, total: int, label: str, echo: Callable[[str], None]) -> None:
        self.total, self.label, self.echo = total, label, echo
        self.done = 0
        self.postfix = ""
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_LOG_SECONDS and self.done < self.total:
            self.last = now
            self.echo(f"curate: {self.label}: {self.done}/{self.total} done{self.postfix}, {now - self.started:.0f}s")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


class Runner:
    def __init__(self, config: RunConfig, *, progress: bool | None = None, client: Any = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.config = config
        # None = progress bars when stderr is a terminal.
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._client = client
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.layout = RunLayout.of(config.output.path)
        self.out = self.layout.root

    # public ------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        storage.makedirs(self.layout.root)
        with runlock.hold(self.layout.lock, self.out):
            return self._run()

    def check(self, every_file: bool = True) -> dict[str, Stage]:
        """Everything a run checks before any work, and all that `curate validate` runs: the input finds files
        with the columns the config names, every enabled stage's preflight passes, and an existing run folder was
        made with this config.

        `every_file=False` (a run, which plans next): the columns of the first file only, to fail fast; planning
        reads every file's schema anyway, and reading thousands of remote footers twice would double its time.
        Returns the client's one instance of each enabled stage (preflight now, run-wide decisions later).
        """
        files, fmt = inputs.resolve_input(self.config.input, self.layout.root)
        _check_resume_compatible(self.config, self.layout, record=False)
        self._check_input_unchanged(files)
        if not storage.exists(self.layout.plan):  # a planned run's columns were checked when it was planned
            inputs.check_input_columns(self.config.input, files if every_file else files[:1], fmt,
                                       self._input_columns())
        context = RunContext(self.layout.root, self.layout.work)
        stages = {spec.section: spec.cls(spec.config, context) for spec in stage_specs(self.config)}
        for stage in stages.values():  # fail fast, before a cluster starts, on what the user must fix
            stage.preflight()
        return stages

    def _input_columns(self) -> dict[str, str]:
        """{config key path: input column} that the enabled stages read besides URL and caption."""
        columns: dict[str, str] = {}
        for spec in stage_specs(self.config):
            columns.update(spec.cls.input_columns(spec.config))
        return columns

    def _run(self) -> RunResult:
        started = time.time()
        layout = self.layout
        stages = self.check(every_file=False)
        storage.makedirs(layout.work)
        _check_resume_compatible(self.config, layout, record=True)
        # This run owns output.path: temporaries of a killed earlier attempt are garbage.
        storage.remove_stale_temporaries(layout.written_dirs())
        plan = self._plan()
        context = RunContext(layout.root, layout.work)
        specs = stage_specs(self.config)
        markers = {p.partition_id: m for p in plan.partitions if (m := self._done_marker(p.partition_id)) is not None}
        done_ids = set(markers)
        lost = self._outputs_lost(markers)
        if lost:  # deleted (or never fully copied) outputs of finished partitions: make them again
            for partition_id, _name in lost:
                storage.remove(layout.done_marker(partition_id))
            done_ids -= {partition_id for partition_id, _name in lost}
            self.echo(f"curate: warning: {len(lost)} finished partition(s) miss output files or have a shard of the "
                      f"wrong size (first: {lost[0][1]}); they run again")
        todo = [p for p in plan.partitions if p.partition_id not in done_ids]
        self.echo(f"curate: {plan.total_rows:,} input rows in {len(plan.partitions)} partition(s) "
                  f"from {len(plan.sources)} file(s); {len(done_ids)} already done, {len(todo)} to run")
        for warning in _damage_warnings(plan.damaged):
            self.echo(f"curate: warning: {warning}")
        if todo:
            self._run_partitions(todo, plan, specs, stages, context)
        return self._finalize(plan, specs, started, len(todo), len(done_ids))

    # steps -------------------------------------------------------------------------------------------
    def _done_marker(self, partition_id: int) -> dict[str, Any] | None:
        """The partition's done marker when it is done: the marker exists and reads; a corrupt marker means: redo
        that partition."""
        marker = self.layout.done_marker(partition_id)
        if not storage.exists(marker):
            return None
        try:
            done = storage.read_json(marker)
        except storage.CorruptFile as err:
            log.warning("%s; partition %d will run again", err, partition_id)
            storage.remove(marker)
            return None
        # A marker without its shard list (a run folder of an older curate) cannot feed the manifest: redo it.
        return done if "shards" in done or not self.config.write.enabled else None

    def _outputs_lost(self, markers: dict[int, dict[str, Any]]) -> list[tuple[int, str]]:
        """(partition, first missing file) of each finished partition whose curated/rejected Parquet or shards are
        gone, or whose shard has another size than its marker records (a copy cut short). One listing per folder,
        not a request per file (40,000 partitions on object storage)."""
        layout = self.layout
        present = {f"{os.path.basename(folder)}/{name}": size
                   for folder, suffix in ((layout.curated_dir, ".parquet"), (layout.rejected_dir, ".parquet"),
                                          (layout.shards_dir, ".tar"))
                   for name, size in storage.file_sizes(folder, suffix).items()}
        lost = []
        for partition_id, marker in sorted(markers.items()):
            expected: dict[str, int | None] = {f"{folder}/{part_name(partition_id, '.parquet')}": None
                                               for folder in ("curated", "rejected")}
            if self.config.write.enabled:
                expected.update({f"shards/{info['name']}": info.get("bytes") for info in marker.get("shards", [])})
            missing = next((name for name, size in expected.items()
                            if name not in present or (size is not None and present[name] != size)), None)
            if missing is not None:
                lost.append((partition_id, missing))
        return lost

    def _check_input_unchanged(self, files: Sequence[str]) -> None:
        """A resume must read the input the run was planned from: partitions are matched to it by number, so new
        or edited files would mix old and new rows. A plan of an older curate records no stamps: not checked."""
        cached = self.layout.plan
        if not storage.exists(cached):
            return
        try:
            data = storage.read_json(cached)
        except storage.CorruptFile:
            return  # the run reports it, with its way out, when it reads the plan
        if "source_stamps" not in data:
            return
        change = inputs.input_changes(data["sources"], data["source_stamps"], files)
        if change is not None:
            raise ConfigError(
                "input.path",
                f"{change} since this run was planned (resuming would mix old and new rows): use a new output.path, "
                "or, if the content is the same (a copy, a touch), delete _work/plan.json there to plan again")

    def _plan(self) -> inputs.InputPlan:
        cached = self.layout.plan
        if storage.exists(cached):
            try:
                data = storage.read_json(cached)
            except storage.CorruptFile as err:
                raise RunFailed(f"{err}: delete it to plan again from the input (only if the input is unchanged: "
                                "finished partitions are matched to it by number), or use a new output.path") from err
            parts = tuple(inputs.PartitionSpec(**p) for p in data["partitions"])
            return inputs.InputPlan(parts, data["total_rows"], tuple(data["sources"]), data["format"],
                                    data.get("malformed_lines", 0), tuple(data.get("damaged", ())))
        plan = inputs.plan_input(self.config.input, self.layout.input_dir, run_dir=self.layout.root,
                                 required=self._input_columns())
        stamps = [inputs.source_stamp(source) for source in plan.sources]
        storage.write_json(cached, {"partitions": [p.__dict__ for p in plan.partitions],
                                    "total_rows": plan.total_rows, "sources": list(plan.sources),
                                    "source_stamps": stamps, "format": plan.format,
                                    "malformed_lines": plan.malformed_lines, "damaged": list(plan.damaged)})
        return plan

    def _run_partitions(self, todo: list[inputs.PartitionSpec], plan: inputs.InputPlan, specs: list[StageSpec],
                        stages: dict[str, Stage], context: RunContext) -> None:
        from curate.pipeline.cluster import open_client

        wants_gpu = any(spec.cls.resources(spec.config).gpus > 0 for spec in specs)
        with open_client(self.config.cluster, wants_gpu, client=self._client, echo=self.echo) as (client, placement):
            context = dataclasses.replace(context, processes_per_host=placement.processes_per_host)
            passes = plan_passes(specs, self.config.write)
            decisions: dict[int, Any] = {}
            failures: list[str] = []
            for pass_index, steps in enumerate(passes):
                last = pass_index == len(passes) - 1
                if pass_index > 0:
                    score_step = passes[pass_index - 1][-1]
                    assert score_step.stage is not None
                    decisions[pass_index] = self._decision(pass_index, stages[score_step.stage.section], plan)
                # A partition whose pass output is already persisted skips that pass.
                pending = [p for p in todo if last or not storage.exists(
                    self.layout.pass_file(pass_index + 1, p.partition_id, ".summary.pkl"))]
                if not pending:
                    continue
                label = f"pass {pass_index + 1}/{len(passes)}" if len(passes) > 1 else "partitions"
                failures += self._submit_pass(client, placement, pending, steps, context, decisions, label)
                if failures:
                    break
            try:
                client.run(teardown_stages)
            except Exception as err:  # a worker already gone has nothing to release
                log.debug("teardown on workers: %r", err)
            if failures:
                raise RunFailed(f"{len(failures)} partition(s) failed; finished ones are kept, re-run to resume:\n  "
                                + "\n  ".join(failures[:10]))

    def _submit_pass(self, client: Any, placement: Any, pending: list[inputs.PartitionSpec],
                     steps: list[Step], context: RunContext, decisions: dict[int, Any], label: str) -> list[str]:
        from distributed import as_completed

        groups = _group_by_resources(steps, placement)
        # One broadcast copy per worker instead of one per task (a dedup decision can be large).
        decisions_ref = client.scatter([decisions], broadcast=True)[0] if decisions else {}
        futures = {}
        for spec in pending:
            payload: Any = spec
            future = None
            for g, (group_steps, resources) in enumerate(groups):
                future = client.submit(
                    run_steps, payload if future is None else future, group_steps, context, self.config.input,
                    decisions_ref, self.config.write, key=f"curate-{label.replace(' ', '').replace('/', 'of')}-"
                    f"part{spec.partition_id:05d}-g{g}-{os.getpid()}-{time.time_ns()}",
                    resources=resources or None, retries=1, pure=False)
            futures[future] = spec
        failures = []
        bar = self._bar(len(futures), label)
        rows = 0
        for future in as_completed(futures):
            spec = futures.pop(future)  # drop our reference so Dask can free the result
            try:
                result = future.result()
                rows += spec.num_rows
            except Exception as err:
                stop = _stops_the_run(err)
                if stop:  # every other partition would fail the same way: stop now, say it once
                    for other in futures:
                        other.cancel()
                    bar.close()
                    raise RunFailed(stop) from err
                # A bug or an infrastructure failure of this partition: keep going, report them all at the end.
                failures.append(f"partition {spec.partition_id} ({spec.source} rows {spec.start}-{spec.stop}): "
                                f"{type(err).__name__}: {err}")
                log.debug("partition %d failed", spec.partition_id, exc_info=err)
                result = None
            bar.set_postfix(rows=f"{rows:,}")
            bar.update(1)
            del result
        bar.close()
        return failures

    def _bar(self, total: int, label: str) -> Any:
        if not self.progress:
            # No terminal (a batch job's log): a line every PROGRESS_LOG_SECONDS instead of a bar.
            return _ProgressLines(total, label, self.echo)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=label, unit="part", file=sys.stderr, dynamic_ncols=True)

    def _decision(self, pass_index: int, stage: Stage, plan: inputs.InputPlan) -> Any:
        """The run-wide decision of `stage`, which ended pass `pass_index - 1` (made once, saved)."""
        layout = self.layout
        path = layout.decision(pass_index)
        if storage.exists(path):
            with fsspec.open(path, "rb") as f:
                return pickle.load(f)  # noqa: S301 - our own file in our own work dir
        summaries = []
        for p in plan.partitions:
            summary_path = layout.pass_file(pass_index, p.partition_id, ".summary.pkl")
            if storage.exists(summary_path):
                with fsspec.open(summary_path, "rb") as f:
                    summary = pickle.load(f)  # noqa: S301 - our own file
                if summary is not None:
                    summaries.append(summary)
            elif not storage.exists(layout.done_marker(p.partition_id)):
                raise RunFailed(f"partition {p.partition_id} has no pass-{pass_index} summary")
        decision = stage.decide(summaries)
        storage.write_bytes(path, pickle.dumps(decision, protocol=pickle.HIGHEST_PROTOCOL))
        self.echo(f"curate: {stage.name} run-wide decision made from {len(summaries)} partition summaries")
        return decision

    def _finalize(self, plan: inputs.InputPlan, specs: list[StageSpec], started: float, ran: int,
                  skipped: int) -> RunResult:
        layout = self.layout
        parts = [storage.read_json(layout.done_marker(p.partition_id)) for p in plan.partitions]
        merged = stats.merge(parts)
        if merged["input_rows"] != plan.total_rows:
            raise stats.AccountingError(f"the input holds {plan.total_rows} rows but the partitions account for "
                                        f"{merged['input_rows']}")
        write_cfg = self.config.write
        stage_order = [s.cls.name for s in specs]
        if ran == 0 and storage.exists(layout.finalized) and storage.exists(layout.stats):
            try:
                previous = storage.read_json(layout.stats)
                manifest = storage.read_json(layout.manifest)
            except (storage.CorruptFile, FileNotFoundError) as err:
                log.warning("%s; finalizing again", err)
            else:
                funnel = stats.format_funnel(previous, stage_order)
                self.echo("curate: nothing to do, every partition is done\n" + funnel)
                return RunResult(self.out, previous, len(plan.partitions), 0, skipped, manifest["shards"], funnel)
        # The workers wrote the shards; the client only lists them.
        infos = [shards.ShardInfo(**info) for part in parts for info in part.get("shards", [])]
        manifest = shards.manifest(infos, write_cfg.shard_prefix)
        if write_cfg.enabled and manifest["total_samples"] != merged["kept"]:
            raise stats.AccountingError(f"shards hold {manifest['total_samples']} samples but {merged['kept']} "
                                        "rows were kept")
        self._remove_outputs_not_in(plan, infos)
        extras = self._conform_extra_columns(plan, parts)
        if write_cfg.enabled:  # open_clip_train reads the sample count from here (no --train-num-samples)
            storage.write_json(layout.shard_sizes, {i.name: i.samples for i in infos})
            image_exts = sorted({ext for part in parts for ext in part.get("image_exts", ["jpg"])})
            sink.write_dataset_card(layout.shards_dir, image_exts, extras)
        storage.write_json(layout.manifest, manifest)
        merged.update({
            "stage_order": stage_order,
            "input_format": plan.format,
            "input_sources": list(plan.sources)[:100],
            "input_malformed_lines": plan.malformed_lines,  # each also a rejected row (input/malformed_line)
            # tar bytes no member could be read from: what was stored there is in no count (docs/operations.md)
            "input_damage": list(plan.damaged),
            "shards": len(infos),
            "samples_in_shards": manifest["total_samples"],
            "elapsed_seconds_last_run": round(time.time() - started, 2),
        })
        storage.write_json(layout.stats, merged)
        self._write_report()
        storage.write_json(layout.finalized, {"shards": len(infos), "kept": merged["kept"]})
        # The pass intermediates are no longer needed once the run is finalized.
        for p in plan.partitions:
            for k in range(1, MAX_PASSES + 1):  # the saved decision.pkl stays: a re-run reuses it, never re-decides
                storage.remove(layout.pass_file(k, p.partition_id, ".arrow"))
                storage.remove(layout.pass_file(k, p.partition_id, ".summary.pkl"))
        funnel = stats.format_funnel(merged, stage_order)
        self.echo(funnel)
        self.echo(f"curate: wrote {len(infos)} shard(s) with {manifest['total_samples']:,} samples to "
                  f"{layout.shards_dir} in {merged['elapsed_seconds_last_run']:.1f}s")
        for warning in [*_damage_warnings(plan.damaged), *stats.outcome_warnings(merged, _reason_hints())]:
            self.echo(f"curate: warning: {warning}")
        return RunResult(self.out, merged, len(plan.partitions), ran, skipped, manifest["shards"], funnel)

    def _conform_extra_columns(self, plan: inputs.InputPlan, parts: list[dict[str, Any]]) -> Any:
        """Give every curated/ and rejected/ file the same extra columns and types (sink.conform_extra_columns):
        partitions type the input's extra fields from their own rows (a tar JSON value that is a number in one
        partition and text in another, a column null in a whole partition), and readers of the folder refuse that."""
        layout = self.layout
        unified = None
        for path_of in (layout.curated, layout.rejected):
            paths = [path_of(p.partition_id) for p in plan.partitions]
            extras = [sink.read_extra_fields(part["extra_columns"]) if "extra_columns" in part
                      else sink.file_extra_fields(path) for part, path in zip(parts, paths, strict=True)]
            rewritten = sink.conform_extra_columns(paths, extras, self.config.write)
            if rewritten:
                log.info("%d file(s) under %s rewritten to the run's extra columns", rewritten, os.path.dirname(paths[0]))
            if unified is None:  # curated's: the rows the shards hold
                unified = sink.unify_extra_columns(extras)
        return unified

    def _remove_outputs_not_in(self, plan: inputs.InputPlan, infos: list[shards.ShardInfo]) -> None:
        """curated/, rejected/, embeddings/ and shards/ keep exactly the current plan's files (an earlier run in
        this folder with other input, limits or shard settings may have left more)."""
        layout = self.layout
        keep = {part_name(p.partition_id, ".parquet") for p in plan.partitions}
        stale = [path for folder in (layout.curated_dir, layout.rejected_dir, layout.embeddings_dir)
                 for path in storage.listdir(folder, ".parquet") if os.path.basename(path) not in keep]
        shard_names = {info.name for info in infos}
        stale += [path for path in storage.listdir(layout.shards_dir, ".tar")
                  if os.path.basename(path) not in shard_names]
        for path in stale:
            log.info("removing %s: not part of this run's plan", path)
            storage.remove(path)

    def _write_report(self) -> None:
        if not storage.is_local(self.out):
            return
        try:
            from curate.pipeline.report import write_run_report
        except ImportError:  # pragma: no cover - report module ships with the package
            return
        try:
            path = write_run_report(self.out)
            self.echo(f"curate: report {path}")
        except Exception as err:  # the data is written; a report problem must not fail the run
            log.error("could not write the run report: %r", err)


def run(config: RunConfig, **kwargs: Any) -> RunResult:
    return Runner(config, **kwargs).run()
