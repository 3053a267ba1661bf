"""Infantry's reaper at work as PID 1: orphans die all the time while failing commands run.

Usage: unshare --pid --fork --mount-proc hang_reaper.py COUNT
It first shows that an orphan stays a zombie while nobody reaps, then starts the reaper and, at the
same time, orphans COUNT processes and runs COUNT commands that exit 3 (in several threads). It
prints a JSON report: its PID, whether the reaper started, every command result that was not 3 (a
stolen exit status reads as 0), and the zombies left once every orphan has ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from infantry.process import run_command, start_reaper

ENV = dict(os.environ)


def children() -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid():
            found.append((int(entry.name), fields[0]))
    return found


def zombies() -> list[int]:
    return [pid for pid, state in children() if state == "Z"]


async def until(condition: object, timeout: float) -> None:
    """Let the loop run (and the reaper with it) until ``condition()`` holds or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.02)


async def main(count: int) -> dict[str, object]:
    report: dict[str, object] = {"pid": os.getpid()}
    run_command(["sh", "-c", "sleep 0.05 &"], 10, ENV)
    await until(lambda: zombies(), 5)
    report["zombies_without_reaper"] = len(zombies())

    report["reaper"] = start_reaper(asyncio.get_running_loop())

    async def orphans() -> None:
        for _ in range(count):
            await asyncio.to_thread(run_command, ["sh", "-c", "sleep 0.01 & exit 0"], 10, ENV)

    async def failing() -> list[int | None]:
        return [
            (await asyncio.to_thread(run_command, ["sh", "-c", "exit 3"], 10, ENV)).returncode for _ in range(count)
        ]

    _, *results = await asyncio.gather(orphans(), failing(), failing(), failing())
    report["orphans_started"] = count
    report["wrong_results"] = [code for codes in results for code in codes if code != 3]
    await until(lambda: not children(), 10)
    report["zombies"] = zombies()
    report["children"] = children()
    return report


print(json.dumps(asyncio.run(main(int(sys.argv[1])))))
