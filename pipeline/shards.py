"""WebDataset tar shards: deterministic part tars per partition, repacked into target-size final shards.

Each partition writes its kept samples to `_work/parts/part-NNNNN.tar` (members `{key}.{jpg|png|webp}`,
`{key}.txt`, `{key}.json`). When every partition is done, :func:`repack` streams the parts in partition order
into `shards/{prefix}-00000.tar ...` of `write.shard_samples` samples (and at most `write.shard_bytes` bytes if
set), each written atomically, then `manifest.json`. The result depends only on the input and the config, not on
which worker finished first, so a re-run or a resumed run produces byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import fsspec

from curate.pipeline import storage
from curate.pipeline.inputs import split_sample_name

# Fixed metadata so identical samples give identical tar bytes.
_MTIME = 0
_MODE = 0o644


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    image_ext: str
    caption: str
    meta_json: bytes


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = _MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_member(name, len(data)), io.BytesIO(data))


def write_samples(path: str, samples: Iterable[Sample]) -> int:
    """Write a tar of samples atomically; return the number of samples."""
    count = 0
    with storage.atomic_path(path) as tmp, open(tmp, "wb") as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _add(tar, f"{s.key}.{s.image_ext}", s.image)
            _add(tar, f"{s.key}.txt", s.caption.encode("utf-8"))
            _add(tar, f"{s.key}.json", s.meta_json)
            count += 1
    return count


def iter_members(path: str) -> Iterator[tuple[str, bytes]]:
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                yield member.name, data.read() if data is not None else b""


def _iter_grouped(path: str) -> Iterator[list[tuple[str, bytes]]]:
    """Members grouped by sample key (consecutive, as written by write_samples)."""
    group: list[tuple[str, bytes]] = []
    current = None
    for name, data in iter_members(path):
        key, _ = split_sample_name(name)
        if current is not None and key != current:
            yield group
            group = []
        current = key
        group.append((name, data))
    if group:
        yield group


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.tar"


def repack(part_paths: list[str], shards_dir: str, prefix: str, shard_samples: int, shard_bytes: int = 0
           ) -> list[ShardInfo]:
    """Stream part tars (in the given order) into final shards; return their manifest entries."""
    infos: list[ShardInfo] = []
    writer: _ShardWriter | None = None
    for part in part_paths:
        for group in _iter_grouped(part):
            size = sum(len(d) + 512 for _, d in group)
            if writer is not None and (writer.samples >= shard_samples
                                       or (shard_bytes and writer.bytes + size > shard_bytes and writer.samples)):
                infos.append(writer.close())
                writer = None
            if writer is None:
                writer = _ShardWriter(f"{shards_dir}/{shard_name(prefix, len(infos))}")
            writer.add(group, size)
    if writer is not None:
        infos.append(writer.close())
    return infos


class _ShardWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.samples = 0
        self.bytes = 0
        self._ctx = storage.atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close(), spans many add() calls
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def add(self, group: list[tuple[str, bytes]], size: int) -> None:
        for name, data in group:
            _add(self._tar, name, data)
        self.samples += 1
        self.bytes += size

    def close(self) -> ShardInfo:
        self._tar.close()
        self._file.close()
        digest = hashlib.sha256()
        with open(self._tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.path.getsize(self._tmp)
        self._ctx.__exit__(None, None, None)
        return ShardInfo(os.path.basename(self.path), self.samples, size, digest.hexdigest())


def manifest(infos: list[ShardInfo], prefix: str) -> dict:
    return {
        "format": "webdataset",
        "prefix": prefix,
        "total_samples": sum(i.samples for i in infos),
        "shards": [asdict(i) for i in infos],
        # Brace pattern for webdataset / open_clip_train --train-data.
        "pattern": f"{prefix}-{{00000..{max(len(infos) - 1, 0):05d}}}.tar" if infos else "",
    }
