"""Fixtures that start real servers and processes, and always stop them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support import (
    FIGURES,
    CuttableProxy,
    Etcd,
    Nginx,
    ReloadEndpoint,
    SignalRecorder,
    TlsFiles,
    Watch,
    free_port,
)

# secret_guard fails the session if a test secret appears in any test's output; pytester tests it.
pytest_plugins = ["pytester", "tests.secret_guard"]

# Hypothesis's default 200 ms deadline per example and its too_slow check measure the machine, not the
# code: on a busy CI machine they fail examples that are correct. The pytest timeout still bounds a hang.
settings.register_profile("infantry", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("infantry")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("figures measured", sep="=")
        for line in FIGURES:
            terminalreporter.line(line)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx", free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("infantry-client@example.test")
    d = tmp_path_factory.mktemp("tls")
    files = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


@pytest.fixture
def nginx_tls(tmp_path: Path, tls_files: TlsFiles) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx-tls", free_port(), tls_port=free_port(), tls=tls_files)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[SignalRecorder]:
    recorder = SignalRecorder(tmp_path)
    yield recorder
    recorder.stop()


@pytest.fixture
def reload_endpoint() -> Iterator[ReloadEndpoint]:
    endpoint = ReloadEndpoint()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    """Every `infantry watch` a test starts; any still running at the end is stopped."""
    started: list[Watch] = []
    yield started
    for watch in started:
        if watch.proc.poll() is None:
            watch.proc.kill()
            watch.proc.wait()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    server = Etcd(tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_proxy(etcd: Etcd) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(etcd.port)
    yield proxy
    proxy.close()
