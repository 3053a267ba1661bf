"""Process hygiene: hooks time out, die as a group, leave no zombies; publishing leaks nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from infantry.errors import NotifyError
from infantry.notify import ExecNotifier
from infantry.process import (
    KILL_GRACE_SECONDS,
    MESSAGE_CHARS,
    STDERR_TAIL_BYTES,
    CommandResult,
    run_command,
    start_reaper,
)
from infantry.snapshot import FileEntry, Snapshot
from tests.support import HELPERS, infantry, installed_store, log_lines, wait_until

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
    assert time.monotonic() - started < 8
    wait_until("the group to be gone", lambda: processes_with(marker) == [])
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
    assert time.monotonic() - started < 8


def test_many_publishes_leak_no_descriptors_threads_or_memory(tmp_path: Path) -> None:
    """Publish through the same paths watch uses (a worker thread per call, check gate, exec hook), many
    times, in a process of its own (tests/helpers/leak_publishes.py)."""
    dest = tmp_path / "configs"
    run = subprocess.run(
        [sys.executable, str(HELPERS / "leak_publishes.py"), str(dest), str(LEAK_PUBLISHES)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    before, after = report["before"], report["after"]
    assert after["fds"] == before["fds"], report
    assert after["threads"] <= before["threads"], report
    assert after["rss"] - before["rss"] < 8 * 1024, f"RSS grew by {after['rss'] - before['rss']} KiB"
    assert my_zombies() == []
    assert len([n for n in os.listdir(dest) if n.startswith("..2")]) == 2


# -- bounded whatever the command does ---------------------------------------------------------------


def _marker() -> str:
    """Digits unique to this test run: also a valid fraction for sleep, so `sleep 300.<marker>` works."""
    return f"{os.getpid()}{time.monotonic_ns() % 100000:05d}"


def _kill_all(marker: str) -> None:
    for pid in processes_with(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until("the leftovers to be gone", lambda: processes_with(marker) == [])


def _run_bounded(argv: list[str], timeout: float, bound: float) -> tuple[CommandResult, float]:
    """run_command in a thread, failing the test (instead of hanging it) if it is not back within ``bound``."""
    outcome: list[CommandResult] = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: outcome.append(run_command(argv, timeout, dict(os.environ))), daemon=True)
    worker.start()
    worker.join(bound)
    elapsed = time.monotonic() - started
    assert outcome, f"run_command({argv!r}, timeout={timeout}) was not back after {elapsed:.1f}s"
    return outcome[0], elapsed


def test_a_setsid_grandchild_holding_stderr_does_not_stretch_the_timeout() -> None:
    marker = _marker()
    # The leader ignores SIGTERM (so the whole grace period is used); the grandchild left its group
    # with setsid, survives the group kill and holds stderr open for five minutes.
    script = f"trap '' TERM; setsid sleep 300.{marker} & sleep 100.{marker}; sleep 101.{marker}"
    try:
        result, elapsed = _run_bounded(["sh", "-c", script], 0.5, 0.5 + KILL_GRACE_SECONDS + 5)
        assert result.timed_out and not result.ok
        assert elapsed < 0.5 + KILL_GRACE_SECONDS + 3, elapsed
        assert result.returncode == -signal.SIGKILL  # the leader's own end
        group_gone = lambda: processes_with(f"100.{marker}") == processes_with(f"101.{marker}") == []  # noqa: E731
        wait_until("the command's group to be gone", group_gone)
        assert len(processes_with(f"300.{marker}")) == 1  # the grandchild is out of reach, as setsid meant
    finally:
        _kill_all(marker)
    assert my_zombies() == []


def test_a_successful_hook_with_a_background_child_holding_stderr_returns_at_once() -> None:
    marker = _marker()
    script = f"sleep 300.{marker} & echo 'reloaded fine' >&2; exit 0"
    try:
        result, elapsed = _run_bounded(["sh", "-c", script], 10, 15)
        assert result.ok and result.returncode == 0 and not result.timed_out
        assert elapsed < 4, elapsed
        assert result.stderr_tail == "reloaded fine"
        assert len(processes_with(marker)) == 1  # a daemon the hook started is left running
    finally:
        _kill_all(marker)
    assert my_zombies() == []


def test_a_failing_hook_reports_its_own_exit_while_its_background_child_writes_on() -> None:
    marker = _marker()
    script = f"(while :; do echo noise; sleep 0.01; done; sleep 300.{marker}) >&2 & echo 'bad config' >&2; exit 3"
    try:
        result, elapsed = _run_bounded(["sh", "-c", script], 10, 15)
        assert result.returncode == 3 and not result.ok and not result.timed_out
        assert elapsed < 4, elapsed
    finally:
        # The background loop is a subshell of the group; its argv is sh's. Kill the group by its leader.
        for pid in processes_with(script):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        wait_until("the background loop to be gone", lambda: processes_with(script) == [])
    assert my_zombies() == []


MEMORY_PROBE = """
import os, resource, sys
from infantry.process import KILL_GRACE_SECONDS, CommandResult, run_command, start_reaper
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = run_command(["sh", "-c", sys.argv[1]], 120, dict(os.environ))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(result.returncode, after - before, result.stderr_tail, sep="|")
"""


def test_300_mb_on_stderr_keeps_memory_bounded() -> None:
    script = "head -c 300000000 /dev/zero >&2; printf '\\nlast words\\n' >&2; exit 3"
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, script], capture_output=True, text=True, timeout=120, check=True
    )
    returncode, grown_kib, tail = probe.stdout.strip().split("|")
    assert returncode == "3"
    assert tail == "last words"
    assert int(grown_kib) < 16 * 1024, f"peak RSS grew by {grown_kib} KiB reading 300 MB of stderr"


def test_the_last_64_kib_of_stderr_are_kept_and_the_message_shows_the_end_of_the_last_line() -> None:
    # 100 KiB of numbered lines, then a last line longer than a log line should be.
    script = (
        'i=0; while [ $i -lt 20000 ]; do echo "line $i"; i=$((i+1)); done >&2; '
        "printf '%0500d verdict: key x is missing\\n' 0 >&2; exit 2"
    )
    expected = "".join(f"line {i}\n" for i in range(20000)).encode() + b"0" * 500 + b" verdict: key x is missing\n"
    result = run_command(["sh", "-c", script], 60, dict(os.environ))
    assert result.returncode == 2
    assert len(expected) > 2 * STDERR_TAIL_BYTES
    assert result.stderr == expected[-STDERR_TAIL_BYTES:]
    assert result.stderr_tail.endswith("0 verdict: key x is missing") and result.stderr_tail.startswith("...")
    assert len(result.stderr_tail) == MESSAGE_CHARS


# Runs one command and reports, as JSON, how it ended and the peak RSS of every process it waited for
# (infantry, and the check command infantry waited for): ru_maxrss of RUSAGE_CHILDREN is that peak.
PEAK_RSS_WRAPPER = """
import json, resource, subprocess, sys
run = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=300)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": run.returncode, "stderr": run.stderr, "peak_kib": peak}))
"""


def test_a_check_writing_300_mb_to_stderr_is_exit_4_with_a_short_message_in_bounded_memory(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "app.yaml").write_text("a: 1\n")
    check = tmp_path / "flooding-check"
    # One 300 MB line with the verdict at its very end, as a validator dumping its input might write.
    check.write_text("#!/bin/sh\nhead -c 300000000 /dev/zero | tr '\\0' x >&2\necho 'rejected: line 3' >&2\nexit 1\n")
    check.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFANTRY_")}
    argv = [sys.executable, "-m", "infantry", "install", "--source", store.as_uri(), "--dest", str(tmp_path / "D"),
            "--check", str(check), "--check-timeout", "240"]  # fmt: skip
    wrapper = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_WRAPPER, *argv], capture_output=True, text=True, timeout=320, env=env
    )
    assert wrapper.returncode == 0, wrapper.stderr
    report = json.loads(wrapper.stdout)
    assert report["code"] == 4, report["stderr"][-2000:]
    message = log_lines(report["stderr"])
    assert len(message) == 1 and len(message[0]) < 400, report["stderr"][-2000:]
    assert message[0].endswith("xxx" + "rejected: line 3"), message[0]
    assert report["peak_kib"] < 128 * 1024, f"peak RSS {report['peak_kib']} KiB"
    assert not (tmp_path / "D" / "..data").exists()


# -- the reaper, when infantry is PID 1 --------------------------------------------------------------


def test_the_reaper_does_nothing_unless_infantry_is_pid_1() -> None:
    async def start() -> bool:
        return start_reaper(asyncio.get_running_loop())

    assert os.getpid() != 1
    assert asyncio.run(start()) is False


def _in_new_pid_namespace(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_as_pid_1_orphans_are_reaped_and_commands_keep_their_exit_status() -> None:
    """Under a new PID namespace, with orphans dying all the time, no failing command reads as a success."""
    run = _in_new_pid_namespace([sys.executable, str(HELPERS / "hang_reaper.py"), "40"], timeout=90)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["pid"] == 1 and report["reaper"] is True
    assert report["orphans_started"] == 40
    assert report["wrong_results"] == []
    assert report["zombies"] == []
    assert report["zombies_without_reaper"] > 0  # the harness sees zombies when nobody reaps them


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _children_of(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, comm) of each child of ``pid``, as seen from this (outer) PID namespace."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = tail.split()
        if int(fields[1]) == pid:
            found.append((int(entry.name), fields[0], head.split("(", 1)[1]))
    return found


def test_watch_as_pid_1_leaves_no_zombies_after_reloads(tmp_path: Path) -> None:
    """`infantry watch` run as a container's PID 1, with an --exec hook that leaves a background child."""
    store, dest = installed_store(tmp_path, {"app.yaml": "v: 0\n"})
    reloads = tmp_path / "reloads"
    hook = f"sh -c 'echo reload >> {reloads}; sleep 0.2 &'"
    log = (tmp_path / "watch.log").open("w")
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-m", "infantry", "watch", "--source", store.as_uri(), "--dest", str(dest), "--exec", hook],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until("infantry to start as PID 1", lambda: len(_children_of(outer.pid)) == 1, timeout=10)
        pid1 = _children_of(outer.pid)[0][0]
        for n in range(1, 6):
            (store / "app.yaml").write_text(f"v: {n}\n")
            wait_until(f"reload {n}", lambda: _lines(reloads) >= n, 15)  # noqa: B023 (used at once)
        wait_until(
            "the hooks' background children to end",
            lambda: not [c for c in _children_of(pid1) if c[2] == "sleep" and c[1] != "Z"],
            timeout=10,
        )
        wait_until("no zombie children of infantry", lambda: not [c for c in _children_of(pid1) if c[1] == "Z"], 5)
    finally:
        # unshare does not pass signals on: SIGTERM goes to infantry itself, by its PID out here.
        for pid, _, _ in _children_of(outer.pid):
            os.kill(pid, signal.SIGTERM)
        try:
            outer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            outer.kill()
            outer.wait()
        log.close()
