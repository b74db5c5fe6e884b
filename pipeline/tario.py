"""WebDataset tar I/O: sample naming, reading (streaming, one sample at a time) and deterministic writing.

Every tar the project reads or writes goes through here: input tars, final shards, eval sets in
WebDataset form and the dedup report's corpus.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec

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


@dataclass(frozen=True, slots=True)
class TarMember:
    """One regular file of a tar, from its header alone (small: a 10k-sample shard's index stays a few MB)."""

    name: str
    field: str
    size: int
    position: int  # index among the tar's regular files, in tar order
    offset_data: int
    sparse: tarfile.TarInfo | None = None  # the header itself, only for GNU sparse members

    def info(self) -> tarfile.TarInfo:
        if self.sparse is not None:
            return self.sparse
        info = tarfile.TarInfo(self.name)
        info.size, info.offset_data = self.size, self.offset_data
        return info


@dataclass
class TarRow:
    """One input row of a tar: a sample (its members wherever they are in the tar), or a duplicate member."""

    key: str
    members: list[TarMember]
    duplicate: bool = False  # a member whose key already has this field: counted as its own row

    def fields(self) -> list[str]:
        return [m.field for m in self.members]


@contextmanager
def _open_tar(path: str) -> Iterator[tuple[tarfile.TarFile, bool]]:
    """The tar, random-access when the file can seek (headers are read, member data skipped by seeking)."""
    with fsspec.open(path, "rb") as f:
        seekable = bool(getattr(f, "seekable", lambda: False)())
        with tarfile.open(fileobj=f, mode="r:*" if seekable else "r|*") as tar:
            yield tar, seekable


def _regular_files(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for info in tar:
        if info.isfile():
            yield info


def index_rows(path: str) -> list[TarRow]:
    """The tar's rows from its headers: members grouped by key wherever they are (order of first appearance).

    A member whose key already has that field (e.g. a second `a.jpg`) is a row of its own, marked `duplicate`,
    so that it is counted instead of silently merged or dropped."""
    rows: list[TarRow] = []
    by_key: dict[str, TarRow] = {}
    with _open_tar(path) as (tar, _seekable):
        for position, info in enumerate(_regular_files(tar)):
            key, ext = split_sample_name(info.name)
            member = TarMember(info.name, ext, info.size, position, info.offset_data,
                               info if info.sparse is not None else None)
            row = by_key.get(key)
            if row is None:
                by_key[key] = row = TarRow(key, [member])
                rows.append(row)
            elif ext in row.fields():
                rows.append(TarRow(key, [member], duplicate=True))
            else:
                row.members.append(member)
    return rows


def read_members(path: str, groups: Sequence[Sequence[TarMember]]) -> Iterator[dict[str, bytes]]:
    """{field: bytes} of each group of members (from `index_rows` of the same file), in group order.

    Only the named members are read. A seekable file is read group by group (one group in memory); a stream
    is read once, front to back, holding a group's members until the group is complete."""
    with _open_tar(path) as (tar, seekable):
        if seekable:
            for group in groups:
                yield {m.field: _read(tar, m.info()) for m in group}
            return
        where = {m.position: (g, m) for g, group in enumerate(groups) for m in group}
        missing = [len(group) for group in groups]
        filled: dict[int, dict[str, bytes]] = {}
        done = 0
        while done < len(groups) and not missing[done]:
            yield {}
            done += 1
        for position, info in enumerate(_regular_files(tar)):
            if done == len(groups):
                return
            hit = where.pop(position, None)
            if hit is None:
                continue
            g, member = hit
            filled.setdefault(g, {})[member.field] = _read(tar, info)
            missing[g] -= 1
            while done < len(groups) and not missing[done]:
                yield filled.pop(done, {})
                done += 1
        while done < len(groups):  # members the index named but the stream no longer has
            yield filled.pop(done, {})
            done += 1


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(info)
    return data.read() if data is not None else b""


def iter_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file, in tar order."""
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                yield member.name, data.read() if data is not None else b""


def iter_sample_members(path: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(sample key, [(member name, bytes), ...]) per row of `index_rows` (members of a key grouped wherever
    they are in the tar; a duplicate member is its own group), one sample in memory at a time."""
    rows = index_rows(path)
    for row, fields in zip(rows, read_members(path, [r.members for r in rows]), strict=True):
        yield row.key, [(m.name, fields.get(m.field, b"")) for m in row.members]


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(sample key, {field: bytes}) per row of `index_rows`, one sample at a time."""
    rows = index_rows(path)
    yield from zip((r.key for r in rows), read_members(path, [r.members for r in rows]), strict=True)


def index_tar(path: str) -> list[str]:
    """The key of each row of the tar (`index_rows`; a duplicate member's row repeats its key)."""
    return [row.key for row in index_rows(path)]


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
