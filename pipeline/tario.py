"""WebDataset tar I/O: sample naming, reading (streaming, one sample at a time) and deterministic writing.

Every tar the project reads or writes goes through here: input tars, part tars, final shards, eval sets in
WebDataset form and the dedup report's corpus.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec

from curate.pipeline import storage

#: Image fields of a WebDataset sample -> the extension curate writes for it.
IMAGE_EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}

# Fixed member metadata so identical samples give identical tar bytes.
_MTIME = 0
_MODE = 0o644


def split_sample_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the basename; the rest is the field
    (lower-cased). `a/b/000001.seg.png` -> (`a/b/000001`, `seg.png`)."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    key = str(path.parent / stem) if str(path.parent) != "." else stem
    return key, ext.lower()


def image_field(fields: Iterable[str]) -> str | None:
    """The first image field of a sample (`jpg`, `jpeg`, `png`, `webp`), or None."""
    return next((f for f in fields if f in IMAGE_EXTENSIONS), None)


def iter_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file, in tar order."""
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                yield member.name, data.read() if data is not None else b""


def iter_sample_members(path: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(sample key, [(member name, bytes), ...]) with consecutive members of one key grouped, in tar order."""
    current: str | None = None
    group: list[tuple[str, bytes]] = []
    for name, data in iter_members(path):
        key, _ = split_sample_name(name)
        if current is not None and key != current:
            yield current, group
            group = []
        current = key
        group.append((name, data))
    if current is not None:
        yield current, group


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(sample key, {field: bytes}) in tar order, one sample at a time."""
    for key, members in iter_sample_members(path):
        yield key, {split_sample_name(name)[1]: data for name, data in members}


def index_tar(path: str) -> list[str]:
    """Sample keys of a tar in order (headers only on seekable local files)."""
    keys: list[str] = []
    seen: set[str] = set()
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _ = split_sample_name(member.name)
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


# -- writing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    image_ext: str
    caption: str
    meta_json: bytes

    def members(self) -> list[tuple[str, bytes]]:
        return [(f"{self.key}.{self.image_ext}", self.image), (f"{self.key}.txt", self.caption.encode("utf-8")),
                (f"{self.key}.json", self.meta_json)]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with fixed metadata (no mtime, owner or mode of this machine)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = _MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_samples(path: str, samples: Iterable[Sample]) -> int:
    """Write a tar of samples atomically; return the number of samples."""
    count = 0
    with storage.atomic_path(path) as tmp, open(tmp, "wb") as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for name, data in sample.members():
                add_member(tar, name, data)
            count += 1
    return count
