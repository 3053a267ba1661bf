"""Run a command while CPU hogs keep every core busy, to shake out tests that only pass on an idle machine.

Usage: python tests/load.py [--hogs N] [COMMAND ...]
The default command is `.venv/bin/pytest -q -x -p no:cacheprovider`, and the default is one hog per
core. The hogs (`python -c 'while 1: pass'`) are killed at the end whatever happens, even if this script
is itself killed (they, and the command, die with it), and the script exits with the command's code.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from types import FrameType

DEFAULT_COMMAND = [".venv/bin/pytest", "-q", "-x", "-p", "no:cacheprovider"]
PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send ``sig`` to the child when this script dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def start_hogs(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` processes that each spin one core until killed."""
    return [
        subprocess.Popen([sys.executable, "-c", "while 1: pass"], preexec_fn=_die_with_parent()) for _ in range(count)
    ]


def stop_hogs(hogs: Sequence[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        with contextlib.suppress(ProcessLookupError):
            hog.kill()
    for hog in hogs:
        hog.wait()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(command: Sequence[str], hogs: int) -> int:
    """Run ``command`` under ``hogs`` CPU hogs; its exit code (128 + N if signal N ended it)."""
    # SIGTERM and SIGHUP unwind through the finally below, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    started = start_hogs(hogs)
    try:
        print(f"load.py: {hogs} CPU hogs running; {' '.join(command)}", file=sys.stderr, flush=True)
        code = subprocess.call(command, preexec_fn=_die_with_parent(signal.SIGTERM))
    finally:
        stop_hogs(started)
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="CPU hogs to run (default: one per core)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run under load")
    args = parser.parse_args(argv)
    return run(args.command or DEFAULT_COMMAND, args.hogs)


if __name__ == "__main__":
    sys.exit(main())
