"""Memory is bounded by construction: a large set, and every refusal for size, measured as the peak RSS
(the kernel's high-water mark) of real infantry processes against real nginx.

The bound is the memory limit `inject` gives the containers by default: the pod must never be
OOM-killed by a set the default limits accept, nor by a hostile store before it is refused.
"""

from __future__ import annotations

import os
import time
import zipfile
import zlib
from pathlib import Path

from tests.archives import files_tar
from tests.support import Nginx, Watch, free_port, infantry_measured, peak_rss_mib, wait_until

POD_LIMIT_MIB = 128
MIB = 1 << 20


def _hundred_mib(seed: bytes) -> dict[str, bytes]:
    """100 files of 1 MiB each, incompressible, different for each seed."""
    return {f"part-{i:03d}.bin": seed + os.urandom(MIB - len(seed)) for i in range(100)}


def _digests(dest: Path) -> dict[str, int]:
    """What an app reads through the destination's top-level names, as a checksum per file."""
    return {
        path.name: zlib.crc32(path.read_bytes()) for path in sorted(dest.glob("*")) if not path.name.startswith("..")
    }


def test_installing_a_100_mib_set_stays_under_the_pod_limit(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path / "nginx", free_port())
    files = _hundred_mib(b"v1")
    (nginx.root / "set.tar").write_bytes(files_tar(files, gz=False))
    nginx.start()
    try:
        dest = tmp_path / "configs"
        result, peak = infantry_measured(tmp_path, "install", "--source", nginx.url("set.tar"), "--dest", str(dest))
    finally:
        nginx.stop()
    assert result.returncode == 0, result.stderr
    assert peak < POD_LIMIT_MIB, f"install peaked at {peak:.1f} MiB"
    assert _digests(dest) == {name: zlib.crc32(data) for name, data in files.items()}
    assert not (dest / "..spool").exists()


def test_watch_through_a_change_of_a_100_mib_set_stays_under_the_pod_limit(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path / "nginx", free_port())
    (nginx.root / "set.tar").write_bytes(files_tar(_hundred_mib(b"v1"), gz=False))
    nginx.start()
    dest = tmp_path / "configs"
    watch = Watch(tmp_path, ["--source", nginx.url("set.tar"), "--dest", str(dest), "--interval", "1"])
    try:
        watch.wait_ready(timeout=60)
        changed = _hundred_mib(b"v2")
        staged = nginx.root / "set.tar.new"
        staged.write_bytes(files_tar(changed, gz=False))
        staged.rename(nginx.root / "set.tar")
        want = {name: zlib.crc32(data) for name, data in changed.items()}
        wait_until("the changed set to be published", lambda: _digests(dest) == want, timeout=60)
        watch.wait_ready(timeout=30)
        peak = peak_rss_mib(watch.proc.pid)
    finally:
        code, _ = watch.stop()
        nginx.stop()
    assert peak < POD_LIMIT_MIB, f"watch peaked at {peak:.1f} MiB\n{watch.log()}"
    assert code == 0
    assert not (dest / "..spool").exists()


def test_a_zip_with_too_many_directory_entries_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path / "nginx", free_port())
    with zipfile.ZipFile(nginx.root / "set.zip", "w") as archive:
        for i in range(250_000):  # past twice the default max-files; the end record declares it (zip64)
            archive.writestr(f"f{i}", b"")
    nginx.start()
    try:
        result, peak = infantry_measured(
            tmp_path, "install", "--source", nginx.url("set.zip"), "--dest", str(tmp_path / "configs")
        )
    finally:
        nginx.stop()
    assert result.returncode == 5, result.stderr
    assert "more than 200000 archive members" in result.stderr and "max-files" in result.stderr
    assert peak < POD_LIMIT_MIB, f"install peaked at {peak:.1f} MiB refusing the zip"


def test_a_gzip_bomb_is_refused_at_the_limit_not_inflated(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path / "nginx", free_port())
    (nginx.root / "gz").mkdir()
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    zeros = bytes(MIB)
    with (nginx.root / "gz" / "app.yaml.gz").open("wb") as bomb:
        for _ in range(1024):  # 1 GiB of zeros, about 1 MiB on the wire
            bomb.write(squeeze.compress(zeros))
        bomb.write(squeeze.flush())
    nginx.start()
    try:
        result, peak = infantry_measured(
            tmp_path, "install", "--source", nginx.url("gz/app.yaml"), "--dest", str(tmp_path / "configs")
        )
    finally:
        nginx.stop()
    assert result.returncode == 5, result.stderr
    assert "passes the limit of 8388608 bytes" in result.stderr
    assert peak < POD_LIMIT_MIB, f"install peaked at {peak:.1f} MiB refusing the bomb"


def _written(pid: int) -> int:
    """Bytes the process has passed to write(2) so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


def test_an_idle_file_source_does_not_copy_its_set_again_on_every_resync(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    files = {f"part-{i}.bin": os.urandom(MIB) for i in range(10)}
    created = time.time()
    for name, data in files.items():
        (store / name).write_bytes(data)
        os.utime(store / name, (1_700_000_000, 1_700_000_000))  # settled long ago
    dest = tmp_path / "configs"
    watch = Watch(tmp_path, ["--source", f"file://{store}", "--dest", str(dest), "--interval", "0.5"])
    try:
        watch.wait_ready(timeout=60)
        # A file is reused only once its ctime (which cannot be set back) is RACY_NS old when read.
        settled_at = created + 2.5
        wait_until("the files to settle", lambda: time.time() > settled_at, timeout=30)
        syncs = watch.metric("infantry_syncs_total", result="unchanged")
        wait_until(
            "a resync of settled files", lambda: watch.metric("infantry_syncs_total", result="unchanged") > syncs
        )
        before = _written(watch.proc.pid)
        syncs = watch.metric("infantry_syncs_total", result="unchanged")
        wait_until("three more resyncs", lambda: watch.metric("infantry_syncs_total", result="unchanged") >= syncs + 3)
        written = _written(watch.proc.pid) - before
        assert written < MIB, f"{written} bytes written over three resyncs of an unchanged 10 MiB set"
        # An edit that keeps the size and puts the mtime back is still seen (its ctime moved).
        edited = b"E" + files["part-3.bin"][1:]
        (store / "part-3.bin").write_bytes(edited)
        os.utime(store / "part-3.bin", (1_700_000_000, 1_700_000_000))
        wait_until("the edit published", lambda: (dest / "part-3.bin").read_bytes()[:1] == b"E", timeout=30)
    finally:
        code, _ = watch.stop()
        assert code == 0
