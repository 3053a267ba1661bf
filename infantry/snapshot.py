"""The Snapshot: an immutable set of files, and the rules every path in it must follow."""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from types import MappingProxyType

from infantry import spool
from infantry.errors import SettingsError, SourceError, UnsafeDataError
from infantry.spool import INLINE_MAX, Blob, Digest

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
# The paths of one set, together: 100,000 paths of 160 bytes. Paths are held in memory as long as the
# set is, and 100,000 paths of 4 KiB each would otherwise hold 400 MB whatever --max-total-size says.
MAX_NAMES_BYTES = 16 << 20


@dataclass(frozen=True)
class Limits:
    """Size limits applied while a source reads, so oversize data is refused before it is held."""

    max_file_size: int = 8 * 1024 * 1024
    max_total_size: int = 128 * 1024 * 1024
    max_files: int = 100_000


def check_path(path: str) -> str | None:
    """Return why ``path`` is unsafe as a relative path in the destination, or None if it is safe."""
    if not path:
        return "empty path"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if "\x00" in path:
        return "NUL byte in name"
    if _CONTROL.search(path):
        return "control character in name"
    if path.startswith("/"):
        return "absolute path"
    if len(encoded) > MAX_PATH_BYTES:
        return f"path longer than {MAX_PATH_BYTES} bytes"
    for part in path.split("/"):
        if part in ("", "."):
            return "empty or '.' path component"
        if part == "..":
            return "'..' path component"
        if part.startswith(".."):
            return f"reserved name {part!r} (names starting with '..' belong to infantry)"
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return f"name longer than {MAX_NAME_BYTES} bytes"
    return None


def printable(path: str) -> str:
    """Render a (possibly hostile) path for a log line or error message."""
    shown = path.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return repr(shown if len(shown) <= 120 else shown[:117] + "...")


class FileEntry:
    """One file's content, whether it should be executable, and its own mode when it has one.

    The content is the bytes themselves when small (at most ``spool.INLINE_MAX``), otherwise a
    :class:`~infantry.spool.Digest`: a spool Blob for content on its way to the destination, or a bare
    digest for a file read back from it. The size alone decides which, so equal content always has
    the same form, and entries compare (and a set's version is computed) without reading files.

    ``mode`` None means the publisher's ``--file-mode`` (with execute bits when ``executable``); a
    file with a mode of its own (a rendered template's) carries it. Use :func:`entry_with_mode` to make
    one, so that a mode equal to the default is stored as None and equal files compare equal.
    """

    __slots__ = ("content", "executable")
    # Nearly every entry has the default mode, and a set may hold 100,000 of them: only an entry with a
    # mode of its own (a _ModedEntry) has room for one.
    mode: int | None = None

    def __new__(cls, content: bytes | Digest, executable: bool = False, mode: int | None = None) -> FileEntry:
        return object.__new__(_ModedEntry if mode is not None else cls)

    def __init__(self, content: bytes | Digest, executable: bool = False, mode: int | None = None) -> None:
        if isinstance(content, bytes) and len(content) > INLINE_MAX:
            content = spool.current().store(content)
        elif isinstance(content, Blob) and content.size <= INLINE_MAX:
            content = content.read()  # one form for each size, so equal content compares equal
        self.content = content
        self.executable = executable

    @property
    def size(self) -> int:
        """The content's length in bytes."""
        return len(self.content) if isinstance(self.content, bytes) else self.content.size

    @property
    def data(self) -> bytes:
        """The whole content, read from the spool if need be. Not for the data path: it reads it all."""
        if isinstance(self.content, bytes):
            return self.content
        if isinstance(self.content, Blob):
            return self.content.read()
        raise ValueError("only the digest of this file's content is kept")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FileEntry)
            and self.executable == other.executable
            and self.mode == other.mode
            and self.content == other.content
        )

    def __hash__(self) -> int:
        return hash((self.content, self.executable, self.mode))

    def __repr__(self) -> str:
        mode = f", mode=0o{self.mode:o}" if self.mode is not None else ""
        return f"FileEntry({self.content!r}, executable={self.executable}{mode})"


class _ModedEntry(FileEntry):
    """A FileEntry with a mode of its own."""

    __slots__ = ("mode",)

    def __init__(self, content: bytes | Digest, executable: bool = False, mode: int | None = None) -> None:
        super().__init__(content, executable)
        self.mode = mode


def default_mode(executable: bool, file_mode: int) -> int:
    """The mode a file gets from ``--file-mode``: execute bits added where read bits are, if executable."""
    return file_mode | ((file_mode & 0o444) >> 2) if executable else file_mode


def entry_with_mode(content: bytes | Digest, mode: int, file_mode: int) -> FileEntry:
    """A FileEntry for a file that must have ``mode``: as a plain or executable file when ``--file-mode``
    gives that mode anyway, so the same file always has the same entry (and the set the same version)."""
    for executable in (False, True):
        if default_mode(executable, file_mode) == mode:
            return FileEntry(content, executable)
    return FileEntry(content, mode=mode)


def _compact(entry: FileEntry) -> bytes | FileEntry:
    """How a set keeps ``entry``: a small plain file as its bytes alone, anything else as the entry."""
    content = entry.content
    return content if isinstance(content, bytes) and not entry.executable and entry.mode is None else entry


def _entry(item: bytes | FileEntry) -> FileEntry:
    return FileEntry(item) if isinstance(item, bytes) else item


class Files(Mapping[str, FileEntry]):
    """A snapshot's files: an immutable mapping from path to FileEntry.

    A set may hold 100,000 small files for as long as it is live, so a small file that is not
    executable (nearly all of them) is kept as its bytes alone, and its FileEntry is made when asked.
    """

    __slots__ = ("_items",)

    def __init__(self, files: Mapping[str, FileEntry]) -> None:
        self._items: dict[str, bytes | FileEntry]
        if isinstance(files, Files):
            self._items = files._items  # neither ever changes
        elif isinstance(files, Draft):
            self._items = files.freeze()
        else:
            self._items = {path: _compact(entry) for path, entry in files.items()}

    def __getitem__(self, path: str) -> FileEntry:
        return _entry(self._items[path])

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: object) -> bool:
        return path in self._items

    def stored(self, path: str) -> bytes | FileEntry | None:
        """The item kept for ``path``, as it is kept: a small plain file's bytes (the same object for as
        long as the file is unchanged), or its FileEntry; None when absent. For quick comparisons."""
        return self._items.get(path)

    def draft(self) -> Draft:
        """A copy to change, at the cost of copying a dict: no FileEntry is made for a small file."""
        return Draft(dict(self._items))

    def __repr__(self) -> str:
        return f"Files({dict(self.items())!r})"


class Draft(MutableMapping[str, FileEntry]):
    """A set's files being changed (a watch applying events), kept as Files keeps them.

    Made by Files.draft(); Files(draft) takes its items without copying them, and the draft can no
    longer be changed, so the Files it became stays immutable.
    """

    __slots__ = ("_frozen", "_items")

    def __init__(self, items: dict[str, bytes | FileEntry]) -> None:
        self._items = items
        self._frozen = False

    def freeze(self) -> dict[str, bytes | FileEntry]:
        """The items, for a Files to own: the draft refuses any change from now on."""
        self._frozen = True
        return self._items

    def _changing(self) -> None:
        if self._frozen:
            raise TypeError("this set of files was frozen into a snapshot and cannot change")

    def __getitem__(self, path: str) -> FileEntry:
        return _entry(self._items[path])

    def __setitem__(self, path: str, entry: FileEntry) -> None:
        self._changing()
        self._items[path] = _compact(entry)

    def __delitem__(self, path: str) -> None:
        self._changing()
        del self._items[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: object) -> bool:
        return path in self._items


@dataclass(frozen=True)
class Snapshot:
    """An immutable mapping from safe relative paths to file entries, with a content digest."""

    files: Mapping[str, FileEntry] = field(default_factory=lambda: MappingProxyType({}))
    version: str = ""

    @classmethod
    def of(cls, files: Mapping[str, FileEntry]) -> Snapshot:
        """Build a Snapshot from already validated entries, computing its version."""
        kept = Files(files)
        return cls(kept, digest(kept))

    @property
    def short_version(self) -> str:
        """The first 12 hex digits of the version, for log lines."""
        return self.version[:12]

    def top_level(self) -> set[str]:
        """The names of the entries at the top of the set (files and directories)."""
        return {path.split("/", 1)[0] for path in self.files}


def digest(files: Mapping[str, FileEntry]) -> str:
    """A SHA-256 over paths, executable bits and content, independent of insertion order.

    Small content is hashed as it is; larger content by its own SHA-256, which was computed as it
    was spooled or read.
    """
    # A Files' own items: its small plain files as bytes, with no FileEntry made for them.
    items: Mapping[str, bytes | FileEntry] = files._items if isinstance(files, Files) else files
    h = hashlib.sha256()
    for path in sorted(items):
        item = items[path]
        encoded = path.encode("utf-8")
        if isinstance(item, bytes):  # a small file with the default mode
            h.update(b"%d:%s:0:%d:" % (len(encoded), encoded, len(item)))
            h.update(item)
            continue
        content = item.content
        # 0 or 1 for a file with the default mode (as before modes of its own existed), 2 + mode otherwise.
        kind = int(item.executable) if item.mode is None else 2 + item.mode
        if isinstance(content, bytes):
            h.update(b"%d:%s:%d:%d:" % (len(encoded), encoded, kind, len(content)))
            h.update(content)
        else:
            h.update(b"%d:%s:%d:%d#" % (len(encoded), encoded, kind, content.size))
            h.update(content.sha)
    return h.hexdigest()


class SnapshotBuilder:
    """Collects a source's files, validating each path and enforcing the size limits as it goes."""

    def __init__(self, source: str, limits: Limits) -> None:
        self._source = source
        self._limits = limits
        self._files: dict[str, FileEntry] = {}
        self._total = 0
        self._names = 0

    @property
    def source(self) -> str:
        """The (redacted) name of the source being read."""
        return self._source

    @property
    def limits(self) -> Limits:
        """The limits this builder enforces."""
        return self._limits

    @property
    def total(self) -> int:
        """The bytes of content added so far."""
        return self._total

    @property
    def names(self) -> int:
        """The characters of the paths added so far (the measure of MAX_NAMES_BYTES)."""
        return self._names

    def remaining(self) -> int:
        """The most bytes the next file may hold under the per-file and total limits."""
        return min(self._limits.max_file_size, self._limits.max_total_size - self._total)

    def check_dir(self, path: str) -> None:
        """Refuse a directory whose path is unsafe, even though directories are not kept."""
        reason = check_path(path)
        if reason is not None:
            raise self.reject(f"unsafe path {printable(path)}: {reason}")

    def reject(self, message: str) -> UnsafeDataError:
        """An UnsafeDataError for this source."""
        return UnsafeDataError(self._source, message)

    def check_size(self, path: str, size: int) -> None:
        """Refuse a file of ``size`` bytes before it is read, if it would break a limit."""
        if size > self._limits.max_file_size:
            raise self.reject(
                f"{printable(path)} is {size} bytes, over the per-file limit of {self._limits.max_file_size}"
            )
        if self._total + size > self._limits.max_total_size:
            raise self.reject(
                f"total size passes the limit of {self._limits.max_total_size} bytes at {printable(path)}"
            )

    def _admit(self, path: str) -> None:
        reason = check_path(path)
        if reason is not None:
            raise self.reject(f"unsafe path {printable(path)}: {reason}")
        if path in self._files:
            raise self.reject(f"{printable(path)} appears twice")
        if len(self._files) >= self._limits.max_files:
            raise self.reject(f"more than {self._limits.max_files} files (max-files)")
        self._names += len(path)
        if self._names > MAX_NAMES_BYTES:
            raise self.reject(
                f"the paths of the set pass {MAX_NAMES_BYTES >> 20} MiB together at {printable(path)}; "
                "use shorter paths or fewer files"
            )

    def _spool_error(self, path: str, exc: OSError) -> SourceError:
        return SourceError(self._source, f"{printable(path)}: {exc.strerror or exc}")

    def add(self, path: str, data: bytes, *, executable: bool = False) -> None:
        """Add one file, or raise UnsafeDataError naming the source and the path."""
        self._admit(path)
        self.check_size(path, len(data))
        try:
            entry = FileEntry(data, executable)
        except spool.SpoolError as exc:
            raise self._spool_error(path, exc) from None
        self._put(path, entry)

    def entry(self, path: str) -> FileEntry:
        """The entry added for ``path``."""
        return self._files[path]

    def add_entry(self, path: str, entry: FileEntry) -> None:
        """Add a file whose content is already held (in memory or in the spool)."""
        self._admit(path)
        self._put(path, entry)

    def _put(self, path: str, entry: FileEntry) -> None:
        """Keep an admitted path's entry, within the size limits."""
        self.check_size(path, entry.size)
        self._files[path] = entry
        self._total += entry.size

    def add_stream(self, path: str, read: Callable[[int], bytes], *, executable: bool = False) -> FileEntry:
        """Add one file read with ``read(n)`` until it returns nothing, keeping at most a chunk in memory.

        The limits are enforced while reading: content past them is refused before it is held.
        """
        self._admit(path)
        cap = self.remaining()
        head = b""
        while len(head) <= INLINE_MAX:  # small content stays in memory, whatever sizes the reads return
            chunk = read(INLINE_MAX + 1 - len(head))
            if not chunk:
                entry = FileEntry(head, executable)
                self._put(path, entry)
                return entry
            head += chunk
        try:
            with spool.current().writer(cap) as writer:
                try:
                    writer.write(head)
                    while chunk := read(spool.CHUNK):
                        writer.write(chunk)
                except spool.TooLarge as exc:
                    self.check_size(path, exc.args[0])
                    raise  # check_size refuses any size past the cap
                blob = writer.finish()
        except spool.SpoolError as exc:
            raise self._spool_error(path, exc) from None
        entry = FileEntry(blob, executable)
        self._put(path, entry)
        return entry

    def build(self) -> Snapshot:
        """The finished Snapshot. An empty set, or a name that is both file and directory, is refused."""
        if not self._files:
            raise self.reject("the source holds no files")
        clash = find_file_dir_clash(self._files)
        if clash is not None:
            raise self.reject(f"{printable(clash)} is both a file and a directory")
        return Snapshot.of(self._files)


@dataclass(frozen=True)
class Checked:
    """A set that passed every check of SnapshotBuilder, with the sums a revision of it is checked from."""

    snapshot: Snapshot
    total: int  # bytes of content
    names: int  # characters of paths, as SnapshotBuilder counts them


# A revision adding more new paths than this is checked whole: each new path costs a pass over the set.
REVISE_NEW_PATHS = 8


def check_whole(source: str, limits: Limits, files: Mapping[str, FileEntry]) -> Checked:
    """Check every path and entry of ``files`` as SnapshotBuilder does, and build the Snapshot."""
    builder = SnapshotBuilder(source, limits)
    for path in sorted(files):
        builder.add_entry(path, files[path])
    return Checked(builder.build(), builder.total, builder.names)


def check_revision(
    source: str, limits: Limits, before: Checked, files: Mapping[str, FileEntry], changed: Iterable[str]
) -> Checked:
    """Check ``files``, which differ from ``before`` only at the paths in ``changed``, at the cost of those.

    It refuses exactly what check_whole would (the message may name another path): paths are checked
    where they are new, sizes against the per-file limit where they changed, and the count, the total
    size and the paths' length from sums kept up to date. A new path is checked against the set for a
    file/directory clash. When more than REVISE_NEW_PATHS paths are new, the set is checked whole.
    """
    old = before.snapshot.files
    builder = SnapshotBuilder(source, limits)
    total, names = before.total, before.names
    new: list[str] = []
    for path in changed:
        was = old.get(path)
        entry = files.get(path)
        if was is not None:
            total -= was.size
            if entry is None:
                names -= len(path)
        elif entry is not None:
            reason = check_path(path)
            if reason is not None:
                raise builder.reject(f"unsafe path {printable(path)}: {reason}")
            names += len(path)
            new.append(path)
        if entry is not None:
            if entry.size > limits.max_file_size:
                builder.check_size(path, entry.size)  # names the path and the limit
            total += entry.size
    if len(new) > REVISE_NEW_PATHS:
        return check_whole(source, limits, files)
    if not files:
        raise builder.reject("the source holds no files")
    if len(files) > limits.max_files:
        raise builder.reject(f"more than {limits.max_files} files (max-files)")
    if names > MAX_NAMES_BYTES:
        raise builder.reject(
            f"the paths of the set pass {MAX_NAMES_BYTES >> 20} MiB together; use shorter paths or fewer files"
        )
    if total > limits.max_total_size:
        raise builder.reject(f"total size passes the limit of {limits.max_total_size} bytes")
    for path in new:
        clash = _clash_at(path, files)
        if clash is not None:
            raise builder.reject(f"{printable(clash)} is both a file and a directory")
    return Checked(Snapshot.of(files), total, names)


def _clash_at(path: str, files: Mapping[str, FileEntry]) -> str | None:
    """A path of ``files`` that is a file above ``path``, or ``path`` itself if files lie under it."""
    at = path.find("/")
    while at != -1:
        if path[:at] in files:
            return path[:at]
        at = path.find("/", at + 1)
    under = path + "/"
    if any(other.startswith(under) for other in files):
        return path
    return None


def find_file_dir_clash(paths: Iterable[str]) -> str | None:
    """Return a path that is used as a file and also as a directory above another path, if any.

    In sorted order, the paths under ``p/`` follow ``p/`` itself, so one binary search per path finds
    them: O(n log n), however deep the paths (a prefix-by-prefix check costs the square of the depth).
    """
    ordered = sorted(paths)
    for path in ordered:
        under = path + "/"
        at = bisect.bisect_left(ordered, under)
        if at < len(ordered) and ordered[at].startswith(under):
            return path
    return None


@dataclass(frozen=True)
class Part:
    """One source's snapshot, and the sub-directory of the destination it belongs in."""

    source: str
    subdir: str
    snapshot: Snapshot


def merge(parts: Iterable[Part]) -> Snapshot:
    """Merge several sources' snapshots into one. Two sources claiming a path is a SettingsError."""
    parts = list(parts)
    if len(parts) == 1 and not parts[0].subdir:
        return parts[0].snapshot  # the common case: nothing to move or check
    files: dict[str, FileEntry] = {}
    owner: dict[str, str] = {}
    for part in parts:
        prefix = f"{part.subdir}/" if part.subdir else ""
        for path, entry in part.snapshot.files.items():
            full = prefix + path
            if full in files:
                raise SettingsError(
                    f"sources {owner[full]} and {part.source} both provide {printable(full)}; "
                    "give each source its own 'dir' in the config file"
                )
            files[full] = entry
            owner[full] = part.source
    clash = find_file_dir_clash(files)
    if clash is not None:
        raise SettingsError(
            f"{printable(clash)} is a file in one source and a directory in another; "
            "give each source its own 'dir' in the config file"
        )
    return Snapshot.of(files)
