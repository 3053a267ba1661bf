"""The infantry pod as plain processes on one machine: a real etcd, `infantry install`, a real nginx, and
`infantry watch` signalling nginx's master process by name, as in a pod with shareProcessNamespace.

Run it: `examples/local/run.sh` (or `python examples/local/pod.py`). It starts everything, shows the page,
changes a key in etcd, shows the page again, and stops everything. It needs etcd, etcdctl and nginx
(`make test` installs them) and infantry on the PATH of the Python running it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

KEY = "/demo/site.conf"


def site(color: str) -> str:
    """The nginx snippet kept in etcd: the page nginx serves."""
    return f'location / {{ default_type text/plain; return 200 "color: {color}\\n"; }}\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if found is None:
        raise SystemExit(f"{name} is not installed (Debian: etcd-server, etcd-client, nginx-light)")
    return found


class LocalPod:
    """etcd (the store), then the pod: install, nginx (the app) and watch (the sidecar)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.configs = workdir / "configs"
        self.etcd_port, self.peer_port, self.http_port, self.health_port = (free_port() for _ in range(4))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.infantry = [sys.executable, "-m", "infantry"]

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = (self.workdir / log).open("ab")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self, color: str = "blue") -> None:
        self._spawn([binary("etcd"), "--name", "demo", "--data-dir", str(self.workdir / "etcd"),
                     "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                     "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                     "--initial-cluster", f"demo=http://127.0.0.1:{self.peer_port}"], "etcd.log")  # fmt: skip
        wait_for("etcd", lambda: self._etcdctl("endpoint", "health", check=False).returncode == 0)
        self.put(color)
        source = f"etcd://127.0.0.1:{self.etcd_port}/demo/"
        subprocess.run([*self.infantry, "install", "--source", source, "--dest", str(self.configs)], check=True)
        self._start_nginx()
        self._spawn([*self.infantry, "watch", "--source", source, "--dest", str(self.configs), "--process", "nginx",
                     "--signal", "HUP", "--listen", f"127.0.0.1:{self.health_port}"], "watch.log")  # fmt: skip
        wait_for(
            "infantry watch to be ready", lambda: self._status(f"http://127.0.0.1:{self.health_port}/readyz") == 200
        )

    def _start_nginx(self) -> None:
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""
        (w / "nginx.conf").write_text(
            f"""{user}
daemon off;
pid {w}/nginx.pid;
worker_processes 1;
error_log {w}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {w}/tmp-body;
    proxy_temp_path {w}/tmp-proxy;
    fastcgi_temp_path {w}/tmp-fastcgi;
    uwsgi_temp_path {w}/tmp-uwsgi;
    scgi_temp_path {w}/tmp-scgi;
    server {{
        listen 127.0.0.1:{self.http_port};
        include {self.configs}/site.conf;
    }}
}}
"""
        )
        self.nginx = self._spawn(
            [binary("nginx"), "-p", str(w), "-e", str(w / "nginx-error.log"), "-c", str(w / "nginx.conf")], "nginx.log"
        )
        wait_for("nginx to serve", lambda: self._status(f"http://127.0.0.1:{self.http_port}/") == 200)

    def _etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run([binary("etcdctl"), f"--endpoints={self.etcd_url}", *args], env=env,
                              capture_output=True, check=check)  # fmt: skip

    def put(self, color: str) -> None:
        """Change the key in etcd, as an operator would."""
        self._etcdctl("put", KEY, site(color))

    @staticmethod
    def _status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status)
        except OSError:
            return 0

    def page(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/", timeout=2) as resp:
            return str(resp.read().decode())

    def nginx_pids(self) -> tuple[int, set[int]]:
        """nginx's master PID and its workers' PIDs."""
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

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if proc is getattr(self, "nginx", None) else signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="infantry-local-pod-") as tmp:
        pod = LocalPod(Path(tmp))
        try:
            print(f"==> starting etcd, infantry install, nginx and infantry watch in {tmp}", flush=True)
            pod.start("blue")
            master, workers = pod.nginx_pids()
            print(f"==> nginx serves: {pod.page().strip()}   (master {master}, workers {sorted(workers)})", flush=True)
            print("==> etcdctl put /demo/site.conf ... color: green", flush=True)
            started = time.monotonic()
            pod.put("green")
            wait_for("the new page", lambda: "green" in pod.page(), timeout=5)
            took = time.monotonic() - started
            wait_for("nginx's new workers", lambda: not (pod.nginx_pids()[1] & workers), timeout=10)
            master_after, workers_after = pod.nginx_pids()
            print(f"==> nginx serves: {pod.page().strip()}   after {took:.2f}s "
                  f"(master {master_after}, workers {sorted(workers_after)}: reloaded)", flush=True)  # fmt: skip
        finally:
            pod.stop()
        print("==> stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
