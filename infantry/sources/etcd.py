"""``etcd://`` and ``etcds://`` sources, through etcd's v3 JSON gateway (no gRPC needed).

Every key under the prefix becomes a file named by the key relative to the prefix. The source counts
the keys, reads them in pages pinned to one revision, then follows a watch stream from the next
revision. After a broken stream it resumes from the last revision seen, so nothing is missed; if that
revision has been compacted away, or the store was rebuilt from scratch (a new cluster ID, or a revision
lower than one already seen), it reads everything again and watches from there.

Memory is bounded whatever the store holds: every answer is read with a byte cap, pages shrink until
they fit theirs, and a value is checked against the limits before it is decoded, then kept as a
FileEntry (in the spool when large), never as a second copy in memory.

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
from collections.abc import AsyncIterator, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from infantry import spool
from infantry.errors import SettingsError, SourceError, UnsafeDataError
from infantry.secrets import read_secret
from infantry.settings import SourceSpec, etcd_endpoints
from infantry.snapshot import Checked, Draft, FileEntry, Files, Limits, Snapshot, check_revision, check_whole, printable
from infantry.sources import redact_url
from infantry.sources.http import build_client

logger = logging.getLogger(__name__)

PAGE_SIZE = 5000
"""The most keys one page asks for."""
PAGE_BYTES = 4 << 20
"""The most bytes of one page's answer; a page that passes it is asked again with fewer keys."""
REPLY_BYTES = 1 << 20
"""The most bytes of any other answer (a login, a count, a probe, an error)."""
JSON_ROOM = 64 << 10
"""Room beside one value in an answer: its key, revisions and the JSON around them."""
READ_ATTEMPTS = 3
"""Reads of the whole prefix started over (the store rebuilt or compacted meanwhile) before giving up."""

_UNAUTHENTICATED = 16  # the gRPC status etcd answers for a missing or expired token
_OUT_OF_RANGE = 11  # ... and for a revision compacted away


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64_size(value: str) -> int:
    """The length of what the base64 text ``value`` decodes to, without decoding it."""
    return len(value) // 4 * 3 - value[-2:].count("=")


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # the whole keyspace
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class _TooLarge(Exception):
    """An answer passed its byte cap after ``size`` bytes, of which ``values`` began a value."""

    def __init__(self, size: int, values: int = 0) -> None:
        super().__init__(size)
        self.size = size
        self.values = values


class _Compacted(Exception):
    """A page asked for a revision that has been compacted away meanwhile."""


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
        try:
            members = etcd_endpoints(spec.url, spec.endpoints)
        except ValueError as exc:
            raise SettingsError(f"source {redact_url(spec.url)}: {exc}") from None
        self.name = redact_url(spec.url)
        scheme = "https" if parts.scheme == "etcds" else "http"
        # The members, tried in order: the one in use until it fails, then the next (see _next_member).
        self._members = [f"{scheme}://{host}:{port}" for host, port in members]
        self._member = 0
        self._switched = False  # a member was left since the last linearizable read: check the next one in
        self._watching: str | None = None  # the member the last watch stream was opened on
        # Members that answered for another cluster than the one followed: member index -> cluster ID.
        self._foreign: dict[int, str] = {}
        # Members that refused a request (a 4xx answer) since the last good answer: once every member
        # has, the refusal is permanent (wrong credentials everywhere); until then the next is tried.
        self._refused: set[int] = set()
        path = unquote(parts.path) or "/"
        self._prefix = (path if path.endswith("/") else path + "/").encode("utf-8")
        self._spec = spec
        self._limits = limits
        self._interval = interval
        self._silence_timeout = silence_timeout
        self._request_timeout = request_timeout
        self._client = client if client is not None else build_client(spec)
        self._token: str | None = None
        # The prefix as last read and followed: file name (the key after the prefix) -> content. Once
        # a Snapshot is built from it, this is that Snapshot's own mapping (copied when events come),
        # so an idle watch holds each name and entry once, in one dict.
        self._kv: Mapping[str, FileEntry] | None = None
        self._revision = 0  # the revision self._kv reflects
        # The last set that passed its checks; while self._kv is self._revised (a copy of it with watch
        # events applied), the names in self._changed are all it differs at, and all that is checked.
        self._checked: Checked | None = None
        self._revised: Draft | None = None
        self._changed: set[str] = set()
        self._behind = False  # the last quiet-stream probe found the store ahead of the stream
        self._refreshed = False  # refresh() asked for everything to be read again
        # What the store's response headers said: a different cluster, or a revision going backwards,
        # means the store was rebuilt from scratch and self._kv describes a store that is gone.
        self._cluster_id: str | None = None
        self._store_revision = 0
        # One value alone in an answer: the largest file allowed, base64-encoded, with room for JSON.
        self._single_cap = limits.max_file_size * 4 // 3 + 4 + JSON_ROOM
        # A watch line is never held past this: a larger one is dropped and the prefix read by pages.
        self._max_line = max(PAGE_BYTES, self._single_cap)
        self._answer_bytes = 0  # the size of the last answer read whole

    # -- members ---------------------------------------------------------------------------------

    @property
    def _base(self) -> str:
        """The member requests go to now: ``http(s)://HOST:PORT``, never with credentials."""
        return self._members[self._member]

    def _next_member(self, exc: SourceError) -> None:
        """Leave the member in use after ``exc``, for the next in the list (the first after the last).

        The caller backs off before the next request (the one retry policy: capped, jittered), so a
        cluster that is down as a whole is asked at a slowing pace, one member after another. The watch
        resumes on the next member from the last revision applied; its first request there is a
        linearizable read (see _stream), so a member that lags behind is caught up before its watch
        headers are compared with revisions already seen.
        """
        if len(self._members) == 1:
            return
        left = self._base
        self._member = (self._member + 1) % len(self._members)
        self._switched = True
        # A "simple" auth token is known only to the member that gave it: log in again on the next one.
        self._token = None
        reason = str(exc).removeprefix(f"{self.name}: ")
        logger.info("%s: member %s failed (%s); trying %s next", self.name, left, reason, self._base)

    # -- requests --------------------------------------------------------------------------------

    def _error(self, message: str, *, temporary: bool = True) -> SourceError:
        return SourceError(self.name, message, temporary=temporary)

    def _malformed(self, message: str) -> SourceError | UnsafeDataError:
        """An answer that is not etcd's: with several members, that member's fault, and the next is tried
        (a wrong service on its port, a proxy's page); with one, refused data, as there is no other."""
        if len(self._members) > 1:
            return self._error(f"member {self._base} gave a malformed etcd response: {message}")
        return UnsafeDataError(self.name, f"malformed etcd response: {message}")

    def _refusal(self, message: str) -> SourceError:
        """A member refused a request (a 4xx answer, credentials refused): with several members the next
        is tried, until every member has refused in a row; then, or with one member, it is permanent."""
        self._refused.add(self._member)
        return self._error(message, temporary=len(self._refused) < len(self._members))

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
            raise self._refusal(f"etcd refused the credentials of user {self._spec.username!r}")
        self._token = token

    def _headers(self) -> dict[str, str]:
        headers = dict(self._spec.headers)
        # Bodies are counted as they arrive; a compressed one could grow past the cap inside one chunk.
        headers["Accept-Encoding"] = "identity"
        # "Require a leader", as etcd's own client asks it: the gateway passes Grpc-Metadata-* headers on
        # as gRPC metadata, so this is `hasleader: true`. Tried against etcd 3.4.23 (three members, the
        # two others stopped with SIGSTOP): a watch carrying it ended ~4.5 s later with the line
        # {"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader",...}}, and a watch
        # or a read sent then was refused at once with HTTP 503 "etcdserver: no leader" (a read without
        # it waited 7 s for "request timed out"); a watch without it stayed open on the cut-off member,
        # sending progress notes and no changes, indefinitely. So a member cut off from its quorum is
        # left for another, not followed in silence; the quiet-stream probe stays as the other check.
        headers["Grpc-Metadata-Hasleader"] = "true"
        if self._token is not None:
            headers["Authorization"] = self._token  # etcd wants the bare token, no "Bearer"
        return headers

    async def _body(self, resp: httpx.Response, cap: int, *, truncate: bool = False) -> bytearray:
        """The response body, read as it streams: _TooLarge past ``cap`` bytes (or cut there, with ``truncate``)."""
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise self._malformed(f"a compressed answer (Content-Encoding: {encoding[:40]}), though none was asked for")
        body = bytearray()
        async for chunk in resp.aiter_raw():
            if len(body) + len(chunk) > cap:
                if truncate:
                    body += chunk[: cap - len(body)]
                    break
                # Base64 has no quotes, so only the field names count: how many values had begun.
                raise _TooLarge(len(body) + len(chunk), body.count(b'"value"'))
            body += chunk
        self._answer_bytes = len(body)
        return body

    async def _exchange(self, path: str, body: dict[str, Any], cap: int) -> tuple[int, str, bytearray]:
        """One POST: the status, its reason and the body (an error's cut to REPLY_BYTES)."""
        try:
            async with (
                asyncio.timeout(self._request_timeout),
                self._client.stream("POST", self._base + path, json=body, headers=self._headers()) as resp,
            ):
                if resp.status_code != 200:
                    return resp.status_code, resp.reason_phrase, await self._body(resp, REPLY_BYTES, truncate=True)
                return resp.status_code, resp.reason_phrase, await self._body(resp, cap)
        except TimeoutError as exc:
            raise self._error(f"{path} took longer than {self._request_timeout:g}s") from exc
        except (httpx.HTTPError, ssl.SSLError) as exc:
            raise self._error(f"request failed: {type(exc).__name__}: {exc}") from exc

    async def _post(
        self, path: str, body: dict[str, Any], *, cap: int | None = None, authenticate: bool = True
    ) -> dict[str, Any]:
        """POST to the gateway; re-authenticate once if the token was rejected.

        The answer is read up to ``cap`` bytes, past which _TooLarge is raised; without a cap, up to
        REPLY_BYTES, past which the answer is malformed (no login, count or probe needs that much).
        """
        if authenticate and self._token is None:
            await self._authenticate()
        for attempt in (1, 2):
            try:
                status, reason, raw = await self._exchange(path, body, cap or REPLY_BYTES)
            except _TooLarge:
                if cap is not None:
                    raise
                raise self._malformed(f"{path} answered more than {REPLY_BYTES} bytes") from None
            if status != 200:
                answer = self._decode_error(raw)
                if authenticate and attempt == 1 and self._rejected_token(status, answer):
                    await self._authenticate()
                    continue
                message = answer.get("message") or answer.get("error") or reason
                if answer.get("code") == _OUT_OF_RANGE and "compacted" in str(message):
                    raise _Compacted
                if status >= 500:
                    raise self._error(f"HTTP {status}: {message}")
                raise self._refusal(f"HTTP {status}: {message}")
            answer = self._decode(raw)
            del raw  # a page's bytes go before its values are decoded
            if authenticate and attempt == 1 and self._rejected_token(status, answer):
                await self._authenticate()
                continue
            if authenticate:
                self._refused.clear()  # a good answer: members refused before it were refused apart
            return answer
        raise self._refusal("etcd keeps rejecting the authentication token")

    def _rejected_token(self, status: int, answer: dict[str, Any]) -> bool:
        return self._spec.username is not None and (status == 401 or answer.get("code") == _UNAUTHENTICATED)

    def _decode(self, raw: bytes | bytearray) -> dict[str, Any]:
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            # RecursionError: nesting deeper than the parser's stack. ValueError includes an integer
            # with more digits than Python converts, and bytes that are not UTF-8.
            raise self._malformed(f"not JSON: {bytes(raw[:60])!r}") from None
        if not isinstance(answer, dict):
            raise self._malformed(f"expected an object, got {type(answer).__name__}")
        return answer

    def _decode_error(self, raw: bytes | bytearray) -> dict[str, Any]:
        """The JSON of an error answer, or nothing: a proxy's HTML error page is trouble, not bad data."""
        try:
            return self._decode(raw)
        except (SourceError, UnsafeDataError):
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
        if cluster_id is not None and self._cluster_id is not None and len(self._members) > 1:
            self._foreign_member(cluster_id)
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

    def _foreign_member(self, cluster_id: str) -> None:
        """Refuse a member that answers for another cluster than the one followed, unless most do.

        A list of members that names one of another cluster is a mistake, and that member's keys are
        not this store's: it is skipped (SourceError, and the next member is tried). Once more than half
        of the members listed have answered for one same new cluster (each member's latest answer
        counts), that cluster is followed instead, as rebuilt (then _rebuilt reads everything again): a
        cluster restored from a backup with a member still down, or a stray member that answered first.
        """
        if cluster_id == self._cluster_id:
            self._foreign.pop(self._member, None)
            return
        self._foreign[self._member] = cluster_id
        answered = sum(1 for other in self._foreign.values() if other == cluster_id)
        if answered * 2 <= len(self._members):
            raise self._error(
                f"member {self._base} answers for etcd cluster {cluster_id}, not cluster {self._cluster_id} "
                f"that infantry follows ({answered} of {len(self._members)} members answered for it); skipping it"
            )
        self._foreign.clear()

    # -- keys and values -------------------------------------------------------------------------

    def _name(self, item: dict[str, Any]) -> tuple[bytes, str]:
        """An entry's raw key and its file name: the key after the prefix.

        A name that is not UTF-8 keeps its bytes as surrogates, so a later delete finds it, and the
        snapshot refuses it by name.
        """
        key = self._bytes(item, "key")
        if not key.startswith(self._prefix):
            raise self._malformed(f"key {key[:80]!r} is outside the prefix")
        return key, key[len(self._prefix) :].decode("utf-8", "surrogateescape")

    def _entry(self, name: str, item: dict[str, Any], shared: dict[bytes, FileEntry] | None = None) -> FileEntry:
        """The value of ``item`` as a FileEntry: large content goes to the spool as it is decoded.

        With ``shared``, a small value equal to one seen before gets that entry (entries are never
        changed once made), so many keys holding the same few bytes cost one entry between them.
        """
        value = self._bytes(item, "value")
        if shared is not None and len(value) <= spool.INLINE_MAX:
            entry = shared.get(value)
            if entry is None:
                entry = shared[value] = FileEntry(value)
            return entry
        try:
            return FileEntry(value)
        except spool.SpoolError as exc:
            raise SourceError(self.name, f"{printable(name)}: {exc.strerror or exc}") from None

    def _over_file_limit(self, name: str, size: int) -> UnsafeDataError:
        return UnsafeDataError(
            self.name,
            f"{printable(name)} is {size} bytes, over the per-file limit of {self._limits.max_file_size} "
            "(max-file-size)",
        )

    def _check_count(self, count: int) -> None:
        """Refuse a prefix with more keys than the file-count limit, before reading or building anything."""
        if count > self._limits.max_files:
            raise UnsafeDataError(self.name, f"more than {self._limits.max_files} keys under the prefix (max-files)")

    # -- reading ---------------------------------------------------------------------------------

    async def _read_all(self) -> None:
        """Read every key under the prefix into self._kv, at one revision; see _read_pages.

        The read starts over, a few times at most, if the store is rebuilt or compacts the revision
        away meanwhile. Not safe to call concurrently with itself or with the watch stream.
        """
        self._kv = None  # what was held describes an older revision; a failed read leaves nothing
        for _ in range(READ_ATTEMPTS):
            try:
                read = await self._read_pages()
            except _Compacted:
                logger.info("%s: the revision being read was compacted; reading from a newer one", self.name)
                continue
            if read is not None:
                self._kv, self._revision = read
                return
        raise self._error("the store kept changing identity or compacting while it was read")

    async def _read_pages(self) -> tuple[dict[str, FileEntry], int] | None:
        """The prefix at one revision, and that revision; None if the store was rebuilt meanwhile.

        (1) A count_only range gives the revision to read at, and the number of keys: more than
            max-files is refused before any value is read.
        (2) Pages from that revision, asking for ``limit`` keys, are read as they stream, up to
            PAGE_BYTES; one key alone may take the per-file limit in base64 and room for JSON.
        (3) A page whose answer passes its cap is dropped, and the same key asked again with fewer
            keys: half as many, or as many values as had begun to arrive, if fewer.
        (4) At one key, an answer past its cap is a value over the per-file limit: it is named (a
            keys_only read) and refused, without having been held.
        (5) Each value is checked against the per-file limit, and the running total against the
            total limit, from its base64 length, before it is decoded; then it becomes a FileEntry at
            once (in the spool when large), and the page's item is dropped.
        (6) After a page well under its cap, the next asks for twice as many keys, up to PAGE_SIZE.
        """
        end = prefix_end(self._prefix)
        # (1)
        counted = await self._post(
            "/v3/kv/range", {"key": _b64(self._prefix), "range_end": _b64(end), "count_only": True}
        )
        self._rebuilt(counted)  # nothing read yet: a new store is simply the one read from here on
        revision = self._header_revision(counted)
        self._check_count(self._int(counted, "count"))
        kv: dict[str, FileEntry] = {}
        shared: dict[bytes, FileEntry] = {}  # equal small values read share one entry (only while reading)
        total = 0
        key, limit = self._prefix, PAGE_SIZE
        while True:
            # (2)
            cap = PAGE_BYTES if limit > 1 else max(PAGE_BYTES, self._single_cap)
            body = {"key": _b64(key), "range_end": _b64(end), "limit": limit, "revision": revision}
            try:
                answer = await self._post("/v3/kv/range", body, cap=cap)
            except _TooLarge as exc:
                if limit == 1:  # (4)
                    raise await self._oversize_key(key, revision, exc.size) from None
                limit = max(1, min(limit // 2, exc.values - 1))  # (3)
                continue
            received = self._answer_bytes
            if self._rebuilt(answer):
                return None  # the pages so far came from the store that is gone
            items = answer.get("kvs", [])
            if not isinstance(items, list):
                raise self._malformed("kvs is not a list")
            last = b""
            for index, item in enumerate(items):
                if not isinstance(item, dict):
                    raise self._malformed("a kvs entry is not an object")
                # (5)
                last, name = self._name(item)
                value = item.get("value", "")
                size = _b64_size(value) if isinstance(value, str) else 0
                if size > self._limits.max_file_size:
                    raise self._over_file_limit(name, size)
                total += size
                if total > self._limits.max_total_size:
                    raise UnsafeDataError(
                        self.name,
                        f"total size passes the limit of {self._limits.max_total_size} bytes (max-total-size) "
                        f"at {printable(name)}",
                    )
                kv[name] = self._entry(name, item, shared)
                items[index] = None  # its base64 goes now, not with the page
            self._check_count(len(kv))
            if not answer.get("more") or not items:
                return kv, revision
            key = last + b"\0"
            if limit < PAGE_SIZE and received < cap // 4:
                limit = min(PAGE_SIZE, limit * 2)  # (6)
            del answer, items

    async def _oversize_key(self, key: bytes, revision: int, seen: int) -> UnsafeDataError:
        """The refusal of the value at ``key``, whose answer passed the one-key cap after ``seen`` bytes."""
        body = {
            "key": _b64(key),
            "range_end": _b64(prefix_end(self._prefix)),
            "limit": 1,
            "revision": revision,
            "keys_only": True,
        }
        answer = await self._post("/v3/kv/range", body)
        items = answer.get("kvs", [])
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            raise self._malformed("a value too large to read, and no key for it")
        _, name = self._name(items[0])
        return UnsafeDataError(
            self.name,
            f"{printable(name)} is over the per-file limit of {self._limits.max_file_size} bytes "
            f"(max-file-size); refused after {seen} bytes of its answer",
        )

    def _snapshot(self) -> Snapshot:
        """The prefix as a checked Snapshot: checked whole after a read, and at the changed names only
        when self._kv is the last checked set with watch events applied (see _apply)."""
        kv = self._kv
        assert kv is not None
        if self._checked is not None and self._revised is not None and kv is self._revised:
            checked = check_revision(self.name, self._limits, self._checked, self._revised, self._changed)
        else:
            checked = check_whole(self.name, self._limits, kv)
        self._checked, self._revised = checked, None
        self._changed.clear()
        self._kv = checked.snapshot.files  # the same names and entries: keep one dict of them, not two
        return checked.snapshot

    def refresh(self) -> None:
        """Read the whole prefix again, from a fresh revision, and answer with it."""
        self._refreshed = True

    async def fetch(self) -> Snapshot:
        """Read the whole prefix once; after a failure, the next call asks the next member."""
        try:
            await self._read_all()
        except SourceError as exc:
            self._next_member(exc)
            raise
        self._switched = False  # that read was linearizable: the member is caught up
        return self._snapshot()

    async def watch(self) -> AsyncIterator[Snapshot | None]:
        """The prefix now, then one Snapshot per watch response that carries events.

        After a failure, calling it again resumes on the next member, from the last revision applied.
        """
        try:
            while True:
                if self._kv is None:
                    await self._read_all()
                    self._switched = False  # that read was linearizable: the member is caught up
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
        except SourceError as exc:
            self._next_member(exc)
            raise

    async def _stream(self) -> AsyncIterator[bool | object]:
        """Follow the watch stream: True after events were applied, False after a progress note."""
        reauthenticated = self._token is None
        if self._token is None:
            await self._authenticate()
        if self._switched:
            # A member just taken over may lag behind the one left: its watch headers could carry a
            # revision older than one already seen, which would look like a store rebuilt from scratch.
            # A linearizable read waits until it has caught up with the leader, and says whether it
            # belongs to the cluster followed (see _rebuilt); from then on its revisions only grow.
            answer = await self._post(
                "/v3/kv/range",
                {"key": _b64(self._prefix), "range_end": _b64(prefix_end(self._prefix)), "count_only": True},
            )
            self._switched = False
            if self._rebuilt(answer):
                yield _REBUILT
                return
        request = {
            "create_request": {
                "key": _b64(self._prefix),
                "range_end": _b64(prefix_end(self._prefix)),
                "start_revision": str(self._revision + 1),
                "progress_notify": True,
                # etcd splits a large transaction's events into responses it could have received.
                "fragment": True,
            }
        }
        timeout = httpx.Timeout(10.0, read=self._silence_timeout)
        pending = False
        raw = bytearray()
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
                            raw = await self._body(resp, REPLY_BYTES, truncate=True)
                except TimeoutError as exc:
                    raise self._error(f"opening the watch took longer than {self._request_timeout:g}s") from exc
                if resp.status_code != 200:
                    answer = self._decode_error(raw)
                    if self._rejected_token(resp.status_code, answer):
                        self._token = None  # authenticate again on the next try
                    raise self._error(f"watch refused: HTTP {resp.status_code}: {answer.get('message', '')}")
                self._refused.clear()  # a good answer, as in _post
                if len(self._members) > 1 and self._watching != self._base:
                    self._watching = self._base
                    logger.info("%s: watching through member %s", self.name, self._base)
                lines = self._lines(resp)
                while True:
                    if self._refreshed:  # within an interval: the quiet-stream wait is no longer than that
                        self._refreshed = False
                        yield _REBUILT
                        return
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
                    try:
                        line, read = read.result(), None
                    except _TooLarge as exc:
                        # Not held, and not skipped: the whole prefix is read again by pages, each capped,
                        # after the usual backoff (a store that always answers so would otherwise spin).
                        self._kv = None
                        raise self._error(
                            f"a watch response passed {exc.size} bytes, more than one change may take; "
                            "reading everything again by pages"
                        ) from None
                    if line is None:
                        return
                    if not line.strip():
                        continue
                    answer = self._decode(line)
                    del line
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
                    # Only now: a stream broken between fragments resumes at this revision's first one.
                    self._revision = max(self._revision, self._header_revision(result))
                    del answer, result, events
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
        """The stream's lines; _TooLarge once one passes the line cap, before it is held whole."""
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise self._malformed(f"a compressed answer (Content-Encoding: {encoding[:40]}), though none was asked for")
        buffer = bytearray()
        async for chunk in resp.aiter_raw():
            searched = len(buffer)  # no newline before here: search only what arrived
            buffer += chunk
            while (end := buffer.find(b"\n", searched)) >= 0:
                yield bytes(memoryview(buffer)[:end])
                del buffer[: end + 1]
                searched = 0
            if len(buffer) > self._max_line:
                raise _TooLarge(len(buffer))
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
        """Apply one watch response's events to self._kv; on any refusal self._kv is dropped.

        What was applied before the refusal is not undone, so the next try reads everything again
        rather than resume from a revision the mirror no longer matches.
        """
        assert self._kv is not None
        if not events:
            return  # a progress note: no copy of the snapshot's names for nothing
        kv: MutableMapping[str, FileEntry]
        if isinstance(self._kv, Files):
            draft = self._kv.draft()  # a dict's copy: no entry is made for the names it leaves alone
            if self._checked is not None and self._kv is self._checked.snapshot.files:
                self._revised = draft  # the checked set, to be revised at self._changed
                self._changed.clear()
            kv = draft
        else:
            kv = self._kv if isinstance(self._kv, MutableMapping) else dict(self._kv)
        self._kv = kv
        try:
            for index, event in enumerate(events):
                if not isinstance(event, dict) or not isinstance(event.get("kv"), dict):
                    raise self._malformed("a watch event has no kv")
                item = event["kv"]
                _, name = self._name(item)
                self._changed.add(name)
                if event.get("type", "PUT") == "DELETE":
                    kv.pop(name, None)
                else:
                    kv[name] = self._entry(name, item)
                events[index] = None  # its base64 goes now, not with the response
            self._check_count(len(kv))
        except (SourceError, UnsafeDataError):
            self._kv = None
            raise

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


_COMPACTED = object()
_TOKEN_EXPIRED = object()
_REBUILT = object()
