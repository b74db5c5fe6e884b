"""Dask cluster set-up: a LocalCluster sized to the machine, or an existing scheduler.

GPU stages run as tasks that ask for the abstract resource `GPU=1`, so on a cluster whose GPU workers were
started with `dask worker --resources GPU=1` (one per GPU) each GPU holds one model and CPU stages stay on the
CPU workers. A LocalCluster on a machine with CUDA devices adds one such worker per device (pinned with
CUDA_VISIBLE_DEVICES); `cluster.gpu_workers` forces a number (also on a machine without CUDA, which exercises
the same scheduling with the stage falling back to CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("curate.cluster")


# Device nodes of the NVIDIA (CUDA) and AMD (ROCm) drivers: without any, torch cannot see a GPU.
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def _cuda_devices() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_DRIVER_PATHS):
        return 0  # spares every CPU-only run start the ~3 s torch import
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # torch missing or broken CUDA: no GPUs for scheduling purposes
        return 0


@dataclass(frozen=True)
class Placement:
    """What the cluster offers for task placement."""

    gpu: bool = False  # some workers advertise GPU: GPU stages ask for GPU=1
    cpu_tagged: bool = False  # some workers advertise CPU: CPU work asks for CPU=1, staying off GPU workers
    processes_per_host: int = 1  # worker processes on one machine, the most on any (RunContext.processes_per_host)


def placement_of(client: Any) -> Placement:
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    resources = [w.get("resources") or {} for w in workers.values()]
    return Placement(gpu=any(r.get("GPU", 0) > 0 for r in resources),
                     cpu_tagged=any(r.get("CPU", 0) > 0 for r in resources),
                     processes_per_host=processes_per_host(client))


def _process_identity() -> tuple[str, int]:
    import socket

    return socket.gethostname(), os.getpid()


def processes_per_host(client: Any) -> int:
    """The most worker processes on one machine (threads-only workers share one process; 1 when unknown).

    Asked of the workers themselves: the scheduler knows their addresses, not which of them share a machine
    (a LocalCluster's workers all listen on 127.0.0.1) or a process.
    """
    try:
        answers = client.run(_process_identity, on_error="ignore")  # a worker that fails to answer is left out
    except Exception as err:  # noqa: BLE001 - only a sizing hint: a cluster that cannot answer gets the default
        log.debug("worker processes per host unknown: %r", err)
        return 1
    identities = {tuple(answer) for answer in answers.values() if isinstance(answer, (tuple, list)) and len(answer) == 2}
    per_host: dict[str, int] = {}
    for host, _pid in identities:
        per_host[host] = per_host.get(host, 0) + 1
    return max(per_host.values(), default=1)


def worker_environ() -> dict[str, Any]:
    """Dask's pre-spawn environment for our LocalCluster's worker processes.

    Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker it spawns so that freed memory goes back to the
    OS at once. That setting also switches off glibc's adaptive mmap threshold: every allocation over 128 KiB
    (each decoded photo, its resize buffers) is then mapped fresh and page-faulted in, then unmapped again.
    For a download-heavy worker that was ~600 page faults and ~1.4 ms of kernel CPU per image (measured: 866k
    vs 240k faults for 1,000 images by `perf stat`, docs/download.md Performance). Without the variable, glibc
    keeps its defaults (what a plain Python process, img2dataset's workers included, gets). A value the user
    exported still reaches the workers: they inherit the client's environment.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ["MALLOC_TRIM_THRESHOLD_"] = None  # Dask's way to leave a variable unset
    return environ


def _local_cluster(cfg: Any, gpu_workers: int) -> Any:
    import dask
    from distributed import LocalCluster

    cpu = os.cpu_count() or 1
    n_workers = cfg.n_workers or max(1, cpu // cfg.threads_per_worker)
    # Worker processes listen on loopback only. A threads-only cluster talks in-process, but each worker still serves
    # its HTTP endpoints (/metrics, /info, ...), which Dask binds to every interface unless told otherwise.
    network = {"host": "127.0.0.1"} if cfg.processes else {"worker_dashboard_address": "127.0.0.1:0"}
    # Nannies read their pre-spawn environment when built (also for workers restarted later).
    # The worker profiler walks every thread's stack every 10 ms while holding the GIL; with 32 download threads
    # that was ~8% of a download worker's Python time (py-spy). Nannies hand this config to their workers.
    settings = {"distributed.nanny.pre-spawn-environ": worker_environ(),
                "distributed.worker.profile.enabled": cfg.worker_profiler}
    held_back = _ctrl_c_held_back() if cfg.processes else contextlib.nullcontext()
    with dask.config.set(settings), held_back:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=cfg.processes,
            memory_limit=cfg.memory_limit,
            # Dask serves a dashboard regardless; keep it on loopback (None would mean 0.0.0.0:8787).
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
            # With GPU workers beside them, CPU workers advertise CPU so CPU stages never occupy a GPU worker.
            resources={"CPU": cfg.threads_per_worker} if gpu_workers and cfg.processes else None,
            **network,
        )
        if gpu_workers and cfg.processes:
            import copy

            for i in range(gpu_workers):
                name, spec = next(iter(cluster.new_worker_spec().items()))
                spec = copy.deepcopy(spec)
                spec["options"]["resources"] = {"GPU": 1}  # and no CPU: only GPU stages run here
                spec["options"]["env"] = {"CUDA_VISIBLE_DEVICES": str(i)}
                spec["options"]["nthreads"] = 1
                cluster.worker_spec[f"gpu-{i}"] = spec
            cluster.sync(cluster._correct_state)
    return cluster


@contextlib.contextmanager
def _ctrl_c_held_back() -> Iterator[None]:
    """Block SIGINT in this thread while the LocalCluster starts: for the worker processes, not the client.

    The cluster's event-loop thread is started here and inherits the mask, and so do the worker processes it
    spawns (a signal mask survives fork and exec): a Ctrl-C while a worker still imports its modules, before
    `_prepare_local_worker` runs, stays pending there instead of printing that worker's traceback. The client still
    gets its KeyboardInterrupt: through another of its threads at once, or when the mask is restored here.
    """
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    from multiprocessing import resource_tracker

    # Started later from the loop thread, the tracker would unblock SIGINT there (it blocks, spawns, then
    # unblocks rather than restoring the mask); once running, it is left alone.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _prepare_local_worker(verbose: bool) -> None:
    """In each LocalCluster worker process: the console's log format, and Ctrl-C left to the client.

    A terminal's Ctrl-C reaches every process of the foreground group; the client stops the run and closes the
    cluster, so a worker that died of it on its own would only print a traceback.
    """
    import signal

    from curate.pipeline import console

    console.configure(verbose)
    # Workers spawned under _ctrl_c_held_back have SIGINT blocked already; this also covers one whose event loop
    # was started earlier in the client's process (and ignoring drops a Ctrl-C still pending there).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loopback_link(link: str) -> str:
    """The dashboard link of our LocalCluster, whose dashboard listens on 127.0.0.1 only. For an in-process
    scheduler Dask builds the link from the machine's address, where nothing listens."""
    from urllib.parse import urlsplit

    parts = urlsplit(link)
    return parts._replace(netloc=f"127.0.0.1:{parts.port}").geturl() if parts.port else link


@contextlib.contextmanager
def open_client(cfg: Any, wants_gpu: bool, *, client: Any = None,
                echo: Callable[[str], None] = print) -> Iterator[tuple[Any, Placement]]:
    """Yield (dask client, its Placement); close what we opened.

    `wants_gpu`: some enabled stage runs on a GPU where one is offered (`Stage.resources(config).gpus`); only then
    does a LocalCluster add GPU workers.
    """
    if client is not None:
        yield client, placement_of(client)
        return
    from distributed import Client

    from curate.pipeline import console

    console.quiet_dask()  # importing distributed just installed its own log handlers and levels
    if cfg.scheduler_address:
        try:
            c = Client(cfg.scheduler_address, timeout="30s")
        except OSError as err:
            raise RuntimeError(f"cannot reach the Dask scheduler at {cfg.scheduler_address}: {err}") from err
        echo(f"curate: connected to {cfg.scheduler_address} ({len(c.scheduler_info().get('workers', {}))} workers)"
             + (f"; dashboard {c.dashboard_link}" if c.dashboard_link else ""))
        try:
            yield c, placement_of(c)
        finally:
            c.close()
        return
    gpu_workers = cfg.gpu_workers or (_cuda_devices() if wants_gpu else 0)
    cluster = _local_cluster(cfg, gpu_workers)
    c = Client(cluster)
    if cfg.processes:  # our own worker processes print like the client (a shared cluster's workers are left alone)
        c.run(_prepare_local_worker, logging.getLogger().getEffectiveLevel() <= logging.DEBUG)
    if cfg.dashboard:
        echo(f"curate: Dask dashboard {_loopback_link(c.dashboard_link)}")
    try:
        yield c, placement_of(c)
    except BaseException:
        # A failed or interrupted run: nothing left to overlap the close with, and closing here means no second
        # close runs beside this one (after Ctrl-C, the CLI closes whatever Dask still has open).
        _close_local(c, cluster)
        raise
    # Workers take a second or so to exit: let them while the client writes stats, manifest and report. A
    # non-daemon thread, so the process still waits for them before it exits.
    threading.Thread(target=_close_local, args=(c, cluster), name="curate-cluster-close").start()


# Closing a LocalCluster takes a second or two; this bounds a close that hangs (the process waits for it at exit).
CLOSE_TIMEOUT_S = 30.0


def _close_local(client: Any, cluster: Any) -> None:
    try:
        client.close()
        cluster.close(timeout=CLOSE_TIMEOUT_S)
    except Exception as err:  # the run's outcome is settled (outputs written, or its own error raised): a worker
        # that will not stop does not change it
        log.warning("closing the local Dask cluster: %r", err)
