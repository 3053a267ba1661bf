"""Regenerate the binary inputs of the bad-input corpus: ``python tests/corpus/build.py``.

The files in data/ are committed; this script documents exactly how each was made.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

DATA = Path(__file__).parent / "data"


def member(
    name: str | bytes, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name if isinstance(name, str) else name.decode("utf-8", "surrogateescape"))
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    info.mode = 0o644
    info.mtime = 0
    return info, data


def tar(members: list[tuple[tarfile.TarInfo, bytes]], gz: bool = True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(
        fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as out:
        for info, data in members:
            out.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return gzip.compress(raw.getvalue(), mtime=0) if gz else raw.getvalue()


def zip_of(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return buf.getvalue()


def gzip_bomb(size: int) -> bytes:
    """A tar.gz whose one member declares and holds ``size`` zero bytes: tiny on the wire."""
    info, _ = member("bomb.bin")
    info.size = size
    body = io.BytesIO()
    with gzip.GzipFile(fileobj=body, mode="wb", compresslevel=9, mtime=0) as out:
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        chunk = b"\0" * (1 << 20)
        for _ in range(size // len(chunk)):
            out.write(chunk)
    return body.getvalue()


def zip_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        info = zipfile.ZipInfo("bomb.bin", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as out:
            chunk = b"\0" * (1 << 20)
            for _ in range(size // len(chunk)):
                out.write(chunk)
    return buf.getvalue()


def noise(size: int) -> bytes:
    """Incompressible but reproducible bytes."""
    out = bytearray()
    block = b"infantry"
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def build() -> dict[str, bytes]:
    good = tar([member("app.yaml", b"ok: true\n")])
    big = b"x" * 4096
    return {
        "tar-dotdot.tar.gz": tar([member("../escape.txt", b"owned")]),
        "tar-nested-dotdot.tar.gz": tar([member("ok/../../escape.txt", b"owned")]),
        "tar-absolute.tar.gz": tar([member("/tmp/escape.txt", b"owned")]),
        "tar-reserved-data.tar.gz": tar([member("..data/app.yaml", b"x")]),
        "tar-reserved-snapshot.tar.gz": tar([member("conf/..2026_01_01_00_00_00.1/x", b"x")]),
        "tar-long-name.tar.gz": tar([member("n" * 300, b"x")]),
        "tar-control-char.tar.gz": tar([member("line\nbreak.yaml", b"x")]),
        "tar-non-utf8.tar": tar([member(b"caf\xe9.yaml", b"x")], gz=False),
        "tar-symlink.tar.gz": tar([member("link", kind=tarfile.SYMTYPE, link="/etc/passwd")]),
        "tar-hardlink.tar.gz": tar([member("hard", kind=tarfile.LNKTYPE, link="/etc/passwd")]),
        "tar-chardev.tar.gz": tar([member("tty", kind=tarfile.CHRTYPE)]),
        "tar-blockdev.tar.gz": tar([member("sda", kind=tarfile.BLKTYPE)]),
        "tar-fifo.tar": tar([member("fifo", kind=tarfile.FIFOTYPE)], gz=False),
        "tar-oversize-member.tar.gz": tar([member("big.bin", big)]),
        "tar-total-over-limit.tar.gz": tar([member(f"f{i}", b"y" * 1500) for i in range(8)]),
        "tar-too-many-files.tar.gz": tar([member(f"f{i:03d}", b"") for i in range(200)]),
        "tar-truncated.tar.gz": tar([member("a.txt", noise(20000))])[:9000],
        "tar-corrupt.tar.gz": good[:20] + bytes(b ^ 0xFF for b in good[20:60]) + good[60:],
        "tar-gzip-bomb.tar.gz": gzip_bomb(64 << 20),
        "tar-empty.tar.gz": tar([]),
        "tar-file-and-dir.tar.gz": tar([member("a", b"1"), member("a/b", b"2")]),
        "zip-slip.zip": zip_of({"../../evil.sh": b"owned"}),
        "zip-absolute.zip": zip_of({"/etc/cron.d/evil": b"owned"}),
        "zip-symlink.zip": zip_of({}, symlinks={"link": "/etc/passwd"}),
        "zip-bomb.zip": zip_bomb(64 << 20),
        "zip-truncated.zip": zip_of({"a.yaml": b"a" * 5000})[:100],
        "html-page.tar.gz": b"<html><body><h1>502 Bad Gateway</h1></body></html>\n",
        "oversize-document.yaml": b"key: " + b"v" * 5000 + b"\n",
    }


if __name__ == "__main__":
    DATA.mkdir(exist_ok=True)
    for name, body in build().items():
        (DATA / name).write_bytes(body)
    print(f"wrote {len(build())} files to {DATA}")
