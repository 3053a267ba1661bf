"""SignalNotifier with PID files that name no process it may signal, inside a PID namespace of its own.

Usage: unshare --pid --fork --mount-proc notify_pidfile.py WORKDIR CONTENT...
As PID 1 of the namespace it runs itself again, so that the notifier runs as an ordinary process that
a stray kill(-1), kill(0) or kill(own PID) would reach, beside an app (sigrecorder.py) that records
every SIGHUP. For each CONTENT ("SELF" stands for the notifier's own PID) it writes the PID file and
asks the notifier to send SIGHUP; then it does the same with the app's PID, which must work. It prints
a JSON report: each content's outcome, and the SIGHUPs the app had got before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if os.getpid() == 1:
    sys.exit(subprocess.call([sys.executable, *sys.argv]))

from infantry.errors import NotifyError
from infantry.notify import SignalNotifier
from infantry.snapshot import FileEntry, Snapshot

workdir, contents = Path(sys.argv[1]), sys.argv[2:]
app_pid_file, record, pid_file = workdir / "app.pid", workdir / "signals.log", workdir / "target.pid"
app = subprocess.Popen(
    [sys.executable, str(Path(__file__).with_name("sigrecorder.py")), str(app_pid_file), str(record)]
)
deadline = time.monotonic() + 10
while not app_pid_file.exists():
    if time.monotonic() > deadline:
        sys.exit("the app did not write its PID file")
    time.sleep(0.01)

notifier = SignalNotifier(signal.SIGHUP, pid_file=pid_file)
snapshot = Snapshot.of({"a": FileEntry(b"a")})


def outcome(content: str) -> str:
    pid_file.write_text(content.replace("SELF", str(os.getpid())))
    try:
        asyncio.run(notifier.notify(snapshot))
    except NotifyError as exc:
        return f"NotifyError: {exc}"
    return "ok"


def signals() -> int:
    return len(record.read_text().splitlines())


report: dict[str, object] = {"outcomes": {content: outcome(content) for content in contents}}
report["signals_before_control"] = signals()
report["control"] = outcome(str(app.pid))
deadline = time.monotonic() + 10
while signals() < 1 and time.monotonic() < deadline:
    time.sleep(0.01)
report["signals_after_control"] = signals()
app.terminate()
app.wait()
print(json.dumps(report))
