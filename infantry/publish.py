"""Atomic publishing of Snapshots into the destination.

The kubelet layout (the default) is the one ConfigMap volumes use::

    DEST/..2026_11_25_19_40_00.123456789/   one directory per published snapshot
    DEST/..data -> ..2026_11_25_19_40_00.123456789
    DEST/..previous -> ..2026_11_25_19_39_00.000000001   kept for rollback
    DEST/app.yaml -> ..data/app.yaml           one link per top-level entry

A new snapshot is written in full into a fresh directory, checked, and then made live by one
``rename(2)`` of a temporary symlink over ``..data``. Readers that go through the top-level links see
the whole old set or the whole new set. Nothing is ever written through a link found in the destination:
links are only read, and replaced by rename.

The direct layout writes plain files, each by temporary file and ``rename(2)``: atomic per file only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal, Protocol

from infantry.errors import CheckFailed, ContentLost, PublishError, SettingsError
from infantry.process import run_command
from infantry.snapshot import FileEntry, Snapshot, check_path, default_mode, entry_with_mode, printable
from infantry.spool import CHUNK, INLINE_MAX, Blob, Digest, remove

logger = logging.getLogger(__name__)

DATA = "..data"
PREVIOUS = "..previous"
MANIFEST = "..infantry-files"
MAX_MANIFEST = 64 << 20  # the JSON list of a set's paths: far more than 100,000 paths need
TMP_PREFIX = "..tmp-"
SNAPSHOT_DIR = re.compile(r"\.\.[0-9]{4}(_[0-9]{2}){5}\.[0-9]{9}")
DIR_MODE = 0o755

SPOOL = "..spool"  # content on its way in: see infantry.spool
FALLBACK = "..fallback"
TOLD = "..told"

Gate = Callable[[Path], None]
"""A check run on the staged directory before it goes live; it raises CheckFailed to refuse it."""

# A file modified this close to the moment it was recorded can be rewritten within the same tick of the
# kernel's coarse clock without its stat changing; its content is compared until it is older than this.
RACY_NS = 2_000_000_000

# What a stat says of a file that a rewrite would change: inode, size, mtime, mode, and ctime (which,
# unlike mtime, no one can set back after an edit). A set may hold 100,000 files, so the ledger keeps
# one small integer per file: a keyed hash of inode, size, mtime and mode, one of ctime, and a bit
# saying the record is racy. The key is random per process, so no one can make an edit that hashes
# the same.
_STAT = struct.Struct("<QQqI")
_CTIME = struct.Struct("<q")
_KEY = os.urandom(16)


def _keyed(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=4, key=_KEY).digest(), "little")


def _signature(st: os.stat_result) -> int:
    """The file's stat as ``stat_hash << 32 | ctime_hash``."""
    ident = _keyed(_STAT.pack(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode & 0xFFFFFFFF))
    return ident << 32 | _keyed(_CTIME.pack(st.st_ctime_ns))


def make_gate(command: str, timeout: float, environ: Mapping[str, str]) -> Gate:
    """The ``--check`` gate: run the command with the staged directory appended; non-zero refuses it."""
    argv = shlex.split(command)
    if not argv:
        raise SettingsError("check: the command is empty")

    def gate(staged: Path) -> None:
        env = {**environ, "INFANTRY_STAGED": str(staged)}
        result = run_command([*argv, str(staged)], timeout, env)
        if not result.ok:
            raise CheckFailed(f"check command {argv[0]!r} {result.describe()}")

    return gate


class Ledger:
    """What infantry last saw of each published file, so a check re-reads only what changed on disk.

    A file whose stat is unchanged since it was recorded (and was not "racy" then, see RACY_NS) still
    holds what was written; any other file is read and compared byte for byte. Not thread-safe: it
    belongs to one publisher, whose methods are not safe to call concurrently.
    """

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}  # rel -> signature << 1 | racy

    def record(self, rel: str, st: os.stat_result, now_ns: int | None = None) -> None:
        """Remember ``rel`` as verified, with the stat taken when it was written or compared."""
        racy = st.st_mtime_ns >= (now_ns if now_ns is not None else time.time_ns()) - RACY_NS
        self._seen[rel] = _signature(st) << 1 | racy

    def unchanged(self, rel: str, st: os.stat_result) -> bool:
        """True when ``st`` is the stat recorded for ``rel``, racy or not."""
        seen = self._seen.get(rel)
        return seen is not None and seen >> 1 == _signature(st)

    def trusted(self, rel: str, st: os.stat_result) -> bool:
        """True when ``st`` shows ``rel`` untouched since it was recorded, and the record is not racy."""
        seen = self._seen.get(rel)
        return seen is not None and seen == _signature(st) << 1

    def rebase(self, rel: str, st: os.stat_result) -> None:
        """Accept a new ctime for ``rel`` when nothing else changed: infantry's own hard links and
        removals of old snapshots change the ctime of the inodes the live snapshot shares with them."""
        seen = self._seen.get(rel)
        now = _signature(st)
        if seen is not None and seen >> 33 == now >> 32:
            self._seen[rel] = now << 1 | (seen & 1)


def _read_nofollow(path: Path | str, limit: int = -1, dir_fd: int | None = None) -> tuple[bytes, os.stat_result]:
    """Up to ``limit`` bytes of a regular file, and its stat; never follows a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    with open(fd, "rb", closefd=True) as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
        return handle.read(limit), st


def _read_content(
    path: Path | str, dir_fd: int | None = None, limit: int | None = None
) -> tuple[bytes | Digest, os.stat_result]:
    """A regular file's content as a FileEntry holds it (the bytes if small, else their digest), and
    its stat; never follows a link, and reads at most ``limit`` bytes (and a chunk) when given."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    with open(fd, "rb", closefd=True) as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
        head = handle.read(INLINE_MAX + 1)
        if len(head) <= INLINE_MAX:
            return head, st
        h = hashlib.sha256(head)
        size = len(head)
        while (limit is None or size <= limit) and (chunk := handle.read(CHUNK)):
            h.update(chunk)
            size += len(chunk)
        return Digest(size, h.digest()), st


def _holds(rel: str, dir_fd: int, entry: FileEntry) -> bool:
    """True when the file ``rel`` under ``dir_fd`` has the entry's content, read from disk."""
    content, _ = _read_content(rel, dir_fd, entry.size)
    return content == entry.content


def _still_holds(ledger: Ledger, rel: str, dir_fd: int, entry: FileEntry) -> bool:
    """True when ``rel`` (under ``dir_fd``) still holds ``entry``: its stat is as recorded, and a file
    recorded too recently to trust its stat is compared by content."""
    st = os.stat(rel, dir_fd=dir_fd, follow_symlinks=False)
    if ledger.trusted(rel, st):
        return True
    if not ledger.unchanged(rel, st):
        return False
    return _holds(rel, dir_fd, entry)


def _check_files(root: Path, snapshot: Snapshot, ledger: Ledger, file_mode: int) -> str | None:
    """Why the files under ``root`` differ from ``snapshot`` (content, type or mode), or None.

    The directories on the way were checked first (:func:`_check_tree`), so paths relative to the
    root's descriptor meet no link but the file itself, which is never followed.
    """
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return f"{root.name} cannot be read: {exc.strerror}"
    now = time.time_ns()
    try:
        for rel, entry in snapshot.files.items():
            try:
                st = os.stat(rel, dir_fd=root_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    return f"{printable(rel)} is no longer a regular file"
                if stat.S_IMODE(st.st_mode) != _mode(entry, file_mode):
                    return f"the mode of {printable(rel)} was changed"
                if ledger.trusted(rel, st):
                    continue
                if st.st_size != entry.size:
                    return f"{printable(rel)} was changed"
                content, st = _read_content(rel, root_fd, entry.size)
            except OSError as exc:
                return f"{printable(rel)} cannot be read: {exc.strerror}"
            if content != entry.content:
                return f"{printable(rel)} was changed"
            ledger.record(rel, st, now)
        return None
    finally:
        os.close(root_fd)


def _check_tree(root: Path, snapshot: Snapshot, dirs: DirNames, ledger: Ledger, file_mode: int) -> str | None:
    """Why the tree under ``root`` differs from ``snapshot``: a directory's entries or mode, or a file."""
    for rel, names in dirs.items():
        path = root / rel if rel else root
        key = f"{DATA}/{rel}"  # directories share the ledger under a name no file can have
        shown = printable(rel or ".")
        try:
            st = path.lstat()
            if not stat.S_ISDIR(st.st_mode):
                return f"directory {shown} was replaced"
            if stat.S_IMODE(st.st_mode) != DIR_MODE:
                return f"the mode of directory {shown} was changed"
            if ledger.trusted(key, st):
                continue
            if _names_digest(os.listdir(path)) != names:
                return f"entries were added to or removed from {shown}"
        except OSError as exc:
            return f"directory {shown} cannot be read: {exc.strerror}"
        ledger.record(key, st)
    return _check_files(root, snapshot, ledger, file_mode)


DirNames = dict[str, tuple[int, int]]
"""Each directory of a set (``""`` is the top), with the count of the names it holds and the sum of
their keyed hashes. Order does not matter to a sum, so it is built a path at a time: a set of 100,000
files never has its names split out and held a second time."""

_MASK = (1 << 64) - 1


def _name_hash(name: str) -> int:
    data = name.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=_KEY).digest(), "little")


def _names_digest(names: Iterable[str]) -> tuple[int, int]:
    count = total = 0
    for name in names:
        count += 1
        total = (total + _name_hash(name)) & _MASK
    return count, total


def _expected_dirs(snapshot: Snapshot) -> DirNames:
    """Each directory of the set (``""`` is the top), with the digest of the names it holds."""
    sums: dict[str, list[int]] = {"": [0, 0]}
    for path in snapshot.files:
        directory, _, name = path.rpartition("/")
        while True:  # count the name in its directory, and a directory seen first in its own parent
            entry = sums.get(directory)
            first = entry is None
            if entry is None:
                entry = sums[directory] = [0, 0]
            entry[0] += 1
            entry[1] = (entry[1] + _name_hash(name)) & _MASK
            if not first:
                break
            directory, _, name = directory.rpartition("/")
    return {rel: (count, total) for rel, (count, total) in sums.items()}


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotADirectory(PublishError):
    """A directory of the set, on disk, is a link or a file: infantry does not go through it."""

    def __init__(self, rel: str) -> None:
        super().__init__(f"{printable(rel)} is not a plain directory; infantry does not go through it")
        self.rel = rel


class _Dirs:
    """The directories under a root, opened a component at a time with ``O_NOFOLLOW``.

    Every write, rename and removal in the destination happens relative to a descriptor from here, so
    a link planted anywhere in the tree (even between a check and a write) is never followed: opening
    it fails instead. Descriptors are cached (a set is written a directory at a time) and the least
    recently used are closed past ``cap``.
    """

    def __init__(self, root_fd: int, *, create: bool = False, replace_links: bool = False, cap: int = 64) -> None:
        self._root = root_fd
        self._create = create
        self._replace_links = replace_links
        self._cap = cap
        self._fds: dict[str, int] = {}  # insertion order is recency

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def forget(self, rel: str) -> None:
        """Close the descriptors of ``rel`` and below: it is about to be removed."""
        for cached in [c for c in self._fds if c == rel or c.startswith(rel + "/")]:
            os.close(self._fds.pop(cached))

    def of(self, rel: str) -> tuple[int, str]:
        """The descriptor of the directory holding ``rel``, and the name of ``rel`` in it."""
        parent, _, name = rel.rpartition("/")
        return self.fd(parent), name

    def fd(self, rel: str) -> int:
        """The descriptor of directory ``rel`` ("" is the root); NotADirectory if a link or file is in the way."""
        if not rel:
            return self._root
        fd = self._fds.pop(rel, None)
        if fd is None:
            parts = rel.split("/")
            depth = len(parts)
            while depth > 0 and "/".join(parts[:depth]) not in self._fds:
                depth -= 1
            here = "/".join(parts[:depth])
            fd = self._fds[here] if depth else self._root
            for part in parts[depth:]:
                here = f"{here}/{part}" if here else part
                fd = self._open(fd, part, here)
                self._keep(here, fd)
            self._fds.pop(rel)
        self._keep(rel, fd)
        return fd

    def _keep(self, rel: str, fd: int) -> None:
        self._fds[rel] = fd
        while len(self._fds) > self._cap:
            oldest = next(iter(self._fds))
            os.close(self._fds.pop(oldest))

    def _open(self, parent_fd: int, name: str, rel: str) -> int:
        if self._create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if not (self._replace_links and stat.S_ISLNK(st.st_mode)):
                raise NotADirectory(rel) from None
            logger.warning("replacing %s, a link where a directory of the set belongs; its target is untouched",
                           printable(rel))  # fmt: skip
            os.unlink(name, dir_fd=parent_fd)  # the link itself, never what it points at
            os.mkdir(name, DIR_MODE, dir_fd=parent_fd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        if self._create:
            os.fchmod(fd, DIR_MODE)  # not narrowed by the umask
        return fd


class Publisher(Protocol):
    """Puts Snapshots into the destination."""

    dest: Path

    def current(self) -> Snapshot | None:
        """The snapshot the destination holds now, or None when it holds no complete set."""

    def verify(self, snapshot: Snapshot) -> str | None:
        """None when the destination holds ``snapshot`` intact; otherwise what differs, read from disk."""

    def occupied(self) -> bool:
        """True when the destination holds something an app may have read, whole or not."""

    def publish(self, snapshot: Snapshot, gate: Gate | None = None) -> bool:
        """Make ``snapshot`` live. Returns False, writing nothing, when it is already live and intact."""

    @property
    def previous_version(self) -> str | None:
        """The version kept for rollback, if any."""

    def tidy(self) -> None:
        """Remove what the last publish left behind (old snapshots); it is off the hot path."""

    def rollback(self) -> Snapshot | None:
        """Make the previous snapshot live again and return it; None when there is none to go back to."""


def make_publisher(dest: Path, layout: Literal["kubelet", "direct"], file_mode: int) -> Publisher:
    """The publisher for ``layout``."""
    if layout == "direct":
        return DirectPublisher(dest, file_mode)
    return KubeletPublisher(dest, file_mode)


def _mode(entry: FileEntry, file_mode: int) -> int:
    return entry.mode if entry.mode is not None else default_mode(entry.executable, file_mode)


def _write_new(path: Path | str, entry: FileEntry, file_mode: int, dir_fd: int | None = None) -> os.stat_result:
    """Create ``path`` (under ``dir_fd``), which must not exist, with the entry's content; never follows a link.

    Spooled content is copied a chunk at a time and its digest checked on the way, so a spool file
    changed on disk is refused, not published.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600, dir_fd=dir_fd)
    name = path if isinstance(path, str) else path.name
    with open(fd, "wb", closefd=True) as handle:
        content = entry.content
        if isinstance(content, bytes):
            handle.write(content)
        elif isinstance(content, Blob):
            h = hashlib.sha256()
            try:
                source = content.open()
            except OSError as exc:
                raise ContentLost(f"the spooled copy of {printable(name)} is gone ({exc.strerror})") from None
            with source:
                while chunk := source.read(CHUNK):
                    h.update(chunk)
                    handle.write(chunk)
            if h.digest() != content.sha:
                raise ContentLost(f"the spooled copy of {printable(name)} was changed on disk; not publishing it")
        else:
            raise ContentLost(f"the content of {printable(name)} is no longer held")
        handle.flush()
        os.fchmod(handle.fileno(), _mode(entry, file_mode))
        return os.fstat(handle.fileno())


def _read_tree(root: Path, file_mode: int, ledger: Ledger) -> Snapshot | None:
    """Read a published tree back into a Snapshot, recording each file in ``ledger``.

    None if it does not look like one we wrote (a link, a device, a mode we would not set, a bad name),
    or cannot be read whole (a directory that cannot be listed). The walk keeps its own stack, so a
    tree of any depth is read without recursion, and only regular files are opened.
    """
    files: dict[str, FileEntry] = {}
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as entries:
                listed = [(entry.name, entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False))
                          for entry in entries]  # fmt: skip
        except OSError:
            return None
        for name, is_dir, is_file in listed:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if check_path(rel) is not None or not (is_dir or is_file):
                return None  # a bad name, or a link, FIFO, socket or device: not a set infantry wrote
            if is_dir:
                pending.append(rel)
                continue
            try:
                content, st = _read_content(root / rel)
            except OSError:
                return None
            files[rel] = entry_with_mode(content, stat.S_IMODE(st.st_mode), file_mode)
            ledger.record(rel, st)
    return Snapshot.of(files) if files else None


def read_published(root: Path, file_mode: int) -> Snapshot | None:
    """Read a published snapshot directory back (see _read_tree), for a reader that keeps no ledger."""
    return _read_tree(root, file_mode, Ledger())


def _replace_with_link(dest: Path, name: str, target: str) -> None:
    """Point ``dest/name`` at ``target`` by renaming a fresh link over it; never writes through a link."""
    dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _link_at(dest_fd, dest, name, target)
    finally:
        os.close(dest_fd)


def _link_at(dest_fd: int, dest: Path, name: str, target: str) -> None:
    """:func:`_replace_with_link` relative to the open destination ``dest_fd`` (``dest`` is for messages)."""
    try:
        if os.readlink(name, dir_fd=dest_fd) == target:
            return
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        if stat.S_ISDIR(os.stat(name, dir_fd=dest_fd, follow_symlinks=False).st_mode):
            raise PublishError(
                f"refusing to replace directory {dest / name}: it was not created by infantry; remove it"
            ) from None
        logger.warning("replacing %s, which was not a link made by infantry", dest / name)
    tmp = f"{TMP_PREFIX}link-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(target, tmp, dir_fd=dest_fd)
    try:
        os.rename(tmp, name, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dest_fd)
        raise


def _write_mark(dest: Path, name: str, version: str) -> None:
    """Write ``dest/name`` by a fresh file renamed over it; never through a link planted on the way."""
    dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f"{TMP_PREFIX}{name.lstrip('.')}-{os.getpid()}-{time.monotonic_ns()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=dest_fd)
        try:
            with open(fd, "w", encoding="utf-8") as handle:
                handle.write(version + "\n")
            os.rename(tmp, name, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dest_fd)
            raise
    finally:
        os.close(dest_fd)


def _read_mark(dest: Path, name: str) -> str | None:
    """A version recorded in ``dest/name``; never follows a link, never blocks on a FIFO."""
    try:
        data, _ = _read_nofollow(dest / name, 128)
    except OSError:
        return None
    text = data.decode("ascii", "replace").strip()
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def mark_fallback(dest: Path, version: str) -> None:
    """Record that the live set, ``version``, is the baked-in fallback, for `watch` to report."""
    _write_mark(dest, FALLBACK, version)


def fallback_version(dest: Path) -> str | None:
    """The version recorded by :func:`mark_fallback`, if any."""
    return _read_mark(dest, FALLBACK)


def mark_told(dest: Path, version: str) -> None:
    """Record that the app has been told of ``version`` (or started after it went live).

    It outlives infantry, so a `watch` restarted between a publish and its reload still tells the app.
    """
    _write_mark(dest, TOLD, version)


def told_version(dest: Path) -> str | None:
    """The version recorded by :func:`mark_told`, if any."""
    return _read_mark(dest, TOLD)


def clear_fallback(dest: Path) -> None:
    """Forget the fallback mark, once the store's own content is live."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest / FALLBACK)


class KubeletPublisher:
    """The ``..data`` symlink-swap layout of the kubelet.

    Not safe to call concurrently: one publisher, one caller at a time (``watch`` runs its steps one
    after another, in one worker thread at a time).
    """

    def __init__(self, dest: Path, file_mode: int) -> None:
        self.dest = dest
        self._file_mode = file_mode
        self._current: Snapshot | None = None
        self._current_dir: str | None = None
        self._ledger = Ledger()
        self._dirs: DirNames = {}
        self._previous: str | None = None  # the version kept in ..previous (its content is on disk)
        self._loaded = False

    def _live_dir(self, link: str) -> str | None:
        """The snapshot directory ``link`` points at, if it is one of ours; otherwise None."""
        try:
            target = os.readlink(self.dest / link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTDIR):
                logger.warning("%s is not a link; it will be replaced", self.dest / link)
                return None
            raise
        candidate = self.dest / target
        if SNAPSHOT_DIR.fullmatch(target) and candidate.is_dir() and not candidate.is_symlink():
            return target
        logger.warning(
            "%s points at %r, outside the destination or not a snapshot; it will be replaced, not followed",
            self.dest / link,
            printable(target),
        )
        return None

    def current(self) -> Snapshot | None:
        """The live snapshot, read from disk the first time."""
        if not self._loaded:
            self._current_dir = self._live_dir(DATA)
            if self._current_dir is not None:
                self._adopt(
                    self._current_dir,
                    _read_tree(self.dest / self._current_dir, self._file_mode, ledger := Ledger()),
                    ledger,
                )
            self._loaded = True
        return self._current

    def _adopt(self, name: str | None, snapshot: Snapshot | None, ledger: Ledger) -> None:
        self._current_dir, self._current, self._ledger = name, snapshot, ledger
        self._dirs = _expected_dirs(snapshot) if snapshot is not None else {}

    def occupied(self) -> bool:
        """True when ``..data`` exists, even if what it points at is not a set infantry can use."""
        return os.path.lexists(self.dest / DATA)

    @property
    def previous_version(self) -> str | None:
        """The version kept in ``..previous`` for rollback, if any."""
        return self._previous

    def verify(self, snapshot: Snapshot) -> str | None:
        """Check, from disk, that ``snapshot`` is what readers of the destination see.

        (1) ``..data`` points at the snapshot directory infantry made live; (2) each top-level name is
        the link into ``..data``; (3) each directory holds exactly the expected names; (4) each file
        has its content and mode (only files whose stat changed since they were recorded are read).
        """
        current = self.current()
        if current is None:
            return "the destination holds no complete set"
        if current.version != snapshot.version:
            return f"the destination holds {current.short_version}"
        assert self._current_dir is not None
        try:
            if os.readlink(self.dest / DATA) != self._current_dir:
                return f"{DATA} was changed"
        except OSError:
            return f"{DATA} is missing"
        try:
            dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return f"the destination cannot be read: {exc.strerror}"
        try:
            for top in snapshot.top_level():
                try:
                    if os.readlink(top, dir_fd=dest_fd) != f"{DATA}/{top}":
                        return f"{printable(top)} was changed"
                except OSError:
                    return f"{printable(top)} is missing or not a link"
        finally:
            os.close(dest_fd)
        return _check_tree(self.dest / self._current_dir, snapshot, self._dirs, self._ledger, self._file_mode)

    def publish(self, snapshot: Snapshot, gate: Gate | None = None) -> bool:
        """Stage ``snapshot`` in a new directory, run the gate, then swap ``..data`` to it.

        Returns False, writing nothing, when the destination already holds it intact.
        """
        if self.verify(snapshot) is None:
            return False
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self.clean()
            name, staged = self._new_dir()
        except OSError as exc:
            raise PublishError(f"cannot prepare {self.dest}: {exc}") from exc
        try:
            ledger = self._fill(staged, snapshot)
            if gate is not None:
                gate(staged)
                if _check_tree(staged, snapshot, _expected_dirs(snapshot), ledger, self._file_mode) is not None:
                    raise CheckFailed("the check command changed the staged set; a check may only read it")
            dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for top in sorted(snapshot.top_level()):
                    _link_at(dest_fd, self.dest, top, f"{DATA}/{top}")
                _link_at(dest_fd, self.dest, DATA, name)
            finally:
                os.close(dest_fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                shutil.rmtree(staged)
            self._rebase_live()  # the links made into the staged set, now gone, moved live ctimes
            if isinstance(exc, OSError):
                raise PublishError(f"cannot publish into {self.dest}: {exc}") from exc
            raise
        previous, previous_dir = self._current, self._current_dir
        self._adopt(name, snapshot, ledger)
        self._previous = previous.version if previous is not None else None
        try:
            if previous_dir is not None and previous is not None:
                _replace_with_link(self.dest, PREVIOUS, previous_dir)
            self._remove_stale_links(snapshot)
        except OSError as exc:
            # The new set is live; leftovers are removed by the next publish or start.
            logger.warning("published, but could not tidy %s: %s", self.dest, exc)
        return True

    def tidy(self) -> None:
        """Remove leftovers: old snapshots, temporary entries, links to names no longer published.

        It runs after the app was told (so a large removal never delays a reload), and at start-up,
        where it also clears what a killed publish left behind.
        """
        if not self.dest.is_dir():
            return
        try:
            current = self.current()
            if current is not None:
                self._remove_stale_links(current)
            self.clean()
        except OSError as exc:
            logger.warning("could not tidy %s: %s", self.dest, exc)

    def rollback(self) -> Snapshot | None:
        """Swap ``..data`` back to the snapshot kept in ``..previous``, if it is still intact."""
        self.current()
        previous_dir = self._live_dir(PREVIOUS)
        if previous_dir is None:
            return None
        ledger = Ledger()
        previous = _read_tree(self.dest / previous_dir, self._file_mode, ledger)
        if previous is None or (self._previous is not None and previous.version != self._previous):
            logger.warning("the set kept in %s was changed on disk; not rolling back to it", self.dest / PREVIOUS)
            return None
        try:
            for top in sorted(previous.top_level()):
                _replace_with_link(self.dest, top, f"{DATA}/{top}")
            _replace_with_link(self.dest, DATA, previous_dir)
            os.unlink(self.dest / PREVIOUS)
        except OSError as exc:
            raise PublishError(f"cannot roll back {self.dest}: {exc}") from exc
        self._adopt(previous_dir, previous, ledger)
        self._previous = None
        self.tidy()
        return previous

    def _new_dir(self) -> tuple[str, Path]:
        while True:
            ns = time.time_ns()
            name = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}"
            try:
                os.mkdir(self.dest / name, DIR_MODE)
            except FileExistsError:
                continue
            # By descriptor, not by path: a link swapped in after mkdir must not have its target chmod-ed.
            fd = os.open(self.dest / name, _DIR_FLAGS)
            try:
                os.fchmod(fd, DIR_MODE)
            finally:
                os.close(fd)
            return name, self.dest / name

    def _fill(self, staged: Path, snapshot: Snapshot) -> Ledger:
        """Write the snapshot into ``staged``, hard-linking files that did not change; return its ledger.

        A file is linked only from a live snapshot whose copy is provably untouched (its stat matches
        the ledger), so an edit made behind infantry's back is never carried into a new snapshot.
        This is the hot path for large sets, so it works on strings relative to directory descriptors.
        """
        old = self._current
        old_fd = None
        now = time.time_ns()
        if old is not None and self._current_dir is not None:
            with contextlib.suppress(OSError):
                old_fd = os.open(self.dest / self._current_dir, _DIR_FLAGS)
        new_fd = os.open(staged, _DIR_FLAGS)
        ledger = Ledger()
        try:
            with _Dirs(new_fd, create=True) as new_dirs, _Dirs(old_fd if old_fd is not None else new_fd) as old_dirs:
                for path, entry in snapshot.files.items():
                    parent_fd, name = new_dirs.of(path)
                    if old_fd is not None and old is not None and old.files.get(path) == entry:
                        try:
                            old_parent, _ = old_dirs.of(path)
                            if _still_holds(self._ledger, path, old_fd, entry):
                                os.link(name, name, src_dir_fd=old_parent, dst_dir_fd=parent_fd, follow_symlinks=False)
                                # The link moved the inode's ctime: record the stat as it is now.
                                ledger.record(path, os.stat(name, dir_fd=parent_fd, follow_symlinks=False), now)
                                continue
                        except (OSError, PublishError):
                            pass  # a hard link is only a saving (and the old set may hold a link): write a copy
                    ledger.record(path, _write_new(name, entry, self._file_mode, parent_fd), now)
        finally:
            os.close(new_fd)
            if old_fd is not None:
                os.close(old_fd)
        return ledger

    def _remove_stale_links(self, snapshot: Snapshot) -> None:
        wanted = snapshot.top_level()
        for entry in os.scandir(self.dest):
            if entry.name.startswith("..") or entry.name in wanted or not entry.is_symlink():
                continue
            if os.readlink(entry.path).startswith(f"{DATA}/"):
                os.unlink(entry.path)

    def clean(self) -> None:
        """Remove temporary entries and snapshot directories that are neither live nor kept for rollback."""
        keep = {self._live_dir(DATA), self._live_dir(PREVIOUS)}
        removed = False
        for entry in os.scandir(self.dest):
            if (
                entry.name.startswith(TMP_PREFIX)
                or entry.name == f"{DATA}_tmp"
                or (SNAPSHOT_DIR.fullmatch(entry.name) and entry.name not in keep)
            ):
                remove(Path(entry.path))
                removed = True
        if self._live_dir(PREVIOUS) is None and os.path.lexists(self.dest / PREVIOUS):
            os.unlink(self.dest / PREVIOUS)
        if removed:
            self._rebase_live()

    def _rebase_live(self) -> None:
        """Take in the ctimes that infantry's own links and removals moved in the live snapshot."""
        if self._current is None or self._current_dir is None:
            return
        with contextlib.suppress(OSError):
            live_fd = os.open(self.dest / self._current_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for rel in self._current.files:
                    with contextlib.suppress(OSError):
                        self._ledger.rebase(rel, os.stat(rel, dir_fd=live_fd, follow_symlinks=False))
            finally:
                os.close(live_fd)


class DirectPublisher:
    """Plain files, each replaced by ``rename(2)``. Atomic per file, not per set.

    Not safe to call concurrently, like :class:`KubeletPublisher`.
    """

    def __init__(self, dest: Path, file_mode: int) -> None:
        self.dest = dest
        self._file_mode = file_mode
        self._current: Snapshot | None = None
        self._ledger = Ledger()
        self._loaded = False

    previous_version = None

    def occupied(self) -> bool:
        """True when a set was published here before (its manifest exists)."""
        return os.path.lexists(self.dest / MANIFEST)

    def _manifest(self) -> list[str]:
        try:
            # Never through a link, never blocking on a FIFO, and never more than a manifest can hold.
            raw, _ = _read_nofollow(self.dest / MANIFEST, MAX_MANIFEST + 1)
            if len(raw) > MAX_MANIFEST:
                return []
            listed = json.loads(raw)
        except (OSError, ValueError, RecursionError):
            return []
        if not isinstance(listed, list):
            return []
        return [p for p in listed if isinstance(p, str) and check_path(p) is None]

    def current(self) -> Snapshot | None:
        """The set the manifest lists, read back from the files, if they are all intact."""
        if not self._loaded:
            self._loaded = True
            files: dict[str, FileEntry] = {}
            try:
                dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                with _Dirs(dest_fd) as dirs:
                    for rel in self._manifest():
                        parent_fd, name = dirs.of(rel)
                        content, st = _read_content(name, parent_fd)
                        files[rel] = entry_with_mode(content, stat.S_IMODE(st.st_mode), self._file_mode)
                        self._ledger.record(rel, st)
            except OSError:  # including a link or a file where a directory of the set belongs
                return None
            finally:
                os.close(dest_fd)
            self._current = Snapshot.of(files) if files else None
        return self._current

    def verify(self, snapshot: Snapshot) -> str | None:
        """Check, from disk, that each file of ``snapshot`` is in place with its content and mode."""
        current = self.current()
        if current is None:
            return "the destination holds no complete set"
        if current.version != snapshot.version:
            return f"the destination holds {current.short_version}"
        try:
            dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            return f"the destination cannot be read: {exc.strerror}"
        try:
            with _Dirs(dest_fd) as dirs:
                for rel in snapshot.files:
                    dirs.of(rel)
        except NotADirectory as exc:
            return f"{printable(exc.rel)} is no longer a plain directory"
        except OSError as exc:
            return f"the destination cannot be read: {exc.strerror}"
        finally:
            os.close(dest_fd)
        return _check_files(self.dest, snapshot, self._ledger, self._file_mode)

    def publish(self, snapshot: Snapshot, gate: Gate | None = None) -> bool:
        """Stage every file, run the gate, then rename each changed file into place.

        Every step is taken relative to directories opened without following links (:class:`_Dirs`): a
        link found where a directory of the set belongs is replaced by a directory (the link itself is
        removed, never what it points at), and nothing is written or removed through one.
        Returns False, writing nothing, when every file is already in place and intact.
        """
        if self.verify(snapshot) is None:
            return False
        current = self._current
        old = current.files if current is not None else {}
        staged_name = f"{TMP_PREFIX}staged-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            for leftover in os.scandir(self.dest):
                if leftover.name.startswith(TMP_PREFIX):
                    remove(Path(leftover.path))
            dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise PublishError(f"cannot prepare {self.dest}: {exc}") from exc
        ledger = Ledger()
        staged_fd = None
        try:
            os.mkdir(staged_name, DIR_MODE, dir_fd=dest_fd)
            staged_fd = os.open(staged_name, _DIR_FLAGS, dir_fd=dest_fd)
            os.fchmod(staged_fd, DIR_MODE)
            with _Dirs(staged_fd, create=True) as staged, _Dirs(dest_fd, create=True, replace_links=True) as live:
                for path, entry in snapshot.files.items():
                    parent_fd, name = staged.of(path)
                    ledger.record(path, _write_new(name, entry, self._file_mode, parent_fd))
                if gate is not None:
                    gate(self.dest / staged_name)
                    if _check_tree(self.dest / staged_name, snapshot, _expected_dirs(snapshot), ledger,
                                   self._file_mode) is not None:  # fmt: skip
                        raise CheckFailed("the check command changed the staged set; a check may only read it")
                # Stale files go first, so a name that turns from a directory into a file (or back) is free.
                for path in sorted(set(old) - set(snapshot.files), reverse=True):
                    parent_fd, name = live.of(path)
                    _remove_at(parent_fd, name)
                    self._prune(live, path)
                unchanged = set()
                for path, entry in snapshot.files.items():
                    with contextlib.suppress(OSError):
                        if old.get(path) == entry and _still_holds(self._ledger, path, dest_fd, entry):
                            ledger.record(path, os.stat(path, dir_fd=dest_fd, follow_symlinks=False))
                            unchanged.add(path)
                for path in snapshot.files:
                    if path in unchanged:
                        continue
                    parent_fd, name = live.of(path)
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                            raise PublishError(f"refusing to replace directory {printable(path)} with a file")
                    os.rename(name, name, src_dir_fd=staged.of(path)[0], dst_dir_fd=parent_fd)
                    # rename(2) moved the ctime, nothing else
                    ledger.rebase(path, os.stat(name, dir_fd=parent_fd, follow_symlinks=False))
            fd = os.open(MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=staged_fd)  # fmt: skip
            with open(fd, "w", encoding="utf-8") as manifest:
                manifest.write(json.dumps(sorted(snapshot.files)))
            os.rename(MANIFEST, MANIFEST, src_dir_fd=staged_fd, dst_dir_fd=dest_fd)
        except OSError as exc:
            raise PublishError(f"cannot publish into {self.dest}: {exc}") from exc
        finally:
            if staged_fd is not None:
                os.close(staged_fd)
            with contextlib.suppress(OSError):
                shutil.rmtree(staged_name, dir_fd=dest_fd)
            os.close(dest_fd)
        self._current, self._ledger, self._loaded = snapshot, ledger, True
        return True

    def tidy(self) -> None:
        """Nothing is left behind in this layout."""

    def rollback(self) -> Snapshot | None:
        """Not offered in this layout: there is no previous set to swap back to atomically."""
        return None

    @staticmethod
    def _prune(live: _Dirs, rel: str) -> None:
        """Remove the directories above ``rel`` that its removal left empty."""
        parent = rel.rpartition("/")[0]
        while parent:
            above_fd, name = live.of(parent)
            live.forget(parent)
            try:
                os.rmdir(name, dir_fd=above_fd)
            except OSError:
                return
            parent = parent.rpartition("/")[0]


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` under ``dir_fd``: a file or link (never what a link points at), or a directory tree."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
