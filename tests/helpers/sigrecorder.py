"""A stand-in app for the tests: it records every SIGHUP it receives, and what the config said then.

Usage: sigrecorder.py PID_FILE RECORD_FILE [CONFIG_FILE]
Each SIGHUP appends one line to RECORD_FILE: the time, then the config's content (or '-').
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

pid_file, record = Path(sys.argv[1]), Path(sys.argv[2])
config = Path(sys.argv[3]) if len(sys.argv) > 3 else None


def on_hup(signum: int, frame: FrameType | None) -> None:
    content = config.read_text().strip().replace("\n", "|") if config is not None else "-"
    with record.open("a") as out:
        out.write(f"{time.time():.6f} {content}\n")


signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
record.touch()
tmp = pid_file.with_suffix(".tmp")
tmp.write_text(f"{os.getpid()}\n")
tmp.rename(pid_file)
while True:
    signal.pause()
