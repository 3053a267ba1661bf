"""The private Docker engine leaves the host as it found it, even when a test stops half-way.

Each test makes the engine add everything it can (a bridge network, a veth, a published port with its
iptables rules and proxy, overlay mounts, a running container), never cleans up with Docker's own
commands, and checks the host afterwards by its own reading, not by what ``stop`` reports.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests import base_images
from tests.docker_engine import DockerEngine, _host_files, _iptables_save, _links, _mounts_under, missing_programs
from tests.support import IN_CI, free_port

pytestmark = pytest.mark.timeout(600)
BASE = base_images.named_images()[0]


@pytest.fixture(autouse=True)
def _engine_programs() -> None:
    if missing := missing_programs():
        message = f"missing {', '.join(missing)}; `make test` installs Debian's docker.io when run as root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _host() -> tuple[set[str], str, str, set[str]]:
    return _links(), _iptables_save(), Path("/proc/sys/net/ipv4/ip_forward").read_text(), _host_files()


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


def test_stop_removes_what_a_running_engine_added(tmp_path: Path) -> None:
    before = _host()
    links = before[0]
    engine = DockerEngine()
    try:
        engine.start()
        pid = _busy(engine)
        assert _links() - links, "the engine was expected to add a bridge and a veth"
        assert _mounts_under(engine.root), "the engine was expected to mount its container's root"
    finally:
        problems = engine.stop()
    assert problems == []
    assert _host() == before
    assert _gone(pid)
    assert not engine.root.exists()
    assert not _mounts_under(engine.root)


def test_an_engine_left_by_a_killed_run_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    before = _host()
    abandoned = DockerEngine()
    second = DockerEngine()
    try:
        abandoned.start()
        pid = _busy(abandoned)
        # The run dies: its dockerd is killed outright, and nothing of it is stopped or restored.
        assert abandoned.process is not None
        os.killpg(abandoned.process.pid, signal.SIGKILL)
        abandoned.process.wait(30)
        assert abandoned._lock is not None
        os.close(abandoned._lock)
        abandoned._lock = None
        abandoned.process = None
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
