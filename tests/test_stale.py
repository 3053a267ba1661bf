"""Never silently stale: real `infantry watch` processes against a full disk, a read-only destination,
a destination edited or emptied behind infantry's back, and a reload endpoint that keeps failing.

Each case shows the same three things: while the cause lasts, the destination keeps a whole set and
/healthz turns 503 (with the reason) once --stale-after has passed; once the cause is gone, the
destination converges to the store by itself, without the store changing again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import IN_CI, Etcd, Nginx, ReloadEndpoint, Watch, holds_for, infantry, read_as_app, wait_until

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
    # Content this large is spooled inside the destination as it is read, before it is published:
    # whichever step meets the full disk first, health names it. A publish that fails also fails
    # /readyz; content that could not be read in yet is a source that has not answered, like a store
    # out of reach, and shows on /healthz once stale.
    assert "No space left" in body, body
    published = "..spool" not in body
    if published:
        assert "has not matched the store" in body, body
        assert watch.get("/readyz")[0] == 503
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}  # the old set, whole
    ballast.unlink()
    # Nothing changes in the store: the retry alone must bring the destination in step.
    wanted = {"app.yaml": "v: 2, written while the disk is full\n" + "x" * 8192}
    wait_until("the destination to converge", lambda: read_as_app(dest) == wanted, timeout=20)
    wait_until("/healthz to recover", lambda: healthz(watch)[0] == 200, timeout=20)
    wait_until("/readyz to recover", lambda: watch.get("/readyz")[0] == 200, timeout=20)
    if published:
        assert watch.metric("infantry_publishes_total", result="error") >= 1
    else:
        assert watch.metric("infantry_syncs_total", result="error") >= 1
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


@pytest.mark.parametrize("size", ["small", "spooled"])
def test_an_emptied_destination_is_restored(tmp_path: Path, watches: list[Watch], size: str) -> None:
    # A file over 256 bytes is held in DEST/..spool, which `rm -rf` empties too: the sources read it again.
    app = "v: 1\n" if size == "small" else "v: 1\n" + "# padding\n" * 500
    store = store_with(tmp_path, **{"app.yaml": app})
    (store / "conf.d").mkdir()
    (store / "conf.d" / "a.conf").write_text("a\n")
    dest = tmp_path / "D"
    watch = start(tmp_path, watches, store, dest)
    wanted = {"app.yaml": app, "conf.d/a.conf": "a\n"}
    assert read_as_app(dest) == wanted
    # What `rm -rf /configs/*` does (the hidden entries stay) ...
    for name in os.listdir(dest):
        if not name.startswith(".."):
            os.unlink(dest / name)
    wait_until("the links to be restored", lambda: read_as_app(dest) == wanted, timeout=20)
    # ... and what removing everything does.
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    wait_until("the whole set to be restored", lambda: dest.exists() and read_as_app(dest) == wanted, timeout=20)
    if size == "small":
        assert watch.metric("infantry_repairs_total") == 2
    else:  # the first try found the spooled copy gone, and the set was read again
        assert watch.metric("infantry_repairs_total") >= 2
        assert "reading every source again" in watch.log()
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


def hook_that_fails_while(flag: Path, record: Path) -> str:
    """An --exec hook that exits 1 while ``flag`` exists, and otherwise records the version it was told."""
    return f"sh -c 'test -e {flag} && exit 1; echo $INFANTRY_VERSION >> {record}'"


def test_a_reload_that_failed_before_a_restart_is_made_after_it(tmp_path: Path, watches: list[Watch]) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
    dest = tmp_path / "D"
    flag, record = tmp_path / "app-down", tmp_path / "told"
    flag.touch()
    hook = hook_that_fails_while(flag, record)
    watch = start(tmp_path, watches, store, dest, "--exec", hook)
    (store / "app.yaml").write_text("v: 2\n")
    wait_until("v2 on disk", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"})
    wait_until("the failed reload", lambda: watch.metric("infantry_reloads_total", method="exec", result="error") >= 1)
    assert watch.stop()[0] == 0  # as the kubelet would, once /healthz has failed for long enough
    flag.unlink()
    again = start(tmp_path, watches, store, dest, "--exec", hook)
    wait_until("the app to be told after the restart", lambda: record.exists() and record.read_text().strip() != "")
    assert len(record.read_text().split()) == 1
    wait_until("/readyz", lambda: again.get("/readyz")[0] == 200)
    # Told once: a further restart tells nobody.
    assert again.stop()[0] == 0
    third = start(tmp_path, watches, store, dest, "--exec", hook)
    assert holds_for(lambda: len(record.read_text().split()) == 1, 1.5)
    assert third.get("/readyz")[0] == 200


def test_a_destination_it_cannot_read_back_at_start_still_gets_the_app_told(
    tmp_path: Path, watches: list[Watch]
) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
    dest = tmp_path / "D"
    assert infantry("install", "--source", store.as_uri(), "--dest", str(dest)).returncode == 0
    os.chmod(dest / os.readlink(dest / "..data") / "app.yaml", 0o600)  # not a mode infantry writes
    (store / "app.yaml").write_text("v: 2\n")
    record = tmp_path / "told"
    start(tmp_path, watches, store, dest, "--exec", f"sh -c 'echo $INFANTRY_VERSION >> {record}'")
    wait_until("v2", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"})
    wait_until("the app told of it", lambda: record.exists() and record.read_text().strip() != "")


def test_a_check_that_writes_into_the_staged_set_is_refused_not_looped(tmp_path: Path, watches: list[Watch]) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
    dest = tmp_path / "D"
    record = tmp_path / "told"
    hook = f"sh -c 'echo $INFANTRY_VERSION >> {record}'"
    check = "sh -c 'touch \"$0/.validated\"'"  # the staged directory is appended as the last argument
    watch = start(tmp_path, watches, store, dest, "--exec", hook, "--check", "true")
    watch.stop()
    watch = start(tmp_path, watches, store, dest, "--exec", hook, "--check", check)
    (store / "app.yaml").write_text("v: 2\n")
    wait_until("the refusal, logged", lambda: "a check may only read it" in watch.log())
    assert watch.metric("infantry_publishes_total", result="rejected") >= 1
    assert holds_for(lambda: not record.exists() and read_as_app(dest) == {"app.yaml": "v: 1\n"}, 1.5)
    assert watch.metric("infantry_publishes_total", result="rejected") == 1  # refused once, not in a loop
    assert watch.get("/readyz")[0] == 503 and healthz(watch)[0] == 200


@pytest.mark.parametrize("kind", ["etcd", "file"])
def test_a_store_emptied_is_refused_and_not_ready_until_it_holds_files_again(
    kind: str, tmp_path: Path, watches: list[Watch], request: pytest.FixtureRequest
) -> None:
    """An empty store is refused (the last good set stays), and /readyz and /status say so for as long as
    it lasts: the destination no longer holds what the store does. /healthz follows --stale-after."""
    dest = tmp_path / "D"
    store = store_with(tmp_path)
    etcd: Etcd | None = request.getfixturevalue("etcd") if kind == "etcd" else None

    def write(content: str | None) -> None:
        if etcd is not None:
            etcd.put("/app/site.conf", content) if content is not None else etcd.delete("/app/site.conf")
        elif content is not None:
            (store / "site.conf").write_text(content)
        else:
            (store / "site.conf").unlink()

    write("v: 1\n")
    source = etcd.url() if etcd is not None else store.as_uri()
    watch = Watch(tmp_path, ["--source", source, "--dest", str(dest), "--interval", "0.2", "--stale-after", STALE])
    watches.append(watch)
    watch.wait_ready()
    write(None)
    wait_until("/readyz to report the refusal", lambda: watch.get("/readyz")[0] == 503)
    assert "holds no files" in watch.get("/readyz")[1]
    assert "holds no files" in (json.loads(watch.get("/status")[1])["refused"] or "")
    # It stays refused: an "unchanged" answer from the store does not count as a good one.
    assert holds_for(lambda: watch.get("/readyz")[0] == 503, 1.0)
    wait_until("/healthz to fail after --stale-after", lambda: healthz(watch)[0] == 503, timeout=20)
    assert read_as_app(dest) == {"site.conf": "v: 1\n"}  # the last good set stays
    write("v: 2\n")
    wait_until("the new set", lambda: read_as_app(dest) == {"site.conf": "v: 2\n"})
    wait_until("/readyz and /healthz to recover",
               lambda: watch.get("/readyz")[0] == 200 and healthz(watch)[0] == 200)  # fmt: skip


def test_a_directory_whose_mode_was_changed_is_repaired(tmp_path: Path, watches: list[Watch]) -> None:
    store = store_with(tmp_path)
    (store / "conf.d").mkdir()
    (store / "conf.d" / "a.conf").write_text("a\n")
    dest = tmp_path / "D"
    watch = start(tmp_path, watches, store, dest)
    os.chmod(dest / os.readlink(dest / "..data") / "conf.d", 0o700)
    wait_until("the repair", lambda: (dest / "conf.d").stat().st_mode & 0o777 == 0o755)
    assert watch.metric("infantry_repairs_total") == 1


def test_sources_that_clash_fail_health_until_the_clash_is_gone(tmp_path: Path, watches: list[Watch]) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a.conf").write_text("a\n")
    (second / "b.conf").write_text("b\n")
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        ["--source", first.as_uri(), "--source", second.as_uri(), "--dest", str(dest),
         "--interval", "0.2", "--stale-after", STALE],
    )  # fmt: skip
    watches.append(watch)
    watch.wait_ready()
    (second / "a.conf").write_text("a from the second source\n")
    wait_until("/healthz to report the clash", lambda: healthz(watch)[0] == 503)
    assert "both provide" in healthz(watch)[1]
    (first / "a.conf").write_text("a, changed\n")
    assert holds_for(lambda: read_as_app(dest) == {"a.conf": "a\n", "b.conf": "b\n"}, 1.0)  # held back
    (second / "a.conf").unlink()
    wait_until(
        "the change held back by the clash", lambda: read_as_app(dest) == {"a.conf": "a, changed\n", "b.conf": "b\n"}
    )
    wait_until("/healthz to recover", lambda: healthz(watch)[0] == 200)


def test_a_pid_file_that_is_a_fifo_blocks_nothing(tmp_path: Path, watches: list[Watch]) -> None:
    store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
    dest = tmp_path / "D"
    pid_file = tmp_path / "app.pid"
    os.mkfifo(pid_file)
    watch = start(tmp_path, watches, store, dest, "--pid-file", str(pid_file))
    (store / "app.yaml").write_text("v: 2\n")
    wait_until("the failed signal, logged", lambda: "not a regular file" in watch.log())
    assert watch.metric("infantry_reloads_total", method="signal", result="error") >= 1
    assert watch.get("/status")[0] == 200  # the event loop still answers
    code, took = watch.stop(timeout=20)
    assert code == 0 and took < 15


def test_sigterm_stops_watch_even_while_the_destination_filesystem_is_frozen(
    tmp_path: Path, watches: list[Watch]
) -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test freezes a filesystem, which needs root (CI runs as root)")
        pytest.skip("needs root to freeze a filesystem")
    image, mount = tmp_path / "fs.img", tmp_path / "frozen"
    mount.mkdir()
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    frozen = False
    try:
        store = store_with(tmp_path, **{"app.yaml": "v: 1\n"})
        dest = mount / "configs"
        watch = start(tmp_path, watches, store, dest, "--publish-timeout", "2")
        subprocess.run(["fsfreeze", "-f", str(mount)], check=True)
        frozen = True
        (store / "app.yaml").write_text("v: 2\n")

        # 503 comes first for being out of step; the reason follows once the step's deadline has passed.
        def reports_the_hang() -> bool:
            body = healthz(watch)[1]
            return "did not finish" in body or "has not returned" in body

        wait_until("/healthz to report the hung publish", reports_the_hang)
        assert healthz(watch)[0] == 503
        # The worker stuck in the kernel cannot be killed (the process cannot even finish exiting until
        # the filesystem thaws), but watch itself stops at once and says so.
        watch.proc.send_signal(signal.SIGTERM)
        wait_until("watch to stop", lambda: "stopped" in watch.log())
        subprocess.run(["fsfreeze", "-u", str(mount)], check=True)
        frozen = False
        assert watch.proc.wait(timeout=20) == 0
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "-u", str(mount)], check=False)
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("token", ["sesame\nSECRET-second-line\n", "sésame-SECRET\n"])
def test_a_token_that_cannot_be_sent_is_reported_without_its_value(
    token: str, nginx: Nginx, tmp_path: Path, watches: list[Watch]
) -> None:
    (nginx.root / "bearer").mkdir()
    (nginx.root / "bearer" / "app.yaml").write_text("v: 1\n")
    token_file = tmp_path / "token"
    token_file.write_text("sesame\n")
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        ["--source", nginx.url("bearer/app.yaml"), "--dest", str(dest), "--interval", "0.2",
         "--stale-after", STALE, "--bearer-token-file", str(token_file)],
    )  # fmt: skip
    watches.append(watch)
    watch.wait_ready()
    token_file.write_text(token)
    wait_until("/healthz to report the token file", lambda: healthz(watch)[0] == 503)
    assert "bearer-token-file" in healthz(watch)[1]
    for shown in (healthz(watch)[1], watch.get("/status")[1], watch.log()):
        assert "SECRET" not in shown and "sesame" not in shown
    token_file.write_text("sesame\n")
    (nginx.root / "bearer" / "app.yaml").write_text("v: 2, longer\n")
    wait_until("the next version", lambda: read_as_app(dest) == {"app.yaml": "v: 2, longer\n"})
    assert watch.proc.poll() is None
