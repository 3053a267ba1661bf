"""The image and the docker compose demo, built and run for real on a private Docker engine.

The engine is started for this module and stopped after it, with what it added to the host removed
(tests/docker_engine.py). Base images are pulled, or stood in for from Debian packages where no
registry can be reached (tests/base_images.py). The compose demo runs the README's own commands.
"""

from __future__ import annotations

import json
import re
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import base_images
from tests.docker_engine import DockerEngine, missing_programs
from tests.support import IN_CI, free_port, report_figure, wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
IMAGE = "infantry:0.1.0"
# Building the image from nothing takes a minute or two, and more on a busy machine.
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    if missing := missing_programs():
        message = f"missing {', '.join(missing)}; `make test` installs Debian's docker.io when run as root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    if not Path("/usr/bin/mmdebstrap").exists():
        pytest.fail("mmdebstrap is missing; `make test` installs it when run as root")
    started = time.monotonic()
    docker = DockerEngine()
    try:
        docker.start()
        for outcome in base_images.ensure(docker):
            report_figure(f"base image {outcome.name}: {outcome.how} in {outcome.seconds:.1f} s")
        report_figure(f"private engine with base images ready in {time.monotonic() - started:.1f} s")
        yield docker
    finally:
        problems = docker.stop()
    assert not problems, f"the engine left things behind: {problems}"


@pytest.fixture(scope="module")
def image(engine: DockerEngine) -> str:
    started = time.monotonic()
    engine.docker("build", "-f", "docker/Dockerfile", "-t", IMAGE, ".", cwd=ROOT, timeout=1200)
    report_figure(f"docker build of {IMAGE}: {time.monotonic() - started:.1f} s")
    return IMAGE


def _inspect(engine: DockerEngine, kind: str, name: str) -> dict[str, object]:
    found = json.loads(engine.docker(kind, "inspect", name).stdout)
    assert isinstance(found, list) and len(found) == 1
    item = found[0]
    assert isinstance(item, dict)
    return item


def test_image_is_non_root_small_and_has_the_package_version(engine: DockerEngine, image: str) -> None:
    config = _inspect(engine, "image", image)["Config"]
    assert isinstance(config, dict)
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["infantry"]
    base = base_images.named_images()[0]
    added = int(str(_inspect(engine, "image", image)["Size"])) - int(str(_inspect(engine, "image", base)["Size"]))
    report_figure(f"image size over its base ({base}): {added / 1e6:.1f} MB")
    assert 0 < added <= 40e6, f"the image adds {added / 1e6:.1f} MB over {base}"
    version = engine.docker("run", "--rm", "--read-only", "--user", "65532", image, "--version").stdout
    assert version.strip() == "infantry, version 0.1.0"


def test_install_publishes_into_a_named_volume_read_only_as_65532(
    engine: DockerEngine, image: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    (store / "conf.d").mkdir(parents=True)
    (store / "app.conf").write_text("color = blue\n")
    (store / "conf.d" / "extra.conf").write_text("x" * 5000)
    engine.docker("volume", "create", "infantry-test-configs")
    try:
        engine.docker(
            "run", "--rm", "--read-only", "--user", "65532",
            "-v", "infantry-test-configs:/configs", "-v", f"{store}:/store:ro",
            image, "install", "--source", "file:///store",
        )  # fmt: skip
        mountpoint = Path(str(_inspect(engine, "volume", "infantry-test-configs")["Mountpoint"]))
        assert (mountpoint / "..data").is_symlink()
        assert (mountpoint / "app.conf").read_text() == "color = blue\n"
        assert (mountpoint / "conf.d" / "extra.conf").read_text() == "x" * 5000
        assert (mountpoint / "..data" / "app.conf").stat().st_uid == 65532
        assert not (mountpoint / "..spool").exists()
    finally:
        engine.docker("volume", "rm", "infantry-test-configs", check=False)


# -- the compose demo, as the README shows it ---------------------------------------------------------


def readme_demo() -> list[tuple[str, str]]:
    """The README's compose demo: (command, the comment after it) for each line of its sh block."""
    section = README.read_text().split("## The docker compose demo", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's compose demo has no sh block"
    steps = []
    for line in block.group(1).splitlines():
        command, _, comment = line.partition("  #")
        if command.strip():
            steps.append((command.strip(), comment.strip()))
    return steps


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
            body: bytes = response.read()
            return body.decode()
    except (OSError, urllib.error.URLError):
        return ""


def _nginx_processes(engine: DockerEngine, container: str) -> tuple[int, set[int]]:
    """The host PIDs of nginx's master and of its workers in ``container``."""
    rows = engine.docker("top", container, "-eo", "pid,args").stdout.splitlines()[1:]
    master, workers = 0, set()
    for row in rows:
        pid, _, args = row.strip().partition(" ")
        if "nginx: master" in args:
            master = int(pid)
        elif "nginx: worker" in args:
            workers.add(int(pid))
    return master, workers


def _container(engine: DockerEngine, service: str) -> str:
    found = engine.docker(
        "ps", "-q", "--filter", "label=com.docker.compose.project=infantry-demo",
        "--filter", f"label=com.docker.compose.service={service}",
    ).stdout.split()  # fmt: skip
    assert len(found) == 1, f"{service}: {found}"
    return found[0]


def test_compose_demo_runs_as_the_readme_shows(engine: DockerEngine) -> None:
    steps = readme_demo()
    shapes = [command.split()[:4] if command.startswith("docker") else command.split()[:1] for command, _ in steps]
    assert shapes == [
        ["docker", "compose", "-f", "docker/compose.yaml"], ["curl"],
        ["docker", "compose", "-f", "docker/compose.yaml"], ["curl"],
        ["docker", "compose", "-f", "docker/compose.yaml"],
    ], "the README's demo is expected to be: up, curl, exec (a put), curl, down"  # fmt: skip
    (up, _), (curl_blue, said_blue), (put, _), (curl_green, said_green), (down, _) = steps
    assert " up " in f"{up} " and " put " in put and " down " in f"{down} "
    port = free_port()
    engine.env["INFANTRY_DEMO_PORT"] = str(port)
    finished = False
    try:
        started = time.monotonic()
        _run_readme_line(engine, up)
        report_figure(f"docker compose up --build -d: {time.monotonic() - started:.1f} s")
        _shows(curl_blue, said_blue, port, timeout=120)
        watcher = _container(engine, "infantry-watch")
        wait_until("infantry-watch to report healthy", lambda: _health(engine, watcher) == "healthy", timeout=120)
        app = _container(engine, "app")
        master, workers = _nginx_processes(engine, app)
        assert master and workers, f"no nginx master and workers in the app container: {master}, {workers}"

        put_started = time.monotonic()
        _run_readme_line(engine, put)
        put_done = time.monotonic()
        _shows(curl_green, said_green, port, timeout=60)
        served = time.monotonic()
        report_figure(
            f"etcd put to nginx serving the new config: {served - put_done:.2f} s after `exec etcd etcdctl put` "
            f"returned ({served - put_started:.2f} s from starting that command)"
        )
        assert _nginx_processes(engine, app)[0] == master, "nginx's master was replaced, not signalled"
        wait_until("nginx's workers to be replaced", lambda: not _nginx_processes(engine, app)[1] & workers)

        # Beyond the README's five lines, as it says to do: restart the app, which ends the watcher too (it
        # shares the app's PID namespace), then start the watcher again; it goes on following the store.
        watcher_started = _started_at(engine, watcher)
        engine.docker("compose", "-f", "docker/compose.yaml", "restart", "app", cwd=ROOT)
        wait_until("the watcher to end with the app", lambda: not _running(engine, watcher), timeout=60)
        engine.docker("compose", "-f", "docker/compose.yaml", "start", "infantry-watch", cwd=ROOT)
        wait_until("infantry-watch to be started again and healthy",
                   lambda: _started_at(engine, watcher) != watcher_started and _health(engine, watcher) == "healthy",
                   timeout=120)  # fmt: skip
        yellow = 'location / { return 200 "color: yellow\n"; }'
        engine.docker("compose", "-f", "docker/compose.yaml", "exec", "etcd", "etcdctl", "put", "/demo/site.conf",
                      yellow, cwd=ROOT)  # fmt: skip
        _shows("curl localhost:8080", "color: yellow", port, timeout=60)

        _run_readme_line(engine, down)
        finished = True
    finally:
        if not finished:  # the engine's own stop removes the rest
            engine.docker("compose", "-f", "docker/compose.yaml", "down", "-v", cwd=ROOT, check=False)
    assert not (left := _leftovers(engine)), f"`down -v` left these behind: {left}"


def _run_readme_line(engine: DockerEngine, line: str) -> None:
    args = shlex.split(line)
    assert args[0] == "docker"
    engine.docker(*args[1:], cwd=ROOT, timeout=1200)


def _shows(curl: str, comment: str, port: int, timeout: float) -> None:
    """Wait until the README's ``curl`` line, on ``port``, shows what its comment says it does."""
    expected = re.search(r"color: (\w+)", comment)
    assert expected, f"the README says nothing of what {curl!r} shows"
    url = "http://" + curl.split()[1].replace("localhost:8080", f"127.0.0.1:{port}")
    want = f"color: {expected.group(1)}\n"
    wait_until(f"{url} to show {want!r}", lambda: _get(url) == want, timeout=timeout)


def _health(engine: DockerEngine, container: str) -> str:
    state = _inspect(engine, "container", container)["State"]
    assert isinstance(state, dict)
    health = state.get("Health")
    return str(health["Status"]) if isinstance(health, dict) else "none"


def _running(engine: DockerEngine, container: str) -> bool:
    state = _inspect(engine, "container", container)["State"]
    assert isinstance(state, dict)
    return bool(state["Running"])


def _started_at(engine: DockerEngine, container: str) -> str:
    state = _inspect(engine, "container", container)["State"]
    assert isinstance(state, dict)
    return str(state["StartedAt"])


def _leftovers(engine: DockerEngine) -> list[str]:
    containers = engine.docker("ps", "-aq").stdout.split()
    volumes = engine.docker("volume", "ls", "-q").stdout.split()
    networks = [n for n in engine.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
                if n not in ("bridge", "host", "none")]  # fmt: skip
    return (
        [f"container {c}" for c in containers] + [f"volume {v}" for v in volumes] + [f"network {n}" for n in networks]
    )
