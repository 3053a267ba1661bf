"""The mutating admission webhook: HTTPS only, AdmissionReview admission.k8s.io/v1, JSON Patch by diffing.

Requests are served on threads, bodies are limited in size and read with a timeout, the certificate is
reloaded when its files change (so cert-manager rotation needs no restart), and SIGTERM lets requests
in flight finish. Nothing on the request path calls the Kubernetes API.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch

from infantry.errors import InvalidAnnotation, SettingsError
from infantry.inject import annotation_values, inject_pod, opted_in, option_values, parse_options
from infantry.settings import Settings

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
READ_TIMEOUT_SECONDS = 10.0
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
    """Answer one AdmissionReview: allow, allow with a JSON Patch, or deny naming the bad annotation."""
    try:
        request_review = json.loads(body)
    except ValueError:
        raise BadReview("the body is not JSON") from None
    if not isinstance(request_review, dict) or request_review.get("kind") != "AdmissionReview":
        raise BadReview("the body is not an AdmissionReview")
    if request_review.get("apiVersion") != API_VERSION:
        raise BadReview(f"only {API_VERSION} AdmissionReviews are served, not {request_review.get('apiVersion')!r}")
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
    metadata = _mapping(pod.get("metadata"))
    labels = {str(k): str(v) for k, v in _mapping(metadata.get("labels")).items()}
    annotations = {str(k): str(v) for k, v in _mapping(metadata.get("annotations")).items()}
    if opted_in(labels, annotations) is not True or not isinstance(pod.get("spec"), dict):
        return answer
    # The pod's own namespace may be empty at admission; the request says where it is being created.
    where = f"{request.get('namespace') or '?'}/{metadata.get('name') or metadata.get('generateName', '?')}"
    try:
        options = parse_options({**option_values(settings, only_set=False), **annotation_values(annotations)})
        spec, new_annotations = inject_pod(pod["spec"], annotations, options)
    except InvalidAnnotation as exc:
        logger.warning("denied pod %s: %s", where, exc)
        response.update(allowed=False, status={"code": 400, "message": f"infantry: {exc}"})
        return answer
    mutated = copy.deepcopy(pod)
    mutated["spec"] = spec
    mutated.setdefault("metadata", {})["annotations"] = new_annotations
    patch = jsonpatch.make_patch(pod, mutated).patch
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        logger.info("injected infantry into pod %s (%s)", where, options.mode)
    return answer


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    timeout = READ_TIMEOUT_SECONDS
    protocol_version = "HTTP/1.1"
    server_version = "infantry-webhook"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/healthz":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/mutate":
            self._send(404, {"error": "not found"}, close=True)
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._send(411, {"error": "a Content-Length is required"}, close=True)
            return
        if int(length) > MAX_BODY_BYTES:
            self._send(413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"}, close=True)
            return
        try:
            body = self.rfile.read(int(length))
        except (TimeoutError, OSError):
            self.close_connection = True
            return
        if len(body) < int(length):
            self._send(400, {"error": "the body ended early"}, close=True)
            return
        try:
            self._send(200, review(body, self.server.settings))
        except BadReview as exc:
            self._send(400, {"error": str(exc)})
        except Exception:  # a bug must cost one request, never the server
            logger.exception("unexpected error answering an AdmissionReview")
            self._send(500, {"error": "internal error"})

    def _send(self, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        logger.debug("%s %s", self.address_string(), format % args)


class WebhookServer(ThreadingHTTPServer):
    """A threaded HTTPS server; each connection gets the certificate current when it arrives."""

    daemon_threads = False  # SIGTERM lets requests in flight finish: server_close() joins them
    block_on_close = True

    def __init__(self, address: tuple[str, int], certificates: CertificateStore, settings: Settings) -> None:
        self.certificates = certificates
        self.settings = settings
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        wrapped = self.certificates.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(READ_TIMEOUT_SECONDS)
        try:
            request.do_handshake()  # here, on the request's own thread, so a slow client blocks nobody
        except (ssl.SSLError, OSError):
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


def make_server(settings: Settings) -> WebhookServer:
    """Bind the webhook's HTTPS server, checking the certificate first."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise SettingsError("tls-cert-file and tls-key-file: the webhook serves HTTPS only; give both")
    try:
        certificates = CertificateStore(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"tls-cert-file: cannot load {settings.tls_cert_file}: {exc}") from exc
    host, _, port = (settings.listen or DEFAULT_LISTEN).rpartition(":")
    try:
        return WebhookServer((host or "0.0.0.0", int(port)), certificates, settings)
    except OSError as exc:
        raise SettingsError(f"listen: cannot listen on {settings.listen or DEFAULT_LISTEN}: {exc.strerror}") from exc


def serve(settings: Settings, stop: threading.Event) -> None:
    """Serve until ``stop`` is set, then let requests in flight finish."""
    server = make_server(settings)
    thread = threading.Thread(target=server.serve_forever, name="infantry-webhook")
    thread.start()
    host, port = server.server_address[:2]
    logger.info("serving the admission webhook on https://%s:%s/mutate", host, port)
    stop.wait()
    logger.info("stopping: finishing requests in flight")
    server.shutdown()
    thread.join()
    server.server_close()
