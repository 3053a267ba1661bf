"""``git+https://``, ``git+http://``, ``git+ssh://``, ``git+git://`` and ``git+file://`` sources: the tree
at a ref, or one sub-directory of it.

Each poll asks the remote which commit the ref points at (the ref advertisement, filtered by the ref's
name where the server speaks protocol v2), and fetches only when that moved. A fetch asks for the one
commit, at ``depth`` (1 by default), with no local history to negotiate, so the pack is self-contained.
The pack is streamed into the spool under a size cap, scanned object by object (declared and inflated
sizes checked before anything is indexed or inflated whole), indexed in memory, and read into a
Snapshot through SnapshotBuilder, which enforces the usual limits. Nothing is checked out, so nothing
but the spool is written, and ``.git`` is never part of a set.

The git protocol is spoken by dulwich (Python, with optional compiled speed-ups), imported only when a
git source is configured. SSH goes through OpenSSH's ``ssh`` client with a fixed set of options: no config
file, batch mode, the key given, and host keys always checked against the known_hosts file given.

Each poll runs in a worker thread, and each of its two exchanges (the ref advertisement, then the pack)
has the request timeout, enforced three ways: each read checks it (a peer that drip-feeds), sockets
carry a read timeout (a peer that stalls), and when the waiting task gives up the ssh client is killed.
Every read counts against a byte budget, so a huge ref advertisement or pack is refused at the cap, not
held. What follows the exchanges (reading the pack, walking the tree; for ``git+file``, making the pack
from local files too) is local work: bounded by the limits (each object's size, their sum, the entries
walked), not by the timeout. A source runs one worker at a time: one abandoned at its deadline is
stopped, and the next poll waits for it to end.

Only git's smart protocols are spoken: a plain web server serving a repository ("dumb" HTTP, whole
objects one by one, with no pack to cap) is refused before any object is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import random
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from infantry import __version__, spool, threads
from infantry.errors import SettingsError, SourceError, UnsafeDataError
from infantry.secrets import read_secret
from infantry.settings import SourceSpec, child_environment, redact_url
from infantry.snapshot import FileEntry, Limits, Snapshot, SnapshotBuilder, printable
from infantry.sources import tls_hint

if TYPE_CHECKING:
    from dulwich.client import GitClient
    from dulwich.pack import Pack

logger = logging.getLogger(__name__)

JITTER = 0.1
REFS_CAP = 4 << 20
"""The most bytes one ref advertisement may take: far more than any real one filtered to a ref."""
PACK_FACTOR = 4
"""A pack may be this many times --max-total-size: it holds the whole tree at the commit, not only
``path``, and up to ``depth`` commits of it. The objects it holds inflate to no more than this together
either, and each to no more than --max-file-size."""
WALK_SLACK = 10_000
# Trees kept read during one walk, so that meeting one again costs no delta resolution (see _TreeReader).
WALKED_TREE_BYTES = 32 << 20
"""A tree is walked through at most 2 x --max-files + this many entries (see ``_TreeReader``)."""
REMEMBERED_SETS = 8
"""The sets whose commits a source remembers, for the commits of the live set."""
LINK_HOPS = 40
"""Links followed in a row before a chain is called a loop, as the kernel does."""
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"
_SHA = re.compile(r"[0-9a-f]{40}")
_MODE_LINK = 0o120000
_MODE_GITLINK = 0o160000
# pack object types
_COMMIT, _TREE, _BLOB, _TAG, _OFS_DELTA, _REF_DELTA = 1, 2, 3, 4, 6, 7


def remote_url(url: str) -> str:
    """The URL git is asked for: the source URL without ``git+`` and without its fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.removeprefix("git+"), parts.netloc, parts.path, parts.query, ""))


class _Deadline(Exception):
    """The operation's deadline passed while it was reading."""


class _TooMuch(Exception):
    """The peer sent more than the operation's byte budget."""


class _Guard:
    """The deadline and byte budget of one operation, checked on every read, and what to kill at its end.

    Shared between the worker thread reading and the task waiting for it; ``abort`` is called by the
    waiter when the deadline passes, and ends the ssh client so that a blocked read returns.
    """

    def __init__(self) -> None:
        self.deadline = float("inf")
        self.budget = 0
        self.used = 0
        self.what = ""
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._sockets: list[socket.socket] = []
        self.aborted = False
        self.local = False  # the exchanges are over (see ``offline``)

    def start(self, seconds: float, budget: int, what: str) -> None:
        self.deadline = time.monotonic() + seconds
        self.budget, self.used, self.what = budget, 0, what

    def offline(self) -> None:
        """The exchanges are over: what is left is local work, which has no deadline (the limits bound it)."""
        self.deadline = float("inf")
        self.local = True

    def check(self) -> None:
        """Stop local work for a waiter that gave up (or a source closed)."""
        if self.aborted:
            raise _Deadline

    def wrap(self, read: Callable[..., bytes]) -> Callable[..., bytes]:
        def guarded(*args: Any) -> bytes:
            if self.aborted or time.monotonic() > self.deadline:
                raise _Deadline
            data = read(*args)
            self.used += len(data)
            if self.used > self.budget:
                raise _TooMuch
            return data

        return guarded

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs = [p for p in self._procs if p.poll() is None]
            self._procs.append(proc)

    def watch_socket(self, sock: Any) -> None:
        """Shut ``sock`` down on abort: a read blocked on it then returns, and its thread ends."""
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets.append(sock)
            if self.aborted:
                self.abort()

    def abort(self) -> None:
        self.aborted = True
        with self._lock:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def reap(self) -> None:
        """Wait for the ssh clients that ended, so none is left a zombie."""
        with self._lock:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            self._procs = []


@dataclass(frozen=True)
class _Ssh:
    key_file: Path | None
    known_hosts: Path


def _ssh_path(path: Path) -> str:
    """``path`` as an ssh option value: quoted (it may hold spaces), ``%`` and a leading ``~`` not expanded."""
    text = str(path.absolute()).replace("%", "%%")
    if '"' in text or not text.isprintable():
        raise SettingsError(f"ssh-key-file and ssh-known-hosts: {text[:80]!r} cannot be given to ssh; rename it")
    return f'"{text}"'


def _ssh_argv(ssh: str, options: _Ssh, host: str, port: int | None, user: str | None, timeout: float) -> list[str]:
    """The ssh client's command line: no config file, no prompts, host keys always checked."""
    argv = [
        ssh,
        "-F",
        "/dev/null",
        "-x",
        "-T",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={_ssh_path(options.known_hosts)}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        "CheckHostIP=no",
        "-o",
        f"ConnectTimeout={max(1, int(timeout))}",
        "-o",
        "ServerAliveInterval=10",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "SetEnv GIT_PROTOCOL=version=2",
    ]
    if options.key_file is not None:
        argv += ["-o", "IdentitiesOnly=yes", "-o", f"IdentityFile={_ssh_path(options.key_file)}"]
    else:
        argv += ["-o", "IdentityFile=none"]
    if port is not None:
        argv += ["-p", str(port)]
    if user:
        argv += ["-l", user]
    return [*argv, "--", host]


def _client(remote: str, spec: SourceSpec, guard: _Guard, timeout: float, pool: Any) -> tuple[GitClient, str]:
    """A dulwich client for ``remote``, every read of it guarded, and the path to ask it for."""
    from dulwich.client import LocalGitClient, SSHGitClient, SSHVendor, SubprocessWrapper, TCPGitClient
    from dulwich.client import Urllib3HttpGitClient as HttpClient

    parts = urlsplit(remote)
    path = unquote(parts.path)
    if parts.scheme == "file":
        return LocalGitClient(), path
    if parts.scheme in ("http", "https"):
        headers = dict(spec.headers)  # --header: to the source's own origin, as the credentials
        if spec.bearer_token_file is not None:
            # Read on every operation, so a rotated token is picked up without a restart.
            headers["Authorization"] = "Bearer " + read_secret(spec.bearer_token_file, "bearer-token-file")
        username, password = spec.username, None
        if spec.password_file is not None:
            password = read_secret(spec.password_file, "password-file")
        elif username is None and parts.username is not None:
            username, password = unquote(parts.username), unquote(parts.password or "")
        origin = _origin(remote)
        name = redact_url(spec.url)

        class Http(HttpClient):
            def _http_request(
                self, url: str, headers: Any = None, data: Any = None, raise_for_status: bool = True
            ) -> Any:
                sent = dict(headers or {})
                if _origin(url) == origin:
                    sent.update(extra)
                resp, read = super()._http_request(url, sent, data, raise_for_status)
                guard.watch_socket(_socket_of(resp))
                return resp, guard.wrap(read)

            def _discover_references(self, *args: Any, **kwargs: Any) -> Any:
                found = super()._discover_references(*args, **kwargs)
                if self.dumb:
                    # A plain web server ("dumb" HTTP) hands out whole objects one by one, with no pack
                    # to cap and no depth: refused before any object is asked for.
                    raise SourceError(
                        name,
                        "the server does not speak git's smart HTTP protocol (it answered info/refs as a plain "
                        'web server would: "dumb" HTTP, which infantry does not support); serve the repository '
                        "with git http-backend or a git host",
                        temporary=False,
                    )
                return found

        extra = headers
        # Credentials go in headers, to the source's own origin only; never in the URL asked for.
        host = parts.netloc.rpartition("@")[2]
        base = urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/", parts.query, ""))
        client = Http(base, pool_manager=pool, username=username, password=password, timeout=timeout)
        return client, ""
    if parts.scheme == "git":

        class Tcp(TCPGitClient):
            def _connect(self, cmd: bytes, path: str | bytes, protocol_version: int | None = None) -> Any:
                proto, can_read, stderr = super()._connect(cmd, path, protocol_version)
                rfile = getattr(proto.read, "__self__", None)
                sock = getattr(getattr(rfile, "raw", None), "_sock", None)
                if isinstance(sock, socket.socket):
                    sock.settimeout(timeout)  # a peer that stalls ends the read, not the thread
                    guard.watch_socket(sock)
                proto.read = guard.wrap(proto.read)
                return proto, can_read, stderr

        return Tcp(parts.hostname or "", parts.port), path
    if parts.scheme == "ssh":
        program = shutil.which("ssh")
        if program is None:
            raise SourceError(
                redact_url(spec.url), "no ssh client in PATH; git+ssh sources need OpenSSH's ssh", temporary=False
            )
        if spec.ssh_known_hosts is None:
            raise SettingsError(
                f"source {redact_url(spec.url)}: git+ssh needs ssh-known-hosts (--ssh-known-hosts or the "
                "source's ssh_known_hosts), a known_hosts file with the server's host key"
            )
        options = _Ssh(spec.ssh_key_file, spec.ssh_known_hosts)
        env = {"PATH": child_environment().get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

        class Vendor(SSHVendor):
            def run_command(
                self,
                host: str,
                command: bytes,
                username: str | None = None,
                port: int | None = None,
                password: str | None = None,
                key_filename: str | None = None,
                ssh_command: str | None = None,
                protocol_version: int | None = None,
            ) -> SubprocessWrapper:
                assert program is not None
                argv = _ssh_argv(program, options, host, port, username, timeout)
                proc = subprocess.Popen(
                    [*argv, os.fsdecode(command)],
                    bufsize=0,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                )
                guard.adopt(proc)
                wrapper = SubprocessWrapper(proc)
                wrapper.read = guard.wrap(wrapper.read)
                return wrapper

        return SSHGitClient(parts.hostname or "", parts.port, parts.username, vendor=Vendor()), path
    raise AssertionError(f"not a git remote: {parts.scheme}")


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port of ``url``, the port made explicit (80 or 443 when not given), so that
    ``http://h/`` and ``http://h:80/`` are one origin and ``http://h:8080/`` another."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return (parts.scheme, None, None)  # matches no origin: nothing is sent to it
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return (parts.scheme.lower(), (parts.hostname or "").lower() or None, port)


def _socket_of(resp: Any) -> Any:
    """The socket an HTTP response is read from, or None: urllib3 keeps it on its connection while the
    connection is kept alive, and on the response's file object otherwise."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is None:
        buffered = getattr(getattr(resp, "_fp", None), "fp", None)
        sock = getattr(getattr(buffered, "raw", None), "_sock", None)
    return sock


class _NoHaves:
    """The graph walker of a fetch with no local history: nothing to offer, nothing shallow."""

    shallow: set[bytes] = set()  # noqa: RUF012

    def __next__(self) -> None:
        return None

    def ack(self, sha: bytes) -> None:
        """Nothing to record: no haves were sent."""

    def nak(self) -> None:
        """Nothing to record."""


def _candidates(ref: str | None) -> list[bytes]:
    """The advertised names ``ref`` may stand for, most specific first."""
    if ref is None:
        return [b"HEAD"]
    if ref.startswith("refs/") or ref == "HEAD":
        return [ref.encode()]
    return [f"refs/heads/{ref}".encode(), f"refs/tags/{ref}".encode()]


def _pick(refs: dict[bytes, Any], ref: str | None) -> bytes | None:
    """The object ``ref`` points at in the advertisement, or None."""
    if ref is not None and _SHA.fullmatch(ref):
        return ref.encode()  # a commit: it never moves, and need not be advertised
    for name in _candidates(ref):
        sha = refs.get(name)
        if isinstance(sha, bytes):
            return sha
    return None


class _PackScan:
    """Reads a pack once, in order, checking what each object declares before anything is inflated
    whole: the object count, each object's size (a delta's result size too) against --max-file-size,
    whatever its type and wherever it is in the tree (in ``path`` or not: the pack holds it, and reading
    the pack inflates it), and the sum of them all. Reading the pack then holds about one object at a
    time (a delta and its base), so its memory follows --max-file-size, not the size of the pack.

    Inflating is streamed a slice at a time into nothing, so a pack of highly compressible objects (a
    gigabyte of zeros is a megabyte of pack) is refused at the cap, never held.
    """

    _SLICE = 4096  # fed to zlib at a time: what it copies back per object stays small

    def __init__(self, handle: BinaryIO, source: str, max_objects: int, object_cap: int, inflate_cap: int) -> None:
        self._handle = handle
        self._source = source
        self._buf = b""
        self._pos = 0
        self._max_objects = max_objects
        self._object_cap = object_cap
        self._inflate_cap = inflate_cap

    def _bad(self, message: str) -> UnsafeDataError:
        return UnsafeDataError(self._source, message)

    def _fill(self, n: int) -> None:
        """At least ``n`` bytes buffered past the position, or UnsafeDataError."""
        if len(self._buf) - self._pos >= n:
            return
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        while have < n:
            chunk = self._handle.read(spool.CHUNK)
            if not chunk:
                raise self._bad("the pack is truncated")
            parts.append(chunk)
            have += len(chunk)
        self._buf, self._pos = b"".join(parts), 0

    def _take(self, n: int) -> bytes:
        self._fill(n)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def run(self) -> None:
        head = self._take(12)
        if head[:4] != b"PACK" or int.from_bytes(head[4:8], "big") not in (2, 3):
            raise self._bad("the server's answer is not a git pack")
        count = int.from_bytes(head[8:12], "big")
        if count > self._max_objects:
            raise self._bad(f"the pack holds {count} objects, more than {self._max_objects}; it is too large")
        total = 0
        for _ in range(count):
            byte = self._take(1)[0]
            kind, size, shift = (byte >> 4) & 7, byte & 15, 4
            while byte & 0x80:
                byte = self._take(1)[0]
                size |= (byte & 0x7F) << shift
                shift += 7
                if shift > 70:
                    raise self._bad("a pack object's size is malformed")
            if kind == _OFS_DELTA:
                byte = 0x80
                while byte & 0x80:
                    byte = self._take(1)[0]
            elif kind == _REF_DELTA:
                self._take(20)
            elif kind not in (_COMMIT, _TREE, _BLOB, _TAG):
                raise self._bad(f"a pack object has an unknown type {kind}")
            result = self._inflate(size, delta=kind in (_OFS_DELTA, _REF_DELTA))
            if result > self._object_cap:
                raise self._bad(
                    f"the commit holds an object of {result} bytes, over the per-file limit of {self._object_cap} "
                    "(--max-file-size; every object the pack holds counts, in path or not)"
                )
            total += result + size
            if total > self._inflate_cap:
                raise self._bad(
                    f"the commit's objects pass {self._inflate_cap} bytes together ({PACK_FACTOR} x max-total-size); "
                    "it is too large"
                )

    def _inflate(self, declared: int, *, delta: bool) -> int:
        """Inflate one object into nothing; its size (for a delta, the size of what it makes)."""
        if declared > self._object_cap:
            raise self._bad(
                f"the commit holds an object of {declared} bytes, over the per-file limit of {self._object_cap} "
                "(--max-file-size; every object the pack holds counts, in path or not)"
            )
        z = zlib.decompressobj()
        out = 0
        head = b""
        while not z.eof:
            self._fill(1)
            data = memoryview(self._buf)[self._pos : self._pos + self._SLICE]
            piece = z.decompress(data, spool.CHUNK)
            out += len(piece)
            if delta and len(head) < 20:
                head += piece[: 20 - len(head)]
            if out > declared:
                raise self._bad("a pack object inflates past the size it declares")
            left = len(z.unused_data) if z.eof else len(z.unconsumed_tail)
            self._pos += len(data) - left
        if out != declared:
            raise self._bad("a pack object inflates to another size than it declares")
        if not delta:
            return declared
        _, at = _varint(head, 0)  # the base's size, then the result's
        result, _ = _varint(head, at)
        return result


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data):
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at
    return 1 << 62, at  # cut short: as large as can be, so the caller refuses it


@dataclass
class _Fetched:
    commit: str
    snapshot: Snapshot


class GitSource:
    """A tree at a ref of a git repository, polled every interval (±10% jitter)."""

    def __init__(self, spec: SourceSpec, limits: Limits, interval: float, *, request_timeout: float = 30.0) -> None:
        self._spec = spec
        self.name = redact_url(spec.url)
        self._limits = limits
        self._interval = interval
        self._timeout = request_timeout
        self._remote = remote_url(spec.url)
        self._ref = spec.ref
        self._path = (spec.path or "").strip("/")
        self._depth = spec.depth or 1
        self._guard = _Guard()
        self._pool: Any = None
        self._advertised: bytes | None = None  # what the ref pointed at when the last set was read
        self._last: _Fetched | None = None
        self._warned: str | None = None  # the commit whose gitlinks and LFS pointers were warned of
        self._delivered: dict[str, str] = {}  # the commit of each set answered with lately, by version
        self._busy = threading.Lock()  # held by the one worker of this source that may run
        self._worker: asyncio.Future[tuple[bytes, _Fetched | None]] | None = None
        # The commit whose tree was refused, and why: refused again at once until the ref moves.
        self._refused: tuple[bytes, UnsafeDataError] | None = None

    # -- the network, in a worker thread -----------------------------------------------------------

    def _http_pool(self) -> Any:
        if self._pool is None:
            import urllib3

            context = ssl.create_default_context(cafile=str(self._spec.ca_file) if self._spec.ca_file else None)
            if self._spec.client_cert is not None and self._spec.client_key is not None:
                try:
                    context.load_cert_chain(self._spec.client_cert, self._spec.client_key)
                except (OSError, ssl.SSLError) as exc:
                    raise SettingsError(f"client-cert: cannot load {self._spec.client_cert}: {exc}") from exc
            # No proxy from the environment (as for http:// sources), no retries (the watch loop retries,
            # with backoff), redirects followed a few hops, credentials dropped on a change of host.
            # Hosts such as GitHub answer the smart protocol only to a git-like User-Agent.
            self._pool = urllib3.PoolManager(
                ssl_context=context,
                timeout=urllib3.Timeout(connect=self._timeout, read=self._timeout),
                retries=urllib3.Retry(
                    connect=0,
                    read=0,
                    status=0,
                    other=0,
                    redirect=5,
                    raise_on_redirect=True,
                    # --header values may be credentials (an API key): like Authorization, never carried
                    # along a redirect, which may lead to another origin.
                    remove_headers_on_redirect=[
                        *urllib3.Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT,
                        *self._spec.headers,
                    ],
                ),
                maxsize=1,
                headers={"User-Agent": f"git/infantry-{__version__}"},
            )
        return self._pool

    def _connect(self, guard: _Guard) -> tuple[GitClient, str]:
        pool = self._http_pool() if self._remote.startswith(("http:", "https:")) else None
        return _client(self._remote, self._spec, guard, self._timeout, pool)

    def _resolve(self, guard: _Guard) -> bytes:
        """Which object the ref points at now (one ref advertisement)."""
        guard.start(self._timeout, REFS_CAP, "the ref advertisement")
        client, path = self._connect(guard)
        result = client.get_refs(path.encode() if path else b"", ref_prefix=self._prefixes())
        sha = _pick({bytes(k): v for k, v in result.refs.items()}, self._ref)
        if sha is None:
            raise SourceError(
                self.name, f"{self._ref_shown()} is not on the remote (deleted, or misspelt?)", temporary=False
            )
        return sha

    def _prefixes(self) -> list[bytes]:
        """The names to ask the server to advertise (protocol v2 filters by them; v0 sends all)."""
        if self._ref is not None and _SHA.fullmatch(self._ref):
            return [b"HEAD"]  # a commit needs no ref; advertise as little as possible
        return _candidates(self._ref)

    def _ref_shown(self) -> str:
        return "HEAD" if self._ref is None else f"ref {printable(self._ref)}"

    def _load(self, want: bytes, guard: _Guard) -> _Fetched:
        """Fetch ``want`` at ``depth`` into the spool, and read its tree into a Snapshot."""
        from dulwich.object_format import SHA1
        from dulwich.pack import MemoryPackIndex, Pack, PackData

        limits = self._limits
        cap = PACK_FACTOR * limits.max_total_size
        guard.start(self._timeout, cap + REFS_CAP, "the pack")
        client, path = self._connect(guard)
        if self._remote.startswith("file:"):
            guard.offline()  # the pack is made here, from local files: local work, with no deadline
        try:
            writer = spool.current().writer(cap)
        except spool.SpoolError as exc:
            raise SourceError(self.name, f"cannot spool the pack: {exc.strerror}") from None
        with writer:
            try:
                client.fetch_pack(
                    path.encode() if path else b"",
                    _wants(want),
                    _NoHaves(),
                    lambda data: _write(writer, data, guard),
                    depth=self._depth,
                    ref_prefix=self._prefixes(),
                )
            except spool.TooLarge:
                raise UnsafeDataError(
                    self.name, f"the pack passes {cap} bytes ({PACK_FACTOR} x max-total-size)"
                ) from None
            except spool.SpoolError as exc:
                raise SourceError(self.name, f"cannot spool the pack: {exc.strerror}") from None
            if writer.size == 0:
                raise SourceError(self.name, f"the server sent no pack for {want.decode()[:12]}")
            blob = writer.finish()
        # The network is done with: what follows is local work, bounded by the limits, not by a deadline.
        guard.offline()
        max_objects = 2 * limits.max_files + 10_000
        with blob.open() as handle:
            _PackScan(handle, self.name, max_objects, limits.max_file_size, cap).run()
        with blob.open() as handle:
            data = PackData.from_file(handle, SHA1, blob.size)
            try:
                entries: list[Any] = list(data.sorted_entries())
                index = MemoryPackIndex(entries, SHA1, data.get_stored_checksum())
                pack = Pack.from_objects(data, index)
                return self._read_commit(pack, want, guard)
            finally:
                data.close()

    def _read_commit(self, pack: Pack, want: bytes, guard: _Guard) -> _Fetched:
        from dulwich.objects import Commit, Tag, Tree

        obj = self._object(pack, want)
        for _ in range(10):  # an annotated tag, perhaps of a tag
            if not isinstance(obj, Tag):
                break
            obj = self._object(pack, obj.object[1])
        if not isinstance(obj, Commit):
            raise UnsafeDataError(self.name, f"{self._ref_shown()} does not point at a commit")
        commit = obj.id.decode()
        tree = self._object(pack, obj.tree)
        if not isinstance(tree, Tree):
            raise UnsafeDataError(self.name, f"commit {commit[:12]} has no tree")
        for part in self._path.split("/") if self._path else []:
            entry = _entry(tree, part)
            sub = self._object(pack, entry[1]) if entry is not None and stat.S_ISDIR(entry[0]) else None
            if not isinstance(sub, Tree):
                where = f"path {printable(self._path)} is not a directory at commit {commit[:12]}"
                raise SourceError(self.name, where, temporary=False)
            tree = sub
        builder = SnapshotBuilder(self.name, self._limits)
        budget = 2 * self._limits.max_files + WALK_SLACK
        try:
            notes = _TreeReader(self, pack, builder, tree, budget, guard).run()
        except UnsafeDataError as exc:
            # A commit's tree never changes: it is refused again without being fetched and walked again.
            self._refused = (want, exc)
            raise
        if notes and self._warned != commit:
            self._warned = commit
            for note in notes:
                logger.warning("%s: commit %s: %s", self.name, commit[:12], note)
        return _Fetched(commit, builder.build())

    def _object(self, pack: Pack, sha: bytes) -> Any:
        try:
            return pack[sha]  # type: ignore[index]
        except KeyError:
            raise UnsafeDataError(self.name, f"the server's pack lacks object {sha.decode()[:12]}") from None

    def _sync(self, known: bytes | None, guard: _Guard) -> tuple[bytes, _Fetched | None]:
        """The advertised object, and the set read at it if it differs from ``known``."""
        try:
            sha = self._resolve(guard)
            if sha == known:
                return sha, None
            if self._refused is not None and self._refused[0] == sha:
                raise self._refused[1]
            return sha, self._load(sha, guard)
        finally:
            guard.reap()
            self._busy.release()

    # -- the async side ------------------------------------------------------------------------------

    async def poll(self) -> Snapshot | None:
        """One ref advertisement; a fetch only if the ref moved. None when it did not."""
        known = self._advertised if self._last is not None else None
        # One worker at a time: one abandoned at its deadline is stopped (its sockets shut down, its ssh
        # client killed, its local work checks the guard), but may take a moment to end: it is given the
        # request timeout to.
        if not self._busy.acquire(blocking=False):
            if self._worker is not None and self._worker.get_loop() is asyncio.get_running_loop():
                await asyncio.wait([self._worker], timeout=self._timeout)
            if not self._busy.acquire(blocking=False):
                raise SourceError(self.name, "the previous poll, stopped at its deadline, has not ended yet")
        try:
            # A guard of its own: a worker abandoned at its deadline keeps its own, already aborted.
            guard = self._guard = _Guard()
            guard.deadline = time.monotonic() + self._timeout  # until the worker starts its first exchange
            try:
                worker = self._worker = threads.start(self._sync, known, guard)
                worker.add_done_callback(_retrieved)  # an abandoned worker's error is no one's to report
            except BaseException:
                self._busy.release()
                raise
            sha, fetched = await self._wait(worker, guard)
        except TimeoutError:
            self._guard.abort()
            raise self._late() from None
        except asyncio.CancelledError:
            self._guard.abort()  # no one waits for the answer any more
            raise
        except (SourceError, UnsafeDataError, SettingsError):
            raise
        except _Deadline:
            raise self._late() from None
        except _TooMuch:
            raise UnsafeDataError(self.name, f"{self._guard.what} passes {self._guard.budget} bytes") from None
        except Exception as exc:
            raise self._error(exc) from exc
        if fetched is None:
            return None
        self._advertised = sha
        changed = self._last is None or self._last.snapshot.version != fetched.snapshot.version
        moved = self._last is not None and self._last.commit != fetched.commit
        self._last = fetched
        if changed or moved:
            self._delivered.pop(fetched.snapshot.version, None)
            self._delivered[fetched.snapshot.version] = fetched.commit
            while len(self._delivered) > REMEMBERED_SETS:
                del self._delivered[next(iter(self._delivered))]
            return fetched.snapshot
        return None

    @staticmethod
    async def _wait(
        worker: asyncio.Future[tuple[bytes, _Fetched | None]], guard: _Guard
    ) -> tuple[bytes, _Fetched | None]:
        """The worker's result. Each exchange has its own deadline (the request timeout, and a little for
        a read blocked past it); the local work after them (reading the pack) has none: the limits bound
        it. Past a deadline, TimeoutError."""
        while True:
            left = None if guard.local else guard.deadline + 0.5 - time.monotonic()
            try:
                return await asyncio.wait_for(asyncio.shield(worker), left)
            except TimeoutError:
                if guard.local or time.monotonic() < guard.deadline + 0.5:
                    continue  # the worker moved on to its next exchange, or to local work
                raise

    def commit_of(self, version: str) -> str | None:
        """The commit the set of ``version`` was read at, if this source answered with it lately."""
        return self._delivered.get(version)

    def _late(self) -> SourceError:
        return SourceError(self.name, f"no complete answer within the request timeout of {self._timeout:g}s")

    @property
    def commit(self) -> str | None:
        """The commit the last set this source answered with was read at."""
        return self._last.commit if self._last is not None else None

    def _error(self, exc: Exception) -> Exception:
        """A failure from the git client, as the error a source raises; never quoting a secret."""
        from dulwich.client import HTTPUnauthorized
        from dulwich.errors import GitProtocolError, HangupException, NotGitRepository

        if _timed_out(exc):
            return self._late()
        if isinstance(exc, HTTPUnauthorized):
            return SourceError(self.name, "the server refused the credentials (HTTP 401)", temporary=False)
        hint = tls_hint(exc)
        if hint is not None:
            return SourceError(self.name, hint, temporary=False)
        if isinstance(exc, NotGitRepository):
            return SourceError(self.name, "no git repository there (HTTP 404, or not a repository)", temporary=False)
        text = " ".join(str(exc).split())
        # ssh's own verdicts first: the pipe to an ssh client that gave up also breaks.
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
            return SourceError(
                self.name,
                "the SSH server's host key DIFFERS from the one in the known_hosts file (ssh-known-hosts): "
                "someone may be intercepting the connection (a man-in-the-middle), or the server's key was "
                "replaced; ask the server's owner for its fingerprint before changing known_hosts",
                temporary=False,
            )
        if "UNPROTECTED PRIVATE KEY FILE" in text or "bad permissions" in text:
            return SourceError(
                self.name,
                "ssh refuses the key file (ssh-key-file): others may read it; make it readable by its owner only "
                "(chmod 600, or a Secret mounted with defaultMode: 0400)",
                temporary=False,
            )
        if "Host key verification failed" in text:
            return SourceError(
                self.name,
                "the SSH server's host key is not in the known_hosts file (ssh-known-hosts); add it, checked "
                "against a fingerprint from the server's owner, e.g. `ssh-keyscan -p PORT HOST >> known_hosts`",
                temporary=False,
            )
        if "Permission denied" in text and isinstance(exc, HangupException | GitProtocolError):
            return SourceError(
                self.name, "the SSH server refused the key (ssh-key-file): Permission denied", temporary=False
            )
        unreachable = _os_error(exc)
        if unreachable is not None:
            return SourceError(self.name, f"cannot reach the git server: {unreachable}")
        if isinstance(exc, HangupException | GitProtocolError):
            if "unexpected http resp 403" in text:
                return SourceError(self.name, "the server refused access (HTTP 403)", temporary=False)
            match = re.search(r"unexpected http resp (\d+)", text)
            if match:
                return SourceError(self.name, f"HTTP {match.group(1)}")
            return SourceError(self.name, f"the git server hung up or misbehaved: {_scrub(text, self._spec)}")
        if isinstance(exc, OSError):
            return SourceError(self.name, f"cannot reach the git server: {type(exc).__name__}")
        return SourceError(self.name, f"git failed: {type(exc).__name__}: {_scrub(text, self._spec)}")

    def refresh(self) -> None:
        """Fetch and read the whole tree again on the next poll, and answer with it."""
        self._last = None
        self._advertised = None
        # A refused commit stays refused: its tree, and the limits, are the same as when it was read.

    async def fetch(self) -> Snapshot:
        """Read the tree at the ref now, ignoring what was seen before."""
        self.refresh()
        snapshot = await self.poll()
        assert snapshot is not None  # with nothing seen before, a poll always returns content
        return snapshot

    async def watch(self) -> AsyncIterator[Snapshot | None]:
        """The tree now, then a poll every interval (±10% jitter, so many pods do not poll in step)."""
        if self._last is None:
            yield await self.fetch()
        else:
            yield await self.poll()  # resuming after an error: the agent holds our last set
        while True:
            await asyncio.sleep(self._interval * random.uniform(1 - JITTER, 1 + JITTER))
            yield await self.poll()

    async def aclose(self) -> None:
        """Close idle HTTP connections; kill any ssh client still running."""
        self._guard.abort()
        if self._pool is not None:
            self._pool.clear()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _os_error(exc: BaseException) -> str | None:
    """The reason of the OSError (a refused connection, an unknown host) that caused ``exc``, if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return None


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc``, or what caused it, is a read or connect that ran out of time."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TimeoutError) or type(cause).__name__ in ("ReadTimeoutError", "ConnectTimeoutError"):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _scrub(text: str, spec: SourceSpec) -> str:
    """``text`` (from a server or a library), cut short and with the source's URL redacted."""
    remote = remote_url(spec.url)
    for secret_bearing in (remote, spec.url):
        text = text.replace(secret_bearing, redact_url(spec.url))
    parts = urlsplit(remote)
    if parts.password:
        text = text.replace(parts.password, "***")
    return text[:300]


def _entry(tree: Any, name: str) -> tuple[int, bytes] | None:
    try:
        mode, sha = tree[name.encode()]
    except KeyError:
        return None
    return int(mode), sha


class _TreeReader:
    """Walks a tree into a SnapshotBuilder: files as they are, links only to files inside the tree,
    gitlinks (submodules) skipped, LFS pointers published as the pointers they are.

    Every entry met costs one unit of a budget (``2 x --max-files + WALK_SLACK``): files, links,
    submodules and directories, a directory each time it is met (a few small tree objects that name one
    another a thousand times over make a billion directories), every link followed, and a tree read
    again to follow a link costs its entries. Past the budget the set is refused at once, so the walk is
    bounded however the tree is built. A tree object is read only when its turn comes, after it was
    charged for.
    """

    _CACHED_TREES = 32  # trees kept read for following links

    def __init__(
        self, source: GitSource, pack: Pack, builder: SnapshotBuilder, root: Any, budget: int, guard: _Guard
    ) -> None:
        self._source = source
        self._pack = pack
        self._builder = builder
        self._root = root
        self._notes: list[str] = []
        self._budget = budget
        self._left = budget
        self._guard = guard
        self._trees: dict[bytes, Any] = {}
        self._targets: dict[bytes, tuple[int, bytes]] = {}
        # Objects met again are not read again: reading one may mean resolving a long chain of deltas,
        # and a tree can name the same objects many times over (each meeting is still charged). Trees
        # are kept up to WALKED_TREE_BYTES (more than the budget lets a walk meet); a file's entry, for
        # every file, costs an entry the set holds anyway.
        self._walked: dict[bytes, Any] = {}
        self._walked_bytes = 0
        self._entries: dict[bytes, tuple[FileEntry, bool]] = {}

    def _charge(self, units: int = 1) -> None:
        self._guard.check()
        self._left -= units
        if self._left < 0:
            raise self._builder.reject(
                f"the tree has more than {self._budget} entries to walk (2 x max-files + {WALK_SLACK}; each file, "
                "link, submodule and directory counts, a directory each time it is met, and each link followed)"
            )

    def run(self) -> list[str]:
        from dulwich.objects import Tree

        # Each directory to read, as its parent's path and its name: the parent's path is one string shared
        # by its children, so what waits here costs a name each, however long the paths.
        pending: list[tuple[bytes | None, str, str]] = [(None, "", "")]
        links: list[tuple[str, bytes]] = []
        while pending:
            sha, parent, name = pending.pop()
            prefix = f"{parent}{name}/" if name else ""
            tree = self._root
            if sha is not None:
                tree = self._walked.get(sha)
                if tree is None:
                    tree = self._source._object(self._pack, sha)
                    if not isinstance(tree, Tree):
                        raise self._builder.reject(f"{printable(prefix.rstrip('/'))} is not a tree")
                    if self._walked_bytes < WALKED_TREE_BYTES:
                        self._walked[sha] = tree
                        self._walked_bytes += 64 * len(tree)
            for item in tree.iteritems():
                self._charge()
                entry = self._name(item.path, prefix)
                rel = prefix + entry
                mode = int(item.mode)
                if stat.S_ISDIR(mode):
                    self._builder.check_dir(rel)
                    pending.append((item.sha, prefix, entry))
                elif mode == _MODE_GITLINK:
                    self._notes.append(f"{printable(rel)} is a submodule; submodules are not followed")
                elif mode == _MODE_LINK:
                    links.append((rel, item.sha))
                elif stat.S_ISREG(mode):
                    self._add(rel, item.sha, executable=bool(mode & 0o100))
                else:
                    raise self._builder.reject(f"{printable(rel)} has an unknown mode {mode:o}")
        for rel, sha in links:
            self._add(rel, self._link(rel, sha), executable=False)
        return self._notes

    def _name(self, raw: bytes, prefix: str) -> str:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._builder.reject(f"a name under {printable(prefix or '/')} is not valid UTF-8") from None
        if name.lower() == ".git" or "/" in name:
            raise self._builder.reject(f"{printable(prefix + name)} is not a name a tree may hold")
        return name

    def _add(self, rel: str, sha: bytes, *, executable: bool) -> None:
        known = self._entries.get(sha)
        if known is None:
            kind, data = self._raw(sha)
            if kind != _BLOB:
                raise self._builder.reject(f"{printable(rel)} is not a file's content")
            self._builder.add(rel, data, executable=executable)
            known = self._entries[sha] = (self._builder.entry(rel), data.startswith(LFS_POINTER))
        else:
            entry = known[0]
            self._builder.add_entry(
                rel, FileEntry(entry.content, executable) if entry.executable != executable else entry
            )
        if known[1]:
            self._notes.append(f"{printable(rel)} is a Git LFS pointer; LFS content is not followed")

    def _raw(self, sha: bytes) -> tuple[int, bytes]:
        try:
            kind, data = self._pack.get_raw(sha)  # type: ignore[arg-type]
        except KeyError:
            raise self._builder.reject(f"the server's pack lacks object {sha.decode()[:12]}") from None
        return int(kind), bytes(data)

    def _target(self, sha: bytes) -> tuple[int, bytes]:
        """What a link's object holds, read once however many links share it."""
        found = self._targets.get(sha)
        if found is None:
            kind, data = self._raw(sha)
            found = (kind, data if len(data) <= 4096 else b"/")  # a target longer than a path may be: refused
            self._targets[sha] = found
        return found

    def _link(self, rel: str, sha: bytes) -> bytes:
        """The content behind the link at ``rel``: a file inside the tree, reached by at most LINK_HOPS links."""
        here = rel
        for _ in range(LINK_HOPS):
            self._charge()
            kind, target = self._target(sha)
            text = target.decode("utf-8", "replace")
            if kind != _BLOB or target.startswith(b"/") or "\x00" in text:
                raise self._builder.reject(f"{printable(rel)} is a link to something outside the tree")
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(here), text))
            if joined == "." or joined.startswith("../") or joined == ".." or _has_git(joined):
                raise self._builder.reject(f"{printable(rel)} is a link to something outside the tree")
            entry = self._lookup(joined)
            if entry is None:
                raise self._builder.reject(f"{printable(rel)} is a link to nothing")
            mode, sha = entry
            if mode == _MODE_LINK:
                here = joined
                continue
            if not stat.S_ISREG(mode):
                raise self._builder.reject(f"{printable(rel)} is a link to a directory, not to a regular file")
            return sha
        raise self._builder.reject(f"{printable(rel)} is a link loop")

    def _lookup(self, rel: str) -> tuple[int, bytes] | None:
        tree = self._root
        parts = rel.split("/")
        for i, part in enumerate(parts):
            self._charge()
            entry = _entry(tree, part)
            if entry is None:
                return None
            if i == len(parts) - 1:
                return entry
            if not stat.S_ISDIR(entry[0]):
                return None
            tree = self._tree(entry[1])
            if tree is None:
                return None
        return None

    def _tree(self, sha: bytes) -> Any:
        """The tree ``sha``, from the few kept read, or read (and charged for its entries); None if not a tree."""
        from dulwich.objects import Tree

        tree = self._trees.pop(sha, None)
        if tree is None:
            tree = self._source._object(self._pack, sha)
            if not isinstance(tree, Tree):
                return None
            self._charge(len(tree))
            if len(self._trees) >= self._CACHED_TREES:
                del self._trees[next(iter(self._trees))]
        self._trees[sha] = tree  # the most recently used last
        return tree


def _has_git(path: str) -> bool:
    return any(part.lower() == ".git" for part in path.split("/"))


def _wants(want: bytes) -> Any:
    def determine_wants(refs: Any, depth: int | None = None) -> list[bytes]:
        return [want]

    return determine_wants


def _write(writer: spool.BlobWriter, data: bytes, guard: _Guard) -> int:
    guard.check()
    writer.write(data)
    return len(data)
