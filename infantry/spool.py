"""Content, on disk, between a source and the destination, so a set never has to fit in memory.

A file's content is held in memory only when it is small (at most INLINE_MAX bytes). Anything larger is
streamed into the spool, a private directory (``DEST/..spool`` for `install` and `watch`), while its
SHA-256 is computed, and from then on it is known by a :class:`Blob`: its size, its digest, and a spool
file. A blob's file is removed when the last entry holding it is gone, so the spool holds what the sets
in memory refer to, and nothing more.

The spool is opened once, by descriptor, without following links; its files are created, read and
removed relative to that descriptor. A link planted in its place is removed, never followed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import itertools
import os
import shutil
import stat
import tempfile
import threading
import weakref
from pathlib import Path
from typing import BinaryIO

INLINE_MAX = 256
"""Content up to this size stays in memory: a spool file would cost more than the bytes."""

CHUNK = 1 << 16
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Digest:
    """Content known by its size and SHA-256 only (a file read back from the destination)."""

    __slots__ = ("sha", "size")

    def __init__(self, size: int, sha: bytes) -> None:
        self.size = size
        self.sha = sha

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Digest) and self.size == other.size and self.sha == other.sha

    def __hash__(self) -> int:
        return hash(self.sha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, sha={self.sha.hex()[:12]})"


class Blob(Digest):
    """Content kept in a spool file, which is removed when this object is."""

    __slots__ = ("__weakref__", "_name", "_spool")

    def __init__(self, spool: Spool, name: str, size: int, sha: bytes) -> None:
        super().__init__(size, sha)
        self._spool = spool
        self._name = name
        weakref.finalize(self, spool.discard, name)

    def open(self) -> BinaryIO:
        """The content, for reading."""
        return self._spool.open(self._name)

    def read(self) -> bytes:
        """The whole content. Only for small uses (tests, messages): it defeats the point of the spool."""
        with self.open() as handle:
            return handle.read()


class SpoolError(OSError):
    """The spool could not be written (a full or read-only disk): a local problem, not the store's."""


class TooLarge(Exception):
    """More bytes were written to a BlobWriter than its cap allows."""


class BlobWriter:
    """Streams content into a new spool file, hashing it, refusing it past ``cap`` bytes."""

    def __init__(self, spool: Spool, cap: int) -> None:
        self._spool = spool
        self._cap = cap
        self._sha = hashlib.sha256()
        self.size = 0
        self._name, fd = spool.create()
        self._file: BinaryIO | None = open(fd, "wb", buffering=CHUNK, closefd=True)  # noqa: SIM115

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data``; TooLarge once the cap is passed (nothing past the cap is written)."""
        assert self._file is not None
        if self.size + len(data) > self._cap:
            raise TooLarge(self.size + len(data))
        self._sha.update(data)
        self.size += len(data)
        try:
            self._file.write(data)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot write to the spool {self._spool.where}: {exc.strerror}") from None

    def finish(self) -> Blob:
        """Close the file and return its Blob."""
        assert self._file is not None
        try:
            self._file.close()
        except OSError as exc:
            self.abort()
            raise SpoolError(exc.errno, f"cannot write to the spool {self._spool.where}: {exc.strerror}") from None
        self._file = None
        return Blob(self._spool, self._name, self.size, self._sha.digest())

    def abort(self) -> None:
        """Drop what was written."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self._spool.discard(self._name)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self.abort()


class Spool:
    """A private directory of content files, opened lazily.

    ``directory`` None means a fresh temporary directory (for tests and library use); otherwise the
    directory is emptied and made again (0700) when first used, since what a previous process left
    there belongs to nobody now.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._made: str | None = None
        # Only the process that made the spool removes from it: a forked child (a template render) that
        # drops a Blob, or exits, must not take files the parent still holds.
        self._owner = os.getpid()

    @property
    def where(self) -> str:
        """The spool's path, for messages."""
        return str(self._directory) if self._directory is not None else (self._made or "a temporary directory")

    def _open(self) -> int:
        with self._lock:
            if self._fd is not None:
                return self._fd
            try:
                if self._directory is None:
                    self._made = tempfile.mkdtemp(prefix="infantry-spool-")
                    path = Path(self._made)
                else:
                    path = self._directory
                    remove(path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.mkdir(path, 0o700)
                self._fd = os.open(path, _DIR_FLAGS)
            except OSError as exc:
                raise SpoolError(exc.errno, f"cannot make the spool {self.where}: {exc.strerror}") from None
            return self._fd

    def create(self) -> tuple[str, int]:
        """A new, empty spool file: its name and a descriptor open for writing.

        If the spool directory was removed from under infantry, it is made again.
        """
        name = f"{os.getpid()}-{next(self._names)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in (1, 2):
            dir_fd = self._open()
            try:
                return name, os.open(name, flags, 0o600, dir_fd=dir_fd)
            except FileNotFoundError:
                if attempt == 2:
                    raise SpoolError(
                        errno.ENOENT, f"cannot write to the spool {self.where}: it keeps vanishing"
                    ) from None
                self._reopen(dir_fd)
            except OSError as exc:
                raise SpoolError(exc.errno, f"cannot write to the spool {self.where}: {exc.strerror}") from None
        raise AssertionError("unreachable")

    def _reopen(self, stale_fd: int) -> None:
        """Forget a spool directory that was removed, so the next use makes it again."""
        with self._lock:
            if self._fd == stale_fd:
                self._fd = None
                os.close(stale_fd)

    def open(self, name: str) -> BinaryIO:
        """A spool file, for reading."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self._open())
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO planted in the spool must not block a publish
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file", name)
        return open(fd, "rb", closefd=True)

    def discard(self, name: str) -> None:
        """Remove a spool file; it may be gone already."""
        fd = self._fd
        if fd is not None and os.getpid() == self._owner:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)

    def writer(self, cap: int) -> BlobWriter:
        """A writer for one new blob of at most ``cap`` bytes."""
        return BlobWriter(self, cap)

    def store(self, data: bytes) -> Blob:
        """A blob holding ``data``."""
        with self.writer(len(data)) as writer:
            writer.write(data)
            return writer.finish()

    def close(self) -> None:
        """Remove the spool and everything in it (in the process that made it; elsewhere, only let go)."""
        if os.getpid() != self._owner:
            self._fd = None
            return
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
            if self._directory is not None and fd is not None:
                remove(self._directory)
            elif self._made is not None:
                shutil.rmtree(self._made, ignore_errors=True)
                self._made = None


def remove(path: Path) -> None:
    """Remove ``path``: a link itself (never what it points at), or a directory tree."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # uses descriptors and never follows links inside the tree
    else:
        path.unlink()


_current = Spool()


def current() -> Spool:
    """The spool sources write into."""
    return _current


def use(directory: Path | None) -> Spool:
    """Make ``directory`` the spool from now on (the old one is closed); returns it."""
    global _current
    old, _current = _current, Spool(directory)
    old.close()
    if directory is not None:
        with contextlib.suppress(OSError):
            remove(directory)  # what a killed process left there belongs to nobody now
    return _current


def _after_fork_in_child() -> None:
    # Another thread may have held the lock when the process forked: the child's copy would stay locked.
    _current._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    _current.close()
