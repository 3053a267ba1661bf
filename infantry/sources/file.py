"""``file://`` sources: a local file or directory tree, watched with watchdog and resynced as a safety net."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from infantry import threads
from infantry.errors import SettingsError, SourceError, UnsafeDataError
from infantry.settings import SourceSpec
from infantry.snapshot import FileEntry, Limits, Snapshot, SnapshotBuilder, printable
from infantry.spool import Blob

logger = logging.getLogger(__name__)

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


# A read that raced a change (an entry vanished, or changed kind, while the tree was walked) is
# simply done again at once; only a tree that keeps changing this many times becomes an error.
READ_ATTEMPTS = 3


class _Raced(Exception):
    """The tree changed under the read. ``final`` is what to raise if it still does on the last try."""

    def __init__(self, final: SourceError | UnsafeDataError) -> None:
        super().__init__(str(final))
        self.final = final


class Reuse:
    """Spooled files from the last read, reused while their stat is unchanged.

    Reading a tree again every interval must not copy every large file into the spool again. A file
    is reused only if its stat (device, inode, size, mode, mtime and ctime) is what it was, and was
    already older than RACY_NS then: a later write changes mtime and ctime to a newer time.
    """

    def __init__(self) -> None:
        self.old: dict[str, tuple[tuple[int, ...], FileEntry]] = {}
        self.new: dict[str, tuple[tuple[int, ...], FileEntry]] = {}

    def done(self) -> None:
        """The read succeeded: what it saw is what the next read may reuse."""
        self.old, self.new = self.new, {}


RACY_NS = 2_000_000_000


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)


def read_tree(root: Path, name: str, limits: Limits, reuse: Reuse | None = None) -> Snapshot:
    """Read a file, or every regular file under a directory, into a Snapshot.

    A directory that is itself a kubelet-style volume (a mounted ConfigMap, or infantry's own output)
    is read from the snapshot directory ``..data`` points at, resolved once, so a swap during the read
    cannot mix two versions. ``..data`` is followed only to a ``..``-named directory directly inside
    the tree. Links are followed only to regular files inside the tree.

    Raises only SourceError (the tree is missing, unreadable, or kept changing while read) and
    UnsafeDataError (a link loop, a link leaving the tree, a bad name or size). Safe to call from
    several threads: it keeps no state.
    """
    raced: _Raced | None = None
    for _ in range(READ_ATTEMPTS):
        if reuse is not None:
            reuse.new = {}
        try:
            snapshot = _read_once(root, name, limits, reuse)
        except _Raced as exc:
            raced = exc
        else:
            if reuse is not None:
                reuse.done()
            return snapshot
    assert raced is not None
    raise raced.final


def _read_once(root: Path, name: str, limits: Limits, reuse: Reuse | None = None) -> Snapshot:
    builder = SnapshotBuilder(name, limits)
    # (1) The root itself: a missing store is temporary trouble, a looping one is unsafe.
    try:
        st = root.stat()
    except OSError as exc:
        raise _os_error(name, str(root), exc, vanished_is_race=False) from exc
    if stat.S_ISREG(st.st_mode):
        # The source names this file itself: follow a link to it (a ConfigMap's app.yaml -> ..data/app.yaml).
        _add_file(builder, root, root.name, follow=True, reuse=reuse)
        return builder.build()
    if not stat.S_ISDIR(st.st_mode):
        raise builder.reject(f"{root} is neither a file nor a directory")
    # (2) A kubelet-style volume is read from the one snapshot directory ``..data`` names right now.
    snapshot_dir = _snapshot_dir(root, name)
    base = root if snapshot_dir is None else root / snapshot_dir
    try:
        real_base = Path(os.path.realpath(base, strict=True))
        real_root = Path(os.path.realpath(root, strict=True))
    except OSError as exc:
        raise _os_error(name, str(base), exc) from exc
    if snapshot_dir is not None and real_base != real_root / snapshot_dir:
        raise _Raced(builder.reject(f"{root}/{snapshot_dir} was replaced by a link while it was read"))
    # (3) Walk it, following links only to regular files inside it; every file opened is checked to be
    # inside it by what its descriptor is, so a link swapped in after a check is caught.
    _walk(builder, base, real_base, reuse)
    # (4) If ``..data`` moved meanwhile, the snapshot read may be the one being removed: read again.
    if snapshot_dir is not None and _snapshot_dir(root, name) != snapshot_dir:
        raise _Raced(SourceError(name, f"{root}/..data kept moving while it was read"))
    return builder.build()


def _snapshot_dir(root: Path, name: str) -> str | None:
    """The ``..``-named directory inside ``root`` that ``root/..data`` points at, or None if there is no link."""
    data = root / "..data"
    try:
        target = os.readlink(data)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None  # a plain entry named ..data: the walk refuses it as a reserved name
        raise _os_error(name, str(data), exc) from exc
    if "/" in target or not target.startswith("..") or target in ("..", "..data"):
        raise UnsafeDataError(
            name, f"{data} points to {printable(target)}, not to a '..' snapshot directory inside the tree"
        )
    try:
        st = os.lstat(root / target)
    except OSError as exc:
        raise _os_error(name, str(root / target), exc) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDataError(name, f"{data} points to {printable(target)}, which is not a directory")
    return target


def _walk(builder: SnapshotBuilder, base: Path, real_base: Path, reuse: Reuse | None) -> None:
    # Plain strings, not Path objects: a tree may hold 100,000 files, read again every interval.
    name = builder.source
    inside = str(real_base)
    pending = [(str(base), "")]
    while pending:
        here, prefix = pending.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise _os_error(name, here, exc) from exc
        for entry in entries:
            path = entry.path
            rel = prefix + entry.name
            try:
                is_link = entry.is_symlink()
                is_dir = not is_link and entry.is_dir(follow_symlinks=False)
            except OSError as exc:
                raise _os_error(name, printable(rel), exc) from exc
            if is_dir:
                builder.check_dir(rel)
                pending.append((path, rel + "/"))
            elif is_link:
                _add_file(builder, _link_target(builder, path, rel, real_base), rel, inside=inside, reuse=reuse)
            else:
                _add_file(builder, path, rel, inside=inside, reuse=reuse)


def _link_target(builder: SnapshotBuilder, path: str, rel: str, real_base: Path) -> Path:
    """Where a link inside the tree leads, if that is a place inside the tree; else UnsafeDataError."""
    try:
        target = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError as exc:
        # Either the link went away (a change in progress) or it dangles: read again to tell which.
        raise _Raced(builder.reject(f"{printable(rel)} is a link to nothing")) from exc
    except OSError as exc:
        raise _os_error(builder.source, printable(rel), exc) from exc
    if not target.is_relative_to(real_base):
        raise builder.reject(f"{printable(rel)} is a link to something outside the tree")
    return target


def _opened_path(fd: int) -> str | None:
    """Where the file behind ``fd`` is, as the kernel resolved it; None where /proc cannot say."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _add_file(
    builder: SnapshotBuilder,
    path: Path | str,
    rel: str,
    *,
    follow: bool = False,
    inside: str | None = None,
    reuse: Reuse | None = None,
) -> None:
    """Read one regular file. Unless ``follow``, a final link is not followed: links were checked already.

    With ``inside``, the file opened must be under that directory, whatever links were swapped in on
    the way since they were checked.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # it became a link after it was listed or resolved: a change in progress
            raise _Raced(builder.reject(f"{printable(rel)} keeps changing into a link")) from exc
        raise _os_error(builder.source, printable(rel), exc) from exc
    with open(fd, "rb", closefd=True) as handle:
        if inside is not None:
            opened = _opened_path(handle.fileno())
            if opened is not None and not (opened == inside or opened.startswith(inside.rstrip("/") + "/")):
                raise _Raced(builder.reject(f"{printable(rel)} is a link to something outside the tree"))
        st = os.fstat(handle.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise _Raced(builder.reject(f"{printable(rel)} is a link to a directory, not to a regular file"))
        if not stat.S_ISREG(st.st_mode):
            raise builder.reject(f"{printable(rel)} is not a regular file")
        builder.check_size(rel, st.st_size)
        key = _stat_key(st)
        if reuse is not None and (known := reuse.old.get(rel)) is not None and known[0] == key:
            builder.add_entry(rel, known[1])  # unchanged since the last read: its spooled copy serves
            reuse.new[rel] = known
            return

        def read(size: int) -> bytes:
            try:
                return handle.read(size)
            except OSError as exc:
                raise _os_error(builder.source, printable(rel), exc) from exc

        # Streamed, with the limits enforced as it goes, so a file that grew since fstat is still caught.
        entry = builder.add_stream(rel, read, executable=bool(st.st_mode & 0o100))
        # Worth reusing next time: a spooled file, settled before it was read, unchanged while read.
        settled = max(st.st_mtime_ns, st.st_ctime_ns) < time.time_ns() - RACY_NS
        if reuse is not None and isinstance(entry.content, Blob) and settled and _stat_key(os.fstat(fd)) == key:
            reuse.new[rel] = (key, entry)


def _os_error(source: str, what: str, exc: OSError, *, vanished_is_race: bool = True) -> Exception:
    """Translate an OSError met while reading the tree into the error a source may raise."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ELOOP:
        return UnsafeDataError(source, f"{what} is a link loop")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SourceError(source, f"cannot read {what}: {reason}", temporary=False)
    error = SourceError(source, f"cannot read {what}: {reason}")
    if vanished_is_race and exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return _Raced(SourceError(source, f"the tree kept changing while it was read ({what}: {reason})"))
    return error


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
        self._reuse = Reuse()
        self._refreshed = False
        self._wakeup: asyncio.Event | None = None

    def refresh(self) -> None:
        """Read every file again, and answer with the whole set even if it is unchanged."""
        self._reuse = Reuse()
        self._refreshed = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def fetch(self) -> Snapshot:
        """Read the tree once."""
        return await threads.run(read_tree, self.root, self.name, self._limits, self._reuse)

    async def watch(self) -> AsyncIterator[Snapshot | None]:
        """The tree now, then again on each change that watchdog reports, or every interval.

        Raises only SourceError and UnsafeDataError. A watcher that died, or that watches a directory
        since replaced, is started again; the resync every interval covers the gap.
        """
        changed = self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        observer, watched = self._start_observer(changed)
        try:
            last = await self.fetch()
            yield last
            while True:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
                # that arrives as the event is set, and the task would then never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await changed.wait()
                # Settle, but never for longer than an interval: a tree that never stops changing is
                # still read every interval, not starved.
                settle_until = loop.time() + self._interval
                while changed.is_set() and loop.time() < settle_until:
                    changed.clear()
                    await asyncio.sleep(SETTLE_SECONDS)
                if not _observing(observer, watched):
                    logger.info(
                        "%s: the file watcher stopped or its directory was replaced; starting it again", self.name
                    )
                    await _stop(observer)
                    observer, watched = self._start_observer(changed)
                refreshed, self._refreshed = self._refreshed, False
                snapshot = await self.fetch()
                if snapshot.version == last.version and not refreshed:
                    yield None  # and keep holding ``last``, the set the agent holds too: one copy, not two
                    continue
                last = snapshot
                yield snapshot
        finally:
            await _stop(observer)

    def _start_observer(self, changed: asyncio.Event) -> tuple[BaseObserver, _Watched]:
        """Watch the tree (or, for one file, its directory). Without a watch, resync still runs."""
        is_dir = self.root.is_dir()
        target = self.root if is_dir else self.root.parent
        handler = _Wakeup(asyncio.get_running_loop(), changed, None if is_dir else self.root.name)
        observer = Observer()
        try:
            watched = _Watched.of(target)
            observer.schedule(handler, str(target), recursive=is_dir)
            observer.start()
        except OSError as exc:
            observer.stop()
            raise SourceError(self.name, f"cannot watch {target}: {exc.strerror or exc}") from exc
        return observer, watched

    async def aclose(self) -> None:
        """Nothing stays open between watches."""


@dataclass(frozen=True)
class _Watched:
    """The directory a watcher was started on, by identity: a replaced directory is no longer watched."""

    path: Path
    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> _Watched:
        st = path.stat()
        return cls(path, st.st_dev, st.st_ino)

    def still_there(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.device, self.inode)


def _observing(observer: BaseObserver, watched: _Watched) -> bool:
    """Whether the watcher still runs, every one of its threads, on the directory it was started on."""
    return observer.is_alive() and all(emitter.is_alive() for emitter in observer.emitters) and watched.still_there()


async def _stop(observer: BaseObserver) -> None:
    observer.stop()
    if observer.is_alive():
        await threads.run(observer.join)
