"""The mutating admission webhook: HTTPS only, AdmissionReview admission.k8s.io/v1, JSON Patch by diffing.

The server runs on asyncio, so a connection waiting on the network costs a little memory, never a
thread. Every request, with the TLS handshake for a connection's first, must arrive whole within
``READ_TIMEOUT_SECONDS`` and under ``MAX_BODY_BYTES``. At most ``MAX_CONNECTIONS`` are open: when one more
arrives, the connection that has waited longest for its request is dropped to make room, so idle and
slow clients cannot crowd out the API server. Reviews are computed on a few worker threads. The
certificate is reloaded when its files change (so cert-manager rotation needs no restart), and SIGTERM
lets requests in flight finish. Nothing on the request path calls the Kubernetes API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import os
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import jsonpatch

from infantry import threads
from infantry.errors import SettingsError
from infantry.inject import (
    MAX_DEPTH,
    annotation_values,
    inject_pod,
    labels_and_annotations,
    opted_in,
    option_values,
    parse_options,
    pod_warnings,
)
from infantry.settings import Settings

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 16 << 10
MAX_CONNECTIONS = 128
READ_TIMEOUT_SECONDS = 10.0
REVIEW_WORKERS = 4
API_VERSION = "admission.k8s.io/v1"
DEFAULT_LISTEN = "0.0.0.0:8443"


class BadReview(Exception):
    """A request body that is not an AdmissionReview this webhook can answer."""


class CertificateStore:
    """The server's TLS context, rebuilt when the certificate or key file changes."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert = cert
        self._key = key
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        self._context = self._load()

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in (self._cert, self._key):
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert, self._key)
        return context

    def context(self) -> ssl.SSLContext:
        """The current context; a changed pair of files is loaded first, a broken one is ignored."""
        try:
            stamp = self._files_stamp()
        except OSError:
            return self._context  # in the middle of a rotation; keep serving the old certificate
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._context = self._load()
                    logger.info("reloaded the TLS certificate from %s", self._cert)
                except (OSError, ssl.SSLError) as exc:
                    logger.warning("keeping the old TLS certificate: cannot load the new one: %s", exc)
                self._stamp = stamp
            return self._context


def review(body: bytes, settings: Settings) -> dict[str, Any]:
    """Answer one AdmissionReview: allow, allow with a JSON Patch, or deny naming what is wrong."""
    try:
        request_review = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise BadReview(f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:
        raise BadReview("the body is not JSON") from None
    if _deeper_than(request_review, MAX_DEPTH):
        raise BadReview(f"the body is nested more than {MAX_DEPTH} levels deep")
    if not isinstance(request_review, dict) or request_review.get("kind") != "AdmissionReview":
        raise BadReview("the body is not an AdmissionReview")
    if request_review.get("apiVersion") != API_VERSION:
        got = repr(request_review.get("apiVersion"))
        raise BadReview(f"only {API_VERSION} AdmissionReviews are served, not {got[:80]}")
    request = request_review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("the AdmissionReview has no request with a uid")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    kind = request.get("kind")
    pod = request.get("object")
    is_pod = isinstance(kind, dict) and kind.get("group", "") == "" and kind.get("kind") == "Pod"
    if not is_pod or request.get("operation") != "CREATE" or not isinstance(pod, dict):
        return answer
    metadata = pod.get("metadata")
    named = metadata if isinstance(metadata, dict) else {}
    # The pod's own namespace may be empty at admission; the request says where it is being created.
    where = f"{_text(request.get('namespace'))}/{_text(named.get('name') or named.get('generateName'))}"
    try:
        labels, annotations = labels_and_annotations(metadata, "metadata")
        if opted_in(labels, annotations) is not True:
            return answer
        options = parse_options({**option_values(settings, only_set=False), **annotation_values(annotations)})
        spec, new_annotations = inject_pod(pod.get("spec"), annotations, options)
    except SettingsError as exc:  # a bad annotation, a wrongly shaped pod, a name infantry adds already taken
        logger.warning("denied pod %s: %s", where, exc)
        response.update(allowed=False, status={"code": 400, "message": f"infantry: {exc}"})
        return answer
    warnings = pod_warnings(spec, options)
    if warnings:
        response["warnings"] = [f"infantry: {warning}" for warning in warnings]
    mutated = copy.deepcopy(pod)
    mutated["spec"] = spec
    mutated.setdefault("metadata", {})["annotations"] = new_annotations
    patch = jsonpatch.make_patch(pod, mutated).patch
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        logger.info("injected infantry into pod %s (%s)", where, options.mode)
    return answer


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _deeper_than(value: Any, limit: int) -> bool:
    """True if ``value`` nests lists and mappings more than ``limit`` deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _text(value: Any) -> str:
    """A name from the request, fit for one log line."""
    if not isinstance(value, str) or not value:
        return "?"
    return value if len(value) <= 100 and value.isprintable() else repr(value[:100])


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    body: bytes
    keep_alive: bool


class _BadRequest(Exception):
    """A request this server refuses before reading it all; the connection is closed after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on the connection, or None if the client closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, f"the request head is over {MAX_HEAD_BYTES} bytes") from None
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(400, "not an HTTP/1.1 request")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(400, "a malformed header line")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if method == "POST":
        length = headers.get("content-length", "")
        if "transfer-encoding" in headers or not length.isdigit():
            raise _BadRequest(411, "a Content-Length is required")
        if int(length) > MAX_BODY_BYTES:
            raise _BadRequest(413, f"the body is over {MAX_BODY_BYTES} bytes")
        body = await reader.readexactly(int(length))
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return _Request(method, target.split("?", 1)[0], body, keep_alive)


async def _send(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any], *, close: bool) -> None:
    body = json.dumps(payload).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Server: infantry-webhook",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if close:
        head.append("Connection: close")
    writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)
    await writer.drain()


class WebhookServer:
    """The webhook's HTTPS server; each connection gets the certificate current when it arrives.

    Everything but ``review`` runs on one event loop: not safe to call from other threads.
    """

    def __init__(self, sock: socket.socket, certificates: CertificateStore, settings: Settings) -> None:
        self.certificates = certificates
        self.settings = settings
        self._socket = sock
        self._connections: set[asyncio.Task[Any]] = set()
        self._waiting: dict[asyncio.Task[Any], None] = {}  # those waiting on the network, longest first
        self._stopping = False
        self._pool: ThreadPoolExecutor | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the server listens on."""
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    async def serve(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then let requests in flight finish."""
        with ThreadPoolExecutor(REVIEW_WORKERS, thread_name_prefix="infantry-review") as pool:
            self._pool = pool
            server = await asyncio.start_server(
                self._connection, sock=self._socket, limit=MAX_HEAD_BYTES, backlog=MAX_CONNECTIONS
            )
            try:
                await threads.start(stop.wait, name="infantry-webhook-stop")
            finally:
                logger.info("stopping: finishing requests in flight")
                self._stopping = True
                server.close()
                for task in list(self._waiting):
                    task.cancel()
                if self._connections:
                    await asyncio.wait(self._connections, timeout=READ_TIMEOUT_SECONDS)

    def _make_room(self) -> bool:
        """Below the cap, or once the connection that has waited longest is dropped; False if all are busy."""
        if len(self._connections) < MAX_CONNECTIONS:
            return True
        if not self._waiting:
            return False
        oldest = next(iter(self._waiting))
        del self._waiting[oldest]
        self._connections.discard(oldest)
        oldest.cancel()
        logger.debug("dropped the connection waiting longest, to make room for a new one")
        return True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stopping or not self._make_room():
            writer.transport.abort()
            return
        self._connections.add(task)
        finished = False
        try:
            await self._converse(reader, writer, task)
            finished = True
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            logger.debug("dropped a connection that was too slow or broke off (%s)", type(exc).__name__)
        finally:
            self._connections.discard(task)
            self._waiting.pop(task, None)
            if finished:
                writer.close()  # after what was written, and TLS's close_notify
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(1):
                        await writer.wait_closed()
            writer.transport.abort()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[Any]
    ) -> None:
        """The TLS handshake, then requests and answers until the client or the server closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_TIMEOUT_SECONDS  # the first request shares it with the handshake
        self._waiting[task] = None
        async with asyncio.timeout_at(deadline):
            await writer.start_tls(self.certificates.context(), ssl_handshake_timeout=READ_TIMEOUT_SECONDS)
        while not self._stopping:
            self._waiting[task] = None
            try:
                async with asyncio.timeout_at(deadline):
                    request = await _read_request(reader)
            except _BadRequest as exc:
                self._waiting.pop(task, None)
                async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                    await _send(writer, exc.status, {"error": str(exc)}, close=True)
                return
            if request is None:
                return
            self._waiting.pop(task, None)
            status, payload, close = await self._answer(request)
            close = close or not request.keep_alive or self._stopping
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                await _send(writer, status, payload, close=close)
            if close:
                return
            deadline = loop.time() + READ_TIMEOUT_SECONDS

    async def _answer(self, request: _Request) -> tuple[int, dict[str, Any], bool]:
        """The status, the JSON answer, and whether to close the connection after it."""
        if request.method == "GET":
            if request.path == "/healthz":
                return 200, {"status": "ok"}, False
            return 404, {"error": "not found"}, False
        if request.method != "POST":
            return 405, {"error": "only GET /healthz and POST /mutate are served"}, True
        if request.path != "/mutate":
            return 404, {"error": "not found"}, True
        loop = asyncio.get_running_loop()
        try:
            return 200, await loop.run_in_executor(self._pool, review, request.body, self.settings), False
        except BadReview as exc:
            return 400, {"error": str(exc)}, False
        except Exception:  # a bug must cost one request, never the server
            logger.exception("unexpected error answering an AdmissionReview")
            return 500, {"error": "internal error"}, False


def make_server(settings: Settings) -> WebhookServer:
    """Bind the webhook's HTTPS server, checking the certificate first."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise SettingsError("tls-cert-file and tls-key-file: the webhook serves HTTPS only; give both")
    option_values(settings, only_set=False)  # a default that cannot be passed on is refused now, not per pod
    try:
        certificates = CertificateStore(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"tls-cert-file: cannot load {settings.tls_cert_file}: {exc}") from exc
    listen = settings.listen or DEFAULT_LISTEN
    host, _, port = listen.rpartition(":")
    try:
        sock = socket.create_server((host.strip("[]") or "0.0.0.0", int(port)), backlog=MAX_CONNECTIONS)
    except OSError as exc:
        raise SettingsError(f"listen: cannot listen on {listen}: {exc.strerror}") from exc
    return WebhookServer(sock, certificates, settings)


def serve(settings: Settings, stop: threading.Event) -> None:
    """Serve until ``stop`` is set, then let requests in flight finish."""
    server = make_server(settings)
    host, port = server.address
    logger.info("serving the admission webhook on https://%s:%s/mutate", host, port)
    asyncio.run(server.serve(stop))
