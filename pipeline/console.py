"""What a person sees on the terminal: one format for every message, each warning once per run.

`curate: <message>` for results, `curate: warning: <message>` (and `error:`) for problems, from the client and
from worker processes alike; `-v` adds the logger name and debug messages. Python warnings (`warnings.warn`) go
through the same path. A message repeated by several workers (or several partitions) is shown once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

# Dask's own loggers: worker start/stop and nanny kill notices are not the user's business unless -v.
DASK_LOGGERS = ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.core",
                "distributed.worker", "distributed.batched", "distributed.comm")


class ConsoleFormatter(logging.Formatter):
    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and self.verbose:
            message += "\n" + self.formatException(record.exc_info)
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        where = f"[{record.name}] " if self.verbose else ""
        return f"curate: {level}{where}{message}"


class OncePerMessage(logging.Filter):
    """Drops a record whose level and text were already shown by this process."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


def configure(verbose: bool) -> None:
    """Install the console format on the root logger of this process (client or worker)."""
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter(verbose))
    handler.addFilter(OncePerMessage())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn goes through the same format (Python's filters still apply)
    quiet_dask()


def quiet_dask() -> None:
    """Route Dask's loggers through the console format, silent unless -v (what matters of a failure, curate
    reports itself; Dask's own lines are connection noise around it). Call again after importing `distributed`:
    its import installs its own handlers and levels."""
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    for name in DASK_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if verbose else logging.CRITICAL)
        logger.propagate = True
        for old in list(logger.handlers):
            logger.removeHandler(old)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(desc: str, unit: str, total: int | None = None) -> Any:
    """A tqdm bar on stderr when it is a terminal; otherwise an object that does nothing (logs stay clean)."""
    import sys

    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
