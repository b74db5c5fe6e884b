"""WebDataset tar shards: deterministic part tars per partition, repacked into target-size final shards.

Each partition writes its kept samples to `_work/parts/part-NNNNN.tar` (members `{key}.{jpg|png|webp}`,
`{key}.txt`, `{key}.json`). When every partition is done, :func:`repack` streams the parts in partition order
into `shards/{prefix}-00000.tar ...` of `write.shard_samples` samples (and at most `write.shard_bytes` bytes if
set), each written atomically, then `manifest.json`. The result depends only on the input and the config, not on
which worker finished first, so a re-run or a resumed run produces byte-identical shards.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import asdict, dataclass

from curate.pipeline import storage, tario


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.tar"


def repack(part_paths: list[str], shards_dir: str, prefix: str, shard_samples: int, shard_bytes: int = 0
           ) -> list[ShardInfo]:
    """Stream part tars (in the given order) into final shards; return their manifest entries."""
    infos: list[ShardInfo] = []
    writer: _ShardWriter | None = None
    for part in part_paths:
        for _key, group in tario.iter_sample_members(part):
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
            tario.add_member(self._tar, name, data)
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
