"""Unpacking tar, tar.gz and zip bodies into a SnapshotBuilder, enforcing limits while streaming."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
import zlib
from typing import Any, Literal

from infantry.snapshot import Limits, SnapshotBuilder, printable

ArchiveKind = Literal["tar", "tar.gz", "zip"]
_CHUNK = 1 << 16


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


def unpack(kind: ArchiveKind, body: bytes, builder: SnapshotBuilder) -> None:
    """Add every regular file in the archive to ``builder``; refuse links, devices and bad data."""
    try:
        if kind == "zip":
            _unpack_zip(body, builder)
        else:
            _unpack_tar(kind, body, builder)
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


def _unpack_tar(kind: ArchiveKind, body: bytes, builder: SnapshotBuilder) -> None:
    raw: io.BufferedIOBase | gzip.GzipFile = io.BytesIO(body)
    if kind == "tar.gz":
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    members = 0
    stream = io.BufferedReader(_CappedReader(raw, inflate_cap(builder.limits)))
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            members += 1
            if members > member_cap(builder.limits):
                raise builder.reject(f"more than {member_cap(builder.limits)} archive members")
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
            data = handle.read()
            if len(data) != member.size:
                raise builder.reject(f"archive member {printable(name)} is truncated")
            builder.add(name, data, executable=bool(member.mode & 0o100))


def _unpack_zip(body: bytes, builder: SnapshotBuilder) -> None:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        infos = archive.infolist()
        if len(infos) > member_cap(builder.limits):
            raise builder.reject(f"more than {member_cap(builder.limits)} archive members")
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
            data = _read_capped(archive, info, builder.remaining())
            builder.add(name, data, executable=bool((info.external_attr >> 16) & 0o100))


def _read_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """Inflate at most ``cap`` bytes, so a member that lies about its size cannot blow up memory."""
    chunks: list[bytes] = []
    size = 0
    with archive.open(info) as handle:
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise zipfile.BadZipFile(f"member {info.filename!r} inflates past its declared size or the limits")
            chunks.append(chunk)
    return b"".join(chunks)
