"""Health, readiness and Prometheus metrics for ``watch --listen``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Clock = Callable[[], float]


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
        for result in ("changed", "unchanged", "error", "unsafe"):
            self.syncs.labels(result)
        for result in ("published", "rejected", "error"):
            self.publishes.labels(result)

    def set_version(self, version: str, files: int) -> None:
        """Report ``version`` as the live snapshot."""
        self.snapshot.clear()
        self.snapshot.labels(version).set(1)
        self.files.set(files)


class Health:
    """What ``/healthz`` and ``/readyz`` answer, fed by the agent's loops."""

    def __init__(self, sources: int, stale_after: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._stale_after = stale_after
        started = clock()
        self._last_ok = [started] * sources
        self._ready = threading.Event()

    def round_trip(self, index: int) -> None:
        """Source ``index`` just answered successfully."""
        self._last_ok[index] = self._clock()

    def mark_ready(self) -> None:
        """The destination holds the store's content."""
        self._ready.set()

    @property
    def ready(self) -> bool:
        """True once the first snapshot is in place."""
        return self._ready.is_set()

    def stale_sources(self) -> list[int]:
        """Indexes of sources with no good round trip for longer than allowed."""
        now = self._clock()
        return [i for i, last in enumerate(self._last_ok) if now - last > self._stale_after]


class HealthServer:
    """A small threaded HTTP server for ``/healthz``, ``/readyz`` and ``/metrics``."""

    def __init__(self, host: str, port: int, health: Health, metrics: Metrics, names: list[str]) -> None:
        handler = _handler_class(health, metrics, names)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="infantry-health", daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def _handler_class(health: Health, metrics: Metrics, names: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "infantry"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                stale = health.stale_sources()
                if stale:
                    body = "stale: " + ", ".join(names[i] for i in stale) + "\n"
                    self._reply(503, body.encode())
                else:
                    self._reply(200, b"ok\n")
            elif path == "/readyz":
                self._reply(200, b"ready\n") if health.ready else self._reply(503, b"not ready\n")
            elif path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            pass  # probes every few seconds would drown the log

    return Handler
