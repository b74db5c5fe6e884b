"""One run at a time per output folder: an exclusive lock file in `output.path`.

The lock records who holds it (host, pid, the process's start time, the command). A second run refuses at once,
naming the holder. A lock whose holder is gone (same host, and that pid no longer runs or is another process) is
stale and taken over. A lock held from another host cannot be checked from here: the run refuses and says which
file to delete once that run is known to be gone.

Local folders use an exclusive create (O_EXCL), which is atomic. On fsspec destinations (s3://, gs://, ...) the
check and the write are two requests, so two runs started within the same instant could both pass: start runs
on one bucket prefix from one place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import fsspec

from curate.pipeline import storage


class RunLocked(RuntimeError):
    """Another run holds the output folder."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


def _holder_is_gone(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return False  # cannot look at another machine's processes
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it runs, as another user
    recorded = holder.get("process_start")
    return recorded is not None and _process_start(pid) not in (None, recorded)


def _read(path: str) -> dict[str, Any]:
    try:
        with fsspec.open(path, "rb") as f:
            data = json.loads(f.read() or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # being written, or truncated by a crash: an unreadable lock is judged by its pid only


def _unreadable_for_a_while(path: str) -> bool:
    """An empty or corrupt lock file older than a few seconds: its writer died mid-write."""
    import time

    try:
        return storage.is_local(path) and time.time() - os.path.getmtime(storage.local(path)) > 10
    except OSError:
        return True


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _try_create(path: str, body: bytes) -> bool:
    if storage.is_local(path):
        try:
            fd = os.open(storage.local(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True
    if storage.exists(path):
        return False
    storage.write_bytes(path, body)
    return True


@contextlib.contextmanager
def hold(path: str, folder: str) -> Iterator[None]:
    """Hold the lock file `path` for the run in `folder`, or raise RunLocked naming the holder."""
    me = _me()
    body = (json.dumps(me, indent=2) + "\n").encode()
    if not _try_create(path, body):
        holder = _read(path)
        if not (_holder_is_gone(holder) if holder else _unreadable_for_a_while(path)):
            raise RunLocked(
                f"{folder} is in use by another curate run ({_describe(holder)}); one run at a time per output "
                f"folder: wait for it, or, if that run is gone, delete {path}")
        storage.remove(path)  # stale: its run was killed
        if not _try_create(path, body):
            raise RunLocked(f"{folder}: another curate run took the lock just now ({_describe(_read(path))})")
    try:
        yield
    finally:
        if _read(path).get("pid") == me["pid"] and _read(path).get("host") == me["host"]:
            storage.remove(path)
