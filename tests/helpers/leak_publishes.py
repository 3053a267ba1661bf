"""Publish many times through the paths `watch` uses, in a process of its own, and report its resources.

Usage: leak_publishes.py DEST COUNT
Prints JSON: open descriptors, threads and RSS (KiB) after a warm-up and after COUNT more publishes.
A process of its own, so threads and sockets other tests leave behind cannot move the counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path

from infantry import threads
from infantry.errors import CheckFailed
from infantry.notify import ExecNotifier
from infantry.publish import KubeletPublisher, make_gate
from infantry.snapshot import FileEntry, Snapshot

dest, count = Path(sys.argv[1]), int(sys.argv[2])


def resources() -> dict[str, int]:
    rss = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(), "rss": int(rss.split()[1])}


async def main() -> None:
    publisher = KubeletPublisher(dest, 0o644)
    gate = make_gate("true", 10, dict(os.environ))
    refused = make_gate("false", 10, dict(os.environ))
    hook = ExecNotifier("true", 10, dict(os.environ))

    async def publish_many(n: int, offset: int) -> None:
        for i in range(offset, offset + n):
            snapshot = Snapshot.of({"app.yaml": FileEntry(f"n: {i}\n".encode()), "conf/x": FileEntry(b"same")})
            if i % 10 == 0:
                try:
                    await threads.run(publisher.publish, snapshot, refused)
                except CheckFailed:
                    continue
                raise AssertionError("the refusing gate let a set through")
            assert await threads.run(publisher.publish, snapshot, gate)
            await hook.notify(snapshot)
            await threads.run(publisher.tidy)

    async def settled(baseline: int) -> None:
        # A worker thread ends just after handing back its result: give the last ones a moment to go.
        async with asyncio.timeout(20):
            while threading.active_count() > baseline:
                await asyncio.sleep(0.01)

    await publish_many(30, 0)  # warm up: caches and allocator arenas
    await settled(1)
    before = resources()
    await publish_many(count, 30)
    await settled(before["threads"])
    print(json.dumps({"before": before, "after": resources()}))


asyncio.run(main())
