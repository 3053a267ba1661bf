"""Unpacking tar, tar.gz and zip bodies into a SnapshotBuilder, enforcing limits while streaming.

The body is read from a file (the spool) and each member is streamed into the builder, so neither the
archive nor its members are ever held in memory whole.

A tar is read as a stream, one member at a time: a member is forgotten once it is unpacked, and the
headers that tarfile reads whole (pax extended headers, GNU long names and links) are refused, unread,
past a small size, so memory does not grow with the number of members or the size of a header.

A zip cannot be streamed: zipfile reads its whole central directory, and makes an object for each
entry. So the directory is first walked here, one fixed-size entry header at a time, and the zip is
refused before zipfile sees it if it holds more entries than the limits allow or would take more memory
to parse than ``ZIP_DIRECTORY_BUDGET``.
"""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import zipfile
import zlib
from typing import Any, BinaryIO, NoReturn

from infantry.archive_names import ArchiveKind, inflate_cap, member_cap
from infantry.snapshot import FileEntry, SnapshotBuilder, printable
from infantry.spool import Blob


def _member_name(name: str) -> str | None:
    """Strip the ``./`` that ``tar -C dir .`` puts in front of names; None for the root entry."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return None if name in ("", ".") else name


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


HEADER_CAP = 64 * 1024
"""The most bytes a pax extended header or a GNU long name or link may hold. A path is at most 4096
bytes, and a pax header holds little else infantry reads; tarfile reads such headers whole."""

MAX_HEADER_CHAIN = 8
"""The most extended headers that may come before one member (tarfile reads them recursively)."""

_EXTENDED = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
)


class _Tar(tarfile.TarFile):
    """A TarFile that reads its headers with bounded memory, and forgets members once read.

    tarfile appends every member it reads to ``members``, even reading a stream; ``next`` empties it.
    """

    members: list[tarfile.TarInfo]  # undocumented in tarfile, but what it keeps every member in
    chain = 0  # extended headers read since the last member header
    global_bytes = 0  # bytes of pax global headers read so far: they accumulate in ``pax_headers``

    def next(self) -> tarfile.TarInfo | None:
        member = super().next()
        self.members.clear()
        return member


class _Header(tarfile.TarInfo):
    """A tar header that refuses, before reading them, extended headers too large to hold, and sparse files."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile's source names this the method a subclass overrides to handle header types. It runs
        # before the header's data is read, and again for each header of a chain.
        assert isinstance(tar, _Tar)
        if self.type in _EXTENDED:
            tar.chain += 1
            if self.size > HEADER_CAP:
                raise tarfile.HeaderError(
                    f"an extended header (pax, or a GNU long name) of {self.size} bytes; at most {HEADER_CAP} are read"
                )
            if tar.chain > MAX_HEADER_CHAIN:
                raise tarfile.HeaderError(f"more than {MAX_HEADER_CHAIN} extended headers before one member")
            if self.type == tarfile.XGLTYPE:
                tar.global_bytes += self.size
                if tar.global_bytes > HEADER_CAP:
                    raise tarfile.HeaderError(f"pax global headers of more than {HEADER_CAP} bytes in all")
        else:
            tar.chain = 0
            if self.type == tarfile.GNUTYPE_SPARSE:
                self._refuse_sparse()
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return member

    def _refuse_sparse(self, member: tarfile.TarInfo | None = None, *_: object) -> NoReturn:
        # A sparse map is read whole, and its length is the archive's to choose.
        name = printable((member or self).name)
        raise tarfile.HeaderError(f"archive member {name} is a sparse file; only regular files are accepted")

    # The pax forms of a sparse file (GNU 0.0, 0.1 and 1.0) name the member that follows: refused before
    # their map is read.
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def _unpack_tar(kind: ArchiveKind, body: BinaryIO, builder: SnapshotBuilder) -> None:
    raw: Any = body
    if kind == "tar.gz":
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    members = 0
    stream = io.BufferedReader(_CappedReader(raw, inflate_cap(builder.limits)))
    with _Tar.open(fileobj=stream, mode="r|", tarinfo=_Header) as tar:
        while (member := tar.next()) is not None:
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
_ENTRY = struct.Struct("<4s6H3L5H2L")  # a central directory entry's fixed part; its name and fields follow

ZIP_DIRECTORY_BUDGET = 24 * 1024 * 1024
"""The most memory zipfile may need to parse a zip's central directory. zipfile reads the directory
whole and makes an object for each entry, on top of the set a `watch` already holds while it reads the
next version: 40,000 entries with short names fit, and `watch` stays under the 128Mi limit `inject`
sets. A larger set streams, as a tar."""

_ZIPINFO_BYTES = 560
"""What zipfile holds for one entry besides its name and fields: a ZipInfo, its date tuple and numbers,
and its place in zipfile's list and dict (measured on CPython 3.11: about 500 bytes)."""

_TAIL = 1 << 17
"""A read zipfile makes that is never a central directory: an end record and its comment, or a member's
local header."""


def _find_directory(body: BinaryIO) -> tuple[int, int, int]:
    """Where a zip's central directory starts, how many bytes of it zipfile will read, and how many
    entries the end records declare.

    Found from the end records exactly as zipfile finds it (zip64 too), reading only the archive's tail.
    """
    size = body.seek(0, io.SEEK_END)
    tail_start = max(0, size - (_END.size + 0xFFFF))  # the record, and a comment of at most 64 KiB
    body.seek(tail_start)
    tail = body.read()
    # (1) The record is last when there is no comment; otherwise it is the last signature in the tail.
    at = len(tail) - _END.size
    if not (at >= 0 and tail[at : at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _END.size > len(tail):
            raise zipfile.BadZipFile("no end of central directory record")
    end = tail_start + at
    fields = _END.unpack_from(tail, at)
    declared, cd_size = fields[4], fields[5]  # (zipfile ignores the offset: the directory ends at the record)
    # (2) A zip64 locator just before it, and a zip64 record just before that, override its numbers.
    framing = 0
    if end >= _END64_LOCATOR.size:
        body.seek(end - _END64_LOCATOR.size)
        locator = body.read(_END64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            _, disk, _, disks = _END64_LOCATOR.unpack(locator)
            if disk != 0 or disks > 1:
                raise zipfile.BadZipFile("zip files that span several disks are not supported")
            record_at = end - _END64_LOCATOR.size - _END64.size
            if record_at >= 0:
                body.seek(record_at)
                record = body.read(_END64.size)
                if record[:4] == b"PK\x06\x06":
                    record_fields = _END64.unpack(record)
                    declared, cd_size = record_fields[7], record_fields[8]
                    framing = _END64.size + _END64_LOCATOR.size
    # (3) Bytes before the archive (a self-extractor's stub) shift every offset alike.
    start = end - cd_size - framing
    if start < 0:
        raise zipfile.BadZipFile("bad offset for central directory")
    return start, min(cd_size, size - start), declared


def _check_directory(body: BinaryIO, builder: SnapshotBuilder) -> int:
    """Walk a zip's central directory one entry header at a time, refusing it if zipfile would hold more
    entries than the limits allow or need more than ZIP_DIRECTORY_BUDGET to parse it; its size in bytes.

    Only the fixed part and the name of one entry are held at a time. Past the budget the walk goes on
    counting, up to the member cap, to name the limit that matters.
    """
    start, size, declared = _find_directory(body)
    cap = member_cap(builder.limits)
    if declared > cap:
        raise _too_many(builder)
    memory = size  # zipfile reads the whole directory at once
    count = 0
    done = 0
    body.seek(start)
    while done < size:
        fixed = body.read(_ENTRY.size) if done + _ENTRY.size <= size else b""
        if len(fixed) != _ENTRY.size:
            raise zipfile.BadZipFile("truncated central directory")
        fields = _ENTRY.unpack(fixed)
        if fields[0] != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad magic number for central directory")
        name_size, extra_size, comment_size = fields[10], fields[11], fields[12]
        name = body.read(min(name_size, size - done - _ENTRY.size))
        body.seek(extra_size + comment_size, io.SEEK_CUR)
        count += 1
        if count > cap:
            raise _too_many(builder)
        # The name is decoded to a str: one byte a character if it is ASCII, up to four if it is not.
        memory += _ZIPINFO_BYTES + (1 if name.isascii() else 4) * len(name) + extra_size + comment_size
        done += _ENTRY.size + name_size + extra_size + comment_size
    if memory > ZIP_DIRECTORY_BUDGET:
        raise builder.reject(
            f"the zip's central directory ({count} entries, {size} bytes) would take more than "
            f"{ZIP_DIRECTORY_BUDGET >> 20} MiB of memory to read; "
            "a tar or tar.gz archive is read as a stream and has no such limit"
        )
    return size


class _ReadCap:
    """A zip body for zipfile, refusing any one read of more than ``cap`` bytes.

    zipfile reads its central directory in one read: this holds it to the directory walked before.
    """

    def __init__(self, inner: BinaryIO, cap: int) -> None:
        self._inner = inner
        self._cap = cap

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            here = self._inner.tell()
            n = self._inner.seek(0, io.SEEK_END) - here
            self._inner.seek(here)
        if n > self._cap:
            raise zipfile.BadZipFile("zipfile read more of the central directory than was checked")
        return self._inner.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def seekable(self) -> bool:
        return True


def _unpack_zip(body: BinaryIO, builder: SnapshotBuilder) -> None:
    directory_size = _check_directory(body, builder)
    cap = member_cap(builder.limits)
    body.seek(0)
    with zipfile.ZipFile(_ReadCap(body, max(directory_size, _TAIL))) as archive:
        infos = archive.infolist()
        if len(infos) > cap:
            raise _too_many(builder)
        # Each entry is let go once unpacked, so the set being built reuses the memory the entries took.
        archive.filelist, archive.NameToInfo = [], {}
        infos.reverse()
        while infos:
            info = infos.pop()
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
