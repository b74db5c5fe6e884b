"""Atomic, idempotent writes on local paths and fsspec URLs.

Every output file is written under a unique temporary name next to its destination and renamed into place,
so a reader never sees a partial file and a task that runs twice (Dask may do that) just replaces identical
content. On object stores (s3://) an upload only becomes visible when complete, which gives the same guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec

TMP_MARK = ".tmp-"


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary local path; on success move it to `path` (local or fsspec URL)."""
    if is_local(path):
        path = local(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        head, tail = os.path.split(path)
        # A hidden name: never matches `*.tar` / `*.parquet`, and dataset readers skip dot files.
        tmp = os.path.join(head, f".{tail}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="curate-")
    os.close(fd)
    try:
        yield tmp
        fs, fs_path = fsspec.core.url_to_fs(path)
        fs.put_file(tmp, fs_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


class CorruptFile(ValueError):
    """A work file that exists but cannot be parsed (a crash or a full disk cut it short)."""

    def __init__(self, path: str, err: Exception) -> None:
        super().__init__(f"{path} is corrupt ({err})")
        self.path = path


def read_json(path: str) -> Any:
    with fsspec.open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise CorruptFile(path, err) from err


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(local(path))
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.exists(fs_path)


def listdir(path: str, suffix: str = "") -> list[str]:
    """Sorted full paths of files directly in `path` ending in `suffix` (no temporaries)."""
    if is_local(path):
        p = local(path)
        if not os.path.isdir(p):
            return []
        names = sorted(n for n in os.listdir(p) if n.endswith(suffix) and TMP_MARK not in n
                       and not n.startswith("."))
        return [os.path.join(p, n) for n in names]
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return []
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return sorted(f"{protocol}://{p}" for p in fs.ls(fs_path, detail=False)
                  if p.endswith(suffix) and TMP_MARK not in p)


def file_sizes(path: str, suffix: str = "") -> dict[str, int]:
    """{file name: size in bytes} of the files `listdir` lists, from one listing."""
    if is_local(path):
        return {os.path.basename(p): os.path.getsize(p) for p in listdir(path, suffix)}
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return {}
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
            for entry in fs.ls(fs_path, detail=True)
            if entry["name"].endswith(suffix) and TMP_MARK not in entry["name"]}


def remove(path: str) -> None:
    if is_local(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local(path))
        return
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(local(path), exist_ok=True)
    else:
        fs, fs_path = fsspec.core.url_to_fs(path)
        fs.makedirs(fs_path, exist_ok=True)


def remove_stale_temporaries(folders: Iterable[str]) -> int:
    """Delete temporaries a killed run left in these folders (local paths only); return how many."""
    removed = 0
    for path in folders:
        if not is_local(path):
            continue  # object stores never expose partial uploads
        folder = local(path)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if TMP_MARK in name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed
