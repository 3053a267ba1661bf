"""``infantry render``: fetch once, render the templates, and print the set, or how it differs from a
destination. It writes nothing: spooled content goes to a private temporary directory, not to --dest."""

from __future__ import annotations

import contextlib
import difflib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from infantry import spool
from infantry.assemble import Assembler
from infantry.install import gather
from infantry.settings import Settings
from infantry.snapshot import Snapshot
from infantry.sources import open_sources


async def run_render(settings: Settings, environ: Mapping[str, str], diff: Path | None, out: BinaryIO) -> None:
    """Print the set ``install`` would publish, or with ``diff`` a unified diff from what ``diff`` holds."""
    spool.use(None)
    sources = open_sources(settings)
    async with contextlib.AsyncExitStack() as stack:
        for _, source in sources:
            stack.push_async_callback(source.aclose)
        snapshot = await gather(settings, sources, Assembler(settings, environ))
    if diff is None:
        for path in sorted(snapshot.files):
            data = snapshot.files[path].data
            out.write(f"==> {path} <==\n".encode())
            out.write(data if data.endswith(b"\n") or not data else data + b"\n")
    else:
        out.write(unified_diff(live_files(diff, int(settings.max_file_size)), snapshot, diff).encode())
    out.flush()


def live_files(dest: Path, cap: int) -> dict[str, bytes | None]:
    """What ``dest`` holds for the app: the set ``..data`` points at (or, in the direct layout, the files
    themselves), leaving out infantry's own names. Content over ``cap`` bytes is None. Links are not
    followed below the top: this only reads, but it reads only the set."""
    root = dest / "..data" if (dest / "..data").exists() else dest
    found: dict[str, bytes | None] = {}
    for directory, names, files in os.walk(root):
        names[:] = [n for n in names if not n.startswith("..")]
        for name in files:
            if name.startswith(".."):
                continue
            path = Path(directory, name)
            rel = path.relative_to(root).as_posix()
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                with open(fd, "rb") as handle:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        data = handle.read(cap + 1)
                        found[rel] = data if len(data) <= cap else None
    return found


def unified_diff(live: Mapping[str, bytes | None], snapshot: Snapshot, dest: Path) -> str:
    """A unified diff from ``live`` (what ``dest`` holds) to ``snapshot``, file by file."""
    chunks: list[str] = []
    for path in sorted(set(live) | set(snapshot.files)):
        old = live.get(path)
        new = snapshot.files[path].data if path in snapshot.files else None
        if path in live and path in snapshot.files and old == new:
            continue
        if path in live and old is None:
            chunks.append(f"Files {dest}/{path} and rendered/{path} differ (too large to compare)\n")
            continue
        before = (old or b"").decode(errors="replace").splitlines(keepends=True) if path in live else []
        after = (new or b"").decode(errors="replace").splitlines(keepends=True) if new is not None else []
        for line in difflib.unified_diff(
            before,
            after,
            fromfile=f"{dest}/{path}" if path in live else "/dev/null",
            tofile=f"rendered/{path}" if new is not None else "/dev/null",
        ):
            chunks.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(chunks)
