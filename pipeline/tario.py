"""WebDataset tar I/O: sample naming, reading (streaming, one sample at a time) and deterministic writing.

Every tar the project reads or writes goes through here: input tars, final shards, eval sets in
WebDataset form and the dedup report's corpus. Reading survives damaged tars (a file cut short, a corrupt
header): what can be read is, a member the file ends in is marked, and :func:`scan_tar` names the byte ranges
that could not be read instead of letting them vanish (tarfile alone stops at a bad header as if the archive
ended there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import logging
import lzma
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec

log = logging.getLogger(__name__)

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
    truncated: bool = False  # the file ends inside this member's data: it cannot be read (never is)

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


@dataclass(frozen=True)
class TarDamage:
    """Bytes of a tar that hold no readable member: a file cut short, a corrupt header, stray data.

    Samples stored there cannot even be named, so they cannot become rows; the run reports the range instead."""

    start: int
    end: int | None  # None: unknown (a stream that ended early)
    reason: str

    def describe(self) -> str:
        where = f"bytes {self.start:,}-{self.end:,}" if self.end is not None else f"from byte {self.start:,}"
        return f"{where}: {self.reason}"


@dataclass
class TarScan:
    rows: list[TarRow]
    damage: list[TarDamage]


# tarfile stops at the first header it cannot parse as if the archive ended there, silently dropping every member
# after it; with ignore_zeros it steps over such blocks (and over the end-of-archive blocks of concatenated tars) to
# the next valid header. scan_tar checks what it stepped over.
_READ_OPTIONS = {"ignore_zeros": True}
#: What reading a damaged tar raises: cut-off data, a corrupt or cut-off gzip/xz stream.
_BROKEN = (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


@contextmanager
def _open_tar(path: str) -> Iterator[tuple[tarfile.TarFile, bool]]:
    """The tar, random-access when the file can seek (headers are read, member data skipped by seeking)."""
    with fsspec.open(path, "rb") as f:
        seekable = bool(getattr(f, "seekable", lambda: False)())
        with tarfile.open(fileobj=f, mode="r:*" if seekable else "r|*", **_READ_OPTIONS) as tar:
            yield tar, seekable


def _headers(tar: tarfile.TarFile, cut_short: list[str] | None = None) -> Iterator[tarfile.TarInfo]:
    """Every member header tarfile can read. Where the file ends inside a member's data (or a compressed stream
    ends early) it stops quietly, noting why in `cut_short`."""
    while True:
        try:
            info = tar.next()
        except _BROKEN as err:  # "unexpected end of data", a compressed stream cut off or corrupt
            if cut_short is not None:
                cut_short.append(str(err) or type(err).__name__)
            return
        if info is None:
            return
        yield info


def _regular_files(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for info in _headers(tar):
        if info.isfile():
            yield info


def scan_tar(path: str) -> TarScan:
    """The tar's rows from its headers, and the byte ranges no member could be read from.

    Rows: members grouped by key wherever they are (order of first appearance). A member whose key already has
    that field (e.g. a second `a.jpg`) is a row of its own, marked `duplicate`, so that it is counted instead of
    silently merged or dropped. A member the file ends in is marked `truncated`.

    Damage: what tarfile stepped over that is neither zeros (end-of-archive blocks, record padding) nor a global
    header (corrupt headers, stray data; seekable files only), and an end of the file inside a member's data."""
    rows: list[TarRow] = []
    by_key: dict[str, TarRow] = {}
    skipped: list[tuple[int, int | None]] = []  # byte ranges tarfile read past without returning a member
    cut_short: list[str] = []
    with contextlib.ExitStack() as stack:
        try:
            tar, seekable = stack.enter_context(_open_tar(path))
        except _BROKEN as err:  # not a tar at all, or broken before its first member
            text = str(err) or type(err).__name__
            why = "empty file" if "empty file" in text else text.splitlines()[0].rstrip(":")
            return TarScan([], [TarDamage(0, None, f"not a readable tar ({why})")])
        position = 0
        before = 0  # where tarfile started looking for the next header (opening the tar already read the first)
        for info in _headers(tar, cut_short):
            if info.offset > before:
                skipped.append((before, info.offset))
            before = tar.offset
            if not info.isfile():
                continue
            key, ext = split_sample_name(info.name)
            member = TarMember(info.name, ext, info.size, position, info.offset_data,
                               info if info.sparse is not None else None)
            position += 1
            row = by_key.get(key)
            if row is None:
                by_key[key] = row = TarRow(key, [member])
                rows.append(row)
            elif ext in row.fields():
                rows.append(TarRow(key, [member], duplicate=True))
            else:
                row.members.append(member)
        damage: list[TarDamage] = []
        if cut_short:
            # tarfile could not reach the next header: the last member's data (or only its padding) is cut off
            last = max((m for row in rows for m in row.members), key=lambda m: m.position, default=None)
            if last is not None and (not seekable or not _holds(tar, last.offset_data + last.size)):
                _mark_truncated(rows, last)
                damage.append(TarDamage(last.offset_data, None, f"the file ends inside member {last.name!r}, "
                                        f"{last.size:,} bytes from byte {last.offset_data:,} ({cut_short[0]}): "
                                        "that member cannot be read, and members after it, if any, are missing"))
            else:
                damage.append(TarDamage(before, None, f"reading stops after the last member's data "
                                        f"({cut_short[0]}): members after it, if any, are missing"))
        elif seekable:
            skipped.append((before, None))
            damage += [found for start, end in skipped if (found := _unreadable(tar, start, end)) is not None]
            if rows and not _holds(tar, before + 1):
                damage.append(TarDamage(before, None, "no end-of-archive marker after the last member: the file "
                                        "may have been cut short there, and members after it would be missing"))
    return TarScan(rows, damage)


def _holds(tar: tarfile.TarFile, length: int) -> bool:
    """Is the (uncompressed) tar stream at least `length` bytes long?"""
    if length <= 0:
        return True
    try:
        tar.fileobj.seek(length - 1)
        return bool(tar.fileobj.read(1))
    except _BROKEN:  # a compressed stream that ends early
        return False


def _mark_truncated(rows: list[TarRow], member: TarMember) -> None:
    for row in rows:
        for i, m in enumerate(row.members):
            if m is member:
                row.members[i] = dataclasses.replace(member, truncated=True)
                return


def _unreadable(tar: tarfile.TarFile, start: int, end: int | None) -> TarDamage | None:
    """The first stretch of [start, end) (end None: to the end of the file) that is neither zero blocks nor a
    global header, as damage, or None."""
    fileobj = tar.fileobj
    at = start
    while end is None or at < end:
        try:
            fileobj.seek(at)
            block = fileobj.read(tarfile.BLOCKSIZE if end is None else min(tarfile.BLOCKSIZE, end - at))
        except _BROKEN as err:  # a compressed stream that ends early or is corrupt
            return TarDamage(at, None, f"the compressed stream cannot be read on ({err})")
        if not block:
            return None
        if not block.strip(b"\0"):
            at += len(block)
            continue
        try:  # a pax global header (`git archive` writes one) is a valid header that tarfile reads past
            header = tarfile.TarInfo.frombuf(block, tar.encoding, tar.errors)
        except tarfile.HeaderError:
            header = None
        if header is not None and header.type == tarfile.XGLTYPE:
            at += tarfile.BLOCKSIZE + -(-header.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            continue
        return TarDamage(at, end, "unreadable data (a corrupt or cut-off header, or stray bytes): no member can be "
                         "read there")
    return None


def index_rows(path: str) -> list[TarRow]:
    """The tar's rows from its headers (:func:`scan_tar` without the damage)."""
    return scan_tar(path).rows


def read_members(path: str, groups: Sequence[Sequence[TarMember]]) -> Iterator[dict[str, bytes]]:
    """{field: bytes} of each group of members (from `index_rows` of the same file), in group order.

    Only the named members are read. A seekable file is read group by group (one group in memory); a stream
    is read once, front to back, holding a group's members until the group is complete. A member that cannot be
    read (marked `truncated`, or its data turns out cut off or corrupt) is missing from its group's dict."""
    if not groups:
        return
    with _open_tar(path) as (tar, seekable):
        if seekable:
            for group in groups:
                read = {m.field: None if m.truncated else _read(tar, m.info()) for m in group}
                yield {field: data for field, data in read.items() if data is not None}
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
            data = None if member.truncated else _read(tar, info)
            if data is not None:
                filled.setdefault(g, {})[member.field] = data
            missing[g] -= 1
            while done < len(groups) and not missing[done]:
                yield filled.pop(done, {})
                done += 1
        while done < len(groups):  # members the index named but the stream no longer has
            yield filled.pop(done, {})
            done += 1


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes | None:
    """The member's bytes, or None where the file cannot give them (cut off, a corrupt compressed stream)."""
    try:
        data = tar.extractfile(info)
        return data.read() if data is not None else b""
    except _BROKEN:
        return None


def iter_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file, in tar order."""
    with fsspec.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*", **_READ_OPTIONS) as tar:
        for member in _regular_files(tar):
            content = _read(tar, member)
            if content is None:  # the file ends inside this member (or its compressed data is corrupt)
                return
            yield member.name, content


def _scanned_rows(path: str) -> list[TarRow]:
    """`scan_tar`'s rows, with a logged warning for each damaged range (for commands that read whole tars)."""
    scan = scan_tar(path)
    for damage in scan.damage:
        log.warning("%s: %s", path, damage.describe())
    return scan.rows


def iter_sample_members(path: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(sample key, [(member name, bytes), ...]) per row of `index_rows` (members of a key grouped wherever
    they are in the tar; a duplicate member is its own group), one sample in memory at a time. A member that
    cannot be read gives empty bytes."""
    rows = _scanned_rows(path)
    for row, fields in zip(rows, read_members(path, [r.members for r in rows]), strict=True):
        yield row.key, [(m.name, fields.get(m.field, b"")) for m in row.members]


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(sample key, {field: bytes}) per row of `index_rows`, one sample at a time (unreadable members left out)."""
    rows = _scanned_rows(path)
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
