"""The soak's reader: reads a destination as an app would, all along, checking each pass is one whole version.

Usage: soak_reader.py DEST EXPECTED_FILES REPORT_FILE PROBLEMS_FILE
Like reader.py, a pass lists the top-level names and reads every file through them; if ``..data`` did
not move during the pass, it must have seen EXPECTED_FILES files whose first lines ("version <V>") are
all the same. Unlike reader.py, it runs for many minutes beside a fault injector that edits the
destination on purpose, so each bad pass is written at once to PROBLEMS_FILE as a JSON line with the
pass's start and end (``time.monotonic()``, which is system-wide on Linux): the soak excuses the passes
that overlap its own edits, and no other. It pauses a millisecond between passes so as not to take a
whole core of a small machine from the process under test. It creates REPORT_FILE.ready once its first
pass is checked, and on SIGTERM writes ``{"checked": N, "problems": M}`` to REPORT_FILE.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

PAUSE_SECONDS = 0.001


def main() -> None:
    dest, expected = Path(sys.argv[1]), int(sys.argv[2])
    report, problems_file = Path(sys.argv[3]), Path(sys.argv[4])
    ready = report.with_name(report.name + ".ready")
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    checked = problems = 0
    with problems_file.open("a") as out:
        while not stopping:
            time.sleep(PAUSE_SECONDS)
            started = time.monotonic()
            try:
                before = os.readlink(dest / "..data")
                seen = read_pass(dest)
                after = os.readlink(dest / "..data")
            except (FileNotFoundError, NotADirectoryError):
                continue  # nothing published yet, or a name went away with a swap: read again
            if before != after:
                continue
            checked += 1
            if checked == 1:
                ready.touch()
            versions = sorted(set(seen.values()))
            if len(seen) != expected or len(versions) != 1:
                problems += 1
                what = f"{before}: {len(seen)} files, versions {versions[:4]}"
                out.write(json.dumps({"t0": started, "t1": time.monotonic(), "what": what}) + "\n")
                out.flush()
    report.write_text(json.dumps({"checked": checked, "problems": problems}) + "\n")


def read_pass(dest: Path) -> dict[str, str]:
    """The first line of every file reached through the top-level names."""
    seen: dict[str, str] = {}
    for name in os.listdir(dest):
        if name.startswith(".."):
            continue
        path = dest / name
        files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            seen[str(file.relative_to(dest))] = file.read_text().split("\n", 1)[0]
    return seen


if __name__ == "__main__":
    main()
