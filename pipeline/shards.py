"""WebDataset shards, written by the workers: each partition writes its own final shard(s), atomically.

A partition's kept samples (in key order) go to at most `pieces` shards named from the partition alone:
`shards/{prefix}-{partition_id * pieces + j:05d}.tar`, with `pieces = ceil(input.shard_size / write.shard_samples)`
(one shard per partition by default, as img2dataset writes one per input shard). A piece closes at
`write.shard_samples` samples, or earlier before it would pass `write.shard_bytes`, while pieces remain; empty
pieces are not written. So samples per shard vary with what each partition keeps, and numbering has gaps where a
partition kept little or nothing: `manifest.json` lists every shard and its brace pattern(s), `shards/sizes.json`
every shard's sample count.

Each shard is written under a hidden temporary name and renamed into place, with fixed tar metadata: a reader
globbing `shards/*.tar` sees only complete shards as partitions finish, and a partition that runs again (a Dask
retry, a resumed run) rewrites identical bytes. Nothing is copied on the client.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from curate.pipeline import storage, tario

_TAR_HEADER = 512  # bytes per member header, for the byte limit


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.tar"


def pieces_per_partition(partition_rows: int, shard_samples: int) -> int:
    return max(1, math.ceil(partition_rows / shard_samples))


def _size(sample: tario.Sample) -> int:
    return sum(len(data) + _TAR_HEADER for _name, data in sample.members())


def split(samples: Sequence[tario.Sample], pieces: int, max_samples: int, max_bytes: int = 0
          ) -> list[list[tario.Sample]]:
    """Consecutive pieces: a new one starts at `max_samples` samples or before passing `max_bytes` (0 = no limit),
    while fewer than `pieces` exist; the last piece takes the rest."""
    out: list[list[tario.Sample]] = []
    size = 0
    for sample in samples:
        sample_size = _size(sample)
        full = out and (len(out[-1]) >= max_samples or (max_bytes and size + sample_size > max_bytes))
        if not out or (full and len(out) < pieces):
            out.append([])
            size = 0
        out[-1].append(sample)
        size += sample_size
    return out


def write_shard(path: str, samples: Iterable[tario.Sample]) -> ShardInfo:
    """Write one shard atomically (hidden temporary, then rename) and describe it for the manifest."""
    count = 0
    with storage.atomic_path(path) as tmp:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for name, data in sample.members():
                    tario.add_member(tar, name, data)
                count += 1
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.path.getsize(tmp)
    return ShardInfo(os.path.basename(path), count, size, digest.hexdigest())


def brace_patterns(names: Sequence[str], prefix: str) -> str:
    """`{prefix}-{00000..00041}.tar` for contiguous numbers; runs joined with `::` (as open_clip_train and
    webdataset take several sources) where partitions wrote nothing."""
    numbers = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(re.escape(prefix) + r"-(\d+)\.tar", n)))
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return "::".join(f"{prefix}-{lo:05d}.tar" if lo == hi else f"{prefix}-{{{lo:05d}..{hi:05d}}}.tar"
                     for lo, hi in runs)


def manifest(infos: list[ShardInfo], prefix: str) -> dict:
    infos = sorted(infos, key=lambda i: i.name)
    return {
        "format": "webdataset",
        "prefix": prefix,
        "total_samples": sum(i.samples for i in infos),
        "shards": [asdict(i) for i in infos],
        # For webdataset / open_clip_train --train-data (relative to shards/).
        "pattern": brace_patterns([i.name for i in infos], prefix),
    }
