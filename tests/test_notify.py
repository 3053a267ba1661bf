"""Notifiers and verifiers are bounded and careful: whole-call deadlines, validated PID files, partial signalling."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infantry.errors import NotifyError
from infantry.notify import CommandVerifier, ExecNotifier, HttpNotifier, HttpVerifier
from infantry.process import KILL_GRACE_SECONDS
from infantry.snapshot import FileEntry, Snapshot
from tests.support import HELPERS, SignalRecorder, free_port, wait_until
from tests.test_process import processes_with

SNAPSHOT = Snapshot.of({"app.yaml": FileEntry(b"v: 1\n")})


class SlowServer:
    """A real HTTP server on loopback that answers at its own pace, recording when each request came.

    ``mode`` is how it answers:

    - "head": it drips the status line and headers, one byte a second, for ever;
    - "body": it sends ``status`` and headers (a Content-Length of 1 GB) at once, then drips the body;
    - "plain": it answers ``status`` with an empty body at once.
    """

    def __init__(self, mode: str, status: int = 200) -> None:
        self.mode = mode
        self.status = status
        self.calls: list[float] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/-/reload") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            self.calls.append(time.monotonic())
            length = 0 if self.mode == "plain" else 1_000_000_000
            head = f"HTTP/1.1 {self.status} Whatever\r\nContent-Length: {length}\r\n\r\n".encode()
            if self.mode == "plain":
                conn.sendall(head)
                return
            if self.mode == "body":
                conn.sendall(head)
            for i in itertools.count():
                conn.sendall(head[i : i + 1] if self.mode == "head" and i < len(head) else b"x")
                if self._stop.wait(1.0):  # the pace of a drip-feeding peer, not a synchronisation
                    return

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


@pytest.fixture
def servers() -> Iterator[list[SlowServer]]:
    started: list[SlowServer] = []
    yield started
    for server in started:
        server.stop()


def slow_server(servers: list[SlowServer], mode: str, status: int = 200) -> SlowServer:
    server = SlowServer(mode, status)
    servers.append(server)
    return server


def timed(coro: Coroutine[Any, Any, Any], bound: float) -> tuple[Any, float]:
    """Run ``coro``; its result (or exception) and how long it took. Never more than ``bound`` seconds."""

    async def run() -> Any:
        try:
            return await asyncio.wait_for(coro, bound)
        except TimeoutError:
            pytest.fail(f"still running after {bound}s")
        except Exception as exc:  # the outcome under test
            return exc

    started = time.monotonic()
    outcome = asyncio.run(run())
    return outcome, time.monotonic() - started


def client(timeout: float) -> httpx.AsyncClient:
    """The reload client as watch builds it: per-operation timeouts only."""
    return httpx.AsyncClient(timeout=timeout, trust_env=False)


# -- HTTP reload calls ---------------------------------------------------------------------------


def test_a_reload_endpoint_that_drips_its_answer_costs_one_reload_timeout(servers: list[SlowServer]) -> None:
    server = slow_server(servers, "head")
    notifier = HttpNotifier(client(2), server.url(), "POST", 2.0)
    outcome, elapsed = timed(notifier.notify(SNAPSHOT), bound=15)
    assert isinstance(outcome, NotifyError), outcome
    assert "no answer in time" in str(outcome) and server.url() in str(outcome)
    assert 1.9 < elapsed < 5, elapsed
    assert len(server.calls) >= 1


def test_a_2xx_status_is_enough_however_slowly_the_body_follows(servers: list[SlowServer]) -> None:
    server = slow_server(servers, "body", 200)
    notifier = HttpNotifier(client(5), server.url(), "POST", 5.0)
    outcome, elapsed = timed(notifier.notify(SNAPSHOT), bound=15)
    assert outcome is None
    assert elapsed < 3, elapsed
    assert len(server.calls) == 1


def test_an_error_status_with_a_dripping_body_is_retried_until_the_deadline(servers: list[SlowServer]) -> None:
    server = slow_server(servers, "body", 503)
    notifier = HttpNotifier(client(2), server.url(), "POST", 2.0)
    outcome, elapsed = timed(notifier.notify(SNAPSHOT), bound=15)
    assert isinstance(outcome, NotifyError), outcome
    assert "HTTP 503" in str(outcome)
    assert 1.9 < elapsed < 5, elapsed
    assert len(server.calls) > 3


def test_a_refusing_endpoint_is_called_again_and_again_until_reload_timeout(servers: list[SlowServer]) -> None:
    server = slow_server(servers, "plain", 500)
    notifier = HttpNotifier(client(3), server.url(), "POST", 3.0)
    started = time.monotonic()
    outcome, elapsed = timed(notifier.notify(SNAPSHOT), bound=15)
    assert isinstance(outcome, NotifyError), outcome
    assert "HTTP 500" in str(outcome)
    assert 2.9 < elapsed < 6, elapsed
    assert len(server.calls) > 5, server.calls
    assert server.calls[-1] - started > 0.75  # not five quick tries, then giving up


def test_reload_errors_never_show_the_url_password_or_query(
    servers: list[SlowServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = slow_server(servers, "plain", 500)
    secret_urls = [
        f"http://reloader:hunter2@127.0.0.1:{port}/-/reload?token=tok3n" for port in (server.port, free_port())
    ]
    caplog.set_level(logging.DEBUG)
    for url in secret_urls:
        outcome, _ = timed(HttpNotifier(client(0.5), url, "POST", 0.5).notify(SNAPSHOT), bound=10)
        assert isinstance(outcome, NotifyError), outcome
        problem, _ = timed(HttpVerifier(client(0.5), url, 0.5).verify(), bound=10)
        assert isinstance(problem, str)
        # httpx logs every URL at INFO; infantry's logging setup quiets it. Infantry's own lines must be clean.
        ours = [record.getMessage() for record in caplog.records if record.name.startswith("infantry")]
        for text in (str(outcome), problem, *ours):
            assert "hunter2" not in text and "tok3n" not in text, text
        assert "reloader:***@127.0.0.1" in str(outcome) and "reloader:***@127.0.0.1" in problem


# -- verify ------------------------------------------------------------------------------------------


def test_a_verify_endpoint_that_drips_costs_at_most_verify_timeout(servers: list[SlowServer]) -> None:
    server = slow_server(servers, "head")
    verifier = HttpVerifier(client(5), server.url("/healthz"), 2.0)
    problem, elapsed = timed(verifier.verify(), bound=15)
    assert isinstance(problem, str) and "no answer in time" in problem, problem
    assert 1.9 < elapsed < 5, elapsed


def test_a_verify_endpoint_is_healthy_on_its_status_alone(servers: list[SlowServer]) -> None:
    server = slow_server(servers, "body", 200)
    verifier = HttpVerifier(client(5), server.url("/healthz"), 5.0)
    problem, elapsed = timed(verifier.verify(), bound=15)
    assert problem is None
    assert elapsed < 3, elapsed


# -- commands ----------------------------------------------------------------------------------------


def test_hook_commands_are_bounded_even_when_a_grandchild_holds_stderr() -> None:
    marker = f"{os.getpid()}{time.monotonic_ns() % 100000:05d}"
    command = f"sh -c 'setsid sleep 300.{marker} & sleep 100.{marker}'"
    try:
        outcome, elapsed = timed(ExecNotifier(command, 0.5, dict(os.environ)).notify(SNAPSHOT), bound=15)
        assert isinstance(outcome, NotifyError) and "timed out" in str(outcome), outcome
        assert elapsed < 0.5 + KILL_GRACE_SECONDS + 3, elapsed
        problem, elapsed = timed(CommandVerifier(command, 1.0, dict(os.environ)).verify(), bound=15)
        assert isinstance(problem, str) and "timed out" in problem, problem
        assert elapsed < 1.0 + KILL_GRACE_SECONDS + 3, elapsed
    finally:
        for pid in processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- signals -----------------------------------------------------------------------------------------

# PID 1 is not among them: when it is not infantry, it may be the app (compose's pid: "service:app").
BAD_PID_FILES = {
    "-1": "does not hold a process ID",  # kill(-1) is every process we may signal
    "0": "not a process that can be reloaded",  # kill(0) is our own process group
    "SELF": "infantry's own PID",
    "99999999999999999999": "does not hold a process ID",
    "4194305": "not a process that can be reloaded",
    "abc": "does not hold a process ID",
    "": "does not hold a process ID",
    "+42": "does not hold a process ID",
    "4 2": "does not hold a process ID",
    "\x1b[31m42": "does not hold a process ID",
    "4194304": "is not running",
}


def test_pid_files_that_name_no_reloadable_process_signal_nothing(tmp_path: Path) -> None:
    """Run in a PID namespace and session of its own, so a stray kill(-1) or kill(0) reaches nothing outside."""
    run = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, str(HELPERS / "notify_pidfile.py"), str(tmp_path), *BAD_PID_FILES],
        capture_output=True, text=True, timeout=60, start_new_session=True,
    )  # fmt: skip
    assert run.returncode == 0, f"the notifier's process did not survive: {run.returncode}\n{run.stderr}"
    report = json.loads(run.stdout)
    for content, expected in BAD_PID_FILES.items():
        got = report["outcomes"][content]
        assert got.startswith("NotifyError:") and expected in got, (content, got)
        assert "\x1b" not in got
    assert report["signals_before_control"] == 0
    assert report["control"] == "ok"
    assert report["signals_after_control"] == 1  # the app can be signalled: the zero above means something


def test_an_unreadable_pid_file_is_a_notify_error(tmp_path: Path) -> None:
    from infantry.notify import SignalNotifier

    outcome, _ = timed(SignalNotifier(signal.SIGHUP, pid_file=tmp_path / "missing.pid").notify(SNAPSHOT), bound=5)
    assert isinstance(outcome, NotifyError) and "missing.pid" in str(outcome)


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the user nobody can write in (pytest's tmp_path is not reachable for it)."""
    path = Path(tempfile.mkdtemp(prefix="infantry-nobody-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def _python_for_nobody() -> str:
    """A Python the user nobody may run by path (this venv's may live under root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if subprocess.run([*NOBODY, "bash", "-c", '"$0" -c pass', candidate], capture_output=True).returncode == 0:
            return candidate
    pytest.fail("no Python that the user nobody may run")


def _notify_as_nobody(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NOBODY, sys.executable, str(HELPERS / "notify_process.py"), name],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_process_name_signals_every_match_it_may_and_logs_the_others(tmp_path: Path, nobody_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test starts processes as another user: run it as root")
    name = f"infantry-app-{os.getpid()}"
    root_app = SignalRecorder(tmp_path, argv0=name)
    nobody_app = subprocess.Popen(
        [*NOBODY, "bash", "-c", f'exec -a {name} "$@"', "bash", _python_for_nobody(), str(HELPERS / "sigrecorder.py"),
         str(nobody_dir / "app.pid"), str(nobody_dir / "signals.log")],
    )  # fmt: skip
    try:
        wait_until("nobody's app to write its PID file", (nobody_dir / "app.pid").exists)
        run = _notify_as_nobody(name)
        assert run.stdout.strip() == "ok", run.stdout + run.stderr
        wait_until("nobody's app to get SIGHUP", lambda: (nobody_dir / "signals.log").read_text().count("\n") == 1)
        assert f"not allowed to send SIGHUP to process {root_app.proc.pid}" in run.stderr
        assert f"sent SIGHUP to process {nobody_app.pid}" in run.stderr
        assert root_app.count() == 0

        nobody_app.terminate()
        nobody_app.wait(timeout=10)
        run = _notify_as_nobody(name)
        assert run.stdout.startswith("NotifyError:"), run.stdout + run.stderr
        assert f"not allowed to signal [{root_app.proc.pid}]" in run.stdout
        assert root_app.count() == 0
    finally:
        if nobody_app.poll() is None:
            nobody_app.kill()
            nobody_app.wait()
        root_app.stop()
