"""Unpacking tar, tar.gz and zip bodies into a SnapshotBuilder, enforcing limits while streaming.

The body is read from a file (the spool) and each member is streamed into the builder, so neither the
archive nor its members are ever held in memory whole. A zip's central directory is counted from its
end record before it is parsed, so a directory of millions of entries is refused unread.
"""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import zipfile
import zlib
from typing import Any, BinaryIO, Literal

from infantry.snapshot import FileEntry, Limits, SnapshotBuilder, printable
from infantry.spool import Blob

ArchiveKind = Literal["tar", "tar.gz", "zip"]


def archive_kind(name: str) -> ArchiveKind | None:
    """The archive kind a file name says, or None for a plain document."""
    lowered = name.lower()
    if lowered.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lowered.endswith(".tar"):
        return "tar"
    if lowered.endswith(".zip"):
        return "zip"
    return None


def _member_name(name: str) -> str | None:
    """Strip the ``./`` that ``tar -C dir .`` puts in front of names; None for the root entry."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return None if name in ("", ".") else name


def member_cap(limits: Limits) -> int:
    """The most members an archive may hold, directories included."""
    return 2 * limits.max_files


def inflate_cap(limits: Limits) -> int:
    """The most bytes an archive may inflate to: the content limit plus per-member header room."""
    return limits.max_total_size + 1024 * member_cap(limits)


class _CappedReader(io.RawIOBase):
    """A reader that fails once more than ``cap`` bytes have come through it: a stop for bombs."""

    def __init__(self, inner: io.BufferedIOBase | gzip.GzipFile, cap: int) -> None:
        self._inner = inner
        self._left = cap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(min(len(buffer), self._left + 1))
        if len(data) > self._left:
            raise tarfile.ReadError("archive inflates past the size limits")
        self._left -= len(data)
        buffer[: len(data)] = data
        return len(data)


def unpack(kind: ArchiveKind, body: FileEntry, builder: SnapshotBuilder) -> None:
    """Add every regular file in the archive to ``builder``; refuse links, devices and bad data."""
    content = body.content
    try:
        with content.open() if isinstance(content, Blob) else io.BytesIO(body.data) as stream:
            if kind == "zip":
                _unpack_zip(stream, builder)
            else:
                _unpack_tar(kind, stream, builder)
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        gzip.BadGzipFile,
        NotImplementedError,
        RuntimeError,
        ValueError,  # zipfile and tarfile raise it for some malformed headers (and UnicodeDecodeError is one)
        OverflowError,
    ) as exc:
        raise builder.reject(f"not a valid {kind} archive: {exc or type(exc).__name__}") from exc
    except OSError as exc:
        raise builder.reject(f"not a valid {kind} archive: {exc}") from exc


def _unpack_tar(kind: ArchiveKind, body: BinaryIO, builder: SnapshotBuilder) -> None:
    raw: Any = body
    if kind == "tar.gz":
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    members = 0
    stream = io.BufferedReader(_CappedReader(raw, inflate_cap(builder.limits)))
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            members += 1
            if members > member_cap(builder.limits):
                raise _too_many(builder)
            name = _member_name(member.name)
            if name is None:
                continue
            if member.isdir():
                builder.check_dir(name)
                continue
            if not member.isreg():
                kinds = {
                    tarfile.SYMTYPE: "symlink",
                    tarfile.LNKTYPE: "hard link",
                    tarfile.CHRTYPE: "device",
                    tarfile.BLKTYPE: "device",
                    tarfile.FIFOTYPE: "fifo",
                }
                what = kinds.get(member.type, "special")
                raise builder.reject(f"archive member {printable(name)} is a {what}; only regular files are accepted")
            builder.check_size(name, member.size)
            handle = tar.extractfile(member)
            if handle is None:
                raise builder.reject(f"archive member {printable(name)} has no data")
            entry = builder.add_stream(name, handle.read, executable=bool(member.mode & 0o100))
            if entry.size != member.size:
                raise builder.reject(f"archive member {printable(name)} is truncated")


def _too_many(builder: SnapshotBuilder) -> Exception:
    cap = member_cap(builder.limits)
    return builder.reject(f"more than {cap} archive members (twice max-files, {builder.limits.max_files})")


_END = struct.Struct("<4s4H2LH")  # the end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")


def _central_directory(body: BinaryIO) -> tuple[int, int] | None:
    """The entry count and byte size a zip's end records declare, read from its tail; None if not found."""
    size = body.seek(0, io.SEEK_END)
    tail_start = max(0, size - (_END.size + 0xFFFF))  # the record, and a comment of at most 64 KiB
    body.seek(tail_start)
    tail = body.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(tail):
        return None
    _, _, _, _, count, cd_size, _, _ = _END.unpack_from(tail, at)
    locator = at - _END64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        _, _, end64_offset, _ = _END64_LOCATOR.unpack_from(tail, locator)
        body.seek(end64_offset)
        record = body.read(_END64.size)
        if len(record) == _END64.size and record[:4] == b"PK\x06\x06":
            fields = _END64.unpack(record)
            count, cd_size = fields[6], fields[7]
    return count, cd_size


def _unpack_zip(body: BinaryIO, builder: SnapshotBuilder) -> None:
    declared = _central_directory(body)
    cap = member_cap(builder.limits)
    # A central directory entry is 46 bytes and a name; anything beyond this is not a set we accept.
    if declared is not None and (declared[0] > cap or declared[1] > cap * (46 + 1024)):
        raise _too_many(builder)
    body.seek(0)
    with zipfile.ZipFile(body) as archive:
        infos = archive.infolist()
        if len(infos) > cap:
            raise _too_many(builder)
        for info in infos:
            name = _member_name(info.filename)
            if name is None:
                continue
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if info.is_dir():
                builder.check_dir(name)
                continue
            if file_type not in (0, stat.S_IFREG):
                what = "symlink" if file_type == stat.S_IFLNK else "special file"
                raise builder.reject(f"archive member {printable(name)} is a {what}; only regular files are accepted")
            builder.check_size(name, info.file_size)
            with archive.open(info) as handle:
                # Streamed with the limits enforced as it inflates: a member lying about its size is caught.
                entry = builder.add_stream(name, handle.read, executable=bool((info.external_attr >> 16) & 0o100))
            if entry.size != info.file_size:
                raise builder.reject(f"archive member {printable(name)} is not the size its header says")
