"""``http://`` and ``https://`` sources: one document (or archive), polled with conditional GET.

Each poll has one deadline for the whole request, body included (``request_timeout``), so a server that
drip-feeds its answer costs one deadline, not a hang. The body is streamed into the spool and decoded
(gzip or deflate) here, a chunk at a time, so a compression bomb is refused at the limit, never inflated
whole in memory. Redirects are followed by hand, at most
``MAX_REDIRECTS`` hops, and the source's credentials (custom headers, bearer token, basic auth) go only
to the origin (scheme, host, port) of the source's own URL.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from urllib.parse import unquote, urlsplit

import httpx

from infantry import spool
from infantry.archive_names import archive_kind, inflate_cap
from infantry.errors import SettingsError, SourceError, UnsafeDataError
from infantry.secrets import read_secret
from infantry.settings import SourceSpec, redact_url
from infantry.snapshot import FileEntry, Limits, Snapshot, SnapshotBuilder, printable
from infantry.sources import tls_hint

JITTER = 0.1
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
# The longest a server's Retry-After may hold polling off, whatever it asks: a proxy answering
# "Retry-After: 86400" once must not stop a sidecar for a day.
RETRY_AFTER_CAP = 300.0
RETRY_AFTER_INTERVALS = 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Answers that will not improve by asking again soon; anything else (5xx, 429, 408) is temporary.
_PERMANENT = frozenset({400, 401, 403, 404, 405, 406, 410, 414, 451})
# The encodings infantry asks for, and decodes itself (with bounded output per step).
ACCEPT_ENCODING = "gzip, deflate"


class _Decoder:
    """Decodes a Content-Encoding a chunk at a time, never producing more than a chunk per step.

    gzip may come as several members one after another (RFC 1952 allows it); anything else after the
    last member is refused. deflate comes with its zlib wrapper (RFC 9110) or, from some servers, as raw
    deflate: the first two bytes tell which.
    """

    _GZIP_MAGIC = b"\x1f\x8b"

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        if encoding in ("", "identity"):
            self._kind = ""
        elif encoding in ("gzip", "x-gzip"):
            self._kind = "gzip"
        elif encoding == "deflate":
            self._kind = "deflate"
        else:
            raise ValueError(encoding)
        self._z: zlib._Decompress | None = None  # the stream being decoded; None between gzip members
        self._head = b""  # the first bytes of a stream, until there are two to tell what follows
        self._streams = 0  # streams decoded to their end

    def _start(self, head: bytes) -> zlib._Decompress:
        if self._kind == "gzip":
            if self._streams and head != self._GZIP_MAGIC:
                raise zlib.error("data after the end of the compressed stream")
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self._streams:
            raise zlib.error("data after the end of the compressed stream")
        cmf, flg = head[0], head[1]
        wrapped = cmf & 0x0F == zlib.DEFLATED and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not self._kind:
            yield data
            return
        while data:
            if self._z is None:
                data, self._head = self._head + data, b""
                if len(data) < 2:
                    self._head = data
                    return
                self._z = self._start(data[:2])
            yield self._z.decompress(data, spool.CHUNK)
            data = self._z.unconsumed_tail
            if self._z.eof:
                data, self._z = self._z.unused_data, None
                self._streams += 1

    def end(self) -> None:
        if not self._kind:
            return
        if self._head and self._streams:
            raise zlib.error("data after the end of the compressed stream")
        if self._z is not None or not self._streams:
            raise zlib.error("the compressed stream is truncated")


def build_client(spec: SourceSpec, timeout: float = 10.0) -> httpx.AsyncClient:
    """An HTTP client for one source, with its CA file and client certificate."""
    context = ssl.create_default_context(cafile=str(spec.ca_file) if spec.ca_file else None)
    if spec.client_cert is not None and spec.client_key is not None:
        try:
            context.load_cert_chain(spec.client_cert, spec.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"client-cert: cannot load {spec.client_cert}: {exc}") from exc
    return httpx.AsyncClient(verify=context, timeout=timeout, follow_redirects=False, trust_env=False)


def retry_after_seconds(value: str | None, now: float, cap: float = RETRY_AFTER_CAP) -> float | None:
    """Parse a ``Retry-After`` header (seconds, or an HTTP date), never more than ``cap`` seconds."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(0.0, when.timestamp() - now), cap)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


class HttpSource:
    """One HTTP document, or an archive of many files, polled every interval with jitter."""

    def __init__(
        self,
        spec: SourceSpec,
        limits: Limits,
        interval: float,
        client: httpx.AsyncClient | None = None,
        *,
        request_timeout: float = 30.0,
    ) -> None:
        self._spec = spec
        self.name = redact_url(spec.url)
        self._limits = limits
        self._interval = interval
        self._request_timeout = request_timeout
        self._client = client if client is not None else build_client(spec)
        path = unquote(urlsplit(spec.url).path)
        self._file_name = spec.name or path.rsplit("/", 1)[-1]
        if not self._file_name:
            raise SettingsError(f"source {self.name}: the URL names no file; set 'name' for this source")
        self._archive = archive_kind(self._file_name)
        self._body_cap = inflate_cap(limits) if self._archive else limits.max_file_size
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._last: Snapshot | None = None

    def _headers(self, trusted: bool) -> dict[str, str]:
        """The request headers; the source's own headers and token only for its own origin (``trusted``)."""
        headers = dict(self._spec.headers) if trusted else {}
        if trusted and self._spec.bearer_token_file is not None:
            # Read on every request, so a rotated token is picked up without a restart.
            headers["Authorization"] = "Bearer " + read_secret(self._spec.bearer_token_file, "bearer-token-file")
        headers["Accept-Encoding"] = ACCEPT_ENCODING
        if self._last is not None:
            if self._etag:
                headers["If-None-Match"] = self._etag
            if self._last_modified:
                headers["If-Modified-Since"] = self._last_modified
        return headers

    def _auth(self) -> httpx.BasicAuth | None:
        if self._spec.username is None:
            return None
        password = read_secret(self._spec.password_file, "password-file") if self._spec.password_file else ""
        return httpx.BasicAuth(self._spec.username, password)

    async def poll(self) -> Snapshot | None:
        """One conditional GET: a new Snapshot, or None when the document has not changed."""
        try:
            async with asyncio.timeout(self._request_timeout):
                answer = await self._get()
        except TimeoutError as exc:
            raise SourceError(
                self.name, f"no complete answer within the request timeout of {self._request_timeout:g}s"
            ) from exc
        except (httpx.HTTPError, ssl.SSLError) as exc:
            hint = tls_hint(exc)
            if hint is not None:
                raise SourceError(self.name, hint, temporary=False) from exc
            raise SourceError(self.name, f"request failed: {type(exc).__name__}: {exc}") from exc
        if answer is None:
            return None
        body, etag, last_modified = answer
        snapshot = self._parse(body)
        # Remember validators only for content that parsed, so bad content is fetched again, not skipped.
        self._etag, self._last_modified = etag, last_modified
        if self._last is not None and snapshot.version == self._last.version:
            return None
        self._last = snapshot
        return snapshot

    async def _get(self) -> tuple[FileEntry, str | None, str | None] | None:
        """GET the document, following redirects: (body, ETag, Last-Modified), or None if not modified."""
        url = httpx.URL(self._spec.url)
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            trusted = _origin(url) == origin
            auth = self._auth() if trusted else None
            request = self._client.stream("GET", url, headers=self._headers(trusted), auth=auth, follow_redirects=False)
            async with request as resp:
                if resp.status_code in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if location is None:
                        raise SourceError(self.name, f"HTTP {resp.status_code} without a Location", temporary=True)
                    try:
                        url = resp.url.join(location)
                    except httpx.InvalidURL as exc:
                        raise SourceError(self.name, f"redirected to an invalid URL: {exc}", temporary=False) from exc
                    continue
                if resp.status_code == 304 and self._last is not None:
                    return None
                if resp.status_code != 200:
                    raise self._status_error(resp)
                body = await self._read_capped(resp)
                return body, resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        raise SourceError(self.name, f"more than {MAX_REDIRECTS} redirects", temporary=False)

    def _status_error(self, resp: httpx.Response) -> SourceError:
        status = resp.status_code
        # The watch loop waits at least the hint; never let one answer stall polling for long.
        cap = min(RETRY_AFTER_INTERVALS * self._interval, RETRY_AFTER_CAP)
        retry_after = (
            retry_after_seconds(resp.headers.get("Retry-After"), time.time(), cap) if status in (429, 503) else None
        )
        return SourceError(
            self.name,
            f"HTTP {status} {resp.reason_phrase}",
            temporary=status not in _PERMANENT,
            retry_after=retry_after,
        )

    async def _read_capped(self, resp: httpx.Response) -> FileEntry:
        """The body, decoded into the spool, refused as soon as it passes the size limit (declared, or
        while it streams and inflates)."""
        cap, what = self._body_cap, printable(self._file_name)
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        try:
            decoder = _Decoder(encoding)
        except ValueError:
            raise UnsafeDataError(
                self.name, f"{what} came in an encoding infantry did not ask for: {encoding!r}"
            ) from None
        declared = resp.headers.get("Content-Length")
        if decoder.encoding in ("", "identity") and declared is not None and declared.isdigit() and int(declared) > cap:
            raise UnsafeDataError(self.name, f"{what} passes the limit of {cap} bytes (it is {declared})")
        try:
            with spool.current().writer(cap) as writer:
                try:
                    async for raw in resp.aiter_raw():
                        for chunk in decoder.feed(raw):
                            writer.write(chunk)
                    decoder.end()
                except spool.TooLarge:
                    raise UnsafeDataError(self.name, f"{what} passes the limit of {cap} bytes") from None
                except zlib.error as exc:
                    raise UnsafeDataError(self.name, f"{what} is not valid {encoding} data: {exc}") from None
                return FileEntry(writer.finish())
        except spool.SpoolError as exc:
            raise SourceError(self.name, f"{what}: {exc.strerror}") from None

    def _parse(self, body: FileEntry) -> Snapshot:
        builder = SnapshotBuilder(self.name, self._limits)
        if self._archive is None:
            builder.add_entry(self._file_name, body)
        else:
            from infantry.archive import unpack  # tarfile and zipfile, only for a source that is an archive

            unpack(self._archive, body, builder)
        return builder.build()

    def refresh(self) -> None:
        """Download the whole set on the next poll, without validators, and answer with it."""
        self._last = None
        self._etag = self._last_modified = None

    async def fetch(self) -> Snapshot:
        """Download the whole set, ignoring what was seen before."""
        self._last = None
        snapshot = await self.poll()
        assert snapshot is not None  # with nothing seen before, a poll always returns content
        return snapshot

    async def watch(self) -> AsyncIterator[Snapshot | None]:
        """Poll every interval (±10% jitter, so many pods do not poll in step)."""
        if self._last is None:
            yield await self.fetch()
        else:
            # Resuming after an error: the agent already holds our last snapshot.
            yield await self.poll()
        while True:
            await asyncio.sleep(self._interval * random.uniform(1 - JITTER, 1 + JITTER))
            yield await self.poll()

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()
