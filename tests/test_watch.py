"""`infantry watch` as a sidecar: real processes receiving real signals, real nginx, real endpoints."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.support import (
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


def make_store(tmp_path: Path, **files: str) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    for name, content in files.items():
        (store / name).write_text(content)
    return store


def test_an_edit_gives_one_signal_and_a_burst_gives_one_more(tmp_path: Path, watches: list[Watch]) -> None:
    store, dest = installed_store(tmp_path, {"app.yaml": "color: blue\n"})
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
                "--signal",
                "HUP",
                "--wait",
                "0.2:1",
            ],
        )
        watches.append(watch)
        watch.wait_ready()
        # Starting after install, with the same content, must not reload the app.
        assert watch.metric("infantry_syncs_total", result="changed") == 1
        assert app.count() == 0

        edited = time.time()
        (store / "app.yaml").write_text("color: green\n")
        wait_until("one SIGHUP after the edit", lambda: app.count() == 1, timeout=15)
        stamp, content = app.signals()[0].split(" ", 1)
        # Within a few seconds, on a busy machine too: far sooner than the 10 s resync, so the change was seen.
        assert float(stamp) - edited < 3.0
        assert content == "color: green"  # the app read the new value when signalled
        assert read_as_app(dest) == {"app.yaml": "color: green\n"}

        for i in range(10):
            (store / f"burst-{i}.conf").write_text(f"n={i}\n")
        wait_until("the burst to be published", lambda: len(read_as_app(dest)) == 11, timeout=15)
        wait_until("a signal for the burst", lambda: app.count() == 2, timeout=15)
        assert holds_for(lambda: app.count() == 2, 1.5), app.signals()

        assert watch.metric("infantry_publishes_total", result="published") == 2
        assert watch.metric("infantry_reloads_total", method="signal", result="ok") == 2
        assert watch.metric("infantry_last_sync_timestamp_seconds") > edited
        assert watch.metric("infantry_propagation_seconds_count") == 2
        assert watch.get("/healthz")[0] == 200
        code, took = watch.stop()
        assert code == 0 and took < 10, watch.log()
    finally:
        app.stop()


def test_readyz_waits_for_the_first_publish_and_sigterm_stops_it(tmp_path: Path, watches: list[Watch]) -> None:
    store = tmp_path / "store"  # does not exist yet: nothing can be published
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest), "--interval", "0.2"])
    watches.append(watch)
    wait_until("the health endpoint", lambda: watch.get("/readyz")[0] == 503)
    assert not dest.exists()
    store.mkdir()
    (store / "a.txt").write_text("a")
    watch.wait_ready()
    assert read_as_app(dest) == {"a.txt": "a"}
    code, took = watch.stop()
    assert code == 0 and took < 10, watch.log()


def test_signal_by_process_name_reaches_the_app(tmp_path: Path, watches: list[Watch]) -> None:
    store, dest = installed_store(tmp_path, {"app.yaml": "v: 1\n"})
    name = f"demo-app-{os.getpid()}"
    app = SignalRecorder(tmp_path, argv0=name)
    try:
        watch = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest), "--process", name, "--signal", "HUP"])
        watches.append(watch)
        watch.wait_ready()
        (store / "app.yaml").write_text("v: 2\n")
        wait_until("the app, found by name, to get SIGHUP", lambda: app.count() == 1, timeout=15)
        # The line is logged after the signal is sent: the app may record it first.
        wait_until("the signal to be logged", lambda: f"sent SIGHUP to process {app.proc.pid}" in watch.log())
    finally:
        app.stop()


def test_reload_url_and_exec_are_each_called_once_per_publish(
    tmp_path: Path, watches: list[Watch], reload_endpoint: ReloadEndpoint
) -> None:
    store, dest = installed_store(tmp_path, {"app.yaml": "v: 1\n"})
    ran = tmp_path / "exec.log"
    hook = f"sh -c 'echo $INFANTRY_VERSION >> {ran}'"
    watch = Watch(
        tmp_path,
        [
            "--source",
            store.as_uri(),
            "--dest",
            str(dest),
            "--reload-url",
            reload_endpoint.url,
            "--exec",
            hook,
            "--wait",
            "0.1:1",
        ],
    )
    watches.append(watch)
    watch.wait_ready()
    (store / "app.yaml").write_text("v: 2\n")
    (store / "other.yaml").write_text("more\n")
    wait_until("the reload call", lambda: len(reload_endpoint.calls) == 1, timeout=15)
    wait_until("the exec hook", lambda: ran.exists() and ran.read_text().strip() != "", timeout=15)
    assert holds_for(lambda: len(reload_endpoint.calls) == 1, 1.2)
    method, path, version = reload_endpoint.calls[0]
    assert (method, path) == ("POST", "/-/reload")
    assert ran.read_text().split() == [version]
    assert watch.metric("infantry_reloads_total", method="http", result="ok") == 1
    assert watch.metric("infantry_reloads_total", method="exec", result="ok") == 1
    assert watch.metric("infantry_snapshot_info", version=version) == 1


def test_reload_url_failures_are_retried_and_counted(tmp_path: Path, watches: list[Watch]) -> None:
    endpoint = ReloadEndpoint(status=500)
    try:
        store, dest = installed_store(tmp_path, {"app.yaml": "v: 1\n"})
        watch = Watch(
            tmp_path,
            ["--source", store.as_uri(), "--dest", str(dest), "--reload-url", endpoint.url, "--reload-timeout", "2"],
        )
        watches.append(watch)
        watch.wait_ready()
        (store / "app.yaml").write_text("v: 2\n")
        wait_until(
            "the failure to be counted",
            lambda: watch.metric("infantry_reloads_total", method="http", result="error") == 1,
            timeout=20,
        )
        assert len(endpoint.calls) > 1  # retried before giving up
        assert read_as_app(dest) == {"app.yaml": "v: 2\n"}
    finally:
        endpoint.stop()


def test_check_gate_keeps_rejected_content_out(tmp_path: Path, watches: list[Watch], app: SignalRecorder) -> None:
    store = make_store(tmp_path, **{"app.yaml": "good: 1\n"})
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        ["--source", store.as_uri(), "--dest", str(dest), "--check", "grep -rq good", "--pid-file", str(app.pid_file)],
    )
    watches.append(watch)
    watch.wait_ready()
    assert app.count() == 0  # the first set in an empty destination notifies nobody
    (store / "app.yaml").write_text("bad: 1\n")
    wait_until("the rejection", lambda: watch.metric("infantry_publishes_total", result="rejected") == 1, timeout=15)
    assert read_as_app(dest) == {"app.yaml": "good: 1\n"}
    assert app.count() == 0
    (store / "app.yaml").write_text("good: 2\n")
    wait_until("the good version", lambda: read_as_app(dest) == {"app.yaml": "good: 2\n"}, timeout=15)
    wait_until("one signal", lambda: app.count() == 1, timeout=15)


def test_http_polling_uses_etags_and_a_304_changes_nothing(
    nginx: Nginx, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    doc = nginx.root / "app.yaml"
    doc.write_text("v: 1\n")
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        ["--source", nginx.url("app.yaml"), "--dest", str(dest), "--interval", "0.2", "--pid-file", str(app.pid_file)],
    )
    watches.append(watch)
    watch.wait_ready()
    # nginx logs a poll once answered, and watch counts it once the answer is read: wait for both.
    wait_until(
        "several polls",
        lambda: len(nginx.requests("app.yaml")) >= 5 and watch.metric("infantry_syncs_total", result="unchanged") >= 4,
        timeout=20,
    )
    rows = nginx.requests("app.yaml")
    assert rows[0][1] == "200"
    assert {row[1] for row in rows[1:]} == {"304"}
    assert all(row[5] for row in rows[1:])  # If-None-Match was sent
    assert all(row[7] == "0" for row in rows[1:])  # and no body came back
    assert watch.metric("infantry_publishes_total", result="published") == 1
    assert watch.metric("infantry_syncs_total", result="unchanged") >= 4

    doc.write_text("v: 2 (longer)\n")
    os.utime(doc, (time.time() + 5, time.time() + 5))  # nginx's ETag is mtime and size
    wait_until("the change to arrive", lambda: read_as_app(dest) == {"app.yaml": "v: 2 (longer)\n"}, timeout=15)
    wait_until("one signal", lambda: app.count() == 1, timeout=15)


def test_last_modified_polling_and_a_rotated_token(nginx: Nginx, tmp_path: Path, watches: list[Watch]) -> None:
    (nginx.root / "noetag").mkdir()
    doc = nginx.root / "noetag" / "app.yaml"
    doc.write_text("v: 1\n")
    token = tmp_path / "token"
    token.write_text("first-token\n")
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        [
            "--source",
            nginx.url("noetag/app.yaml"),
            "--dest",
            str(dest),
            "--interval",
            "0.2",
            "--bearer-token-file",
            str(token),
        ],
    )
    watches.append(watch)
    watch.wait_ready()
    wait_until("conditional polls", lambda: len(nginx.requests("noetag/app.yaml")) >= 3, timeout=20)
    rows = nginx.requests("noetag/app.yaml")
    assert [row[1] for row in rows[:3]] == ["200", "304", "304"]
    assert rows[1][5] == "" and rows[1][6] != ""  # no ETag, so If-Modified-Since carried it
    token.write_text("rotated-token\n")
    wait_until(
        "the rotated token on the wire",
        lambda: nginx.requests("noetag/app.yaml")[-1][4] == "Bearer rotated-token",
        timeout=15,
    )
    assert "rotated-token" not in watch.log() and "first-token" not in watch.log()


def test_store_outage_keeps_files_and_turns_healthz_stale_then_recovers(
    nginx: Nginx, tmp_path: Path, watches: list[Watch]
) -> None:
    doc = nginx.root / "app.yaml"
    doc.write_text("v: 1\n")
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path, ["--source", nginx.url("app.yaml"), "--dest", str(dest), "--interval", "0.2", "--stale-after", "1"]
    )
    watches.append(watch)
    watch.wait_ready()
    assert watch.get("/healthz")[0] == 200
    nginx.stop()
    wait_until("/healthz to report the stale source", lambda: watch.get("/healthz")[0] == 503, timeout=20)
    assert nginx.url("app.yaml") in watch.get("/healthz")[1]
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}
    assert watch.proc.poll() is None
    assert watch.metric("infantry_syncs_total", result="error") >= 1

    doc.write_text("v: 2 after the outage\n")
    nginx.start()
    wait_until("/healthz to recover", lambda: watch.get("/healthz")[0] == 200, timeout=40)
    wait_until(
        "the update made during the outage", lambda: read_as_app(dest) == {"app.yaml": "v: 2 after the outage\n"}
    )


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    store = make_store(tmp_path, **{"a": "1"})
    result = infantry("install", "--source", store.as_uri(), "--dest", str(tmp_path / "D"), "--log-format", "json")
    assert result.returncode == 0
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("published" in e["message"] for e in entries)
