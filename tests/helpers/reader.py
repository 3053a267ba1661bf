"""A reader that reads a destination the way an app would, checking each pass is one whole version.

Usage: reader.py DEST EXPECTED_FILES REPORT_FILE
Every file holds "version <V>" on its first line. A pass lists the top-level names, reads every file
through them, and, if ``..data`` did not move during the pass, requires that it saw EXPECTED_FILES files
all carrying the same version. Once its first pass is checked it creates REPORT_FILE.ready, so that a
test starts changing DEST only once the reader is really reading. It runs until SIGTERM, then writes
"<passes checked> <problems>" and the first problems to REPORT_FILE.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

dest, expected, report = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
ready = report.with_name(report.name + ".ready")
stop = False


def on_term(signum: int, frame: FrameType | None) -> None:
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
checked = 0
problems: list[str] = []


def read_pass() -> dict[str, str] | None:
    seen: dict[str, str] = {}
    for name in os.listdir(dest):
        if name.startswith(".."):
            continue
        path = dest / name
        files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            seen[str(file.relative_to(dest))] = file.read_text().split("\n", 1)[0]
    return seen


while not stop:
    try:
        before = os.readlink(dest / "..data")
        seen = read_pass()
        after = os.readlink(dest / "..data")
    except (FileNotFoundError, NotADirectoryError):
        continue  # nothing published yet, or a name went away with a swap: read again
    if seen is None or before != after:
        continue
    checked += 1
    if checked == 1:
        ready.touch()
    versions = set(seen.values())
    if len(seen) != expected or len(versions) != 1:
        problems.append(f"{before}: {len(seen)} files, versions {sorted(versions)[:4]}")

report.write_text(f"{checked} {len(problems)}\n" + "\n".join(problems[:20]) + "\n")
