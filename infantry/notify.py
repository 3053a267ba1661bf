"""Telling the app to reload: a signal, an HTTP call, or a command."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from infantry import threads
from infantry.errors import NotifyError
from infantry.process import run_command
from infantry.retry import Backoff
from infantry.secrets import read_small
from infantry.settings import redact_url
from infantry.snapshot import Snapshot

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


# The kernel's PID_MAX_LIMIT on 64-bit Linux: no PID is larger.
PID_MAX = 4_194_304


def _shown(text: str, limit: int = 40) -> str:
    """User-supplied text, printable and short, for an error message."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class SignalNotifier:
    """Sends a signal to the app, found by process name or PID file."""

    method = "signal"

    def __init__(self, sig: signal.Signals, *, process: str | None = None, pid_file: Path | None = None) -> None:
        self._signal = sig
        self._process = process
        self._pid_file = pid_file

    @property
    def _name(self) -> str:
        return "SIG" + self._signal.name.removeprefix("SIG")

    async def notify(self, snapshot: Snapshot) -> None:
        """Signal the app: the PID in the file, or every process with the name it may signal."""
        if self._pid_file is not None:
            self._signal_pid_file(self._pid_file)
        else:
            assert self._process is not None
            self._signal_by_name(self._process)

    def _signal_pid_file(self, pid_file: Path) -> None:
        pid = read_pid_file(pid_file)
        try:
            os.kill(pid, self._signal)
        except ProcessLookupError:
            raise NotifyError(f"process {pid} (from {pid_file}) is not running") from None
        except PermissionError:
            raise NotifyError(
                f"not allowed to signal process {pid} (from {pid_file}); run infantry as the app's user"
            ) from None
        logger.info("sent %s to process %d", self._name, pid)

    def _signal_by_name(self, name: str) -> None:
        pids = find_processes(name)
        if not pids:
            raise NotifyError(f"no process named {name!r} (the pod needs shareProcessNamespace: true)")
        signalled, refused, gone = [], [], []
        for pid in pids:
            try:
                os.kill(pid, self._signal)
            except ProcessLookupError:
                gone.append(pid)
                logger.warning("process %d named %r exited before it could be signalled", pid, name)
            except PermissionError:
                refused.append(pid)
                logger.warning("not allowed to send %s to process %d named %r", self._name, pid, name)
            else:
                signalled.append(pid)
                logger.info("sent %s to process %d", self._name, pid)
        if not signalled:
            why = [f"not allowed to signal {refused} (run infantry as the app's user)"] if refused else []
            why += [f"{gone} exited"] if gone else []
            raise NotifyError(f"could not signal any process named {name!r}: {'; '.join(why)}")

    async def aclose(self) -> None:
        """Nothing to release."""


def read_pid_file(pid_file: Path) -> int:
    """The PID a PID file names; NotifyError unless it is one other process that may be signalled.

    ``kill`` treats 0, -1 and negative numbers as process groups or "everyone": none of those, nor
    infantry itself, is ever a reload target. PID 1 is allowed when it is not infantry: in a shared PID
    namespace (compose's ``pid: "service:app"``) the app itself is often PID 1.
    """
    try:
        raw = read_small(pid_file, 64)
    except OSError as exc:
        raise NotifyError(f"cannot read the PID file {pid_file}: {exc.strerror or exc}") from exc
    text = raw.decode("utf-8", "replace")
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or len(digits) > len(str(PID_MAX)):
        raise NotifyError(f"the PID file {pid_file} does not hold a process ID: {_shown(text)}")
    pid = int(digits)
    if pid < 1 or pid > PID_MAX:
        raise NotifyError(f"the PID file {pid_file} holds {pid}, which is not a process that can be reloaded")
    if pid == os.getpid():
        raise NotifyError(f"the PID file {pid_file} holds infantry's own PID {pid}")
    return pid


# Reload calls retry quickly at first: the app is usually local and answers at once.
RELOAD_BACKOFF = Backoff(base=0.05, cap=2.0)
VERIFY_BACKOFF = Backoff(base=0.1, cap=1.0)


class _Refused(Exception):
    """The endpoint answered, with a status that is not 2xx."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.retry_after = retry_after


async def _call_status(
    client: httpx.AsyncClient, method: str, url: str, headers: Mapping[str, str], deadline: float
) -> None:
    """One request that must answer 2xx (else _Refused), bounded as a whole by ``deadline`` (loop time).

    Only the status matters, so a body that never ends (or drips in) costs nothing: the body is never
    read, and the response is closed unread, which closes its connection.
    """
    async with asyncio.timeout_at(deadline), client.stream(method, url, headers=headers) as resp:
        if not resp.is_success:
            raise _Refused(resp.status_code, _retry_after(resp))


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isascii() and value.isdigit() else None


def _describe(exc: BaseException, url: str) -> str:
    """Why a request failed, without the URL's password or query."""
    if isinstance(exc, _Refused):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    detail = str(exc)
    parts = urlsplit(url)
    for secret in (url, parts.password, parts.query):
        if secret:
            detail = detail.replace(secret, redact_url(url) if secret == url else "***")
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


# ssl.SSLError is an OSError; httpx's timeouts are HTTPErrors; TimeoutError is the whole-call deadline.
def _explain(last: BaseException, answer: BaseException | None, url: str) -> str:
    """The last failure; when the deadline cut the last attempt short, also the answer before it."""
    if isinstance(last, TimeoutError) and answer is not None:
        return f"{_describe(last, url)} (before that: {_describe(answer, url)})"
    return _describe(last, url)


_RETRIED = (httpx.HTTPError, OSError, TimeoutError, _Refused)


class HttpNotifier:
    """Calls a reload URL and expects a 2xx answer, retrying with backoff until its timeout runs out."""

    method = "http"

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        http_method: str,
        timeout: float,
        *,
        backoff: Backoff = RELOAD_BACKOFF,
    ) -> None:
        self._client = client
        self._url = url
        self._http_method = http_method
        self._timeout = timeout
        self._backoff = backoff

    async def notify(self, snapshot: Snapshot) -> None:
        """Call the URL until it answers 2xx; NotifyError, with the last cause, once ``timeout`` ran out.

        The timeout bounds the whole call: every attempt, however slowly the endpoint answers, and the
        pauses between attempts.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        headers = {"X-Infantry-Version": snapshot.version}
        failures = 0
        answer: BaseException | None = None  # the last failure that was not the deadline cutting in
        while True:
            try:
                await _call_status(self._client, self._http_method, self._url, headers, deadline)
            except _RETRIED as exc:
                failures += 1
                answer = answer if isinstance(exc, TimeoutError) else exc
                left = deadline - loop.time()
                if left > 0:
                    hint = exc.retry_after if isinstance(exc, _Refused) else None
                    await asyncio.sleep(min(self._backoff.delay(failures - 1, hint), left))
                if loop.time() < deadline:
                    continue
                raise NotifyError(
                    f"reload call to {redact_url(self._url)} failed {failures} times in {self._timeout:g}s;"
                    f" last: {_explain(exc, answer, self._url)}"
                ) from exc
            logger.info("called %s %s", self._http_method, redact_url(self._url))
            return

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
        result = await threads.run(run_command, self._argv, self._timeout, env)
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


class HttpVerifier:
    """Healthy means a 2xx answer from a URL, tried again and again until the time runs out."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, timeout: float, *, backoff: Backoff = VERIFY_BACKOFF
    ) -> None:
        self._client = client
        self._url = url
        self._timeout = timeout
        self._backoff = backoff

    async def verify(self) -> str | None:
        """GET the URL until it answers 2xx; ``timeout`` bounds all the attempts together."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        last: BaseException = TimeoutError()
        answer: BaseException | None = None  # the last failure that was not the deadline cutting in
        failures = 0
        while loop.time() < deadline:
            try:
                await _call_status(self._client, "GET", self._url, {}, deadline)
            except _RETRIED as exc:
                last, answer = exc, answer if isinstance(exc, TimeoutError) else exc
                failures += 1
                await asyncio.sleep(min(self._backoff.delay(failures - 1), max(0.0, deadline - loop.time())))
                continue
            return None
        return f"{redact_url(self._url)}: {_explain(last, answer, self._url)} within {self._timeout:g}s"

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class CommandVerifier:
    """Healthy means the command exits 0, tried again and again until the time runs out."""

    def __init__(
        self, command: str, timeout: float, environ: Mapping[str, str], *, backoff: Backoff = VERIFY_BACKOFF
    ) -> None:
        self._argv = shlex.split(command)
        self._timeout = timeout
        self._environ = environ
        self._backoff = backoff

    async def verify(self) -> str | None:
        """Run the command until it exits 0 or the verify timeout runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        problem = "did not run"
        failures = 0
        while (left := deadline - loop.time()) > 0:
            result = await threads.run(run_command, self._argv, left, self._environ)
            if result.ok:
                return None
            problem = result.describe()
            failures += 1
            await asyncio.sleep(min(self._backoff.delay(failures - 1), max(0.0, deadline - loop.time())))
        return f"verify command {self._argv[0]!r} {problem}"

    async def aclose(self) -> None:
        """Nothing to release."""
