"""The health listener of a real `infantry watch` under hostile clients: bounded, and still answering probes."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infantry.health import MAX_CONNECTIONS, MAX_REQUEST_BYTES, REQUEST_TIMEOUT_SECONDS
from tests.support import Watch, holds_for, installed_store, wait_until

IDLE_CLIENTS = 500
# What a kubelet probe waits by default is 1 s; a busy 2-core machine gets a few more.
PROBE_SECONDS = 5.0
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: infantry\r\n"  # the blank line that ends the head never comes


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def half_sent(port: int) -> socket.socket:
    """A client that sends part of a request head and then says nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(HALF_SENT)
    sock.setblocking(False)
    return sock


def dropped(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` without answering; a reply fails the test."""
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    assert data == b"", f"an incomplete request was answered: {data[:200]!r}"
    return True


def request(port: int, raw: bytes) -> tuple[bytes, float]:
    """Send ``raw`` on a new connection; what came back before the close (b"" for none, or a reset), and how
    long it took."""
    started = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_SECONDS * 3) as sock:
        try:
            sock.sendall(raw)
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionError:
            pass  # closed with part of the request unread: a reset, which is a refusal too
    return answer, time.monotonic() - started


def probe(port: int) -> tuple[bytes, float]:
    return request(port, b"GET /healthz HTTP/1.1\r\nHost: infantry\r\nUser-Agent: kube-probe/1.31\r\n\r\n")


@pytest.fixture
def watch(tmp_path: Path, watches: list[Watch]) -> Watch:
    store, dest = installed_store(tmp_path, {"app.yaml": "v: 1\n"})
    started = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest)])
    watches.append(started)
    started.wait_ready()
    return started


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_500_idle_half_sent_requests_stay_bounded_and_the_probe_is_still_answered(
    watch: Watch, clients: list[socket.socket]
) -> None:
    pid = watch.proc.pid
    assert probe(watch.port)[0].startswith(b"HTTP/1.0 200")  # whatever the first request sets up, it has now
    base_threads, base_fds = threads(pid), open_fds(pid)
    peak_threads, peak_fds = base_threads, base_fds
    for n in range(IDLE_CLIENTS):
        clients.append(half_sent(watch.port))
        if n % 25 == 0:
            peak_threads, peak_fds = max(peak_threads, threads(pid)), max(peak_fds, open_fds(pid))
    # Fresh idle clients, so that every slot is held by one that has waited only a moment when the probe comes.
    clients.extend(half_sent(watch.port) for _ in range(MAX_CONNECTIONS))
    peak_threads, peak_fds = max(peak_threads, threads(pid)), max(peak_fds, open_fds(pid))

    answer, took = probe(watch.port)
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"\r\n\r\nok\n"), answer
    assert took < PROBE_SECONDS, f"the probe took {took:.1f}s"

    print(f"threads {base_threads} -> peak {peak_threads}; descriptors {base_fds} -> peak {peak_fds}")
    assert peak_threads <= base_threads + 2, (base_threads, peak_threads)
    # The connections held, the one being accepted, the one it pushed out (not yet closed), and room for a
    # file the resync may have open.
    assert peak_fds <= base_fds + MAX_CONNECTIONS + 4, (base_fds, peak_fds)

    # Every idle client is dropped: pushed out by a newer one, or at the end of its read timeout.
    wait_until(
        "every idle client to be dropped",
        lambda: all(dropped(sock) for sock in clients),
        timeout=REQUEST_TIMEOUT_SECONDS + 20,
        interval=0.1,
    )
    wait_until("the connections to be closed", lambda: open_fds(pid) <= base_fds + 1)
    assert watch.proc.poll() is None, watch.log()
    assert watch.get("/healthz")[0] == 200


def test_an_idle_client_is_dropped_at_the_read_timeout(watch: Watch, clients: list[socket.socket]) -> None:
    clients.append(sock := half_sent(watch.port))
    opened = time.monotonic()
    assert holds_for(lambda: not dropped(sock), 1.0)  # kept while it may still finish its request
    wait_until("the idle client to be dropped", lambda: dropped(sock), timeout=REQUEST_TIMEOUT_SECONDS + 20)
    assert time.monotonic() - opened >= REQUEST_TIMEOUT_SECONDS * 0.9


@pytest.mark.parametrize("ended", [True, False], ids=["whole-head", "head-never-ends"])
def test_an_oversized_request_head_is_refused_at_once_and_the_server_lives_on(watch: Watch, ended: bool) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: infantry\r\n" + b"X-Padding: " + b"a" * (2 * MAX_REQUEST_BYTES) + b"\r\n"
    answer, took = request(watch.port, head + (b"\r\n" if ended else b""))
    assert answer == b"" or answer.startswith(b"HTTP/1.0 431"), answer[:200]
    assert took < REQUEST_TIMEOUT_SECONDS, f"refused only after {took:.1f}s"
    assert probe(watch.port)[0].startswith(b"HTTP/1.0 200")
    assert watch.proc.poll() is None, watch.log()
    assert "Traceback" not in watch.log(), watch.log()
