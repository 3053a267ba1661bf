"""An etcd cluster: endpoint lists, and failover between real members while `infantry watch` follows them.

Each fault test writes, while the fault lasts, a distinct key ``k<n>`` and then ``seq = n``, and watches
what the destination shows over time: the published sets must only ever move forward (``seq`` never
goes back, and a set showing ``seq = n`` holds every ``k1``..``kn``), and the last one must hold every
key written, with the last ``seq``.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from infantry.errors import SettingsError, SourceError
from infantry.settings import SourceSpec, etcd_endpoints, load_settings, read_config_file, redact_url
from infantry.snapshot import Limits
from infantry.sources.etcd import EtcdSource
from tests.etcd_cluster import EtcdCluster
from tests.support import Etcd, SignalRecorder, Watch, infantry, serve_loopback, wait_until

# -- endpoint lists (no server) ----------------------------------------------------------------------


def test_a_comma_list_names_every_member_in_order() -> None:
    assert etcd_endpoints("etcd://h1:2379,h2:2380,10.0.0.3:2379/app/") == [
        ("h1", 2379),
        ("h2", 2380),
        ("10.0.0.3", 2379),
    ]
    assert etcd_endpoints("etcds://[::1]:2379,[fe80::1]:2380/app/") == [("[::1]", 2379), ("[fe80::1]", 2380)]
    assert etcd_endpoints("etcd://h1:1/app/", ["h2:2", "etcd://h3:3", "http://h4:4"]) == [
        ("h1", 1),
        ("h2", 2),
        ("h3", 3),
        ("h4", 4),
    ]
    assert etcd_endpoints("etcds:///app/", ["etcds://h1:1", "https://h2:2", "h3:3"]) == [
        ("h1", 1),
        ("h2", 2),
        ("h3", 3),
    ]


@pytest.mark.parametrize(
    ("url", "endpoints", "problem"),
    [
        ("etcd://h1:2379,h2/app/", [], "no port for 'h2'"),
        ("etcd://h1/app/", [], "no port for 'h1'"),
        ("etcd://h1:2379,h2:/app/", [], "no port for 'h2'"),
        ("etcd://h1:2379,h1:2379/app/", [], "endpoint h1:2379 is given twice"),
        ("etcd://H1:2379,h1:2379/app/", [], "given twice"),
        ("etcd://h1:2379/app/", ["h1:2379"], "endpoint h1:2379 is given twice"),
        ("etcd://[::1]:2379,[::1]:2379/app/", [], "endpoint [::1]:2379 is given twice"),
        ("etcd://h1:2379,,h2:2379/app/", [], "an empty endpoint"),
        ("etcd://h1:2379,etcds://h2:2379/app/", [], "give the scheme once"),
        ("etcd://h1:2379/app/", ["etcds://h2:2379"], "mix TLS and plain HTTP"),
        ("etcds://h1:2379/app/", ["http://h2:2379"], "mix TLS and plain HTTP"),
        ("etcd://h1:2379/app/", ["ftp://h2:2379"], "expected HOST:PORT"),
        ("etcd://h1:2379/app/", ["h2:2379/other/"], "no path or credentials"),
        ("etcd://h1:2379/app/", ["u:pw@h2:2379"], "no path or credentials"),
        ("etcd://::1:2379/app/", [], "put an IPv6 address in brackets"),
        ("etcd://[::1]/app/", [], "no port for '[::1]'"),
        ("etcd://[not-v6]:1/app/", [], "cannot be read"),
        ("etcd://h1:99999/app/", [], "not a number from 1 to 65535"),
        ("etcd://h1:0/app/", [], "not a number from 1 to 65535"),
        ("etcd:///app/", [], "no host"),
        ("http://h1/x", ["h2:2379"], "only an etcd:// or etcds:// source"),
    ],
)
def test_bad_endpoint_lists_are_refused_naming_the_problem(url: str, endpoints: list[str], problem: str) -> None:
    with pytest.raises(SettingsError, match=r"--source #1: ") as caught:
        load_settings({"source": [{"url": url, "endpoints": endpoints}]}, {})
    assert problem in str(caught.value)


def test_credentials_in_an_etcd_url_are_refused_without_echoing_them(tmp_path: Path) -> None:
    """etcd takes no credentials in its URL: rather than go unused (every request anonymous), they are
    refused as a setting, with the options to use instead, and the password never repeated."""
    url = "etcd://reader:Sup3rSecret@h1:2379,h2:2379/app/"
    assert redact_url(url) == "etcd://reader:***@h1:2379,h2:2379/app/"
    for given in (
        {"source": [url]},
        {"source": ["etcd://reader:Sup3rSecret@127.0.0.1:2379/app/"]},
        {"source": ["etcd://reader:Sup3rSecret@h1:2379,h1:2379/app/"]},
        {"source": [{"url": "etcd://reader:Sup3rSecret@/app/", "endpoints": ["h1:2379"]}]},
    ):
        with pytest.raises(SettingsError, match=r"--source #1: ") as caught:
            load_settings(given, {})
        assert "Sup3rSecret" not in str(caught.value)
        assert "--username and --password-file" in str(caught.value)
    with pytest.raises(ValueError, match="takes no user name or password"):
        etcd_endpoints("etcd://user:pw@h1:1,h2:2/app/")
    result = infantry("install", "--source", url, "--dest", str(tmp_path / "D"))
    assert result.returncode == 2, result.stderr
    assert "etcd://reader:***@h1:2379,h2:2379/app/" in result.stderr
    assert "--username and --password-file" in result.stderr
    assert "Sup3rSecret" not in result.stderr + result.stdout


def test_the_config_file_takes_an_endpoints_list(tmp_path: Path) -> None:
    config = tmp_path / "infantry.yaml"
    config.write_text(
        "sources:\n"
        "  - url: etcds:///app/\n"
        "    endpoints: [h1:2379, 'etcds://h2:2379', '[::1]:2379']\n"
        "  - url: etcd://a:1,b:2/other/\n"
        "    dir: other\n"
    )
    settings = load_settings({"config": str(config)}, {})
    first, second = settings.resolved_sources()
    assert first.endpoints == ["h1:2379", "etcds://h2:2379", "[::1]:2379"]
    source = EtcdSource(first, Limits(), 1.0, 10.0)
    assert source._members == ["https://h1:2379", "https://h2:2379", "https://[::1]:2379"]
    assert EtcdSource(second, Limits(), 1.0, 10.0)._members == ["http://a:1", "http://b:2"]
    config.write_text("sources:\n  - url: etcd:///app/\n    endpoint: [h1:2379]\n")
    with pytest.raises(SettingsError, match="did you mean 'endpoints'"):
        read_config_file(config)


def _header(cluster: str, revision: int) -> dict[str, object]:
    return {"header": {"cluster_id": cluster, "revision": str(revision)}}


def test_a_member_of_another_cluster_is_skipped_unless_most_members_moved() -> None:
    """A minority answering for another cluster is a mistake in the list; a majority, the cluster followed."""
    source = EtcdSource(SourceSpec.model_validate({"url": "etcd://h1:1,h2:2,h3:3/app/"}), Limits(), 1.0, 10.0)
    assert not source._rebuilt(_header("111", 50))  # the first member pins the cluster
    source._member = 1
    with pytest.raises(SourceError, match=r"answers for etcd cluster 222, not cluster 111 .* skipping it"):
        source._rebuilt(_header("222", 3))  # one member of three
    source._member = 0
    assert not source._rebuilt(_header("111", 51))  # the first member is still of the cluster: it is followed
    source._member = 1
    with pytest.raises(SourceError, match="skipping it"):
        source._rebuilt(_header("222", 4))  # asked again, still one member of three
    source._member = 2
    assert source._rebuilt(_header("222", 5))  # two of three (the third may be down): rebuilt, read again
    assert source._cluster_id == "222"
    assert not source._rebuilt(_header("222", 6))
    source._member = 0
    with pytest.raises(SourceError, match="answers for etcd cluster 111, not cluster 222"):
        source._rebuilt(_header("111", 52))  # the member left behind is the minority now
    assert source._cluster_id == "222"

    # Of four members, two are not a majority; three are. A member back with the followed cluster no
    # longer counts for the other one.
    four = EtcdSource(SourceSpec.model_validate({"url": "etcd://h1:1,h2:2,h3:3,h4:4/app/"}), Limits(), 1.0, 10.0)
    assert not four._rebuilt(_header("999", 7))  # a stray member, listed first, answered first
    for member in (1, 2):
        four._member = member
        with pytest.raises(SourceError, match=r"\(\d of 4 members answered for it\); skipping it"):
            four._rebuilt(_header("111", 50))
    four._member = 1
    assert not four._rebuilt(_header("999", 8))
    four._member = 3
    with pytest.raises(SourceError, match=r"\(2 of 4 members answered for it\)"):
        four._rebuilt(_header("111", 51))
    four._member = 2
    with pytest.raises(SourceError, match=r"\(2 of 4 members answered for it\)"):
        four._rebuilt(_header("111", 52))  # a member asked twice counts once
    assert four._cluster_id == "999"
    four._member = 1
    assert four._rebuilt(_header("111", 53))  # members 1, 2 and 3 of four
    assert four._cluster_id == "111"
    # With one member, a new cluster ID is a store rebuilt from scratch, as before.
    single = EtcdSource(SourceSpec.model_validate({"url": "etcd://h1:1/app/"}), Limits(), 1.0, 10.0)
    assert not single._rebuilt(_header("111", 50))
    assert single._rebuilt(_header("222", 60))


def test_a_refusal_is_permanent_once_every_member_refused_in_a_row() -> None:
    source = EtcdSource(SourceSpec.model_validate({"url": "etcd://h1:1,h2:2,h3:3/app/"}), Limits(), 1.0, 10.0)
    for member in (0, 1, 0):
        source._member = member
        assert source._refusal("HTTP 403: no").temporary
    source._refused.clear()  # a good answer came between
    for member in (2, 0):
        source._member = member
        assert source._refusal("HTTP 403: no").temporary
    source._member = 1
    assert not source._refusal("HTTP 403: no").temporary
    single = EtcdSource(SourceSpec.model_validate({"url": "etcd://h1:1/app/"}), Limits(), 1.0, 10.0)
    assert not single._refusal("HTTP 403: no").temporary
    assert single._malformed("not JSON").__class__.__name__ == "UnsafeDataError"
    malformed = source._malformed("not JSON")
    assert isinstance(malformed, SourceError) and malformed.temporary


# -- members that are not etcd's ---------------------------------------------------------------------


class FakeMember:
    """A listed member that answers every request with ``status`` and ``body``: another service on its
    port, a proxy's page, an etcd without its JSON gateway."""

    def __init__(self, status: int, body: bytes) -> None:
        outer = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = serve_loopback(Handler)
        self.port = self._server.server_address[1]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fakes() -> Iterator[list[FakeMember]]:
    started: list[FakeMember] = []
    yield started
    for fake in started:
        fake.stop()


@pytest.mark.parametrize(
    ("status", "body", "alone"),
    [
        (200, b"<html>hello</html>", 5),  # not etcd's JSON: alone, refused data, as before
        (200, b"{}", 5),  # JSON, but no header
        (404, b"Not Found", 3),  # etcd without its JSON gateway: alone, a permanent refusal
        (403, b'{"error":"forbidden","code":7,"message":"forbidden"}', 3),
    ],
)
def test_a_member_that_does_not_answer_as_etcd_is_left_for_the_next(
    etcd: Etcd, tmp_path: Path, watches: list[Watch], fakes: list[FakeMember], status: int, body: bytes, alone: int
) -> None:
    fake = FakeMember(status, body)
    fakes.append(fake)
    etcd.put("/app/seq", "1")
    url = f"etcd://127.0.0.1:{fake.port},127.0.0.1:{etcd.port}/app/"
    result = infantry("install", "--source", url, "--dest", str(tmp_path / "I"), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert consistent_view(tmp_path / "I") == {"seq": "1"}
    assert f"member http://127.0.0.1:{fake.port} failed" in result.stderr
    assert f"trying http://127.0.0.1:{etcd.port} next" in result.stderr
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", url, "--dest", str(dest), "--interval", "0.5", "--request-timeout", "3"])
    watches.append(watch)
    watch.wait_ready(timeout=60)
    wait_until("the first set", lambda: consistent_view(dest) == {"seq": "1"}, timeout=30)
    etcd.put("/app/seq", "2")
    wait_until("the change", lambda: consistent_view(dest) == {"seq": "2"}, timeout=30)
    assert fake.requests >= 2  # install and watch each asked it first
    # The same member alone: nothing else to try, so its answer stands (as it always did).
    started = time.monotonic()
    only = f"etcd://127.0.0.1:{fake.port}/app/"
    result = infantry("install", "--source", only, "--dest", str(tmp_path / "J"), "--timeout", "60")
    assert result.returncode == alone, result.stderr
    assert time.monotonic() - started < 30, "refused at once, not after --timeout"


def test_every_member_refusing_is_permanent(tmp_path: Path, fakes: list[FakeMember]) -> None:
    """Wrong credentials, or no gateway, on every member: install gives up at once, not after --timeout."""
    fakes.extend(FakeMember(403, b'{"error":"permission denied","code":7}') for _ in range(3))
    url = "etcd://" + ",".join(f"127.0.0.1:{fake.port}" for fake in fakes) + "/app/"
    started = time.monotonic()
    result = infantry("install", "--source", url, "--dest", str(tmp_path / "I"), "--timeout", "60")
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 30, result.stderr
    assert "HTTP 403" in result.stderr
    assert "sources unreachable after" not in result.stderr
    assert all(fake.requests == 1 for fake in fakes), [fake.requests for fake in fakes]


# -- failover against a real cluster ---------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    started = EtcdCluster(tmp_path / "cluster")
    try:
        started.start()
        yield started
    finally:
        started.stop()


def consistent_view(dest: Path) -> dict[str, str] | None:
    """The published set as one snapshot directory holds it (never a mix of two); None before the first."""
    deadline = time.monotonic() + 5
    while True:
        try:
            target = dest / os.readlink(dest / "..data")
            return {p.name: p.read_text() for p in target.iterdir() if p.is_file()}
        except FileNotFoundError:
            if not (dest / "..data").is_symlink() and not dest.exists():
                return None
            if time.monotonic() > deadline:
                raise  # a snapshot directory removed under every read for seconds: not a race any more
        except OSError:
            return None


class History:
    """What the destination showed over time, polled from a thread while the test runs."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.views: list[dict[str, str]] = []
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _look(self) -> None:
        view = consistent_view(self.dest)
        if view is not None and (not self.views or view != self.views[-1]):
            self.views.append(view)

    def _poll(self) -> None:
        try:
            while not self._stop.is_set():
                self._look()
                time.sleep(0.005)
        except BaseException as exc:  # raised again in the test's thread, by stop()
            self._failed = exc

    def stop(self) -> None:
        """Stop polling, with one last look (the poller may not have run since the last publish)."""
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the history poller is stuck"
        if self._failed is not None:
            raise self._failed
        self._look()


class Writer:
    """Writes k<n> then seq = n, one pair at a time, and checks what the destination showed."""

    def __init__(self, cluster: EtcdCluster) -> None:
        self.cluster = cluster
        self.n = 0

    def write(self, count: int) -> None:
        for _ in range(count):
            self.n += 1
            self.cluster.put(f"/app/k{self.n}", str(self.n))
            self.cluster.put("/app/seq", str(self.n))

    def expected(self) -> dict[str, str]:
        return {"seq": str(self.n), **{f"k{i}": str(i) for i in range(1, self.n + 1)}}

    def check(self, history: History, app: SignalRecorder) -> None:
        """Every view moved forward and was a prefix of what was written; the last is everything."""
        last = 0
        for view in history.views:
            seq = int(view.get("seq", "0"))
            assert seq >= last, f"the destination went back from seq {last} to {seq}"
            last = seq
            keys = {name for name in view if name.startswith("k")}
            wanted = {f"k{i}" for i in range(1, seq + 1)}
            assert wanted <= keys, f"seq {seq} published without {sorted(wanted - keys)}"
            assert keys <= wanted | {f"k{seq + 1}"}, f"seq {seq} published with later keys {sorted(keys - wanted)}"
        assert history.views[-1] == self.expected()
        # The app, told once per publish, read seq going forward only, and read the last value last.
        told = [int(line.split(" ", 1)[1]) for line in app.signals() if line.split(" ", 1)[1].isdigit()]
        assert told == sorted(told), told
        assert told and told[-1] == self.n


def start_watch(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], interval: float = 0.5, stale_after: float = 60
) -> tuple[Watch, Path]:
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        [
            "--source", cluster.url(), "--dest", str(dest), "--interval", str(interval), "--request-timeout", "3",
            "--pid-file", str(tmp_path / "app" / "app.pid"), "--stale-after", str(stale_after),
        ],
    )  # fmt: skip
    watches.append(watch)
    watch.wait_ready(timeout=60)
    return watch, dest


def connected_member(watch: Watch, cluster: EtcdCluster, after: int = 0) -> int:
    """The member whose watch stream infantry follows, as its log says (the latest, past ``after`` lines)."""
    ports = {member.port: index for index, member in enumerate(cluster.members)}
    found: list[int] = []

    def logged() -> bool:
        lines = watch.log().splitlines()[after:]
        matches = [m for line in lines if (m := re.search(r"watching through member http://127\.0\.0\.1:(\d+)", line))]
        if matches:
            found[:] = [ports[int(matches[-1].group(1))]]
        return bool(matches)

    wait_until("infantry to say which member it watches through", logged, timeout=60)
    return found[0]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[SignalRecorder]:
    (tmp_path / "app").mkdir()
    recorder = SignalRecorder(tmp_path / "app", config=tmp_path / "D" / "seq")
    yield recorder
    recorder.stop()


def follow_through(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], interval: float = 0.5, stale_after: float = 60
) -> tuple[Watch, Path, Writer, History]:
    """`watch` on the cluster, ready, holding k1 and seq = 1, with its destination's history recorded."""
    writer = Writer(cluster)
    writer.write(1)
    watch, dest = start_watch(cluster, tmp_path, watches, interval, stale_after)
    history = History(dest)
    wait_until("the first set", lambda: consistent_view(dest) == writer.expected(), timeout=30)
    return watch, dest, writer, history


def finish(watch: Watch, writer: Writer, history: History, app: SignalRecorder, dest: Path) -> None:
    """Wait for everything written to be published; then check the history, and that no store looked rebuilt."""
    try:
        wait_until("every put to reach the destination", lambda: consistent_view(dest) == writer.expected(), 60)
        # Each line the app records is "TIME SEQ": what it read when told.
        wait_until("the app to be told of the last one", lambda: app.signals()[-1:] != [] and
                   app.signals()[-1].split(" ", 1)[1] == str(writer.n), 30)  # fmt: skip
    finally:
        history.stop()
    writer.check(history, app)
    assert "the store was rebuilt" not in watch.log(), watch.log()
    assert watch.proc.poll() is None, watch.log()


def test_killing_the_member_infantry_watches_through(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    watch, dest, writer, history = follow_through(cluster, tmp_path, watches)
    victim = connected_member(watch, cluster)
    lines = len(watch.log().splitlines())
    cluster.members[victim].kill()
    writer.write(5)
    moved_to = connected_member(watch, cluster, after=lines)
    assert moved_to != victim
    writer.write(5)
    finish(watch, writer, history, app, dest)
    assert f"member http://127.0.0.1:{cluster.members[victim].port} failed" in watch.log()
    # install, with the dead member first in its list, moves on to the next.
    ports = [cluster.members[i].port for i in (victim, *(i for i in range(3) if i != victim))]
    url = "etcd://" + ",".join(f"127.0.0.1:{port}" for port in ports) + "/app/"
    result = infantry("install", "--source", url, "--dest", str(tmp_path / "I"), "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert consistent_view(tmp_path / "I") == writer.expected()


def test_killing_the_leader(cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder) -> None:
    watch, dest, writer, history = follow_through(cluster, tmp_path, watches)
    leader = cluster.leader()
    cluster.members[leader].kill()
    new_leader = cluster.leader()
    assert new_leader != leader
    writer.write(10)
    finish(watch, writer, history, app, dest)
    # The old leader comes back as a follower; changes go on reaching the destination.
    cluster.start_member(leader)
    cluster.wait_healthy()
    history = History(dest)
    writer.write(3)
    finish(watch, writer, history, app, dest)


def test_a_stopped_member_that_accepts_connections_but_never_answers(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    watch, dest, writer, history = follow_through(cluster, tmp_path, watches)
    victim = connected_member(watch, cluster)
    lines = len(watch.log().splitlines())
    stopped_at = time.monotonic()
    cluster.members[victim].stop_process()  # SIGSTOP: the kernel still accepts its TCP connections
    cluster.leader()  # among the two others, if the stopped one led
    writer.write(5)
    moved_to = connected_member(watch, cluster, after=lines)
    assert moved_to != victim
    moved_after = time.monotonic() - stopped_at
    writer.write(5)
    cluster.members[victim].cont()
    cluster.wait_healthy()
    writer.write(3)
    finish(watch, writer, history, app, dest)
    # The quiet-stream probe (every --interval) waited out --request-timeout (3 s) on the stopped member.
    assert moved_after < 30, moved_after


def test_a_member_cut_off_from_its_quorum_is_left(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    """The two members infantry is not watching through stop: the one it follows has no leader any more.

    Without "require leader" its watch would stay open and silent; with it, etcd ends the stream, and
    infantry goes on trying the members in turn until the quorum is back.
    """
    # An interval longer than the test: no quiet-stream probe runs (etcd's progress notes keep the stream
    # talking), so only etcd ending the stream can make infantry leave the member.
    watch, dest, writer, history = follow_through(cluster, tmp_path, watches, interval=300)
    kept = connected_member(watch, cluster)
    others = [i for i in range(3) if i != kept]
    for index in others:
        cluster.members[index].stop_process()
    wait_until(
        "etcd to end the stream for want of a leader",
        lambda: "watch failed: etcdserver: no leader" in watch.log(),
        timeout=60,
    )
    for index in others:
        cluster.members[index].cont()
    cluster.wait_healthy()
    writer.write(5)
    finish(watch, writer, history, app, dest)


def test_restarting_all_three_and_the_cluster_down_meanwhile(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    watch, dest, writer, history = follow_through(cluster, tmp_path, watches, stale_after=4)
    writer.write(3)
    wait_until("those puts", lambda: consistent_view(dest) == writer.expected(), timeout=30)
    for member in cluster.members:
        member.kill()
    # Down as a whole: errors, members tried in turn with backoff, and health says stale.
    wait_until("errors", lambda: watch.metric("infantry_syncs_total", result="error") >= 3, timeout=60)
    wait_until("/healthz to say stale", lambda: watch.get("/healthz")[0] == 503, timeout=60)
    started = time.monotonic()
    down = infantry("install", "--source", cluster.url(), "--dest", str(tmp_path / "E"), "--timeout", "3")
    assert down.returncode == 3, down.stderr
    assert time.monotonic() - started < 30
    assert "sources unreachable after 3s" in down.stderr
    for member in cluster.members:
        assert f"member http://127.0.0.1:{member.port} failed" in down.stderr + watch.log()
    for index in range(3):
        cluster.start_member(index)
    cluster.wait_healthy()
    writer.write(5)
    finish(watch, writer, history, app, dest)
    wait_until("/healthz to be green again", lambda: watch.get("/healthz")[0] == 200, timeout=30)


def test_a_member_of_another_cluster_is_refused(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    stranger = Etcd(tmp_path / "stranger")
    stranger.start()
    try:
        stranger.put("/app/seq", "999")
        stranger.put("/app/intruder", "not this cluster's")
        writer = Writer(cluster)
        writer.write(1)
        m0, m1, m2 = cluster.members
        url = f"etcd://127.0.0.1:{m0.port},127.0.0.1:{stranger.port},127.0.0.1:{m1.port},127.0.0.1:{m2.port}/app/"
        dest = tmp_path / "D"
        watch = Watch(tmp_path, ["--source", url, "--dest", str(dest), "--interval", "0.5", "--request-timeout", "3",
                                 "--pid-file", str(app.pid_file), "--stale-after", "4"])  # fmt: skip
        watches.append(watch)
        watch.wait_ready(timeout=60)
        history = History(dest)
        wait_until("the first set", lambda: consistent_view(dest) == writer.expected(), timeout=30)
        assert connected_member(watch, cluster) == 0
        m0.kill()
        writer.write(5)
        wait_until("the stranger to be refused", lambda: "answers for etcd cluster" in watch.log(), timeout=60)
        finish(watch, writer, history, app, dest)
        assert all("intruder" not in view for view in history.views)
        # Only the stranger answers now: a skipped answer is no good answer, so health goes stale, and
        # the destination keeps the cluster's last set.
        m1.kill()
        m2.kill()
        wait_until("/healthz to say stale", lambda: watch.get("/healthz")[0] == 503, timeout=60)
        lines = len(watch.log().splitlines())
        wait_until(
            "the stranger to be skipped again",
            lambda: "answers for etcd cluster" in "\n".join(watch.log().splitlines()[lines:]),
            timeout=60,
        )
        assert watch.get("/healthz")[0] == 503
        assert consistent_view(dest) == writer.expected()
        assert watch.proc.poll() is None, watch.log()
    finally:
        stranger.stop()


def test_a_cluster_restored_with_a_member_still_down_is_followed(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    """The cluster is restored (a new cluster ID) on the same addresses, one member not back yet: two
    of the three members listed answer for it, a majority, so it is followed and read again."""
    watch, dest, _, history = follow_through(cluster, tmp_path, watches, stale_after=4)
    for member in cluster.members:
        member.kill()
    wait_until("/healthz to say stale", lambda: watch.get("/healthz")[0] == 503, timeout=60)
    restored = EtcdCluster(tmp_path / "restored", ports=[member.port for member in cluster.members])
    try:
        restored.start(only=[0, 1])
        restored.put("/app/seq", "restored")
        restored.put("/app/new", "only in the restored cluster")
        expected = {"seq": "restored", "new": "only in the restored cluster"}  # k1 went without a delete event
        wait_until("the restored cluster's set", lambda: consistent_view(dest) == expected, timeout=60)
        log = watch.log()
        assert "of 3 members answered for it); skipping it" in log, log
        assert "the store was rebuilt" in log, log
        wait_until("/healthz to be green again", lambda: watch.get("/healthz")[0] == 200, timeout=30)
        wait_until("/readyz to be green again", lambda: watch.get("/readyz")[0] == 200, timeout=30)
        restored.put("/app/seq", "restored 2")
        expected["seq"] = "restored 2"
        wait_until("a change in the restored cluster", lambda: consistent_view(dest) == expected, timeout=60)
        history.stop()
        assert all("new" not in view or "k1" not in view for view in history.views), "two clusters mixed"
        assert watch.proc.poll() is None, watch.log()
    finally:
        restored.stop()


def test_a_stray_member_listed_first_gives_way_to_the_cluster_most_members_answer_for(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    """A single-node etcd listed first answers first, so its set is published; once it is gone, the
    cluster that three of the four members listed answer for is followed, not refused for good."""
    stranger = Etcd(tmp_path / "stranger")
    stranger.start()
    try:
        stranger.put("/app/seq", "999")
        stranger.put("/app/intruder", "not this cluster's")
        writer = Writer(cluster)
        writer.write(1)
        url = f"etcd://127.0.0.1:{stranger.port}," + cluster.url().removeprefix("etcd://")
        dest = tmp_path / "D"
        watch = Watch(tmp_path, ["--source", url, "--dest", str(dest), "--interval", "0.5", "--request-timeout", "3",
                                 "--pid-file", str(app.pid_file), "--stale-after", "4"])  # fmt: skip
        watches.append(watch)
        watch.wait_ready(timeout=60)
        stray = {"seq": "999", "intruder": "not this cluster's"}
        wait_until("the stranger's set", lambda: consistent_view(dest) == stray, timeout=30)
        history = History(dest)
        stranger.kill()
        writer.write(3)
        wait_until("the cluster's set", lambda: consistent_view(dest) == writer.expected(), timeout=60)
        log = watch.log()
        assert "(1 of 4 members answered for it); skipping it" in log, log
        assert "(2 of 4 members answered for it); skipping it" in log, log
        assert "the store was rebuilt" in log, log
        wait_until("/healthz to be green", lambda: watch.get("/healthz")[0] == 200, timeout=30)
        wait_until("/readyz to be green", lambda: watch.get("/readyz")[0] == 200, timeout=30)
        writer.write(2)
        wait_until("later changes", lambda: consistent_view(dest) == writer.expected(), timeout=60)
        history.stop()
        assert all("intruder" not in view for view in history.views[1:]), history.views
        assert watch.proc.poll() is None, watch.log()
    finally:
        stranger.stop()


def test_compaction_while_failing_over_reads_everything_again(
    cluster: EtcdCluster, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    watch, dest, writer, history = follow_through(cluster, tmp_path, watches)
    victim = connected_member(watch, cluster)
    # infantry is held still (SIGSTOP) while its member dies and the revisions it would resume from are
    # compacted away, so its failover meets the compaction.
    watch.proc.send_signal(signal.SIGSTOP)
    try:
        cluster.members[victim].kill()
        writer.write(4)
        cluster.compact(cluster.revision())
    finally:
        watch.proc.send_signal(signal.SIGCONT)
    writer.write(2)
    finish(watch, writer, history, app, dest)
    assert "was compacted; reading everything again" in watch.log(), watch.log()
