"""Running hook commands (check, exec) with a hard deadline, in their own process group, leaving no zombies.

Two promises are kept here:

- :func:`run_command` returns within ``timeout + KILL_GRACE_SECONDS + ~1 s`` whatever the command and
  its descendants do: it waits for the command's own exit, not for its stderr to close, and keeps only
  the last :data:`STDERR_TAIL_BYTES` of what it wrote, reading in bounded chunks, so a hook that writes
  gigabytes costs no more memory than one that writes a line.
- When infantry runs as PID 1 (a container with no init), :func:`start_reaper` reaps the orphans the
  kernel hands to it, without ever taking the exit status of a command :func:`run_command` waits for.

Every child infantry starts must be started by :func:`run_command`: the reaper reaps any other child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

KILL_GRACE_SECONDS = 2.0
# How long stderr is still read once the command has exited: what it wrote just before exiting is
# usually there already; a background child that keeps the pipe open is not waited for.
DRAIN_SECONDS = 0.1
# How long the leader may take to be reaped after SIGKILL (only a process stuck in the kernel is slower).
_REAP_SECONDS = 0.5
# What is kept of a command's stderr: enough for a validator's full report, small beside the pod's
# memory limit. Only the end of the last line of it goes into a log line (MESSAGE_CHARS).
STDERR_TAIL_BYTES = 64 * 1024
MESSAGE_CHARS = 200
_READ_CHUNK = 64 * 1024

# Guards spawn+register in run_command and scan+reap in the reaper, so that the reaper never sees a
# child of run_command that is not yet registered, and never reaps one that is.
_children_lock = threading.Lock()
_owned: set[int] = set()


@dataclass(frozen=True)
class CommandResult:
    """How a command ended: its exit, the end of its last stderr line, and the last 64 KiB of stderr."""

    returncode: int | None
    timed_out: bool
    stderr_tail: str
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        """True when the command exited 0 in time."""
        return not self.timed_out and self.returncode == 0

    def describe(self) -> str:
        """A short phrase for a log line."""
        if self.timed_out:
            return "timed out and was killed"
        detail = f": {self.stderr_tail}" if self.stderr_tail else ""
        if self.returncode is not None and self.returncode < 0:
            return f"was killed by signal {-self.returncode}{detail}"
        return f"exited {self.returncode}{detail}"


def run_command(argv: Sequence[str], timeout: float, env: Mapping[str, str]) -> CommandResult:
    """Run ``argv`` without a shell, for at most ``timeout`` seconds; the result is the command's own exit.

    The command leads a new process group. On timeout the group gets SIGTERM, then SIGKILL after
    ``KILL_GRACE_SECONDS``, and the leader is reaped. Descendants that hold stderr open (a daemon the
    hook started, a ``setsid`` grandchild) are not waited for. Safe to call from several threads.
    """
    try:
        with _children_lock:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            _owned.add(proc.pid)
    except OSError as exc:
        return CommandResult(None, False, f"cannot start {argv[0]!r}: {exc.strerror}")
    try:
        with _Watcher(proc) as watcher:
            if watcher.wait_exit(time.monotonic() + timeout):
                watcher.drain(time.monotonic() + DRAIN_SECONDS)
                return CommandResult(proc.returncode, False, watcher.tail(), watcher.kept())
            _kill_group(proc, watcher)
            return CommandResult(proc.returncode, True, "", watcher.kept())
    except BaseException:
        _kill_group(proc, None)
        raise
    finally:
        with _children_lock:
            _owned.discard(proc.pid)


class _Watcher:
    """Waits for a command's exit while reading its stderr, keeping only the tail.

    It waits on a pidfd, which becomes readable when the command exits, and on the stderr pipe, in one
    ``select``. Without pidfd (an old kernel) it polls the exit every 50 ms instead.
    """

    _POLL = 0.05

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self._proc = proc
        self._stderr: int | None = proc.stderr.fileno()
        self._buffer = bytearray()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stderr, selectors.EVENT_READ)
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(proc.pid)
            self._selector.register(self._pidfd, selectors.EVENT_READ)

    def __enter__(self) -> _Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._selector.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
        if self._proc.stderr is not None:
            self._proc.stderr.close()  # a descendant still writing gets EPIPE, not a stuck pipe

    def wait_exit(self, deadline: float) -> bool:
        """Read stderr until the command exits (True, and reaped) or the deadline passes (False)."""
        while self._proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._select(min(left, self._POLL) if self._pidfd is None else left)
        return True

    def drain(self, deadline: float) -> None:
        """Read what stderr still holds, until it closes or the deadline passes."""
        while self._stderr is not None and (left := deadline - time.monotonic()) > 0:
            if not self._select(left):
                return

    def kept(self) -> bytes:
        """The last ``STDERR_TAIL_BYTES`` of what the command wrote to stderr."""
        return bytes(self._buffer)

    def tail(self) -> str:
        """The last line of what the command wrote to stderr, shortened for a log line.

        A long line is cut at its start, not its end: a validator's verdict comes last.
        """
        lines = self._buffer.decode("utf-8", "replace").strip().splitlines()
        if not lines:
            return ""
        last = lines[-1].strip()
        return last if len(last) <= MESSAGE_CHARS else "..." + last[-(MESSAGE_CHARS - 3) :]

    def _select(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for an event and handle it; False when nothing happened."""
        events = self._selector.select(timeout)
        for key, _ in events:
            if key.fd == self._stderr:
                self._read()
        return bool(events)

    def _read(self) -> None:
        assert self._stderr is not None
        try:
            chunk = os.read(self._stderr, _READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self._selector.unregister(self._stderr)
            self._stderr = None
            return
        self._buffer += chunk
        # Never more than STDERR_TAIL_BYTES + one chunk is held, however much the command writes.
        del self._buffer[:-STDERR_TAIL_BYTES]


def _kill_group(proc: subprocess.Popen[bytes], watcher: _Watcher | None) -> None:
    """SIGTERM the group, SIGKILL it after a grace period, and reap the leader.

    stderr is still read during the grace period, so a command that logs while it shuts down does
    not block on a full pipe.
    """
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, _REAP_SECONDS)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        if watcher is not None:
            if watcher.wait_exit(deadline):
                break
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                break
    if proc.returncode is None:
        logger.warning("command %r (process %d) did not die after SIGKILL", proc.args, proc.pid)
    # Descendants left in the group after the leader exited get the same end.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# -- the reaper, for PID 1 -------------------------------------------------------------------------


def start_reaper(loop: asyncio.AbstractEventLoop) -> bool:
    """Reap orphaned children on SIGCHLD when infantry is PID 1; False (and nothing done) otherwise.

    A container with no init makes infantry PID 1, so every orphan in the container (the background
    child of an ``--exec`` hook, say) becomes infantry's child and, once dead, stays a zombie unless
    infantry reaps it.
    """
    if os.getpid() != 1:
        return False
    loop.add_signal_handler(signal.SIGCHLD, reap_orphans)
    loop.call_soon(reap_orphans)  # orphans that died before the handler was installed
    logger.info("running as PID 1: reaping orphaned processes")
    return True


def fork_owned() -> int:
    """``os.fork()``, the child registered as owned so that the reaper leaves it to its parent.

    The parent must :func:`release` the PID once it has reaped the child.
    """
    with _children_lock:
        pid = os.fork()
        if pid:
            _owned.add(pid)
    return pid


def release(pid: int) -> None:
    """Forget a child of :func:`fork_owned`, once reaped."""
    with _children_lock:
        _owned.discard(pid)


def reap_orphans(proc: Path = Path("/proc")) -> list[int]:
    """Reap every zombie child that :func:`run_command` does not own; the PIDs reaped."""
    reaped = []
    with _children_lock:
        for pid in _zombie_children(proc):
            if pid in _owned:
                continue
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(pid)
    return reaped


def _zombie_children(proc: Path) -> list[int]:
    own = os.getpid()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone already
        if fields[0] == "Z" and int(fields[1]) == own:
            found.append(int(entry.name))
    return found
