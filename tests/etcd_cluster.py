"""A real three-member etcd cluster on loopback, for the failover tests and the failover benchmark."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import b64, free_port, port_open, require_binary, wait_until

# Elections in well under a second, yet not so eager that a busy 2-core machine starts one for nothing.
HEARTBEAT_MS = 100
ELECTION_MS = 1000


class Member:
    """One etcd process of the cluster, with its own ports and data directory."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, initial_cluster: str, token: str) -> None:
        args = [
            require_binary("etcd", "etcd-server"),
            "--name", self.name,
            "--data-dir", str(self.workdir / "data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            "--experimental-watch-progress-notify-interval", "1s",
            "--log-level", "error",
        ]  # fmt: skip
        log = (self.workdir / "etcd.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self) -> None:
        """SIGKILL, and wait until its client port is closed."""
        if self.proc is not None and self.proc.poll() is None:
            if self.stopped:
                self.cont()
            self.proc.kill()
            self.proc.wait()
        wait_until(f"{self.name}'s port to close", lambda: not port_open(self.port), timeout=10)

    def stop_process(self) -> None:
        """SIGSTOP: the port stays open and connections are accepted, but nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def log(self) -> str:
        path = self.workdir / "etcd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class EtcdCluster:
    """A three-member etcd cluster on loopback: start, kill, freeze and restart members; read and write."""

    def __init__(self, workdir: Path, size: int = 3, ports: list[int] | None = None) -> None:
        """``ports``: the members' client ports (a cluster rebuilt where another one was); free ones if not given."""
        self.members = [Member(workdir / f"m{i}", f"m{i}") for i in range(size)]
        for member, port in zip(self.members, ports or [], strict=False):
            member.port = port
        self.token = f"infantry-{os.getpid()}-{free_port()}"
        self._lock = threading.Lock()

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def url(self, prefix: str = "/app/") -> str:
        """The source URL naming every member, in order."""
        return "etcd://" + ",".join(f"127.0.0.1:{m.port}" for m in self.members) + prefix

    def start(self, only: list[int] | None = None) -> None:
        """Start every member, or those ``only`` names (all at once: a new cluster needs a quorum to elect
        a leader)."""
        for index, member in enumerate(self.members):
            if only is None or index in only:
                member.start(self.initial_cluster, self.token)
        self.wait_healthy()

    def start_member(self, index: int) -> None:
        """Start a member again on its own data directory (it rejoins the cluster)."""
        self.members[index].start(self.initial_cluster, self.token)

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every running member answers a linearizable read (so a leader exists and it follows it)."""

        def healthy() -> bool:
            for member in self.members:
                if not member.running or member.stopped:
                    continue
                if not self._answers(member):
                    return False
            return True

        wait_until("every etcd member to answer", healthy, timeout=timeout, interval=0.05)

    def _answers(self, member: Member) -> bool:
        try:
            with httpx.Client(timeout=2) as client:
                resp = client.post(member.endpoint + "/v3/kv/range", json={"key": b64("\0")})
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def status(self, member: Member) -> dict[str, Any] | None:
        """The member's /v3/maintenance/status answer, or None if it does not answer."""
        try:
            with httpx.Client(timeout=2) as client:
                resp = client.post(member.endpoint + "/v3/maintenance/status", json={})
            resp.raise_for_status()
            answer: dict[str, Any] = resp.json()
        except (httpx.HTTPError, ValueError):
            return None
        return answer

    def leader(self, timeout: float = 30) -> int:
        """The index of the member that leads now, once the running members agree on one."""
        found: list[int] = []

        def agreed() -> bool:
            ids: dict[str, int] = {}
            leaders: set[str] = set()
            for index, member in enumerate(self.members):
                if not member.running or member.stopped:
                    continue
                answer = self.status(member)
                if answer is None:
                    return False
                ids[str(answer["header"]["member_id"])] = index
                leaders.add(str(answer.get("leader", "0")))
            if len(leaders) != 1:
                return False
            leader = leaders.pop()
            if leader not in ids:
                return False
            found[:] = [ids[leader]]
            return True

        wait_until("the members to agree on a leader", agreed, timeout=timeout, interval=0.05)
        return found[0]

    def call(self, path: str, body: dict[str, Any], timeout: float = 60, attempt: float = 5.0) -> dict[str, Any]:
        """POST to the first member that answers; tried again, member after member, until ``timeout``.

        A put that timed out is tried again, so it may be written twice in a row.
        """
        deadline = time.monotonic() + timeout
        last: str = ""
        with self._lock, httpx.Client(timeout=httpx.Timeout(attempt, connect=1.0)) as client:
            while time.monotonic() < deadline:
                for member in self.members:
                    if not member.running or member.stopped:
                        continue
                    try:
                        resp = client.post(member.endpoint + path, json=body)
                    except httpx.ConnectError as exc:
                        last = f"{member.name}: {exc}"
                        continue
                    except httpx.TimeoutException:
                        # A put may have been applied all the same: the tests' puts are such that one
                        # written twice in a row changes nothing they check.
                        last = f"{member.name}: timed out"
                        continue
                    if resp.status_code == 200:
                        answer: dict[str, Any] = resp.json()
                        return answer
                    last = f"{member.name}: HTTP {resp.status_code} {resp.text[:200]}"
                time.sleep(0.05)
        pytest.fail(f"no etcd member took {path} within {timeout}s: {last}")

    def put(self, key: str, value: str, attempt: float = 5.0) -> int:
        """Put, member after member; ``attempt`` bounds each try (a member whose leader just died may hold
        a proposal until etcd's own request timeout, 7 s with these settings)."""
        answer = self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)}, attempt=attempt)
        return int(answer["header"]["revision"])

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": b64("\0")})["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def keys(self, prefix: str = "/app/") -> dict[str, bytes]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        answer = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in answer.get("kvs", [])
        }

    def stop(self) -> None:
        """Kill every member: the data is thrown away, and a clean shutdown of a member that has lost its
        peers waits for them (seconds per test)."""
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.kill()
        for member in self.members:
            if member.proc is not None:
                member.proc.wait()


@contextlib.contextmanager
def running_cluster(workdir: Path) -> Iterator[EtcdCluster]:
    """A started cluster, always stopped at the end."""
    cluster = EtcdCluster(workdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
