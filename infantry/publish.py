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
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, Protocol

from infantry.errors import PublishError
from infantry.snapshot import FileEntry, Snapshot, check_path

logger = logging.getLogger(__name__)

DATA = "..data"
PREVIOUS = "..previous"
MANIFEST = "..infantry-files"
TMP_PREFIX = "..tmp-"
SNAPSHOT_DIR = re.compile(r"\.\.\d{4}(_\d\d){5}\.\d{9}")
DIR_MODE = 0o755

FALLBACK = "..fallback"

Gate = Callable[[Path], None]
"""A check run on the staged directory before it goes live; it raises CheckFailed to refuse it."""


class Publisher(Protocol):
    """Puts Snapshots into the destination."""

    dest: Path

    def current(self) -> Snapshot | None:
        """The snapshot the destination holds now, or None when it holds no complete set."""

    def publish(self, snapshot: Snapshot, gate: Gate | None = None) -> bool:
        """Make ``snapshot`` live. Returns False, writing nothing, when it is already live."""

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
    if entry.executable:
        return file_mode | ((file_mode & 0o444) >> 2)
    return file_mode


def _write_new(path: Path, entry: FileEntry, file_mode: int) -> None:
    """Create ``path``, which must not exist, with the entry's content; never follows a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    with open(fd, "wb", closefd=True) as handle:
        handle.write(entry.data)
        os.fchmod(handle.fileno(), _mode(entry, file_mode))


def _read_tree(root: Path, file_mode: int) -> Snapshot | None:
    """Read a published tree back into a Snapshot, or None if it does not look like one we wrote."""
    files: dict[str, FileEntry] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or check_path(rel) is not None:
                return None
            entry = FileEntry(path.read_bytes(), executable=bool(st.st_mode & 0o100))
            if stat.S_IMODE(st.st_mode) != _mode(entry, file_mode):
                return None
            files[rel] = entry
    return Snapshot.of(files) if files else None


def _replace_with_link(dest: Path, name: str, target: str) -> None:
    """Point ``dest/name`` at ``target`` by renaming a fresh link over it; never writes through a link."""
    path = dest / name
    try:
        if os.readlink(path) == target:
            return
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        if path.is_dir():
            raise PublishError(
                f"refusing to replace directory {path}: it was not created by infantry; remove it"
            ) from None
        logger.warning("replacing %s, which was not a link made by infantry", path)
    tmp = dest / f"{TMP_PREFIX}link-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(target, tmp)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def mark_fallback(dest: Path, version: str) -> None:
    """Record that the live set, ``version``, is the baked-in fallback, for `watch` to report."""
    tmp = dest / f"{TMP_PREFIX}fallback-{os.getpid()}"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.rename(tmp, dest / FALLBACK)


def fallback_version(dest: Path) -> str | None:
    """The version recorded by :func:`mark_fallback`, if any."""
    try:
        return (dest / FALLBACK).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def clear_fallback(dest: Path) -> None:
    """Forget the fallback mark, once the store's own content is live."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest / FALLBACK)


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree inside the destination, never following links."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


class KubeletPublisher:
    """The ``..data`` symlink-swap layout of the kubelet."""

    def __init__(self, dest: Path, file_mode: int) -> None:
        self.dest = dest
        self._file_mode = file_mode
        self._current: Snapshot | None = None
        self._current_dir: str | None = None
        self._previous: Snapshot | None = None
        self._loaded = False

    def _live_dir(self, link: str) -> str | None:
        """The snapshot directory ``link`` points at, if it is one of ours; otherwise None."""
        try:
            target = os.readlink(self.dest / link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                logger.warning("%s is not a link; it will be replaced", self.dest / link)
                return None
            raise
        candidate = self.dest / target
        if SNAPSHOT_DIR.fullmatch(target) and candidate.is_dir() and not candidate.is_symlink():
            return target
        logger.warning(
            "%s points at %r, outside the destination or not a snapshot; it will be replaced, not followed",
            self.dest / link,
            target,
        )
        return None

    def current(self) -> Snapshot | None:
        """The live snapshot, read from disk the first time."""
        if not self._loaded:
            self._current_dir = self._live_dir(DATA)
            if self._current_dir is not None:
                self._current = _read_tree(self.dest / self._current_dir, self._file_mode)
            self._loaded = True
        return self._current

    def publish(self, snapshot: Snapshot, gate: Gate | None = None) -> bool:
        """Stage ``snapshot`` in a new directory, run the gate, then swap ``..data`` to it."""
        current = self.current()
        if current is not None and current.version == snapshot.version:
            return False
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self.clean()
            name, staged = self._new_dir()
        except OSError as exc:
            raise PublishError(f"cannot prepare {self.dest}: {exc}") from exc
        try:
            self._fill(staged, snapshot)
            if gate is not None:
                gate(staged)
            for top in sorted(snapshot.top_level()):
                _replace_with_link(self.dest, top, f"{DATA}/{top}")
            _replace_with_link(self.dest, DATA, name)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                shutil.rmtree(staged)
            if isinstance(exc, OSError):
                raise PublishError(f"cannot publish into {self.dest}: {exc}") from exc
            raise
        self._previous = self._current
        previous, self._current, self._current_dir = self._current_dir, snapshot, name
        try:
            if previous is not None:
                _replace_with_link(self.dest, PREVIOUS, previous)
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
        """Swap ``..data`` back to the snapshot kept in ``..previous``."""
        self.current()
        previous_dir = self._live_dir(PREVIOUS)
        if previous_dir is None:
            return None
        previous = self._previous
        if previous is None:
            previous = _read_tree(self.dest / previous_dir, self._file_mode)
            if previous is None:
                return None
        try:
            for top in sorted(previous.top_level()):
                _replace_with_link(self.dest, top, f"{DATA}/{top}")
            _replace_with_link(self.dest, DATA, previous_dir)
            os.unlink(self.dest / PREVIOUS)
        except OSError as exc:
            raise PublishError(f"cannot roll back {self.dest}: {exc}") from exc
        self._current, self._current_dir, self._previous = previous, previous_dir, None
        self.tidy()
        return previous

    def _new_dir(self) -> tuple[str, Path]:
        while True:
            ns = time.time_ns()
            name = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d}"
            try:
                (self.dest / name).mkdir(DIR_MODE)
            except FileExistsError:
                continue
            os.chmod(self.dest / name, DIR_MODE)
            return name, self.dest / name

    def _fill(self, staged: Path, snapshot: Snapshot) -> None:
        """Write the snapshot into ``staged``, hard-linking files that did not change.

        This is the hot path for large sets, so it works on strings relative to directory
        descriptors rather than on Path objects.
        """
        old = self._current
        old_fd = None
        if old is not None and self._current_dir is not None:
            with contextlib.suppress(OSError):
                old_fd = os.open(self.dest / self._current_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        new_fd = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        made: set[str] = {""}
        try:
            for path, entry in snapshot.files.items():
                parent = path.rpartition("/")[0]
                if parent not in made:
                    self._make_dirs(new_fd, parent, made)
                if old_fd is not None and old is not None and old.files.get(path) == entry:
                    try:
                        os.link(path, path, src_dir_fd=old_fd, dst_dir_fd=new_fd, follow_symlinks=False)
                        continue
                    except OSError:
                        pass  # a hard link is only a saving; write a copy instead
                _write_new(staged / path, entry, self._file_mode)
        finally:
            os.close(new_fd)
            if old_fd is not None:
                os.close(old_fd)

    @staticmethod
    def _make_dirs(dir_fd: int, rel: str, made: set[str]) -> None:
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub not in made:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, DIR_MODE, dir_fd=dir_fd)
                os.chmod(sub, DIR_MODE, dir_fd=dir_fd)  # not narrowed by the umask
                made.add(sub)

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
        for entry in os.scandir(self.dest):
            if (
                entry.name.startswith(TMP_PREFIX)
                or entry.name == f"{DATA}_tmp"
                or (SNAPSHOT_DIR.fullmatch(entry.name) and entry.name not in keep)
            ):
                _remove(Path(entry.path))
        if self._live_dir(PREVIOUS) is None and os.path.lexists(self.dest / PREVIOUS):
            os.unlink(self.dest / PREVIOUS)


class DirectPublisher:
    """Plain files, each replaced by ``rename(2)``. Atomic per file, not per set."""

    def __init__(self, dest: Path, file_mode: int) -> None:
        self.dest = dest
        self._file_mode = file_mode
        self._current: Snapshot | None = None
        self._loaded = False

    def _manifest(self) -> list[str]:
        try:
            listed = json.loads((self.dest / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(listed, list):
            return []
        return [p for p in listed if isinstance(p, str) and check_path(p) is None]

    def current(self) -> Snapshot | None:
        """The set the manifest lists, read back from the files, if they are all intact."""
        if not self._loaded:
            self._loaded = True
            files: dict[str, FileEntry] = {}
            for rel in self._manifest():
                path = self.dest / rel
                try:
                    st = path.lstat()
                    if not stat.S_ISREG(st.st_mode) or any(p.is_symlink() for p in self._parents(rel)):
                        return None
                    files[rel] = FileEntry(path.read_bytes(), executable=bool(st.st_mode & 0o100))
                except OSError:
                    return None
            self._current = Snapshot.of(files) if files else None
        return self._current

    def _parents(self, rel: str) -> Iterator[Path]:
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            yield self.dest.joinpath(*parts[:depth])

    def _safe_parent(self, rel: str) -> None:
        """Create the directories above ``rel`` inside the destination, refusing links on the way."""
        for directory in self._parents(rel):
            try:
                st = directory.lstat()
            except FileNotFoundError:
                directory.mkdir(DIR_MODE)
                continue
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise PublishError(f"refusing to write through {directory}: it is not a plain directory")

    def publish(self, snapshot: Snapshot, gate: Gate | None = None) -> bool:
        """Stage every file, run the gate, then rename each changed file into place."""
        current = self.current()
        if current is not None and current.version == snapshot.version:
            return False
        old = current.files if current is not None else {}
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            for leftover in os.scandir(self.dest):
                if leftover.name.startswith(TMP_PREFIX):
                    _remove(Path(leftover.path))
            staged = self.dest / f"{TMP_PREFIX}staged-{os.getpid()}-{time.monotonic_ns()}"
            staged.mkdir(DIR_MODE)
        except OSError as exc:
            raise PublishError(f"cannot prepare {self.dest}: {exc}") from exc
        try:
            for path, entry in snapshot.files.items():
                (staged / path).parent.mkdir(DIR_MODE, parents=True, exist_ok=True)
                _write_new(staged / path, entry, self._file_mode)
            if gate is not None:
                gate(staged)
            # Stale files go first, so a name that turns from a directory into a file (or back) is free.
            for path in sorted(set(old) - set(snapshot.files), reverse=True):
                _remove(self.dest / path)
                self._prune(path)
            for path, entry in snapshot.files.items():
                if old.get(path) == entry:
                    continue
                self._safe_parent(path)
                if (self.dest / path).is_dir() and not (self.dest / path).is_symlink():
                    raise PublishError(f"refusing to replace directory {self.dest / path} with a file")
                os.rename(staged / path, self.dest / path)
            tmp_manifest = staged / MANIFEST
            tmp_manifest.write_text(json.dumps(sorted(snapshot.files)), encoding="utf-8")
            os.rename(tmp_manifest, self.dest / MANIFEST)
        except OSError as exc:
            raise PublishError(f"cannot publish into {self.dest}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(staged)
        self._current = snapshot
        return True

    def tidy(self) -> None:
        """Nothing is left behind in this layout."""

    def rollback(self) -> Snapshot | None:
        """Not offered in this layout: there is no previous set to swap back to atomically."""
        return None

    def _prune(self, rel: str) -> None:
        for directory in reversed(list(self._parents(rel))):
            try:
                directory.rmdir()
            except OSError:
                return
