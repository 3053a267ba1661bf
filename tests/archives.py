"""Build archives for the tests, good and hostile: small ones in memory, large ones streamed to a file."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def tar_member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    info.mode = mode
    return info


def make_tar(members: Iterable[tuple[tarfile.TarInfo, bytes]], gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def files_tar(files: dict[str, bytes], gz: bool = True) -> bytes:
    return make_tar(((tar_member(name, data), data) for name, data in files.items()), gz=gz)


def make_zip(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return buf.getvalue()


# Hostile archives are written a header at a time, straight to a file, so a test never holds them.

MIB = 1 << 20


def tar_header(name: str, kind: bytes, size: int) -> bytes:
    """One 512-byte ustar header (GNU and pax header types included)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def tar_padding(size: int) -> bytes:
    """The zeros that fill a member's data out to a whole block."""
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def pax_record(key: str, value: bytes) -> bytes:
    """One pax extended header record: ``LEN key=value\\n``, LEN counting itself."""
    body = b" " + key.encode() + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return str(length).encode() + body


def write_tar_gz(path: Path, blocks: Iterable[bytes]) -> None:
    """A tar.gz of ``blocks`` (headers and data), ended by the two zero blocks of a tar."""
    with gzip.open(path, "wb", compresslevel=1) as out:
        for block in blocks:
            out.write(block)
        out.write(b"\0" * 2 * tarfile.BLOCKSIZE)


def filler(size: int, byte: bytes = b"a") -> Iterator[bytes]:
    """``size`` bytes of ``byte``, a MiB at a time."""
    chunk = byte * MIB
    while size > 0:
        yield chunk[: min(size, MIB)]
        size -= MIB


_CENTRAL = struct.Struct("<4s6H3L5H2L")
_END = struct.Struct("<4s4H2LH")
_END64 = struct.Struct("<4sQ2H2L4Q")
_END64_LOCATOR = struct.Struct("<4sLQL")


def write_zip_directory(path: Path, names: Iterable[bytes], declared: int | None = None) -> None:
    """A zip that is only a central directory: one entry per name (each pointing at offset 0, where no
    member is), and zip64 end records declaring ``declared`` entries (the real count if None)."""
    count = 0
    with path.open("wb") as out:
        for name in names:
            flags = 0 if name.isascii() else 0x800  # names in UTF-8
            out.write(_CENTRAL.pack(b"PK\x01\x02", 20, 20, flags, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0))
            out.write(name)
            count += 1
        size = out.tell()
        entries = count if declared is None else declared
        out.write(_END64.pack(b"PK\x06\x06", _END64.size - 12, 45, 45, 0, 0, entries, entries, size, 0))
        out.write(_END64_LOCATOR.pack(b"PK\x06\x07", 0, size, 1))
        out.write(_END.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
