"""Health, readiness, status and Prometheus metrics for ``watch --listen``.

The server is a small asyncio HTTP/1.0 responder that runs in ``watch``'s task group: each request
must arrive whole within a few seconds and under a size cap, and only so many connections are held at
once, so slow or idle clients cannot pile up threads, descriptors or memory. When the cap is reached, the
connection that has waited longest for its request is dropped to make room (see :meth:`_admit`), so a
probe is still answered while idle clients hold every slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

REQUEST_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 32
# Connections the kernel holds before infantry accepts them: not open descriptors of infantry's, and
# room for a burst, so that a probe's connection is not dropped while the loop catches up.
BACKLOG = 128


class Metrics:
    """The counters and gauges infantry reports, on their own registry.

    prometheus_client is imported when one is made: `watch` makes one only with --listen (see
    NullMetrics), so a sidecar nobody scrapes does not load it.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.syncs = Counter(
            "infantry_syncs", "Round trips to a source, by result.", ["result"], registry=self.registry
        )
        self.publishes = Counter(
            "infantry_publishes", "Attempts to publish a new snapshot, by result.", ["result"], registry=self.registry
        )
        self.reloads = Counter(
            "infantry_reloads",
            "Reload notifications, by method and result.",
            ["method", "result"],
            registry=self.registry,
        )
        self.last_sync = Gauge(
            "infantry_last_sync_timestamp_seconds", "When a source last answered successfully.", registry=self.registry
        )
        self.snapshot = Gauge(
            "infantry_snapshot_info", "The version of the live snapshot.", ["version"], registry=self.registry
        )
        self.files = Gauge("infantry_snapshot_files", "Files in the live snapshot.", registry=self.registry)
        self.fallback = Gauge(
            "infantry_fallback_active",
            "1 while the live set is the baked-in fallback from install.",
            registry=self.registry,
        )
        self.rollbacks = Counter(
            "infantry_rollbacks", "Snapshots swapped back after the app failed verification.", registry=self.registry
        )
        self.bad_version = Gauge(
            "infantry_bad_version_info",
            "The last version that failed verification.",
            ["version"],
            registry=self.registry,
        )
        self.propagation = Histogram(
            "infantry_propagation_seconds",
            "From a change being seen at the source to the app being notified.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_sync = Gauge(
            "infantry_in_sync",
            "1 while the destination holds the store's current content and the app was told of it.",
            registry=self.registry,
        )
        self.repairs = Counter(
            "infantry_repairs",
            "Publishes that restored a destination changed behind infantry's back.",
            registry=self.registry,
        )
        self.render_errors = Counter(
            "infantry_render_errors",
            "Template renders that failed (each distinct error once), by template.",
            ["template"],
            registry=self.registry,
        )
        self.git_commit = Gauge(
            "infantry_git_commit_info",
            "The commit each git source's live content was read at.",
            ["sha"],
            registry=self.registry,
        )
        for result in ("changed", "unchanged", "error", "unsafe"):
            self.syncs.labels(result)
        for result in ("published", "rejected", "error", "timeout"):
            self.publishes.labels(result)

    def set_commits(self, shas: list[str]) -> None:
        """Report ``shas`` as the commits of the live content, and no other."""
        self.git_commit.clear()
        for sha in shas:
            self.git_commit.labels(sha).set(1)

    def set_version(self, version: str, files: int) -> None:
        """Report ``version`` as the live snapshot."""
        self.snapshot.clear()
        self.snapshot.labels(version).set(1)
        self.files.set(files)


class _Forgets:
    """An instrument nobody reads: every call is accepted, and forgotten."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self


_FORGETS = _Forgets()


class NullMetrics(Metrics):
    """Metrics with nowhere to be read (`watch` without --listen): every instrument Metrics has (an
    attribute it does not set itself is looked up here), forgetting."""

    def __init__(self) -> None:  # no registry, and no prometheus_client
        pass

    def __getattr__(self, name: str) -> Any:
        return _FORGETS


@dataclass(frozen=True)
class Report:
    """What the health endpoints answer, computed by ``watch`` when asked."""

    healthy: bool
    ready: bool
    problems: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    not_ready: str | None = None


class HealthServer:
    """``/healthz``, ``/readyz``, ``/status`` and ``/metrics`` over plain HTTP, in the event loop."""

    def __init__(self, host: str, port: int, report: Callable[[], Report], metrics: Metrics) -> None:
        # Bound now, so a port in use is a settings error at start-up, not a dead task later.
        self._socket = socket.create_server((host, port), reuse_port=False)
        self._report = report
        self._metrics = metrics
        # Every open connection, oldest first; True while its request head has not arrived whole.
        self._open: dict[asyncio.StreamWriter, bool] = {}

    @property
    def address(self) -> str:
        """``HOST:PORT`` the server is bound to: the port the kernel chose, when 0 was asked for."""
        host, port = self._socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def serve(self) -> None:
        """Serve until cancelled, then close the socket.

        Connections are accepted one at a time and admitted (or another dropped) before the next is
        accepted, so no more than MAX_CONNECTIONS + 1 sockets are ever open, whatever the clients do;
        asyncio's own server accepts a whole backlog before any of it can be turned away.
        """
        loop = asyncio.get_running_loop()
        self._socket.setblocking(False)
        self._socket.listen(BACKLOG)
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    conn, _ = await loop.sock_accept(self._socket)
                    try:
                        reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_REQUEST_BYTES)
                    except OSError:
                        conn.close()  # reset before it could be set up
                        continue
                    if self._admit(writer):
                        group.create_task(self._handle(reader, writer))
                    else:
                        writer.transport.abort()
        finally:
            self._socket.close()

    def close(self) -> None:
        """Close the listening socket (when serve() never ran)."""
        self._socket.close()

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Make room for a new connection under MAX_CONNECTIONS; False if there is none to make.

        Refusing newcomers at the cap would let 32 idle clients, renewed every few seconds, starve the
        kubelet's probe, which fails the pod although nothing is wrong with it. Dropping the connection
        that has waited longest for its request instead costs a real client nothing: a probe sends its
        whole request at once and is answered within milliseconds, long before 32 newer connections can
        push it out, while an idle client is the one that has been waiting. Connections whose request
        arrived are being answered and are never dropped; if all of them are, the newcomer is refused.
        """
        if len(self._open) >= MAX_CONNECTIONS:
            oldest = next((w for w, waiting in self._open.items() if waiting), None)
            if oldest is None:
                return False
            del self._open[oldest]
            oldest.transport.abort()  # its handler reads EOF and ends
        self._open[writer] = True
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    status, body, content_type = 431, b"request header too large\n", _TEXT
                else:
                    status, body, content_type = self._answer(head.split(b"\r\n", 1)[0])
                if writer in self._open:
                    self._open[writer] = False
                writer.write(
                    b"HTTP/1.0 %d %s\r\nServer: infantry\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n" % (status, _REASONS[status], content_type.encode(), len(body)) + body
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a slow, dropped or vanished client gets nothing more
        except Exception:
            # A bug in answering one request must not take the listener (and so watch) down with it.
            logger.exception("the health server failed to answer a request")
        finally:
            self._open.pop(writer, None)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    def _answer(self, request_line: bytes) -> tuple[int, bytes, str]:
        parts = request_line.split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return 400, b"bad request\n", _TEXT
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST
        if path not in (b"/healthz", b"/readyz", b"/status", b"/configured"):
            return 404, b"not found\n", _TEXT
        report = self._report()
        if path == b"/configured":
            if report.status.get("configured"):
                return 200, b"a set is live\n", _TEXT
            return 503, b"no set is live in the destination yet\n", _TEXT
        if path == b"/status":
            return 200, json.dumps(report.status, indent=2, sort_keys=True).encode() + b"\n", "application/json"
        if path == b"/healthz":
            if report.healthy:
                return 200, b"ok\n", _TEXT
            return 503, ("".join(f"{p}\n" for p in report.problems)).encode(), _TEXT
        if report.ready:
            return 200, b"ready\n", _TEXT
        return 503, f"not ready: {report.not_ready or 'starting'}\n".encode(), _TEXT


_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
