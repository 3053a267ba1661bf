"""Telling the app to reload: a signal, an HTTP call, or a command."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import httpx
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_random_exponential

from infantry.errors import NotifyError
from infantry.process import run_command
from infantry.snapshot import Snapshot
from infantry.sources import redact_url

logger = logging.getLogger(__name__)


class Notifier(Protocol):
    """One way of telling the app that a new snapshot is live."""

    method: str

    async def notify(self, snapshot: Snapshot) -> None:
        """Tell the app; raise NotifyError if it could not be told."""

    async def aclose(self) -> None:
        """Release what the notifier holds open."""


def find_processes(name: str, proc: Path = Path("/proc")) -> list[int]:
    """PIDs whose executable name, comm or argv[0] is ``name``, keeping only the top of each tree.

    A master and its workers often share a name (nginx, gunicorn); only the master is wanted, so a
    process whose parent also matches is left out.
    """
    matches: dict[int, int] = {}
    own = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            stat_line = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().rstrip("\n")
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode("utf-8", "replace")
        except OSError:
            continue  # gone, or not ours to read
        fields = stat_line.rsplit(")", 1)[-1].split()
        if not argv0 or fields[0] == "Z":
            continue  # a kernel thread, or a zombie
        try:
            exe = os.path.basename(os.readlink(entry / "exe"))
        except OSError:
            exe = ""
        if name in (comm, exe, argv0, os.path.basename(argv0.split(" ", 1)[0])):
            matches[int(entry.name)] = int(fields[1])
    return sorted(pid for pid, ppid in matches.items() if ppid not in matches)


class SignalNotifier:
    """Sends a signal to the app, found by process name or PID file."""

    method = "signal"

    def __init__(self, sig: signal.Signals, *, process: str | None = None, pid_file: Path | None = None) -> None:
        self._signal = sig
        self._process = process
        self._pid_file = pid_file

    def _targets(self) -> list[int]:
        if self._pid_file is not None:
            try:
                return [int(self._pid_file.read_text().strip())]
            except (OSError, ValueError) as exc:
                raise NotifyError(f"cannot read a PID from {self._pid_file}: {exc}") from exc
        assert self._process is not None
        pids = find_processes(self._process)
        if not pids:
            raise NotifyError(f"no process named {self._process!r} (the pod needs shareProcessNamespace: true)")
        return pids

    async def notify(self, snapshot: Snapshot) -> None:
        """Signal every target; fail if any could not be signalled."""
        for pid in self._targets():
            try:
                os.kill(pid, self._signal)
            except ProcessLookupError:
                raise NotifyError(f"process {pid} is not running") from None
            except PermissionError:
                raise NotifyError(f"not allowed to signal process {pid}; run infantry as the app's user") from None
            logger.info("sent SIG%s to process %d", self._signal.name.removeprefix("SIG"), pid)

    async def aclose(self) -> None:
        """Nothing to release."""


class _BadStatus(Exception):
    pass


class HttpNotifier:
    """Calls a reload URL and expects a 2xx answer, retrying with backoff and jitter."""

    method = "http"

    def __init__(self, client: httpx.AsyncClient, url: str, http_method: str, timeout: float) -> None:
        self._client = client
        self._url = url
        self._http_method = http_method
        self._timeout = timeout

    async def notify(self, snapshot: Snapshot) -> None:
        """Call the URL until it answers 2xx, or the attempts or the time run out."""
        shown = redact_url(self._url)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(5) | stop_after_delay(self._timeout),
            wait=wait_random_exponential(multiplier=0.1, max=2),
            retry=retry_if_exception_type((httpx.TransportError, ssl.SSLError, _BadStatus)),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    resp = await self._client.request(
                        self._http_method, self._url, headers={"X-Infantry-Version": snapshot.version}
                    )
                    if not resp.is_success:
                        raise _BadStatus(f"HTTP {resp.status_code}")
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise NotifyError(f"reload call to {shown} failed: {cause}") from cause
        except (httpx.HTTPError, ssl.SSLError) as exc:
            raise NotifyError(f"reload call to {shown} failed: {exc}") from exc
        logger.info("called %s %s", self._http_method, shown)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class ExecNotifier:
    """Runs a command, without a shell, with a timeout."""

    method = "exec"

    def __init__(self, command: str, timeout: float, environ: Mapping[str, str]) -> None:
        self._argv = shlex.split(command)
        self._timeout = timeout
        self._environ = environ

    async def notify(self, snapshot: Snapshot) -> None:
        """Run the command; fail if it exits non-zero or runs out of time."""
        env = {**self._environ, "INFANTRY_VERSION": snapshot.version}
        result = await asyncio.to_thread(run_command, self._argv, self._timeout, env)
        if not result.ok:
            raise NotifyError(f"reload command {self._argv[0]!r} {result.describe()}")
        logger.info("ran reload command %r", self._argv[0])

    async def aclose(self) -> None:
        """Nothing to release."""


class Verifier(Protocol):
    """Checks, after a reload, that the app came back healthy."""

    async def verify(self) -> str | None:
        """None when the app is healthy within the time allowed; otherwise why it is not."""

    async def aclose(self) -> None:
        """Release what the verifier holds open."""


VERIFY_PAUSE_SECONDS = 0.2


class HttpVerifier:
    """Healthy means a 2xx answer from a URL, tried again and again until the time runs out."""

    def __init__(self, client: httpx.AsyncClient, url: str, timeout: float) -> None:
        self._client = client
        self._url = url
        self._timeout = timeout

    async def verify(self) -> str | None:
        """GET the URL until it answers 2xx or the verify timeout runs out."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        problem = "no answer"
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return f"{redact_url(self._url)}: {problem} within {self._timeout:g}s"
            try:
                resp = await self._client.get(self._url, timeout=left)
                if resp.is_success:
                    return None
                problem = f"HTTP {resp.status_code}"
            except (httpx.HTTPError, ssl.SSLError) as exc:
                problem = f"{type(exc).__name__}"
            await asyncio.sleep(min(VERIFY_PAUSE_SECONDS, max(0.0, deadline - asyncio.get_running_loop().time())))

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class CommandVerifier:
    """Healthy means the command exits 0, tried again and again until the time runs out."""

    def __init__(self, command: str, timeout: float, environ: Mapping[str, str]) -> None:
        self._argv = shlex.split(command)
        self._timeout = timeout
        self._environ = environ

    async def verify(self) -> str | None:
        """Run the command until it exits 0 or the verify timeout runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        problem = "did not run"
        while (left := deadline - loop.time()) > 0:
            result = await asyncio.to_thread(run_command, self._argv, left, self._environ)
            if result.ok:
                return None
            problem = result.describe()
            await asyncio.sleep(min(VERIFY_PAUSE_SECONDS, max(0.0, deadline - loop.time())))
        return f"verify command {self._argv[0]!r} {problem}"

    async def aclose(self) -> None:
        """Nothing to release."""
