"""End to end: hooks and endpoints that never finish cannot stall `infantry watch`.

Each test runs a real `infantry watch` with a hook or endpoint that misbehaves for ever, then checks
what the command line promises: later store changes still reach --dest, and SIGTERM still stops watch
promptly, with exit code 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Watch, installed_store, read_as_app, wait_until
from tests.test_notify import SlowServer
from tests.test_process import processes_with

STOP_SECONDS = 10
PUBLISH_SECONDS = 15


@pytest.fixture
def marker() -> Iterator[str]:
    """Digits unique to the test (also a valid fraction for sleep); whatever carries them is killed at the end."""
    digits = f"{os.getpid()}{time.monotonic_ns() % 100000:05d}"
    yield digits
    for pid in processes_with(digits):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def slow_servers() -> Iterator[list[SlowServer]]:
    started: list[SlowServer] = []
    yield started
    for server in started:
        server.stop()


def start_watch(tmp_path: Path, watches: list[Watch], args: list[str]) -> tuple[Watch, Path, Path]:
    store, dest = installed_store(tmp_path, {"app.yaml": "v: 0\n"})
    watch = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest), *args])
    watches.append(watch)
    watch.wait_ready(timeout=15)
    return watch, store, dest


def change_and_see_it_published(watch: Watch, store: Path, dest: Path, n: int) -> None:
    (store / "app.yaml").write_text(f"v: {n}\n")

    def published() -> bool:
        if watch.proc.poll() is not None:
            pytest.fail(f"infantry watch exited {watch.proc.returncode}:\n{watch.log()}")
        return read_as_app(dest) == {"app.yaml": f"v: {n}\n"}

    wait_until(f"version {n} to be published", published, timeout=PUBLISH_SECONDS)


def stop_promptly(watch: Watch) -> None:
    code, took = watch.stop(timeout=STOP_SECONDS)
    assert code == 0, watch.log()
    assert took < STOP_SECONDS


@pytest.mark.parametrize("ending", ["exits", "times out"])
def test_an_exec_hook_leaving_a_setsid_grandchild_on_stderr(
    tmp_path: Path, watches: list[Watch], marker: str, ending: str
) -> None:
    rest = "exit 0" if ending == "exits" else f"sleep 100.{marker}"
    hook = f"sh -c 'setsid sleep 300.{marker} & {rest}'"
    watch, store, dest = start_watch(tmp_path, watches, ["--exec", hook, "--exec-timeout", "1"])
    change_and_see_it_published(watch, store, dest, 1)
    wait_until("the hook's grandchild to be running", lambda: processes_with(f"300.{marker}") != [])
    for n in (2, 3):
        change_and_see_it_published(watch, store, dest, n)
    wait_until("the hook to run for each change", lambda: len(processes_with(f"300.{marker}")) >= 3)
    (store / "app.yaml").write_text("v: 4\n")  # and stop while that one may be running
    stop_promptly(watch)


def test_a_check_leaving_a_setsid_grandchild_on_stderr_still_passes(
    tmp_path: Path, watches: list[Watch], marker: str
) -> None:
    check = f"sh -c 'setsid sleep 300.{marker} & exit 0'"
    watch, store, dest = start_watch(tmp_path, watches, ["--check", check, "--check-timeout", "5"])
    for n in (1, 2, 3):
        change_and_see_it_published(watch, store, dest, n)
    assert len(processes_with(f"300.{marker}")) >= 3  # the check really ran, and left its grandchild
    stop_promptly(watch)


def test_a_reload_url_that_drips_its_answer(
    tmp_path: Path, watches: list[Watch], slow_servers: list[SlowServer]
) -> None:
    server = SlowServer("head")
    slow_servers.append(server)
    args = ["--reload-url", server.url(), "--reload-timeout", "2"]
    watch, store, dest = start_watch(tmp_path, watches, args)
    change_and_see_it_published(watch, store, dest, 1)
    wait_until("the reload call", lambda: len(server.calls) >= 1)
    change_and_see_it_published(watch, store, dest, 2)
    calls = len(server.calls)
    (store / "app.yaml").write_text("v: 3\n")
    wait_until("a reload call for version 3", lambda: len(server.calls) > calls, timeout=PUBLISH_SECONDS)
    stop_promptly(watch)  # while that call drips


@pytest.mark.parametrize("mode", ["body", "head"])
def test_a_verify_url_that_drips_its_answer(
    tmp_path: Path, watches: list[Watch], slow_servers: list[SlowServer], mode: str
) -> None:
    """ "body": 200 at once, then a body that never ends (healthy); "head": no status, ever (unhealthy)."""
    server = SlowServer(mode, 200)
    slow_servers.append(server)
    args = ["--verify-url", server.url("/healthz"), "--verify-timeout", "2"]
    watch, store, dest = start_watch(tmp_path, watches, args)
    change_and_see_it_published(watch, store, dest, 1)
    wait_until("the verify call", lambda: len(server.calls) >= 1)
    change_and_see_it_published(watch, store, dest, 2)
    if mode == "body":
        assert read_as_app(dest) == {"app.yaml": "v: 2\n"}
    calls = len(server.calls)
    (store / "app.yaml").write_text("v: 3\n")
    wait_until("a verify call for version 3", lambda: len(server.calls) > calls, timeout=PUBLISH_SECONDS)
    stop_promptly(watch)  # while that call drips
