"""Archives and encoded bodies that would take memory out of proportion to what they hold: each is
refused in one line with exit 5 (or, when legitimate, installed) by real infantry processes fetching
from real nginx, and the peak RSS (the kernel's high-water mark) stays under the pod's memory limit.

Hostile archives are written a header at a time, straight to nginx's directory, so they are small on
disk (a 100 MiB header compresses to a few hundred KiB) and never held by the test.
"""

from __future__ import annotations

import gzip
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.archives import (
    MIB,
    filler,
    pax_record,
    tar_header,
    tar_padding,
    write_tar_gz,
    write_zip_directory,
)
from tests.support import (
    Nginx,
    Watch,
    free_port,
    infantry,
    infantry_measured,
    log_lines,
    peak_rss_mib,
    read_as_app,
    wait_until,
)

POD_LIMIT_MIB = 128
REFUSAL_MIB = 80  # a refusal happens before anything large is held


class _DeflateNginx(Nginx):
    """nginx that also answers /deflate/NAME with NAME's bytes as they are, labelled Content-Encoding: deflate."""

    def _config(self) -> str:
        return (
            super()
            ._config()
            .replace(
                "        location /noetag/ {",
                "        location /deflate/ {\n            add_header Content-Encoding deflate;\n        }\n"
                "        location /noetag/ {",
            )
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_DeflateNginx]:
    nginx = _DeflateNginx(tmp_path_factory.mktemp("nginx"), free_port())
    (nginx.root / "gz").mkdir()
    (nginx.root / "deflate").mkdir()
    nginx.start()
    yield nginx
    nginx.stop()


def _refused(server: Nginx, tmp_path: Path, name: str, *expected: str) -> float:
    """Install ``name``: it must be refused in one line holding ``expected``; the peak RSS in MiB."""
    result, peak = infantry_measured(tmp_path, "install", "--source", server.url(name), "--dest", str(tmp_path / "D"))
    assert peak < REFUSAL_MIB, f"installing {name} peaked at {peak:.1f} MiB (exit {result.returncode})"
    assert result.returncode == 5, result.stderr[-2000:]
    lines = log_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "D" / "..data").exists()
    return peak


def _extended(kind: bytes, size: int) -> Iterator[bytes]:
    """A tar whose only file is preceded by an extended header of ``kind`` holding ``size`` bytes."""
    if kind == tarfile.XHDTYPE:
        record = b"%d comment=" % size  # one pax record of ``size`` bytes, its length first
        yield tar_header("././@PaxHeader", kind, size)
        yield record
        yield from filler(size - len(record) - 1)
        yield b"\n"
    else:
        yield tar_header("././@LongLink", kind, size)
        yield from filler(size)
    yield tar_padding(size)
    yield tar_header("app.yaml", tarfile.REGTYPE, 0)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME], ids=["pax", "gnu-longname"])
def test_a_huge_extended_header_is_refused_before_it_is_read(server: Nginx, tmp_path: Path, kind: bytes) -> None:
    # tarfile reads such a header whole: 100 MiB of it cost 400 MiB or more, and a pax one was accepted.
    name = f"header-{kind.decode()}.tar.gz"
    write_tar_gz(server.root / name, _extended(kind, 100 * MIB))
    _refused(server, tmp_path, name, "not a valid tar.gz archive", f"of {100 * MIB} bytes", "at most 65536")


def test_pax_global_headers_cannot_pile_up(server: Nginx, tmp_path: Path) -> None:
    # Global headers merge into one dict kept for the whole archive: 2,000 of 60 KiB, each under the
    # per-header cap, would hold 120 MB.
    def blocks() -> Iterator[bytes]:
        for i in range(2000):
            record = pax_record(f"infantry.test{i}", b"g" * 60_000)
            yield tar_header("pax_global_header", tarfile.XGLTYPE, len(record))
            yield record + tar_padding(len(record))
            yield tar_header(f"f{i}.yaml", tarfile.REGTYPE, 0)

    write_tar_gz(server.root / "globals.tar.gz", blocks())
    _refused(server, tmp_path, "globals.tar.gz", "pax global headers of more than 65536 bytes")


def test_a_sparse_map_is_refused_before_it_is_read(server: Nginx, tmp_path: Path) -> None:
    # A GNU sparse 1.0 file lists its map in its data, as many numbers as the archive says: 24 million
    # here, which tarfile holds as a list of 190 MB.
    pairs = 12_000_000
    sparse = pax_record("GNU.sparse.major", b"1") + pax_record("GNU.sparse.minor", b"0")
    head = b"%d\n" % pairs
    size = len(head) + 2 * 2 * pairs  # each number is "1\n"
    ones = b"1\n" * (MIB // 2)

    def blocks() -> Iterator[bytes]:
        yield tar_header("././@PaxHeader", tarfile.XHDTYPE, len(sparse))
        yield sparse + tar_padding(len(sparse))
        yield tar_header("big.bin", tarfile.REGTYPE, size)
        yield head
        for start in range(0, 4 * pairs, MIB):
            yield ones[: min(MIB, 4 * pairs - start)]
        yield tar_padding(size)

    write_tar_gz(server.root / "sparse.tar.gz", blocks())
    _refused(server, tmp_path, "sparse.tar.gz", "'big.bin' is a sparse file", "only regular files")


def test_a_tar_of_100000_files_and_100000_directories_installs_in_bounded_memory(server: Nginx, tmp_path: Path) -> None:
    # tarfile keeps every member it has read, even reading a stream: these cost 180 MiB.
    def blocks() -> Iterator[bytes]:
        for i in range(100_000):
            yield tar_header(f"d{i:06d}".ljust(150, "x") + "/" + "y" * 99, tarfile.DIRTYPE, 0)
        for i in range(100_000):
            yield tar_header(f"f{i:06d}".ljust(99, "z"), tarfile.REGTYPE, 10)
            yield b"%010d" % i + tar_padding(10)

    write_tar_gz(server.root / "many.tar.gz", blocks())
    dest = tmp_path / "D"
    result, peak = infantry_measured(tmp_path, "install", "--source", server.url("many.tar.gz"), "--dest", str(dest))
    assert result.returncode == 0, result.stderr[-2000:]
    assert peak < POD_LIMIT_MIB, f"install peaked at {peak:.1f} MiB"
    published = sorted(p.name for p in dest.iterdir() if not p.name.startswith(".."))
    assert len(published) == 100_000
    assert (dest / published[12_345]).read_bytes() == b"%010d" % 12_345


def test_a_zip_directory_too_large_to_parse_is_refused_unparsed(server: Nginx, tmp_path: Path) -> None:
    # 25,000 entries, well under max-files, with 1,000-byte names, one character of which is outside the BMP
    # (so zipfile keeps each name at four bytes a character): 26 MB on disk, 150 MB parsed.
    names = (("\U0001f5c2" + f"{i:09d}".ljust(996, "n")).encode() for i in range(25_000))
    write_zip_directory(server.root / "wide.zip", names)
    _refused(server, tmp_path, "wide.zip", "central directory", "MiB of memory", "tar.gz archive is read as a stream")


def test_a_zip_whose_end_record_understates_its_entries_is_counted_before_it_is_parsed(
    server: Nginx, tmp_path: Path
) -> None:
    # The zip64 end record declares one entry; the directory holds 250,000 (14 MB), past twice max-files.
    names = (b"%010d" % i for i in range(250_000))
    write_zip_directory(server.root / "liar.zip", names, declared=1)
    _refused(server, tmp_path, "liar.zip", "more than 200000 archive members", "max-files")


def test_a_zip_of_30000_files_installs_and_is_followed_through_a_change_under_the_pod_limit(
    server: Nginx, tmp_path: Path
) -> None:
    # The directory budget must not refuse a large zip set; and it comes on top of the set a watch holds.
    def write(version: bytes) -> None:
        with zipfile.ZipFile(server.root / "set.new", "w") as archive:
            for i in range(30_000):
                archive.writestr(f"f{i:06d}", version + b"%d" % i)
        (server.root / "set.new").rename(server.root / "set.zip")

    write(b"a")
    dest = tmp_path / "D"
    result, peak = infantry_measured(tmp_path, "install", "--source", server.url("set.zip"), "--dest", str(dest))
    assert result.returncode == 0, result.stderr[-2000:]
    assert peak < POD_LIMIT_MIB, f"install peaked at {peak:.1f} MiB"
    assert (dest / "f024321").read_bytes() == b"a24321"
    watch = Watch(tmp_path, ["--source", server.url("set.zip"), "--dest", str(dest), "--interval", "1"])
    try:
        watch.wait_ready(timeout=120)
        write(b"b")
        wait_until("the change", lambda: (dest / "f024321").read_bytes() == b"b24321", timeout=120)
        peak = peak_rss_mib(watch.proc.pid)
    finally:
        code, _ = watch.stop()
    assert code == 0
    assert peak < POD_LIMIT_MIB, f"watch peaked at {peak:.1f} MiB\n{watch.log()}"


def test_a_zip_of_100000_files_is_refused_with_a_hint_to_send_a_tar(server: Nginx, tmp_path: Path) -> None:
    write_zip_directory(server.root / "set.zip", (b"f%06d" % i for i in range(100_000)))
    _refused(server, tmp_path, "set.zip", "central directory", "tar.gz archive is read as a stream")


def test_gzip_of_several_members_is_decoded_and_garbage_after_it_refused(server: Nginx, tmp_path: Path) -> None:
    members = gzip.compress(b"a: 1\n") + gzip.compress(b"b: 2\n") + gzip.compress(b"")
    (server.root / "gz" / "app.yaml.gz").write_bytes(members)
    (server.root / "gz" / "bad.yaml.gz").write_bytes(members + b"\x1f\x8bnot gzip")
    dest = tmp_path / "D"
    result = infantry("install", "--source", server.url("gz/app.yaml"), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"app.yaml": "a: 1\nb: 2\n"}
    result = infantry("install", "--source", server.url("gz/bad.yaml"), "--dest", str(tmp_path / "E"))
    assert result.returncode == 5, result.stderr
    assert "not valid gzip data" in result.stderr and len(log_lines(result.stderr)) == 1, result.stderr


def test_deflate_is_decoded_with_or_without_its_zlib_wrapper(server: Nginx, tmp_path: Path) -> None:
    content = b"key: value\n" * 1000
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    (server.root / "deflate" / "raw.yaml").write_bytes(raw.compress(content) + raw.flush())
    (server.root / "deflate" / "wrapped.yaml").write_bytes(zlib.compress(content))
    for name in ("raw.yaml", "wrapped.yaml"):
        dest = tmp_path / name
        result = infantry("install", "--source", server.url(f"deflate/{name}"), "--dest", str(dest))
        assert result.returncode == 0, result.stderr
        assert (dest / name).read_bytes() == content
