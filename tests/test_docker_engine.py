"""The private Docker engine leaves the host as it found it, even when a test stops half-way.

Each test makes the engine add everything it can (a bridge network, a veth, a published port with its
iptables rules and proxy, overlay mounts, a running container), never cleans up with Docker's own
commands, and checks the host afterwards by its own reading, not by what ``stop`` reports. The host is
read while holding the engines' lock, so another run's engine cannot come and go in between.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests import base_images
from tests.docker_engine import (
    DockerEngine,
    exclusive,
    host_files,
    iptables_rules,
    links,
    missing_programs,
    mounts_under,
)
from tests.support import IN_CI, free_port

pytestmark = pytest.mark.timeout(1200)
BASE = base_images.named_images()[0]


@pytest.fixture(autouse=True)
def _engine_programs() -> None:
    if missing := missing_programs():
        message = f"missing {', '.join(missing)}; `make test` installs Debian's docker.io when run as root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _host() -> tuple[set[str], str, str, set[str]]:
    return links(), iptables_rules(), Path("/proc/sys/net/ipv4/ip_forward").read_text(), host_files()


def _busy(engine: DockerEngine) -> int:
    """Give ``engine`` a network and a container on it with a published port; return the container's PID."""
    base_images.ensure(engine)
    engine.docker("network", "create", "infantry-leak-test")
    container = engine.docker(
        "run", "-d", "--network", "infantry-leak-test", "-p", f"127.0.0.1:{free_port()}:8000",
        BASE, "python3", "-m", "http.server", "8000",
    ).stdout.strip()  # fmt: skip
    assert engine.docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true"
    return int(engine.docker("inspect", "-f", "{{.State.Pid}}", container).stdout)


def _gone(pid: int) -> bool:
    try:
        return b"http.server" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def test_stop_removes_what_a_running_engine_added() -> None:
    with exclusive():
        before = _host()
        engine = DockerEngine()
        try:
            engine.start()
            pid = _busy(engine)
            assert links() - before[0], "the engine was expected to add a bridge and a veth"
            assert iptables_rules() != before[1], "the engine was expected to add iptables rules"
            assert mounts_under(engine.root), "the engine was expected to mount its container's root"
        finally:
            problems = engine.stop()
        assert problems == []
        assert _host() == before
    assert _gone(pid)
    assert not engine.root.exists()


def test_rules_someone_else_adds_meanwhile_stay() -> None:
    rule = ["INPUT", "-s", "127.0.0.2/32", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"]
    with exclusive():
        engine = DockerEngine()
        try:
            engine.start()
            subprocess.run(["iptables", "-A", *rule], check=True)
        finally:
            problems = engine.stop()
        try:
            assert problems == []
            assert subprocess.run(["iptables", "-C", *rule]).returncode == 0, "another program's rule was removed"
        finally:
            subprocess.run(["iptables", "-D", *rule], check=False)


def test_an_engine_left_by_a_killed_run_is_cleaned_up_by_the_next() -> None:
    with exclusive():
        before = _host()
        abandoned = DockerEngine()
        second = DockerEngine()
        try:
            abandoned.start()
            pid = _busy(abandoned)
            # The run dies: dockerd and containerd are killed outright, and nothing is stopped or restored.
            for process in (abandoned.process, abandoned.containerd):
                assert process is not None
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
            abandoned.process = abandoned.containerd = None
            assert abandoned.root.exists()
            assert not _gone(pid), "the container was expected to outlive its engine"

            second.start()
            assert not abandoned.root.exists()
            assert _gone(pid)
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
            assert str(abandoned.root) not in ps
        finally:
            second.stop()
            abandoned.stop()
        assert _host() == before
