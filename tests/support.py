"""Real parts for the tests: nginx, an app that records signals, a reload endpoint, and infantry itself."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

HELPERS = Path(__file__).parent / "helpers"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# How long a helper keeps retrying what only failed for lack of CPU (a pass racing a swap, a refused
# connection from a server still starting); a busy 2-core CI machine needs seconds, not tries.
READ_RETRY_SECONDS = 5.0
REQUEST_SECONDS = 10.0
# Figures a test measured, printed at the end of the run (image size, propagation time, ...).
FIGURES: list[str] = []


def report_figure(line: str) -> None:
    """Print ``line`` in the run's summary, where CI output shows it."""
    FIGURES.append(line)


# The deadline of the innermost wait_until, so that a helper retrying inside a condition (Watch.get)
# gives up when the caller would, not after its own, longer, timeout.
_caller_deadline: ContextVar[float | None] = ContextVar("caller_deadline", default=None)


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01) -> None:
    """Poll ``condition`` until it holds, failing the test with ``what`` after ``timeout`` seconds.

    The default is generous on purpose: it costs nothing when the condition comes true, and a busy
    2-core CI machine can take seconds for what takes 50 ms on an idle one.
    """
    deadline = time.monotonic() + timeout
    token = _caller_deadline.set(deadline)
    try:
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)
    finally:
        _caller_deadline.reset(token)


def _deadline(timeout: float) -> float:
    """``timeout`` seconds from now, or the enclosing wait_until's deadline if that comes first."""
    own = time.monotonic() + timeout
    caller = _caller_deadline.get()
    return own if caller is None else min(own, caller)


def holds_for(condition: Callable[[], bool], seconds: float) -> bool:
    """True if ``condition`` stays true for a whole observation window (to show nothing more happens)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.02)
    return condition()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def require_binary(name: str, package: str) -> str:
    """The path of a server binary; its absence fails the test (``make test`` installs it)."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail(f"{name} is not installed; `make test` installs Debian's {package} when run as root")
    return found


def infantry(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the infantry command line, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("INFANTRY_")}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "infantry", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    # Searched for the test secrets at the end of the session (the label names no argument: they may be secret).
    from tests.secret_guard import note_output  # here, not at the top: pytest loads the guard as a plugin first

    note_output(f"output of infantry {args[0] if args else ''}", result.stdout + result.stderr)
    return result


def log_lines(stderr: str) -> list[str]:
    """The lines a run logged after its start-up line (the one naming the version and the settings)."""
    lines = stderr.strip().splitlines()
    start = re.compile(r'infantry\.cli: infantry \S+ \w+: |"event": "start"')
    return [line for line in lines if not start.search(line)]


_MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def infantry_measured(
    workdir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the infantry command line, and return its result with its peak RSS in MiB (the kernel's own
    high-water mark of the process, taken when it exits)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("INFANTRY_")}
    full_env.update(env or {})
    peak = workdir / f"peak-rss-{time.monotonic_ns()}"
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(peak), sys.executable, "-m", "infantry", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    from tests.secret_guard import note_output

    note_output(f"output of infantry {args[0] if args else ''}", result.stdout + result.stderr)
    return result, int(peak.read_text()) / 1024


def peak_rss_mib(pid: int) -> float:
    """The peak RSS of a running process so far, in MiB (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def rss_mib(pid: int) -> float:
    """The RSS of a running process now, in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as '-> target'), to show what changed on disk."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes().decode("utf-8", "replace")
        else:
            out[rel] = "dir"
    return out


def read_as_app(dest: Path) -> dict[str, str]:
    """What an app sees: every file reached through the top-level names, not the hidden entries.

    A name removed by a publish between listing and reading makes the pass start again, as an app
    rescanning its directory would.
    """
    deadline = time.monotonic() + READ_RETRY_SECONDS
    while True:
        try:
            return _read_pass(dest)
        except FileNotFoundError:
            # A pass can lose the race with a swap many times in a row on a busy machine: give up only
            # after a span of time, never after a count of tries.
            if time.monotonic() > deadline:
                raise


def _read_pass(dest: Path) -> dict[str, str]:
    seen: dict[str, str] = {}
    for entry in sorted(os.listdir(dest)):
        if entry.startswith(".."):
            continue
        path = dest / entry
        if path.is_dir():
            for inner in sorted(path.rglob("*")):
                if inner.is_file():
                    seen[inner.relative_to(dest).as_posix()] = inner.read_text()
        else:
            seen[entry] = path.read_text()
    return seen


def installed_store(tmp_path: Path, files: dict[str, str]) -> tuple[Path, Path]:
    """A store directory holding ``files``, installed into a destination with `infantry install`."""
    store, dest = tmp_path / "store", tmp_path / "D"
    store.mkdir()
    for name, content in files.items():
        (store / name).write_text(content)
    result = infantry("install", "--source", store.as_uri(), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    return store, dest


# -- nginx -----------------------------------------------------------------------------------------


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass
class Nginx:
    """A real nginx on a loopback port, serving ``root``, logging each request to ``access.log``."""

    workdir: Path
    port: int
    tls_port: int | None = None
    tls: TlsFiles | None = None
    proc: subprocess.Popen[bytes] | None = None
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.workdir / "www"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.workdir / "htpasswd").write_text("alice:{PLAIN}wonderland\n")
        (self.workdir / "nginx.conf").write_text(self._config())

    def _config(self) -> str:
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""
        tls_server = ""
        if self.tls is not None and self.tls_port is not None:
            tls_server = f"""
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        ssl_certificate {self.tls.server_cert};
        ssl_certificate_key {self.tls.server_key};
        ssl_client_certificate {self.tls.ca};
        ssl_verify_client on;
        root {self.root};
    }}"""
        return f"""
{user}
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format probe '$msec|$status|$request_method|$uri|$http_authorization'
                     '|$http_if_none_match|$http_if_modified_since|$body_bytes_sent|$bytes_sent';
    access_log {w}/access.log probe;
    client_body_temp_path {w}/tmp-body;
    proxy_temp_path {w}/tmp-proxy;
    fastcgi_temp_path {w}/tmp-fastcgi;
    uwsgi_temp_path {w}/tmp-uwsgi;
    scgi_temp_path {w}/tmp-scgi;
    types {{ text/plain txt yaml conf; application/gzip gz tgz; application/x-tar tar; application/zip zip; }}
    default_type application/octet-stream;
    etag on;
    map $http_x_case $etcd_body {{
        default '{{"error": "no such case"}}';
        not-json 'this is not json';
        wrong-shape '{{"header": {{"revision": "5"}}, "kvs": "nope"}}';
        bad-base64 '{{"header": {{"revision": "5"}}, "kvs": [{{"key": "!!not base64!!", "value": "eA=="}}]}}';
        no-header '{{"kvs": []}}';
    }}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location /bearer/ {{
            if ($http_authorization !~ "^Bearer (sesame|opensesame)$") {{ return 401; }}
        }}
        location /basic/ {{
            auth_basic "infantry tests";
            auth_basic_user_file {w}/htpasswd;
        }}
        location /gz/ {{
            gzip_static on;  # serves NAME.gz, compressed, for NAME: a Content-Encoding: gzip answer
        }}
        location /noetag/ {{
            etag off;
        }}
        location = /v3/kv/range {{
            default_type application/json;
            return 200 $etcd_body;
        }}
        location = /busy.yaml {{
            add_header Retry-After 1 always;
            return 503;
        }}
        location = /html/bundle.tar.gz {{
            default_type text/html;
            return 200 "<html><body>Oops, the config store is down</body></html>";
        }}
    }}{tls_server}
}}
"""

    def start(self) -> None:
        binary = require_binary("nginx", "nginx-light")
        self.proc = subprocess.Popen(
            [
                binary,
                "-p",
                str(self.workdir),
                "-e",
                str(self.workdir / "error.log"),
                "-c",
                str(self.workdir / "nginx.conf"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not (port_open(self.port) and (self.tls_port is None or port_open(self.tls_port))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"nginx did not start: {err}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        wait_until("nginx to release its port", lambda: not port_open(self.port), timeout=10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def tls_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.tls_port}/{path.lstrip('/')}"

    def requests(self, path: str) -> list[list[str]]:
        """Access-log rows for ``path``.

        Each is [msec, status, method, uri, authorization, if-none-match, if-modified-since, bytes].
        """
        log = self.workdir / "access.log"
        if not log.exists():
            return []
        rows = []
        for line in log.read_text().splitlines():
            parts = line.split("|")
            if parts[3] == "/" + path.lstrip("/"):
                rows.append(["" if p == "-" else p for p in parts])
        return rows


# -- the app, a reload endpoint, and infantry watch ---------------------------------------------------


class SignalRecorder:
    """A real child process that records each SIGHUP it receives (and what the config said then)."""

    def __init__(self, workdir: Path, config: Path | None = None, argv0: str | None = None) -> None:
        self.pid_file = workdir / "app.pid"
        self.record = workdir / "signals.log"
        args = [str(HELPERS / "sigrecorder.py"), str(self.pid_file), str(self.record)]
        if config is not None:
            args.append(str(config))
        if argv0 is not None:
            # exec -a gives the process the argv[0] that `--process NAME` looks for.
            self.proc = subprocess.Popen(["bash", "-c", f'exec -a {argv0} "$@"', "bash", sys.executable, *args])
        else:
            self.proc = subprocess.Popen([sys.executable, *args])
        wait_until("the app to write its PID file", self.pid_file.exists)

    def signals(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def count(self) -> int:
        return len(self.signals())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def serve_loopback(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server for ``handler`` on a free loopback port, serving from a daemon thread.

    Its port is ``server.server_address[1]``; stop it with ``shutdown()`` and ``server_close()``.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class ReloadEndpoint:
    """A real HTTP server that records reload calls and answers with ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                outer.calls.append((self.command, self.path, self.headers.get("X-Infantry-Version", "")))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_GET = _record  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/-/reload"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Watch:
    """``infantry watch`` as a real process, with its health endpoint on a free port."""

    def __init__(self, workdir: Path, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = workdir / f"watch-{self.port}.log"
        self._log = self.log_path.open("w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("INFANTRY_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infantry", "watch", *args, "--listen", f"127.0.0.1:{self.port}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    def get(self, path: str, timeout: float = REQUEST_SECONDS) -> tuple[int, str]:
        """The status and body of ``path`` on the health server; (0, "") if it cannot be reached in time.

        A refused, reset or timed-out request is tried again while the process lives, until ``timeout``
        (or the enclosing wait_until's deadline): on a busy machine the server may be slow to start or to
        answer, and that is not what a test checks.
        """
        deadline = _deadline(timeout)
        while True:
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=remaining) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except (OSError, http.client.HTTPException):
                if self.proc.poll() is not None or time.monotonic() >= deadline:
                    return 0, ""
                time.sleep(0.05)

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"infantry watch exited {self.proc.returncode}:\n{self.log()}")
            return self.get("/readyz")[0] == 200

        wait_until("infantry watch to be ready", ready, timeout)

    def metric(self, name: str, **labels: str) -> float:
        status, body = self.get("/metrics")
        assert status == 200, f"/metrics answered {status} {body}\n{self.log()}"
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 20) -> tuple[int, float]:
        """SIGTERM, then the exit code and how long it took to exit (tests bound that themselves)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"infantry watch did not stop within {timeout}s:\n{self.log()}")
        self._log.close()
        return code, time.monotonic() - started


# -- etcd ------------------------------------------------------------------------------------------


def b64(data: bytes | str) -> str:
    import base64

    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class Etcd:
    """A real single-member etcd on loopback ports, with a temporary data directory."""

    def __init__(self, workdir: Path, tls: TlsFiles | None = None, token_ttl: int = 300) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.peer_port = free_port()
        self.tls = tls
        self.token_ttl = token_ttl
        self.proc: subprocess.Popen[bytes] | None = None
        self.token: str | None = None
        self._root_password: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, prefix: str = "/app/") -> str:
        return f"{'etcds' if self.tls else 'etcd'}://127.0.0.1:{self.port}{prefix}"

    def start(self) -> None:
        binary = require_binary("etcd", "etcd-server")
        args = [
            binary,
            "--name", "infantry-test",
            "--data-dir", str(self.workdir / "data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"infantry-test=http://127.0.0.1:{self.peer_port}",
            "--experimental-watch-progress-notify-interval", "1s",
            "--max-txn-ops", "10000",
            "--auth-token", "simple",
            "--auth-token-ttl", str(self.token_ttl),
            "--log-level", "error",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        self.log = (self.workdir / "etcd.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until("etcd to answer", self._healthy, timeout=30)

    def _client(self) -> Any:
        import httpx

        if self.tls is None:
            return httpx.Client(timeout=10)
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return httpx.Client(timeout=10, verify=context)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"etcd exited {self.proc.returncode}: {(self.workdir / 'etcd.log').read_text()[-2000:]}")
        import httpx

        try:
            self.call("/v3/kv/range", {"key": b64("\0")})
        except (OSError, httpx.TransportError):
            return False
        return True

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the JSON gateway; as root once auth is on, logging in again if the token expired.

        A short ``token_ttl`` (or a restart, which forgets simple tokens) can expire the helper's own token
        while a slow test runs; etcd then answers 401 with gRPC code 16 (UNAUTHENTICATED).
        """
        with self._client() as client:
            resp = self._post(client, path, body)
            if self._root_password is not None and _token_rejected(resp):
                self._login(client)
                resp = self._post(client, path, body)
            resp.raise_for_status()
            result: dict[str, Any] = resp.json()
            return result

    def _post(self, client: Any, path: str, body: dict[str, Any]) -> Any:
        headers = {"Authorization": self.token} if self.token else {}
        return client.post(self.endpoint + path, json=body, headers=headers)

    def _login(self, client: Any) -> None:
        self.token = None
        resp = self._post(client, "/v3/auth/authenticate", {"name": "root", "password": self._root_password})
        resp.raise_for_status()
        self.token = resp.json()["token"]

    def put(self, key: str, value: bytes | str) -> int:
        return int(self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self.call("/v3/kv/deleterange", {"key": b64(key)})["header"]["revision"])

    def txn(self, puts: dict[str, bytes | str], deletes: Sequence[str] = ()) -> int:
        ops: list[dict[str, Any]] = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in puts.items()]
        ops += [{"request_delete_range": {"key": b64(k)}} for k in deletes]
        return int(self.call("/v3/kv/txn", {"success": ops})["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": b64("\0")})["header"]["revision"])

    def keys(self, prefix: str = "/app/") -> dict[str, bytes]:
        import base64

        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        answer = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in answer.get("kvs", [])
        }

    def enable_auth(self, user: str, password: str) -> None:
        self.call("/v3/auth/user/add", {"name": "root", "password": "root-password"})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/role/add", {"name": "reader"})
        self.call(
            "/v3/auth/role/grant",
            {"name": "reader", "perm": {"permType": "READ", "key": b64("/app/"), "range_end": b64("/app0")}},
        )
        self.call("/v3/auth/user/add", {"name": user, "password": password})
        self.call("/v3/auth/user/grant", {"user": user, "role": "reader"})
        self.call("/v3/auth/enable", {})
        self._root_password = "root-password"
        with self._client() as client:
            self._login(client)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        wait_until("etcd's port to close", lambda: not port_open(self.port), timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _token_rejected(resp: Any) -> bool:
    """True if etcd refused the request for its auth token (HTTP 401, or gRPC code 16 in the body)."""
    if resp.status_code == 401:
        return True
    try:
        answer = resp.json()
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("code") == 16


class CuttableProxy:
    """A real TCP forwarder on loopback whose connections can be cut, while the server behind stays up."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        self._frozen: set[socket.socket] = set()
        self._last_request: dict[socket.socket, bytes] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if data.startswith((b"GET ", b"POST ", b"PUT ")):
                    with self._lock:
                        self._last_request[src] = data.split(b"\r\n", 1)[0]
                while src in self._frozen and not self._closed:
                    time.sleep(0.05)  # a stalled peer: the bytes are held, the connection stays open
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        self._cut = True
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def restore(self) -> None:
        self._cut = False

    def freeze(self, request: bytes = b"") -> None:
        """Stop forwarding, without closing, on the open connections whose latest request line holds
        ``request`` (all of them by default); new connections work."""
        with self._lock:
            for i in range(0, len(self._open), 2):
                client, upstream = self._open[i], self._open[i + 1]
                if request in self._last_request.get(client, b""):
                    self._frozen.update((client, upstream))

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
