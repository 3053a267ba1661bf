"""Runs SignalNotifier(SIGHUP, process=NAME) once, as whatever user this helper was started as.

Usage: notify_process.py NAME
Prints "ok" or "NotifyError: <message>" on stdout; the notifier's log lines go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from infantry.errors import NotifyError
from infantry.notify import SignalNotifier
from infantry.snapshot import FileEntry, Snapshot

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
try:
    asyncio.run(SignalNotifier(signal.SIGHUP, process=sys.argv[1]).notify(Snapshot.of({"a": FileEntry(b"a")})))
except NotifyError as exc:
    print(f"NotifyError: {exc}")
else:
    print("ok")
