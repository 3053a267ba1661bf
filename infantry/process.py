"""Running hook commands (check, exec) with a timeout, in their own process group, leaving no zombies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KILL_GRACE_SECONDS = 2.0
_TAIL_BYTES = 400


@dataclass(frozen=True)
class CommandResult:
    """How a command ended, with the last line of what it wrote to stderr."""

    returncode: int | None
    timed_out: bool
    stderr_tail: str

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
    """Run ``argv`` without a shell. On timeout the whole process group is terminated, then killed."""
    try:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return CommandResult(None, False, f"cannot start {argv[0]!r}: {exc.strerror}")
    try:
        _, stderr = proc.communicate(timeout=timeout)
        return CommandResult(proc.returncode, False, _tail(stderr))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return CommandResult(proc.returncode, True, "")
    except BaseException:
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group, SIGKILL it after a grace period, and reap the leader."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Grandchildren left in the group after the leader exited get the same end.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(stderr: bytes) -> str:
    lines = stderr[-_TAIL_BYTES:].decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:200] if lines else ""
