"""Failure: a bad version rolled back, publishers killed at any instant, stores going away, leaks."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from infantry.publish import SNAPSHOT_DIR, KubeletPublisher
from infantry.snapshot import FileEntry, Snapshot
from tests.support import (
    HELPERS,
    Etcd,
    Nginx,
    ReloadEndpoint,
    SignalRecorder,
    Watch,
    holds_for,
    infantry,
    installed_store,
    read_as_app,
    wait_until,
)

STRESS_TRIALS = int(os.environ.get("INFANTRY_STRESS_TRIALS", "300"))
WATCH_KILLS = int(os.environ.get("INFANTRY_WATCH_KILLS", "50"))
FILES = 8


def versioned(version: int, files: int = FILES) -> Snapshot:
    """A set whose every file names its version on the first line, padded so writes take a while."""
    return Snapshot.of(
        {f"conf.d/f{i}.conf" if i % 2 else f"f{i}.yaml": FileEntry(f"version {version}\n{'x' * 8000}\n".encode())
         for i in range(files)}
    )  # fmt: skip


def write_store(store: Path, version: int) -> None:
    """Update the store atomically, as a ConfigMap volume is updated: the file source reads it whole."""
    publisher = KubeletPublisher(store, 0o644)
    publisher.publish(versioned(version))
    publisher.tidy()


class Reader:
    """The reader process from tests/helpers/reader.py, checking every pass is one whole version."""

    def __init__(self, dest: Path, report: Path) -> None:
        self.report = report
        self.proc = subprocess.Popen([sys.executable, str(HELPERS / "reader.py"), str(dest), str(FILES), str(report)])
        # Python can take seconds to start on a busy machine: the changes must not begin before the reading.
        ready = report.with_name(report.name + ".ready")
        wait_until("the reader's first pass", lambda: ready.exists() or self.proc.poll() is not None, timeout=30)
        assert self.proc.poll() is None, f"the reader exited {self.proc.returncode}"

    def finish(self) -> tuple[int, list[str]]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        head, *problems = self.report.read_text().splitlines()
        checked, _ = head.split()
        return int(checked), [p for p in problems if p]


def test_a_version_that_fails_verification_is_rolled_back(tmp_path: Path, watches: list[Watch]) -> None:
    store, dest = installed_store(tmp_path, {"app.yaml": "v: 1\n"})
    health = ReloadEndpoint(status=500)
    app = SignalRecorder(tmp_path, config=dest / "app.yaml")
    try:
        watch = Watch(
            tmp_path,
            [
                "--source",
                store.as_uri(),
                "--dest",
                str(dest),
                "--pid-file",
                str(app.pid_file),
                "--verify-url",
                health.url,
                "--verify-timeout",
                "1",
                "--interval",
                "0.3",
            ],
        )
        watches.append(watch)
        watch.wait_ready()
        (store / "app.yaml").write_text("v: 2 (breaks the app)\n")
        wait_until("the reload", lambda: app.count() == 1, timeout=15)
        reloaded_at = float(app.signals()[0].split()[0])
        wait_until("the rollback", lambda: read_as_app(dest) == {"app.yaml": "v: 1\n"}, timeout=5)
        # Rolled back once the 1 s verify timeout ran out, not at some later resync (slack for a busy machine).
        assert time.time() - reloaded_at < 1 + 3
        wait_until("the second notification", lambda: app.count() == 2, timeout=15)
        assert app.signals()[1].split(" ", 1)[1] == "v: 1"
        assert watch.metric("infantry_rollbacks_total") == 1
        assert "failed verification" in watch.log()
        # The bad version is not published again while the store still holds it (resyncs run every 0.3 s).
        assert holds_for(lambda: read_as_app(dest) == {"app.yaml": "v: 1\n"} and app.count() == 2, 1.5)

        health.status = 200
        (store / "app.yaml").write_text("v: 3\n")
        wait_until("the next good version", lambda: read_as_app(dest) == {"app.yaml": "v: 3\n"}, timeout=15)
        assert holds_for(lambda: read_as_app(dest) == {"app.yaml": "v: 3\n"}, 1.5)
        assert watch.metric("infantry_rollbacks_total") == 1
    finally:
        app.stop()
        health.stop()


def test_content_rejected_by_the_check_is_never_visible(tmp_path: Path, watches: list[Watch]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "app.yaml").write_text("good 0\n")
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest), "--check", "grep -rq good"])
    watches.append(watch)
    watch.wait_ready()
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.update(read_as_app(dest).values())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 21):
            content = f"good {i}\n" if i % 2 == 0 else f"bad {i}\n"
            (store / "app.yaml").write_text(content)
            if i % 2 == 0:
                wait_until(f"good {i}", functools.partial(lambda c: read_as_app(dest) == {"app.yaml": c}, content))
            else:
                wanted = (i + 1) // 2
                wait_until(
                    f"bad {i} to be rejected",
                    functools.partial(
                        lambda n: watch.metric("infantry_publishes_total", result="rejected") >= n, wanted
                    ),
                )
    finally:
        stop.set()
        reader.join()
    assert len(seen) >= 5
    assert not [content for content in seen if "bad" in content]


def _publish_forever(dest: Path, first: int) -> None:
    """The body of a forked publisher: publish new versions until killed."""
    publisher = KubeletPublisher(dest, 0o644)
    publisher.tidy()
    version = first
    while True:
        publisher.publish(versioned(version))
        publisher.tidy()
        version += 1


def test_publisher_killed_at_random_instants_never_shows_a_torn_set(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    KubeletPublisher(dest, 0o644).publish(versioned(0))
    reader = Reader(dest, tmp_path / "report")
    rng = random.Random(1234)
    for trial in range(STRESS_TRIALS):
        pid = os.fork()
        if pid == 0:  # the child publishes until it is killed
            try:
                _publish_forever(dest, (trial + 1) * 1_000_000)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    checked, problems = reader.finish()
    assert problems == []
    assert checked > STRESS_TRIALS  # the reader really was reading all along
    # A fresh start clears whatever the kills left, and converges.
    final = KubeletPublisher(dest, 0o644)
    final.tidy()
    final.publish(versioned(7))
    final.tidy()
    leftovers = [n for n in os.listdir(dest) if n.startswith("..") and n not in ("..data", "..previous")]
    assert len(leftovers) == 2, leftovers  # the live snapshot and the one kept for rollback
    assert set(read_as_app(dest).values()) == {versioned(7).files["f0.yaml"].data.decode()}


def test_watch_killed_50_times_during_changes_never_tears_and_converges(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_store(store, 0)
    dest = tmp_path / "D"
    assert infantry("install", "--source", store.as_uri(), "--dest", str(dest)).returncode == 0
    reader = Reader(dest, tmp_path / "report")
    stop = threading.Event()
    versions = [0]

    def write() -> None:
        while not stop.is_set():
            versions.append(versions[-1] + 1)
            write_store(store, versions[-1])
            time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()
    rng = random.Random(99)
    try:
        for _ in range(WATCH_KILLS):
            proc = subprocess.Popen(
                [sys.executable, "-m", "infantry", "watch", "--source", store.as_uri(), "--dest", str(dest),
                 "--log-level", "error"],
            )  # fmt: skip
            time.sleep(rng.uniform(0.3, 0.6))
            proc.kill()
            proc.wait()
    finally:
        stop.set()
        writer.join()
    checked, problems = reader.finish()
    assert problems == []
    assert checked > WATCH_KILLS
    # A restart converges to the store, and clears what the kills left behind.
    watch = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest)])
    try:
        watch.wait_ready(timeout=30)
        expected = {name: entry.data.decode() for name, entry in versioned(versions[-1]).files.items()}
        wait_until("the store's last version", lambda: read_as_app(dest) == expected, timeout=20)

        def snapshot_dirs() -> list[str]:
            return [n for n in os.listdir(dest) if SNAPSHOT_DIR.fullmatch(n)]

        # Old snapshots are removed just after each publish has been announced: wait for that.
        wait_until("the leftovers of the kills to be cleared", lambda: len(snapshot_dirs()) <= 2, timeout=20)
    finally:
        assert watch.stop()[0] == 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("store_kind", ["nginx", "etcd"])
def test_store_outage_keeps_files_costs_little_cpu_and_recovers(
    store_kind: str, tmp_path: Path, watches: list[Watch], nginx: Nginx, etcd: Etcd
) -> None:
    if store_kind == "nginx":
        (nginx.root / "app.yaml").write_text("v: 1\n")
        url = nginx.url("app.yaml")
    else:
        etcd.put("/app/app.yaml", "v: 1\n")
        url = etcd.url()
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", url, "--dest", str(dest), "--interval", "0.5", "--stale-after", "2"])
    watches.append(watch)
    watch.wait_ready()
    (nginx.stop if store_kind == "nginx" else etcd.kill)()
    outage_started = time.monotonic()
    cpu_before = _cpu_seconds(watch.proc.pid)
    # Polled gently: each request costs the watch CPU, which would count against it below.
    wait_until("/healthz to turn stale", lambda: watch.get("/healthz")[0] == 503, timeout=20, interval=0.25)
    wait_until("six seconds of outage", lambda: time.monotonic() - outage_started > 6, timeout=10)
    cpu_used = _cpu_seconds(watch.proc.pid) - cpu_before
    assert cpu_used < 0.5, f"{cpu_used:.2f} CPU seconds during a 6 s outage: a busy loop?"
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}
    assert watch.proc.poll() is None

    if store_kind == "nginx":
        (nginx.root / "app.yaml").write_text("v: 2, written during the outage\n")
        nginx.start()
    else:
        etcd.start()
        etcd.put("/app/app.yaml", "v: 2, written during the outage\n")
    wait_until("/healthz to recover", lambda: watch.get("/healthz")[0] == 200, timeout=40)
    wait_until("the store's content", lambda: read_as_app(dest) == {"app.yaml": "v: 2, written during the outage\n"})
