"""Never silently stale: real `infantry watch` processes against a full disk, a read-only destination,
a destination edited or emptied behind infantry's back, and a reload endpoint that keeps failing.

Each case shows the same three things: while the cause lasts, the destination keeps a whole set and
/healthz turns 503 (with the reason) once --stale-after has passed; once the cause is gone, the
destination converges to the store by itself, without the store changing again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import IN_CI, ReloadEndpoint, Watch, holds_for, read_as_app, wait_until

STALE = "2"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of the test's own, so it can be filled and made read-only."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("these tests mount a tmpfs, which needs root (CI runs as root)")
        pytest.skip("needs root to mount a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def store_with(tmp_path: Path, **files: str) -> Path:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    for name, content in files.items():
        (store / name).write_text(content)
    return store


def start(tmp_path: Path, watches: list[Watch], store: Path, dest: Path, *extra: str) -> Watch:
    watch = Watch(
        tmp_path,
        ["--source", store.as_uri(), "--dest", str(dest), "--interval", "0.2", "--stale-after", STALE, *extra],
    )
    watches.append(watch)
    watch.wait_ready(timeout=20)
    return watch


def healthz(watch: Watch) -> tuple[int, str]:
    return watch.get("/healthz")


def fill(mount: Path) -> Path:
    """Fill the filesystem to the last byte with a ballast file; return it."""
    ballast = mount / "ballast"
    with open(ballast, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return ballast


def test_a_full_disk_fails_health_and_converges_once_space_is_freed(
    tmp_path: Path, watches: list[Watch], small_fs: Path
) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
    dest = small_fs / "configs"
    watch = start(tmp_path, watches, store, dest)
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}
    ballast = fill(small_fs)
    (store / "app.yaml").write_text("v: 2, written while the disk is full\n" + "x" * 8192)
    wait_until("/healthz to report the full disk", lambda: healthz(watch)[0] == 503, timeout=20)
    _, body = healthz(watch)
    assert "has not matched the store" in body and "No space left" in body, body
    assert watch.get("/readyz")[0] == 503
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}  # the old set, whole
    ballast.unlink()
    # Nothing changes in the store: the retry alone must bring the destination in step.
    wanted = {"app.yaml": "v: 2, written while the disk is full\n" + "x" * 8192}
    wait_until("the destination to converge", lambda: read_as_app(dest) == wanted, timeout=20)
    wait_until("/healthz to recover", lambda: healthz(watch)[0] == 200, timeout=20)
    wait_until("/readyz to recover", lambda: watch.get("/readyz")[0] == 200, timeout=20)
    assert watch.metric("infantry_publishes_total", result="error") >= 1
    code, _ = watch.stop(timeout=20)
    assert code == 0


def test_a_read_only_destination_fails_health_and_converges_once_writable(
    tmp_path: Path, watches: list[Watch], small_fs: Path
) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
    dest = small_fs / "configs"
    watch = start(tmp_path, watches, store, dest)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    (store / "app.yaml").write_text("v: 2\n")
    wait_until("/healthz to report it", lambda: healthz(watch)[0] == 503, timeout=20)
    assert "Read-only file system" in healthz(watch)[1]
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}
    assert watch.proc.poll() is None
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    wait_until("the destination to converge", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"}, timeout=20)
    wait_until("/healthz to recover", lambda: healthz(watch)[0] == 200, timeout=20)


def test_a_file_edited_in_the_live_snapshot_is_restored_and_never_carried_forward(
    tmp_path: Path, watches: list[Watch], reload_endpoint: ReloadEndpoint
) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n", "keep.yaml": "same\n"})
    dest = tmp_path / "D"
    watch = start(tmp_path, watches, store, dest, "--reload-url", reload_endpoint.url)
    live = dest / os.readlink(dest / "..data")
    # Edited in place, same size, so only the content tells (an inode shared by hard links changes too).
    with open(live / "keep.yaml", "r+") as handle:
        handle.write("SAME\n")
    wait_until(
        "the edit to be repaired",
        lambda: read_as_app(dest) == {"app.yaml": "v: 1\n", "keep.yaml": "same\n"},
        timeout=20,
    )
    assert watch.metric("infantry_repairs_total") == 1
    wait_until("the app told of the repair", lambda: len(reload_endpoint.calls) == 1, timeout=20)
    # The next publish must not hard-link the edited file from the old snapshot.
    (store / "app.yaml").write_text("v: 2\n")
    wait_until("v2", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n", "keep.yaml": "same\n"}, timeout=20)
    wait_until("/readyz", lambda: watch.get("/readyz")[0] == 200, timeout=20)
    assert healthz(watch)[0] == 200
    # infantry's own links and removals of old snapshots are not mistaken for edits: no repair follows.
    assert holds_for(lambda: watch.metric("infantry_repairs_total") == 1, 1.5)
    # An edit that puts the size and the mtime back is still seen (its ctime cannot be put back).
    live = dest / os.readlink(dest / "..data")
    before = (live / "keep.yaml").stat()
    # Wait until the copy is too old to be "racy" (a fresh file's content is compared on every check),
    # and a few resyncs have seen it at that age, so only its stat can give the edit away.
    wait_until("the copy to age", lambda: time.time_ns() - before.st_mtime_ns > 4_000_000_000)
    assert holds_for(lambda: watch.metric("infantry_repairs_total") == 1, 1.0)
    with open(live / "keep.yaml", "r+") as handle:
        handle.write("SAME\n")
    os.utime(live / "keep.yaml", ns=(before.st_atime_ns, before.st_mtime_ns))
    wait_until(
        "the disguised edit to be repaired",
        lambda: read_as_app(dest) == {"app.yaml": "v: 2\n", "keep.yaml": "same\n"},
        timeout=20,
    )
    assert watch.metric("infantry_repairs_total") == 2


def test_an_emptied_destination_is_restored(tmp_path: Path, watches: list[Watch]) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
    (store / "conf.d").mkdir()
    (store / "conf.d" / "a.conf").write_text("a\n")
    dest = tmp_path / "D"
    watch = start(tmp_path, watches, store, dest)
    wanted = {"app.yaml": "v: 1\n", "conf.d/a.conf": "a\n"}
    assert read_as_app(dest) == wanted
    # What `rm -rf /configs/*` does (the hidden entries stay) ...
    for name in os.listdir(dest):
        if not name.startswith(".."):
            os.unlink(dest / name)
    wait_until("the links to be restored", lambda: read_as_app(dest) == wanted, timeout=20)
    # ... and what removing everything does.
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    wait_until("the whole set to be restored", lambda: dest.exists() and read_as_app(dest) == wanted, timeout=20)
    assert watch.metric("infantry_repairs_total") == 2
    wait_until("/readyz", lambda: watch.get("/readyz")[0] == 200, timeout=20)


def test_a_reload_that_keeps_failing_is_retried_and_fails_health(tmp_path: Path, watches: list[Watch]) -> None:
    endpoint = ReloadEndpoint(status=500)
    try:
        store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
        dest = tmp_path / "D"
        watch = start(tmp_path, watches, store, dest, "--reload-url", endpoint.url, "--reload-timeout", "0.5")
        (store / "app.yaml").write_text("v: 2\n")
        wait_until("the new set on disk", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"}, timeout=20)
        wait_until("/healthz to report the failing reload", lambda: healthz(watch)[0] == 503, timeout=20)
        assert "reload" in healthz(watch)[1]
        assert watch.get("/readyz")[0] == 503
        calls = len(endpoint.calls)
        wait_until("more attempts, on later reconciles", lambda: len(endpoint.calls) > calls + 2, timeout=20)
        endpoint.status = 200
        wait_until("/healthz to recover", lambda: healthz(watch)[0] == 200, timeout=20)
        wait_until("/readyz to recover", lambda: watch.get("/readyz")[0] == 200, timeout=20)
        assert endpoint.calls[-1][2] != ""  # the call that worked named the version
        assert watch.metric("infantry_reloads_total", method="http", result="ok") == 1
        log = watch.log()
        # Each state change is logged once, not once per retry.
        assert log.count("matches the store again") == 1, log
    finally:
        endpoint.stop()
