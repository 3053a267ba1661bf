"""``file://`` sources: a local file or directory tree, watched with watchdog and resynced as a safety net."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from infantry.errors import SettingsError, SourceError
from infantry.settings import SourceSpec
from infantry.snapshot import Limits, Snapshot, SnapshotBuilder, printable

# Events that mean content may have changed. Opening or reading a file (which infantry itself does)
# does not count, or every read would trigger another.
_CHANGE_EVENTS = frozenset({"created", "deleted", "modified", "moved", "closed"})
# Editors and `cp` produce bursts of events for one save; wait this long for quiet before reading.
SETTLE_SECONDS = 0.02


def path_of(url: str) -> Path:
    """The local path of a ``file://`` URL, which must be absolute and on this host."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise SettingsError(f"source: {url!r} must be file:///absolute/path")
    return Path(unquote(parts.path))


def read_tree(root: Path, name: str, limits: Limits) -> Snapshot:
    """Read a file, or every regular file under a directory, into a Snapshot.

    A directory that is itself a kubelet-style volume (a mounted ConfigMap, or infantry's own output)
    is read from the snapshot directory ``..data`` points at, resolved once, so a swap during the read
    cannot mix two versions; if ``..data`` moved meanwhile, the read starts again.
    Links are followed only to regular files inside the tree.
    """
    data = root / "..data"
    for _ in range(5):
        try:
            target = os.readlink(data)
        except OSError:
            break  # not a kubelet-style volume
        try:
            snapshot = _read(root, root / target, name, limits)
        except SourceError:
            snapshot = None  # the directory went away under us: a swap; read the new one
        if snapshot is not None and os.readlink(data) == target:
            return snapshot
    return _read(root, root, name, limits)


def _read(root: Path, base: Path, name: str, limits: Limits) -> Snapshot:
    builder = SnapshotBuilder(name, limits)
    try:
        st = root.stat()
    except OSError as exc:
        raise SourceError(name, f"cannot read {root}: {exc.strerror}") from exc
    if stat.S_ISREG(st.st_mode):
        _add_file(builder, root, root.name)
        return builder.build()
    if not stat.S_ISDIR(st.st_mode):
        raise builder.reject(f"{root} is neither a file nor a directory")
    real_base = base.resolve()
    for dirpath, dirnames, filenames in os.walk(base, onerror=_raise):
        here = Path(dirpath)
        for entry_name in sorted(filenames + dirnames):
            path = here / entry_name
            rel = path.relative_to(base).as_posix()
            if not path.is_symlink():
                if entry_name in filenames:
                    _add_file(builder, path, rel)
                else:
                    builder.check_dir(rel)
                continue
            target = path.resolve()
            if not target.is_relative_to(real_base) or not target.is_file():
                raise builder.reject(f"{printable(rel)} is a link to something outside the tree or not a regular file")
            if entry_name in dirnames:
                dirnames.remove(entry_name)
            _add_file(builder, target, rel)
    return builder.build()


def _raise(exc: OSError) -> None:
    raise exc


def _add_file(builder: SnapshotBuilder, path: Path, rel: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SourceError(builder.source, f"cannot read {printable(rel)}: {exc.strerror}") from exc
    with open(fd, "rb", closefd=True) as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise builder.reject(f"{printable(rel)} is not a regular file")
        builder.check_size(rel, st.st_size)
        # Read one byte past the limit, so a file that grew since fstat is still caught.
        data = handle.read(builder.remaining() + 1)
    builder.add(rel, data, executable=bool(st.st_mode & 0o100))


class _Wakeup(FileSystemEventHandler):
    """Sets an asyncio event from watchdog's thread when something relevant changed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event, only: str | None) -> None:
        self._loop = loop
        self._event = event
        self._only = only

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _CHANGE_EVENTS:
            return
        if self._only is not None:
            names = {os.path.basename(os.fsdecode(event.src_path)), os.path.basename(os.fsdecode(event.dest_path))}
            if self._only not in names:
                return
        self._loop.call_soon_threadsafe(self._event.set)


class FileSource:
    """A local file or tree."""

    def __init__(self, spec: SourceSpec, limits: Limits, interval: float) -> None:
        self.root = path_of(spec.url)
        self.name = spec.url
        self._limits = limits
        self._interval = interval

    async def fetch(self) -> Snapshot:
        """Read the tree once."""
        return await asyncio.to_thread(read_tree, self.root, self.name, self._limits)

    async def watch(self) -> AsyncIterator[Snapshot | None]:
        """The tree now, then again on each change that watchdog reports, or every interval."""
        changed = asyncio.Event()
        observer = self._start_observer(changed)
        try:
            last = await self.fetch()
            yield last
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=self._interval)
                while changed.is_set():
                    changed.clear()
                    await asyncio.sleep(SETTLE_SECONDS)
                snapshot = await self.fetch()
                yield snapshot if snapshot.version != last.version else None
                last = snapshot
        finally:
            observer.stop()
            await asyncio.to_thread(observer.join)

    def _start_observer(self, changed: asyncio.Event) -> BaseObserver:
        """Watch the tree (or, for one file, its directory). Without a watch, resync still runs."""
        is_dir = self.root.is_dir()
        target = self.root if is_dir else self.root.parent
        handler = _Wakeup(asyncio.get_running_loop(), changed, None if is_dir else self.root.name)
        observer = Observer()
        try:
            observer.schedule(handler, str(target), recursive=is_dir)
            observer.start()
        except OSError as exc:
            raise SourceError(self.name, f"cannot watch {target}: {exc.strerror}") from exc
        return observer

    async def aclose(self) -> None:
        """Nothing stays open between watches."""
