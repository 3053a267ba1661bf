"""Hostile stores and misbehaving servers: every source fails with a clean error, and `watch` keeps following.

Real processes throughout: the infantry command line, `infantry watch`, real HTTP servers on loopback
sockets that misbehave on purpose (drip-feeding, long Retry-After, redirects, an etcd gateway that
answers absurdly deep JSON), and real directories that loop, escape or vanish under the reader.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.support import Watch, b64, free_port, infantry, read_as_app, serve_loopback, wait_until

NOBODY = 65534
INFANTRY = (sys.executable, "-m", "infantry")


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    """The command failed with ``code`` and one error line naming ``needle``: no traceback, no 'bug'."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "bug in infantry" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def start_watch(tmp_path: Path, watches: list[Watch], source: str, dest: Path, *extra: str) -> Watch:
    watch = Watch(tmp_path, ["--source", source, "--dest", str(dest), "--interval", "0.2", *extra])
    watches.append(watch)
    watch.wait_ready(timeout=20)
    return watch


def wait_for_log(watch: Watch, needle: str, timeout: float = 10) -> None:
    def logged() -> bool:
        assert watch.proc.poll() is None, f"infantry watch exited {watch.proc.returncode}:\n{watch.log()}"
        return needle in watch.log()

    wait_until(f"watch to log {needle!r}", logged, timeout)


def assert_following(watch: Watch) -> None:
    assert watch.proc.poll() is None, f"infantry watch exited {watch.proc.returncode}:\n{watch.log()}"
    assert "Traceback" not in watch.log() and "bug in infantry" not in watch.log(), watch.log()


# -- hostile file stores -----------------------------------------------------------------------------


def make_link_loop(store: Path) -> None:
    os.symlink("loop-b", store / "loop-a")
    os.symlink("loop-a", store / "loop-b")


def make_data_to_file(store: Path) -> None:
    (store / "..file").write_text("not a directory\n")
    os.symlink("..file", store / "..data")


def make_data_to_plain_name(store: Path) -> None:
    os.symlink("app.yaml", store / "..data")


def make_data_outside(store: Path) -> None:
    secret = store.parent / "secret"
    secret.mkdir(exist_ok=True)
    (secret / "token").write_text("TOP-SECRET\n")
    os.symlink("../secret", store / "..data")


def make_link_outside(store: Path) -> None:
    (store.parent / "outside.txt").write_text("TOP-SECRET\n")
    os.symlink("../outside.txt", store / "escape.txt")


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "link-loop": (make_link_loop, "link loop"),
    "data-to-file": (make_data_to_file, "not a directory"),
    "data-to-plain-name": (make_data_to_plain_name, "not to a '..' snapshot directory"),
    "data-outside": (make_data_outside, "not to a '..' snapshot directory"),
    "link-outside": (make_link_outside, "outside the tree"),
}


def repair(store: Path) -> None:
    """Take away everything the hostile makers added."""
    for name in ("loop-a", "loop-b", "..data", "..file", "escape.txt"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(store / name)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_install_refuses_a_hostile_file_store_with_exit_5(kind: str, tmp_path: Path) -> None:
    make, needle = HOSTILE[kind]
    store = tmp_path / "store"
    store.mkdir()
    (store / "app.yaml").write_text("v: 1\n")
    make(store)
    dest = tmp_path / "D"
    result = infantry("install", "--source", store.as_uri(), "--dest", str(dest), "--timeout", "5")
    assert_clean_failure(result, 5, needle)
    assert not dest.exists() or "TOP-SECRET" not in str(read_as_app(dest))


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_watch_survives_a_hostile_file_store_and_keeps_following(
    kind: str, tmp_path: Path, watches: list[Watch]
) -> None:
    make, needle = HOSTILE[kind]
    store = tmp_path / "store"
    store.mkdir()
    (store / "app.yaml").write_text("v: 1\n")
    dest = tmp_path / "D"
    watch = start_watch(tmp_path, watches, store.as_uri(), dest)
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}

    make(store)
    wait_for_log(watch, needle)
    assert_following(watch)
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}

    repair(store)
    (store / "app.yaml").write_text("v: 2\n")
    wait_until("the repaired store's content", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"}, timeout=15)
    assert_following(watch)


def test_a_one_file_source_may_be_a_link_into_a_configmap_volume(tmp_path: Path) -> None:
    # The guard against links changing under the reader must not refuse the file the URL itself names.
    volume = tmp_path / "volume"
    (volume / "..2026_01_01").mkdir(parents=True)
    (volume / "..2026_01_01" / "app.yaml").write_text("v: 1\n")
    os.symlink("..2026_01_01", volume / "..data")
    os.symlink("..data/app.yaml", volume / "app.yaml")
    dest = tmp_path / "D"
    result = infantry("install", "--source", (volume / "app.yaml").as_uri(), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}
    whole = infantry("install", "--source", volume.as_uri(), "--dest", str(tmp_path / "W"))
    assert whole.returncode == 0, whole.stderr
    assert read_as_app(tmp_path / "W") == {"app.yaml": "v: 1\n"}


# -- an unreadable sub-directory, seen by an unprivileged infantry -------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="infantry-hostile-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_unprivileged() -> list[str]:
    """The command prefix that runs infantry as nobody when the tests run as root (as `make test` does)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to run infantry as an unprivileged user")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def unreadable_store(shared: Path) -> tuple[Path, Path]:
    store, dest = shared / "store", shared / "D"
    store.mkdir(mode=0o755)
    (store / "app.yaml").write_text("v: 1\n")
    dest.mkdir()
    if os.geteuid() == 0:
        os.chown(dest, NOBODY, NOBODY)
    for path in (store, store / "app.yaml"):
        path.chmod(0o755)
    return store, dest


def make_unreadable(store: Path) -> None:
    private = store / "private"
    private.mkdir()
    (private / "key").write_text("hidden\n")
    private.chmod(0o700)  # owned by the test's user: infantry, running as nobody, may not list it


def test_install_on_an_unreadable_subdirectory_exits_3(shared_dir: Path) -> None:
    store, dest = unreadable_store(shared_dir)
    make_unreadable(store)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFANTRY_")}
    result = subprocess.run(
        [*as_unprivileged(), *INFANTRY, "install", "--source", store.as_uri(), "--dest", str(dest), "--timeout", "3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert_clean_failure(result, 3, "Permission denied")
    assert os.listdir(dest) == []


class UnprivilegedWatch(Watch):
    """``infantry watch`` run as nobody."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.port = free_port()
        self.log_path = workdir / f"watch-{self.port}.log"
        self._log = self.log_path.open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFANTRY_")}
        self.proc = subprocess.Popen(
            [*as_unprivileged(), *INFANTRY, "watch", *args, "--listen", f"127.0.0.1:{self.port}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).parent.parent,
        )


def test_watch_survives_an_unreadable_subdirectory(shared_dir: Path, watches: list[Watch]) -> None:
    store, dest = unreadable_store(shared_dir)
    watch = UnprivilegedWatch(shared_dir, ["--source", store.as_uri(), "--dest", str(dest), "--interval", "0.2"])
    watches.append(watch)
    watch.wait_ready(timeout=20)
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}

    make_unreadable(store)
    wait_for_log(watch, "Permission denied")
    assert_following(watch)

    shutil.rmtree(store / "private")
    (store / "app.yaml").write_text("v: 2\n")
    wait_until("the repaired store's content", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"}, timeout=15)
    assert_following(watch)


# -- a plain directory under churn, and a watched directory that goes away ----------------------------


def test_watch_follows_a_directory_while_subdirectories_come_and_go(tmp_path: Path, watches: list[Watch]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "app.yaml").write_text("v: 1\n")
    dest = tmp_path / "D"
    watch = start_watch(tmp_path, watches, store.as_uri(), dest)

    stop = threading.Event()
    rounds = 0

    def churn() -> None:
        nonlocal rounds
        while not stop.is_set():
            for i in range(10):
                sub = store / f"churn{i}"
                (sub / "deeper").mkdir(parents=True, exist_ok=True)
                for j in range(10):
                    (sub / f"f{j}.conf").write_text(f"{rounds} {j}\n")
                    (sub / "deeper" / f"g{j}.conf").write_text(f"{rounds} {j}\n")
            for i in range(10):
                shutil.rmtree(store / f"churn{i}", ignore_errors=True)
            rounds += 1

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    started = time.monotonic()
    wait_until("a few seconds of churn", lambda: time.monotonic() - started > 4, timeout=10)
    stop.set()
    churner.join(timeout=10)
    assert rounds > 10  # the churn did happen
    assert_following(watch)

    (store / "app.yaml").write_text("v: final\n")
    wait_until("the last change", lambda: read_as_app(dest) == {"app.yaml": "v: final\n"}, timeout=15)
    assert_following(watch)


def test_watch_survives_its_watched_directory_going_away(tmp_path: Path, watches: list[Watch]) -> None:
    # A one-file source watches the file's directory; removing that directory breaks the watcher, and
    # starting a new one fails until the directory is back.
    home = tmp_path / "home"
    home.mkdir()
    (home / "app.yaml").write_text("v: 1\n")
    dest = tmp_path / "D"
    watch = start_watch(tmp_path, watches, (home / "app.yaml").as_uri(), dest)

    shutil.rmtree(home)
    wait_for_log(watch, "No such file or directory")
    wait_for_log(watch, "cannot watch")
    assert_following(watch)
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}

    home.mkdir()
    (home / "app.yaml").write_text("v: 2\n")
    wait_until("the file once its directory is back", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"}, timeout=15)
    # And the watcher works again: a change is seen (well before a slow resync would matter).
    (home / "app.yaml").write_text("v: 3\n")
    wait_until("a change after that", lambda: read_as_app(dest) == {"app.yaml": "v: 3\n"}, timeout=15)
    assert_following(watch)


# -- HTTP: a whole-request deadline, a capped Retry-After, and credentials kept to their origin --------


class Document:
    """A real HTTP server on loopback serving one document, which can be told to misbehave.

    ``mode`` is "ok" (200 with ``body``), "drip" (headers, then one byte a second), or "busy" (503 with
    ``Retry-After: 86400``). Every request is recorded with its headers.
    """

    def __init__(self, body: str) -> None:
        self.body = body
        self.mode = "ok"
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.redirects: dict[str, str] = {}
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests.append((outer.mode, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path in outer.redirects:
                    self.send_response(302)
                    self.send_header("Location", outer.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if outer.mode == "busy":
                    self.send_response(503)
                    self.send_header("Retry-After", "86400")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = outer.body.encode()
                if outer.mode == "drip":
                    data = b"x" * 100
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if outer.mode != "drip":
                    self.wfile.write(data)
                    return
                for byte in data:
                    if outer._stop.wait(1.0):
                        return
                    try:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = serve_loopback(Handler)
        self.port = int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def document() -> Iterator[Document]:
    server = Document("v: 1\n")
    yield server
    server.stop()


def test_a_drip_fed_answer_costs_one_request_timeout(document: Document, tmp_path: Path, watches: list[Watch]) -> None:
    dest = tmp_path / "D"
    watch = start_watch(tmp_path, watches, document.url("/app.yaml"), dest, "--request-timeout", "1")
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}

    document.mode = "drip"
    wait_for_log(watch, "request timeout of 1s")
    assert_following(watch)

    document.body, document.mode = "v: 2\n", "ok"
    healed = time.monotonic()
    wait_until("the new content after the drip", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"}, timeout=10)
    # Backoff after a few failures stays within seconds; a per-read timeout would have hung for 100 s.
    assert time.monotonic() - healed < 10
    assert_following(watch)


def test_install_gives_up_on_a_drip_fed_answer_with_exit_3(document: Document, tmp_path: Path) -> None:
    document.mode = "drip"
    started = time.monotonic()
    result = infantry(
        "install", "--source", document.url("/app.yaml"), "--dest", str(tmp_path / "D"), "--timeout", "3",
        "--request-timeout", "1",
    )  # fmt: skip
    assert_clean_failure(result, 3, "unreachable")
    assert time.monotonic() - started < 20


def test_a_day_long_retry_after_is_capped_at_ten_intervals(
    document: Document, tmp_path: Path, watches: list[Watch]
) -> None:
    dest = tmp_path / "D"
    watch = start_watch(tmp_path, watches, document.url("/app.yaml"), dest)
    document.mode = "busy"
    wait_for_log(watch, "HTTP 503")
    document.body, document.mode = "v: 2\n", "ok"
    healed = time.monotonic()
    wait_until("the new content after the 503", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n"}, timeout=20)
    # The cap is 10 x 0.2 s = 2 s, plus jitter, the backoff and a publish.
    assert time.monotonic() - healed < 8  # the cap is 10 intervals (2 s), not the server's 86400 s
    assert_following(watch)


def test_credentials_follow_a_redirect_only_within_the_origin(document: Document, tmp_path: Path) -> None:
    other = Document("v: elsewhere\n")
    try:
        document.redirects["/same/app.yaml"] = "/final/app.yaml"
        document.redirects["/cross/app.yaml"] = other.url("/landing/app.yaml")
        password = tmp_path / "password"
        password.write_text("wonderland\n")
        creds = ["--header", "X-Api-Key: k3y-s3cret", "--username", "alice", "--password-file", str(password)]

        same = infantry("install", "--source", document.url("/same/app.yaml"), "--dest", str(tmp_path / "S"), *creds)
        assert same.returncode == 0, same.stderr
        assert read_as_app(tmp_path / "S") == {"app.yaml": "v: 1\n"}
        final = [headers for _, path, headers in document.requests if path == "/final/app.yaml"]
        assert len(final) == 1
        assert final[0].get("x-api-key") == "k3y-s3cret"
        assert final[0].get("authorization", "").startswith("Basic ")

        cross = infantry("install", "--source", document.url("/cross/app.yaml"), "--dest", str(tmp_path / "C"), *creds)
        assert cross.returncode == 0, cross.stderr
        assert read_as_app(tmp_path / "C") == {"app.yaml": "v: elsewhere\n"}
        first = [headers for _, path, headers in document.requests if path == "/cross/app.yaml"]
        assert first and first[0].get("x-api-key") == "k3y-s3cret"  # the source's own origin gets them
        assert [path for _, path, _ in other.requests] == ["/landing/app.yaml"]
        landed = other.requests[0][2]
        assert "x-api-key" not in landed and "authorization" not in landed, landed
    finally:
        other.stop()


# -- etcd: a gateway that answers absurdly deep JSON --------------------------------------------------


class FakeGateway:
    """Just enough of etcd's JSON gateway, on a real socket: one page of keys, and a watch stream.

    With ``deep`` set, the watch stream (or, with ``deep_range``, the range) answers one line of
    100000 nested ``[``; otherwise the watch reports ``a`` set to ``value`` and stays open.
    """

    CLUSTER = "424242"

    def __init__(self) -> None:
        self.deep = True
        self.deep_range = False
        self.value = "2"
        self.watches = 0
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                header = {"cluster_id": outer.CLUSTER, "revision": "5"}
                if self.path == "/v3/kv/range":
                    if outer.deep_range:
                        self._send(b"[" * 100_000)
                    else:
                        kvs = [{"key": b64("/app/a"), "value": b64("1"), "mod_revision": "5"}]
                        self._send(_json({"header": header, "kvs": kvs, "count": "1"}))
                    return
                if self.path != "/v3/watch":
                    self.send_error(404)
                    return
                outer.watches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()  # HTTP/1.0: the body runs until the connection closes
                if outer.deep:
                    self.wfile.write(b"[" * 100_000 + b"\n")
                    return
                created = {"result": {"header": {**header, "revision": "5"}, "created": True}}
                kv = {"key": b64("/app/a"), "value": b64(outer.value), "mod_revision": "6"}
                event = {"result": {"header": {**header, "revision": "6"}, "events": [{"kv": kv}]}}
                self.wfile.write(_json(created) + b"\n" + _json(event) + b"\n")
                self.wfile.flush()
                outer._stop.wait(30)

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = serve_loopback(Handler)
        self.port = int(self._server.server_address[1])

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


def _json(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    server = FakeGateway()
    yield server
    server.stop()


def test_deeply_nested_json_from_etcd_is_malformed_data(gateway: FakeGateway, tmp_path: Path) -> None:
    gateway.deep_range = True
    url = f"etcd://127.0.0.1:{gateway.port}/app/"
    result = infantry("install", "--source", url, "--dest", str(tmp_path / "D"), "--timeout", "3")
    assert_clean_failure(result, 5, "malformed etcd response")


def test_watch_survives_deeply_nested_json_from_etcd(
    gateway: FakeGateway, tmp_path: Path, watches: list[Watch]
) -> None:
    dest = tmp_path / "D"
    watch = start_watch(tmp_path, watches, f"etcd://127.0.0.1:{gateway.port}/app/", dest)
    assert read_as_app(dest) == {"a": "1"}
    wait_for_log(watch, "malformed etcd response")
    wait_until("watch to try again", lambda: gateway.watches >= 2, timeout=10)
    assert_following(watch)

    gateway.deep = False
    wait_until("the update once the gateway behaves", lambda: read_as_app(dest) == {"a": "2"}, timeout=15)
    assert_following(watch)


def test_a_directory_swapped_for_a_link_mid_read_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the listing of ``sub`` and the opening of a file in it, ``sub`` becomes a link to a
    secret directory: the file opened is checked by its descriptor, so the secret is never read."""
    from infantry.errors import SourceError, UnsafeDataError
    from infantry.snapshot import Limits
    from infantry.sources import file as file_module

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "a").write_text("TOP-SECRET\n")
    store = tmp_path / "store"
    (store / "sub").mkdir(parents=True)
    (store / "sub" / "a").write_text("ours\n")
    real_add = file_module._add_file

    def add_after_a_swap(builder: Any, path: Path, rel: str, **kwargs: Any) -> None:
        if rel == "sub/a" and not (store / "sub").is_symlink():
            (store / "sub").rename(tmp_path / "moved")
            (store / "sub").symlink_to(secret)
        real_add(builder, path, rel, **kwargs)

    monkeypatch.setattr(file_module, "_add_file", add_after_a_swap)
    with pytest.raises((SourceError, UnsafeDataError)) as refused:
        file_module.read_tree(store, "file://store", Limits())
    assert "outside the tree" in str(refused.value) and "TOP-SECRET" not in str(refused.value)
