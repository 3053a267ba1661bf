"""Process hygiene: hooks time out, die as a group, leave no zombies; publishing leaks nothing."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from infantry.agent import make_gate
from infantry.errors import CheckFailed, NotifyError
from infantry.notify import ExecNotifier
from infantry.process import run_command
from infantry.publish import KubeletPublisher
from infantry.snapshot import FileEntry, Snapshot
from tests.support import infantry, wait_until

LEAK_PUBLISHES = int(os.environ.get("INFANTRY_LEAK_PUBLISHES", "300"))


def processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def my_zombies() -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(int(entry.name))
    return zombies


def test_a_command_that_times_out_is_killed_with_its_whole_group() -> None:
    marker = f"{os.getpid()}{time.monotonic_ns() % 1000:03d}"  # digits: it is also sleep's fraction
    started = time.monotonic()
    result = run_command(["sh", "-c", f"sleep 300.{marker} & sleep 301.{marker}; wait"], 0.5, dict(os.environ))
    assert result.timed_out and not result.ok
    assert time.monotonic() - started < 5
    wait_until("the group to be gone", lambda: processes_with(marker) == [], timeout=5)
    assert my_zombies() == []


def test_commands_are_reaped_and_report_how_they_ended() -> None:
    ok = run_command(["true"], 5, dict(os.environ))
    failed = run_command(["sh", "-c", "echo 'bad config on line 3' >&2; exit 3"], 5, dict(os.environ))
    missing = run_command(["/nonexistent/program"], 5, dict(os.environ))
    assert ok.ok
    assert failed.returncode == 3 and failed.describe() == "exited 3: bad config on line 3"
    assert not missing.ok and "cannot start" in missing.describe()
    assert my_zombies() == []


def test_check_timeout_is_exit_4(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "a").write_text("a")
    marker = f"sleep 123.{os.getpid()}"
    result = infantry("install", "--source", store.as_uri(), "--dest", str(tmp_path / "D"),
                      "--check", f"sh -c '{marker}; true'", "--check-timeout", "1")  # fmt: skip
    assert result.returncode == 4
    assert "timed out and was killed" in result.stderr
    assert processes_with(marker) == []
    assert not (tmp_path / "D" / "..data").exists()


def test_exec_hook_timeout_is_a_notify_error() -> None:
    notifier = ExecNotifier("sleep 30", 0.5, dict(os.environ))
    started = time.monotonic()
    with pytest.raises(NotifyError, match="timed out"):
        asyncio.run(notifier.notify(Snapshot.of({"a": FileEntry(b"")})))
    assert time.monotonic() - started < 5


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_many_publishes_leak_no_descriptors_threads_or_memory(tmp_path: Path) -> None:
    """Publish through the same paths watch uses (thread pool, check gate, exec hook), many times."""
    publisher = KubeletPublisher(tmp_path / "configs", 0o644)
    gate = make_gate("true", 10, dict(os.environ))
    hook = ExecNotifier("true", 10, dict(os.environ))
    refused = make_gate("false", 10, dict(os.environ))

    async def publish_many(count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            snapshot = Snapshot.of({"app.yaml": FileEntry(f"n: {i}\n".encode()), "conf/x": FileEntry(b"same")})
            if i % 10 == 0:
                try:
                    await asyncio.to_thread(publisher.publish, snapshot, refused)
                except CheckFailed:
                    pass
                else:
                    raise AssertionError("the refusing gate let a set through")
                continue
            assert await asyncio.to_thread(publisher.publish, snapshot, gate)
            await hook.notify(snapshot)
            await asyncio.to_thread(publisher.tidy)

    async def run() -> tuple[int, int, int, int, int, int]:
        await publish_many(30, 0)  # warm up: the thread pool, caches, allocator arenas
        before = _open_fds(), threading.active_count(), _rss_kib()
        await publish_many(LEAK_PUBLISHES, 30)
        return (*before, _open_fds(), threading.active_count(), _rss_kib())

    fds_before, threads_before, rss_before, fds_after, threads_after, rss_after = asyncio.run(run())
    assert fds_after == fds_before
    assert threads_after <= threads_before
    assert rss_after - rss_before < 8 * 1024, f"RSS grew by {rss_after - rss_before} KiB"
    assert my_zombies() == []
    assert len([n for n in os.listdir(tmp_path / "configs") if n.startswith("..2")]) == 2
