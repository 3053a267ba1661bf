"""``etcd://`` and ``etcds://`` sources, through etcd's v3 JSON gateway (no gRPC needed).

Every key under the prefix becomes a file named by the key relative to the prefix. The source reads the
whole prefix in pages pinned to one revision, then follows a watch stream from the next revision. After a
broken stream it resumes from the last revision seen, so nothing is missed; if that revision has been
compacted away, or the store was rebuilt from scratch (a new cluster ID, or a revision lower than one
already seen), it reads everything again and watches from there.

Every request has a whole-request deadline (``request_timeout``): a unary call, and a watch stream
until its response headers arrive. Only SourceError, UnsafeDataError and SettingsError leave this module.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from infantry.errors import SettingsError, SourceError, UnsafeDataError
from infantry.secrets import read_secret
from infantry.settings import SourceSpec
from infantry.snapshot import Limits, Snapshot, SnapshotBuilder, printable
from infantry.sources import redact_url
from infantry.sources.http import build_client

logger = logging.getLogger(__name__)

PAGE_SIZE = 1000
_UNAUTHENTICATED = 16  # the gRPC status etcd answers for a missing or expired token


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # the whole keyspace
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class EtcdSource:
    """Keys under a prefix in etcd, read in pages and followed with a resumable watch."""

    def __init__(
        self,
        spec: SourceSpec,
        limits: Limits,
        interval: float,
        silence_timeout: float,
        client: httpx.AsyncClient | None = None,
        *,
        request_timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(spec.url)
        if not parts.hostname or not parts.port:
            raise SettingsError(f"source {redact_url(spec.url)}: expected etcd://HOST:PORT/prefix/")
        self.name = redact_url(spec.url)
        scheme = "https" if parts.scheme == "etcds" else "http"
        self._base = f"{scheme}://{parts.netloc.rpartition('@')[2]}"
        path = unquote(parts.path) or "/"
        self._prefix = (path if path.endswith("/") else path + "/").encode("utf-8")
        self._spec = spec
        self._limits = limits
        self._interval = interval
        self._silence_timeout = silence_timeout
        self._request_timeout = request_timeout
        self._client = client if client is not None else build_client(spec)
        self._token: str | None = None
        self._kv: dict[bytes, bytes] | None = None
        self._revision = 0  # the revision self._kv reflects
        self._behind = False  # the last quiet-stream probe found the store ahead of the stream
        # What the store's response headers said: a different cluster, or a revision going backwards,
        # means the store was rebuilt from scratch and self._kv describes a store that is gone.
        self._cluster_id: str | None = None
        self._store_revision = 0
        # A watch line never needs more than the whole prefix, base64-encoded, with room for JSON.
        self._max_line = limits.max_total_size * 2 + (1 << 20)

    # -- requests --------------------------------------------------------------------------------

    def _error(self, message: str, *, temporary: bool = True) -> SourceError:
        return SourceError(self.name, message, temporary=temporary)

    def _malformed(self, message: str) -> UnsafeDataError:
        return UnsafeDataError(self.name, f"malformed etcd response: {message}")

    async def _authenticate(self) -> None:
        self._token = None  # an expired token sent along would get the login itself refused
        if self._spec.username is None:
            return
        password = ""
        if self._spec.password_file is not None:
            password = read_secret(self._spec.password_file, "password-file")
        body = {"name": self._spec.username, "password": password}
        answer = await self._post("/v3/auth/authenticate", body, authenticate=False)
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise self._error(f"etcd refused the credentials of user {self._spec.username!r}", temporary=False)
        self._token = token

    def _headers(self) -> dict[str, str]:
        headers = dict(self._spec.headers)
        if self._token is not None:
            headers["Authorization"] = self._token  # etcd wants the bare token, no "Bearer"
        return headers

    async def _post(self, path: str, body: dict[str, Any], *, authenticate: bool = True) -> dict[str, Any]:
        """POST to the gateway; re-authenticate once if the token was rejected."""
        if authenticate and self._token is None:
            await self._authenticate()
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._request_timeout):
                    resp = await self._client.post(self._base + path, json=body, headers=self._headers())
            except TimeoutError as exc:
                raise self._error(f"{path} took longer than {self._request_timeout:g}s") from exc
            except (httpx.HTTPError, ssl.SSLError) as exc:
                raise self._error(f"request failed: {type(exc).__name__}: {exc}") from exc
            if resp.status_code != 200:
                answer = self._decode_error(resp.content)
                if authenticate and attempt == 1 and self._rejected_token(resp.status_code, answer):
                    await self._authenticate()
                    continue
                message = answer.get("message") or answer.get("error") or resp.reason_phrase
                raise self._error(f"HTTP {resp.status_code}: {message}", temporary=resp.status_code >= 500)
            answer = self._decode(resp.content)
            if authenticate and attempt == 1 and self._rejected_token(resp.status_code, answer):
                await self._authenticate()
                continue
            return answer
        raise self._error("etcd keeps rejecting the authentication token", temporary=False)

    def _rejected_token(self, status: int, answer: dict[str, Any]) -> bool:
        return self._spec.username is not None and (status == 401 or answer.get("code") == _UNAUTHENTICATED)

    def _decode(self, raw: bytes) -> dict[str, Any]:
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            # RecursionError: nesting deeper than the parser's stack. ValueError includes an integer
            # with more digits than Python converts, and bytes that are not UTF-8.
            raise self._malformed(f"not JSON: {raw[:60]!r}") from None
        if not isinstance(answer, dict):
            raise self._malformed(f"expected an object, got {type(answer).__name__}")
        return answer

    def _decode_error(self, raw: bytes) -> dict[str, Any]:
        """The JSON of an error answer, or nothing: a proxy's HTML error page is trouble, not bad data."""
        try:
            return self._decode(raw)
        except UnsafeDataError:
            return {}

    def _bytes(self, item: dict[str, Any], field: str) -> bytes:
        value = item.get(field, "")
        if not isinstance(value, str):
            raise self._malformed(f"{field} is not a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self._malformed(f"{field} is not valid base64") from None

    def _int(self, item: dict[str, Any], field: str) -> int:
        value = item.get(field, "0")  # int64 fields arrive as JSON strings, and are left out when 0
        try:
            return int(value)
        except (TypeError, ValueError):
            raise self._malformed(f"{field} is not an integer: {value!r}") from None

    def _header_revision(self, answer: dict[str, Any]) -> int:
        header = answer.get("header")
        if not isinstance(header, dict):
            raise self._malformed("no header")
        return self._int(header, "revision")

    def _rebuilt(self, answer: dict[str, Any]) -> bool:
        """Note the store's identity from a response header; True if it is not the store read before.

        etcd's revision never goes backwards and its cluster ID never changes, short of the store being
        rebuilt from scratch. Then the revision to resume from means nothing, and keys the old store had
        may be gone without any delete event.
        """
        header = answer.get("header")
        if not isinstance(header, dict):
            raise self._malformed("no header")
        revision = self._int(header, "revision")
        if not revision:
            return False  # a canceled watch may answer without one: nothing to compare
        cluster_id = header.get("cluster_id")
        cluster_id = str(cluster_id) if cluster_id is not None else None
        rebuilt = (cluster_id is not None and self._cluster_id is not None and cluster_id != self._cluster_id) or (
            revision < self._store_revision
        )
        if rebuilt:
            logger.warning(
                "%s: the store was rebuilt (cluster %s at revision %d, was cluster %s at revision %d); "
                "reading everything again",
                self.name,
                cluster_id,
                revision,
                self._cluster_id,
                self._store_revision,
            )
            self._store_revision = 0
        self._cluster_id = cluster_id or self._cluster_id
        self._store_revision = max(self._store_revision, revision)
        return rebuilt

    # -- reading ---------------------------------------------------------------------------------

    async def _read_all(self) -> None:
        """Read every key under the prefix, in pages pinned to the first page's revision."""
        kv: dict[bytes, bytes] = {}
        key, end, revision = self._prefix, prefix_end(self._prefix), 0
        while True:
            body: dict[str, Any] = {"key": _b64(key), "range_end": _b64(end), "limit": PAGE_SIZE}
            if revision:
                body["revision"] = revision
            answer = await self._post("/v3/kv/range", body)
            if self._rebuilt(answer) and revision:
                # Rebuilt between two pages: the pages so far came from the store that is gone.
                kv, key, revision = {}, self._prefix, 0
                continue
            revision = revision or self._header_revision(answer)
            items = answer.get("kvs", [])
            if not isinstance(items, list):
                raise self._malformed("kvs is not a list")
            for item in items:
                if not isinstance(item, dict):
                    raise self._malformed("a kvs entry is not an object")
                kv[self._bytes(item, "key")] = self._bytes(item, "value")
            self._check_count(kv)
            if not answer.get("more") or not items:
                break
            key = self._bytes(items[-1], "key") + b"\0"
        self._kv, self._revision = kv, revision

    def _snapshot(self) -> Snapshot:
        assert self._kv is not None
        builder = SnapshotBuilder(self.name, self._limits)
        for key in sorted(self._kv):
            if not key.startswith(self._prefix):
                raise self._malformed(f"key {key[:80]!r} is outside the prefix")
            try:
                name = key[len(self._prefix) :].decode("utf-8")
            except UnicodeDecodeError:
                raise builder.reject(
                    f"key {printable(key.decode('utf-8', 'backslashreplace'))} is not valid UTF-8"
                ) from None
            builder.add(name, self._kv[key])
        return builder.build()

    async def fetch(self) -> Snapshot:
        """Read the whole prefix once."""
        await self._read_all()
        return self._snapshot()

    async def watch(self) -> AsyncIterator[Snapshot | None]:
        """The prefix now, then one Snapshot per watch response that carries events."""
        while True:
            if self._kv is None:
                await self._read_all()
                yield self._snapshot()
            ended_by: object = None
            async for changed in self._stream():
                if changed is _COMPACTED or changed is _TOKEN_EXPIRED or changed is _REBUILT:
                    ended_by = changed
                    break
                yield self._snapshot() if changed else None
            if ended_by is _TOKEN_EXPIRED:
                logger.info("%s: the auth token expired; logging in again", self.name)
                await self._authenticate()
                continue
            if ended_by is _REBUILT:
                self._kv = None  # _rebuilt() logged it
                continue
            if ended_by is not _COMPACTED:
                raise self._error("the watch stream ended")
            logger.warning("%s: revision %d was compacted; reading everything again", self.name, self._revision + 1)
            self._kv = None

    async def _stream(self) -> AsyncIterator[bool | object]:
        """Follow the watch stream: True after events were applied, False after a progress note."""
        reauthenticated = self._token is None
        if self._token is None:
            await self._authenticate()
        request = {
            "create_request": {
                "key": _b64(self._prefix),
                "range_end": _b64(prefix_end(self._prefix)),
                "start_revision": str(self._revision + 1),
                "progress_notify": True,
            }
        }
        timeout = httpx.Timeout(10.0, read=self._silence_timeout)
        pending = False
        read: asyncio.Future[bytes | None] | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                # The deadline covers opening the stream, up to its response headers; the stream itself
                # may then stay open as long as it keeps talking (silence_timeout, and the probe).
                try:
                    async with asyncio.timeout(self._request_timeout):
                        resp = await stack.enter_async_context(
                            self._client.stream(
                                "POST", self._base + "/v3/watch", json=request, headers=self._headers(), timeout=timeout
                            )
                        )
                        if resp.status_code != 200:
                            await resp.aread()
                except TimeoutError as exc:
                    raise self._error(f"opening the watch took longer than {self._request_timeout:g}s") from exc
                if resp.status_code != 200:
                    answer = self._decode_error(resp.content)
                    if self._rejected_token(resp.status_code, answer):
                        self._token = None  # authenticate again on the next try
                    raise self._error(f"watch refused: HTTP {resp.status_code}: {answer.get('message', '')}")
                lines = self._lines(resp)
                while True:
                    if read is None:
                        read = asyncio.ensure_future(anext(lines, None))
                    done, _ = await asyncio.wait({read}, timeout=self._interval)
                    if not done:
                        # A quiet stream: ask the store directly, so a dead one is noticed and health is honest.
                        if await self._probe():
                            yield _REBUILT
                            return
                        yield False
                        continue
                    line, read = read.result(), None
                    if line is None:
                        return
                    if not line.strip():
                        continue
                    answer = self._decode(line)
                    if "error" in answer:
                        error = answer["error"]
                        message = error.get("message", error) if isinstance(error, dict) else error
                        if isinstance(error, dict) and error.get("code") == _UNAUTHENTICATED:
                            self._token = None
                        raise self._error(f"watch failed: {message}")
                    result = answer.get("result")
                    if not isinstance(result, dict):
                        raise self._malformed("watch response without a result")
                    if result.get("canceled"):
                        reason = str(result.get("cancel_reason", "no reason given"))
                        if self._int(result, "compact_revision"):
                            yield _COMPACTED
                            return
                        if "Unauthenticated" in reason and self._spec.username is not None and not reauthenticated:
                            yield _TOKEN_EXPIRED
                            return
                        raise self._error(f"watch canceled: {reason}")
                    if self._rebuilt(result):
                        yield _REBUILT
                        return
                    events = result.get("events", [])
                    if not isinstance(events, list):
                        raise self._malformed("events is not a list")
                    self._apply(events)
                    pending = pending or bool(events)
                    if result.get("fragment"):
                        continue  # the rest of this response follows
                    revision = self._header_revision(result)
                    self._revision = max(self._revision, revision)
                    self._behind = False
                    yield pending
                    pending = False
        except httpx.ReadTimeout as exc:
            raise self._error(f"the watch stream was silent for {self._silence_timeout:g}s") from exc
        except (httpx.HTTPError, ssl.SSLError) as exc:
            raise self._error(f"watch failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if read is not None and not read.done():
                read.cancel()

    async def _lines(self, resp: httpx.Response) -> AsyncIterator[bytes]:
        """The stream's lines, refusing one that grows past any answer the prefix could need."""
        buffer = bytearray()
        async for chunk in resp.aiter_bytes():
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                yield bytes(buffer[:end])
                del buffer[: end + 1]
            if len(buffer) > self._max_line:
                raise self._malformed(f"a watch response passes {self._max_line} bytes")
        if buffer:
            yield bytes(buffer)

    async def _probe(self) -> bool:
        """A cheap round trip while the stream is quiet; True if the store was rebuilt meanwhile.

        It reads the count of keys under the prefix and the newest key's mod_revision (one key, no
        value). If the store holds a change the stream has not delivered (a newer revision, or a
        different number of keys) on two quiet intervals in a row, the stream is stalled: it is
        broken off and resumed from the last revision applied, so a frozen connection cannot hold
        the destination on old content while the probes keep health green.
        """
        body = {
            "key": _b64(self._prefix),
            "range_end": _b64(prefix_end(self._prefix)),
            "limit": 1,
            "sort_order": "DESCEND",
            "sort_target": "MOD",
            "keys_only": True,
        }
        answer = await self._post("/v3/kv/range", body)
        if self._rebuilt(answer):
            return True
        items = answer.get("kvs", [])
        newest = self._int(items[0], "mod_revision") if isinstance(items, list) and items else 0
        count = self._int(answer, "count")
        behind = newest > self._revision or (self._kv is not None and count != len(self._kv))
        if behind and self._behind:
            self._behind = False
            raise self._error("the watch stream stopped delivering changes the store holds; resuming it")
        self._behind = behind
        return False

    def _apply(self, events: list[Any]) -> None:
        assert self._kv is not None
        for event in events:
            if not isinstance(event, dict) or not isinstance(event.get("kv"), dict):
                raise self._malformed("a watch event has no kv")
            kv = event["kv"]
            key = self._bytes(kv, "key")
            if event.get("type", "PUT") == "DELETE":
                self._kv.pop(key, None)
            else:
                self._kv[key] = self._bytes(kv, "value")
            self._revision = max(self._revision, self._int(kv, "mod_revision"))
        self._check_count(self._kv)

    def _check_count(self, kv: dict[bytes, bytes]) -> None:
        """Refuse a prefix with more keys than the file-count limit, before building anything from it."""
        if len(kv) > self._limits.max_files:
            raise UnsafeDataError(self.name, f"more than {self._limits.max_files} keys under the prefix")

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


_COMPACTED = object()
_TOKEN_EXPIRED = object()
_REBUILT = object()
