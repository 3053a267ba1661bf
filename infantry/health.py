"""Health, readiness, status and Prometheus metrics for ``watch --listen``.

The server is a small asyncio HTTP/1.0 responder that runs in ``watch``'s task group: each request
must arrive whole within a few seconds and under a size cap, and only so many connections are served at
once, so slow or idle clients cannot pile up threads or memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

REQUEST_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 32


class Metrics:
    """The counters and gauges infantry reports, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
        for result in ("changed", "unchanged", "error", "unsafe"):
            self.syncs.labels(result)
        for result in ("published", "rejected", "error", "timeout"):
            self.publishes.labels(result)

    def set_version(self, version: str, files: int) -> None:
        """Report ``version`` as the live snapshot."""
        self.snapshot.clear()
        self.snapshot.labels(version).set(1)
        self.files.set(files)


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
        self._active = 0

    async def serve(self) -> None:
        """Serve until cancelled, then close the socket."""
        server = await asyncio.start_server(self._handle, sock=self._socket, limit=MAX_REQUEST_BYTES)
        async with server:
            await server.serve_forever()

    def close(self) -> None:
        """Close the listening socket (when serve() never ran)."""
        self._socket.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body, content_type = self._answer(head.split(b"\r\n", 1)[0])
                writer.write(
                    b"HTTP/1.0 %d %s\r\nServer: infantry\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n" % (status, _REASONS[status], content_type.encode(), len(body)) + body
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a slow, oversize or vanished client gets nothing more
        finally:
            self._active -= 1
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
            return 200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST
        if path not in (b"/healthz", b"/readyz", b"/status"):
            return 404, b"not found\n", _TEXT
        report = self._report()
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
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 503: b"Service Unavailable"}
