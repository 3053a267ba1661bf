"""The confd demo, done with infantry's templates: etcd holds the backends, nginx proxies to them.

etcd keeps one key per backend, ``/services/web/HOST:PORT``. Two templates turn them into nginx
configuration: ``upstream.conf.j2`` lists them in ``upstream web { ... }``, ``site.conf.j2`` is the server
that proxies to it, on the address the pod gives in ``NGINX_LISTEN``. ``check.sh`` runs ``nginx -t`` on
every staged set, so a set nginx would refuse is never published, and a template that calls ``fail()``
publishes nothing: the last good set stays live, and ``/readyz`` says why.

Run it: ``examples/templates/run.sh`` (or ``python examples/templates/pod.py``). It starts etcd, two
backends, ``infantry install``, nginx and ``infantry watch``, then adds and removes backends with
``etcdctl`` and shows where nginx sends requests after each change. It needs etcd, etcdctl and nginx
(``make test`` installs them) and infantry importable by the Python running it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = "/services/web/"
"""Where backends register, one key each: ``/services/web/HOST:PORT``; the value is not read."""
KEEPALIVE = "/services/nginx/keepalive"
"""A setting of the upstream kept beside the backends: the store is not empty when the last backend goes."""
NOWHERE = "127.0.0.1:99999"
"""A backend address the templates accept and nginx refuses (no such port): the check gate's case."""
TEMPLATES = {"upstream.conf": "upstream.conf.j2", "site.conf": "site.conf.j2"}
"""Each published file, and the template it is rendered from."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise SystemExit(f"{name} is not installed (Debian: etcd-server, etcd-client, nginx-light)")
    return found


class TemplatePod:
    """etcd (the store) and two backends, then the pod: install, nginx (the app) and watch (the sidecar)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.configs = workdir / "configs"
        self.config = workdir / "infantry.yaml"
        self.etcd_port, self.peer_port, self.http_port, self.health_port = (free_port() for _ in range(4))
        self.backends = {"one": free_port(), "two": free_port()}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nginx: subprocess.Popen[bytes] | None = None
        self.infantry = [sys.executable, "-m", "infantry"]
        # The pod's environment: the templates may read only what template_env names.
        self.env = {**os.environ, "NGINX_LISTEN": f"127.0.0.1:{self.http_port}"}

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def address(self, backend: str) -> str:
        """The ``HOST:PORT`` of backend ``one`` or ``two``: the name of its key under /services/web/."""
        return f"127.0.0.1:{self.backends[backend]}"

    def _spawn(self, argv: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.workdir / log).open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    # -- the world around the pod ----------------------------------------------------------------

    def start_store(self) -> None:
        """Start etcd and the two backends, and wait until they answer."""
        self._spawn([binary("etcd"), "--name", "demo", "--data-dir", str(self.workdir / "etcd"),
                     "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                     "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                     "--initial-cluster", f"demo=http://127.0.0.1:{self.peer_port}"], "etcd.log")  # fmt: skip
        for name, port in self.backends.items():
            self._spawn([sys.executable, str(HERE / "backend.py"), str(port), name], f"backend-{name}.log")
        wait_for("etcd", lambda: self._etcdctl("endpoint", "health", check=False).returncode == 0)
        for name in self.backends:
            wait_for(f"backend {name}", partial(self._answers_as, name))

    def _answers_as(self, backend: str) -> bool:
        return self._get(f"http://{self.address(backend)}/") == (200, f"backend {backend}\n")

    def _etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run([binary("etcdctl"), f"--endpoints={self.etcd_url}", *args], env=env,
                              capture_output=True, check=check)  # fmt: skip

    def register(self, address: str) -> None:
        """``etcdctl put /services/web/ADDRESS up``, as a backend registering itself would."""
        self._etcdctl("put", BACKENDS + address, "up")

    def deregister(self, address: str) -> None:
        """``etcdctl del /services/web/ADDRESS``."""
        self._etcdctl("del", BACKENDS + address)

    def deregister_all(self) -> None:
        """``etcdctl del --prefix /services/web/``: no backend left."""
        self._etcdctl("del", "--prefix", BACKENDS)

    def configure(self, keepalive: int = 16) -> None:
        """``etcdctl put /services/nginx/keepalive N``: the upstream's idle connections per worker."""
        self._etcdctl("put", KEEPALIVE, str(keepalive))

    # -- the pod ---------------------------------------------------------------------------------

    def write_config(self) -> Path:
        """infantry's settings file: the etcd source, the two templates, and nginx -t as the gate."""
        lines = [
            "source:",
            f"  - url: etcd://127.0.0.1:{self.etcd_port}/services/",
            f"dest: {json.dumps(str(self.configs))}",
            "templates:",
            *(f"  - src: {json.dumps((HERE / src).as_uri())}\n    dest: {dest}" for dest, src in TEMPLATES.items()),
            "template_env: [NGINX_LISTEN]",
            "raw: none  # the keys themselves are not files nginx should see",
            f"check: {json.dumps(shlex.join(['sh', str(HERE / 'check.sh')]))}",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def install(self) -> subprocess.CompletedProcess[str]:
        """``infantry install --config infantry.yaml``: render, check and publish the first set."""
        self.write_config()
        return subprocess.run([*self.infantry, "install", "--config", str(self.config)], env=self.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def start_nginx(self) -> None:
        """nginx with its own prefix, pid file and temp paths, including every published ``*.conf``."""
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""
        (w / "nginx.conf").write_text(
            f"""{user}
daemon off;
pid "{w}/nginx.pid";
worker_processes 1;
error_log "{w}/nginx-error.log";
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path "{w}/tmp-body";
    proxy_temp_path "{w}/tmp-proxy";
    fastcgi_temp_path "{w}/tmp-fastcgi";
    uwsgi_temp_path "{w}/tmp-uwsgi";
    scgi_temp_path "{w}/tmp-scgi";
    include "{self.configs}/*.conf";
}}
"""
        )
        self.nginx = self._spawn(
            [binary("nginx"), "-p", str(w), "-e", str(w / "nginx-error.log"), "-c", str(w / "nginx.conf")], "nginx.log"
        )
        wait_for("nginx to proxy", lambda: self._get(self.url)[0] == 200)

    def start_watch(self) -> None:
        """``infantry watch``, signalling nginx's master (found through its pid file) with HUP."""
        self._spawn([*self.infantry, "watch", "--config", str(self.config),
                     "--pid-file", str(self.workdir / "nginx.pid"), "--signal", "HUP",
                     "--listen", f"127.0.0.1:{self.health_port}"], "watch.log", env=self.env)  # fmt: skip
        wait_for("infantry watch to be ready", lambda: self.probe("/readyz")[0] == 200)

    def start(self) -> None:
        """The whole pod, with backend one registered: etcd, backends, install, nginx, watch."""
        self.start_store()
        self.configure()
        self.register(self.address("one"))
        result = self.install()
        if result.returncode != 0:
            raise RuntimeError(f"infantry install exited {result.returncode}: {result.stderr.strip()}")
        self.start_nginx()
        self.start_watch()

    # -- looking at it ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    @staticmethod
    def _get(url: str) -> tuple[int, str]:
        """Status and body of a GET on a new connection; 0 when nothing answers."""
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status), str(resp.read().decode())
        except urllib.error.HTTPError as exc:
            return int(exc.code), str(exc.read().decode(errors="replace"))
        except OSError:
            return 0, ""

    def answers(self, requests: int = 6) -> list[str]:
        """Who answered each of ``requests`` requests to nginx, in order (``backend one``, ...)."""
        out = []
        for _ in range(requests):
            status, body = self._get(self.url)
            out.append(body.strip() if status == 200 else f"HTTP {status}")
        return out

    def serves(self, backends: Iterable[str]) -> bool:
        """True if nginx's answers come from exactly ``backends`` (names), each of them at least once."""
        return set(self.answers(2 * len(self.backends) + 2)) == {f"backend {name}" for name in backends}

    def probe(self, path: str) -> tuple[int, str]:
        """infantry watch's answer on ``/readyz``, ``/healthz`` or ``/status``."""
        return self._get(f"http://127.0.0.1:{self.health_port}{path}")

    def published(self) -> dict[str, str]:
        """The files nginx includes, read through their published names."""
        return {path.name: path.read_text() for path in sorted(self.configs.glob("*.conf"))}

    def nginx_pids(self) -> tuple[int, set[int]]:
        """nginx's master PID and its workers' PIDs."""
        assert self.nginx is not None
        master = self.nginx.pid
        workers = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == master and fields[0] != "Z":
                    workers.add(int(entry.name))
        return master, workers

    def reloaded(self, old_workers: set[int]) -> bool:
        """True once none of ``old_workers`` is left: every request is served with the new configuration."""
        return not (self.nginx_pids()[1] & old_workers)

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if proc is self.nginx else signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="infantry-template-pod-") as tmp:
        pod = TemplatePod(Path(tmp))

        def say(line: str) -> None:
            print(f"==> {line}", flush=True)

        def show_answers() -> None:
            say(f"nginx answers: {', '.join(pod.answers(4))}")

        try:
            say(f"starting etcd, backend one ({pod.address('one')}) and backend two ({pod.address('two')}) in {tmp}")
            pod.start_store()
            say(f"etcdctl put {KEEPALIVE} 16")
            pod.configure(16)
            say(f"etcdctl put {BACKENDS}{pod.address('one')} up")
            pod.register(pod.address("one"))
            say(f"infantry install --config {pod.config}")
            result = pod.install()
            if result.returncode != 0:
                raise RuntimeError(f"infantry install exited {result.returncode}: {result.stderr.strip()}")
            for name, text in pod.published().items():
                print(f"--- configs/{name}\n{text.rstrip()}", flush=True)
            say("starting nginx (include configs/*.conf) and infantry watch --pid-file nginx.pid --signal HUP")
            pod.start_nginx()
            pod.start_watch()
            show_answers()

            say(f"etcdctl put {BACKENDS}{pod.address('two')} up")
            _, workers = pod.nginx_pids()
            pod.register(pod.address("two"))
            wait_for("both backends to answer", lambda: pod.serves({"one", "two"}))
            wait_for("nginx's old workers to finish", lambda: pod.reloaded(workers))
            show_answers()

            say(f"etcdctl put {BACKENDS}{NOWHERE} up   (a port nginx refuses)")
            _, workers = pod.nginx_pids()
            pod.register(NOWHERE)
            wait_for("the check to refuse the set", lambda: "refused" in pod.probe("/readyz")[1])
            say(f"/readyz: {' '.join(map(str, pod.probe('/readyz'))).strip()}")
            say(f"nginx was not reloaded: {pod.nginx_pids()[1] == workers}")
            show_answers()
            say(f"etcdctl del {BACKENDS}{NOWHERE}")
            pod.deregister(NOWHERE)
            wait_for("infantry to be ready again", lambda: pod.probe("/readyz")[0] == 200)
            say(f"/readyz: {' '.join(map(str, pod.probe('/readyz'))).strip()}")

            say(f"etcdctl del {BACKENDS}{pod.address('one')}")
            _, workers = pod.nginx_pids()
            pod.deregister(pod.address("one"))
            wait_for("only backend two to answer", lambda: pod.serves({"two"}))
            wait_for("nginx's old workers to finish", lambda: pod.reloaded(workers))
            show_answers()

            say(f"etcdctl del --prefix {BACKENDS}   (no backend left: the template calls fail())")
            before = pod.published()
            pod.deregister_all()
            wait_for("the template to refuse the set", lambda: "no backends" in pod.probe("/readyz")[1])
            say(f"/readyz: {' '.join(map(str, pod.probe('/readyz'))).strip()}")
            say(f"/healthz: {' '.join(map(str, pod.probe('/healthz'))).strip()}   (until --stale-after)")
            say(f"the last good set stays: {pod.published() == before}")
            show_answers()

            say(f"etcdctl put {BACKENDS}{pod.address('one')} up")
            _, workers = pod.nginx_pids()
            pod.register(pod.address("one"))
            wait_for("backend one to answer again", lambda: pod.serves({"one"}))
            wait_for("nginx's old workers to finish", lambda: pod.reloaded(workers))
            wait_for("infantry to be ready again", lambda: pod.probe("/readyz")[0] == 200)
            show_answers()
            say(f"/readyz: {' '.join(map(str, pod.probe('/readyz'))).strip()}")
        finally:
            pod.stop()
        say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
