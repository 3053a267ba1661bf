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
from infantry.publish import DATA
from infantry.settings import Settings
from infantry.snapshot import Snapshot, default_mode, printable
from infantry.sources import open_sources
from infantry.status import snapshot_dir


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
        live = live_files(diff, int(settings.max_file_size))
        out.write(unified_diff(live, snapshot, diff, settings.file_mode).encode())
    out.flush()


def live_files(dest: Path, cap: int) -> dict[str, tuple[bytes | None, int]]:
    """What ``dest`` holds for the app, with each file's mode: the set ``..data`` points at (or, in the
    direct layout, the files themselves), leaving out infantry's own names. Content over ``cap`` bytes
    is None. It only reads, and only the set: a ``..data`` that does not point at a snapshot directory
    of the destination counts as nothing live, and no link below it is followed."""
    if os.path.lexists(dest / DATA):
        live_dir, _ = snapshot_dir(dest, DATA)
        if live_dir is None:
            return {}
        root = dest / live_dir
    else:
        root = dest
    found: dict[str, tuple[bytes | None, int]] = {}
    pending = [root]
    while pending:  # its own stack: a tree of any depth, without recursion
        directory = pending.pop()
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(".."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    rel = Path(entry.path).relative_to(root).as_posix()
                    with contextlib.suppress(OSError):
                        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                        with open(fd, "rb") as handle:
                            st = os.fstat(fd)
                            if stat.S_ISREG(st.st_mode):
                                data = handle.read(cap + 1)
                                found[rel] = (data if len(data) <= cap else None, stat.S_IMODE(st.st_mode))
    return found


def unified_diff(live: Mapping[str, tuple[bytes | None, int]], snapshot: Snapshot, dest: Path, file_mode: int) -> str:
    """A unified diff from ``live`` (what ``dest`` holds) to ``snapshot``, file by file, with a line
    for each mode that changes (as git shows one)."""
    chunks: list[str] = []
    for path in sorted(set(live) | set(snapshot.files)):
        shown = path if path.isprintable() else printable(path)  # no terminal escape from a file's name
        old, old_mode = live.get(path, (None, 0))
        entry = snapshot.files.get(path)
        new = entry.data if entry is not None else None
        if entry is not None and path in live:
            new_mode = entry.mode if entry.mode is not None else default_mode(entry.executable, file_mode)
            if new_mode != old_mode:
                chunks.append(f"mode of {shown}: {old_mode:04o} -> {new_mode:04o}\n")
        if path in live and entry is not None and old == new:
            continue
        if path in live and old is None:
            chunks.append(f"Files {dest}/{shown} and rendered/{shown} differ (too large to compare)\n")
            continue
        before = (old or b"").decode(errors="replace").splitlines(keepends=True) if path in live else []
        after = (new or b"").decode(errors="replace").splitlines(keepends=True) if new is not None else []
        for line in difflib.unified_diff(
            before,
            after,
            fromfile=f"{dest}/{shown}" if path in live else "/dev/null",
            tofile=f"rendered/{shown}" if new is not None else "/dev/null",
        ):
            chunks.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(chunks)
