"""Log lines as an operator queries them: JSON fields beside the message, a start-up line with the
effective settings (no secret in it), the port actually bound, and retry progress."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support import Watch, free_port, infantry, wait_until


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_the_start_line_carries_the_effective_settings_with_no_secret(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.conf").write_text("x")
    result = infantry(
        "install",
        "--source", source.as_uri(),
        "--source", f"http://reader:hunter2-password@127.0.0.1:{free_port()}/app.conf",
        "--dest", str(tmp_path / "D"),
        "--header", "Authorization: Bearer hunter2-token",
        "--check", "true\t--token hunter2-arg",  # any white space separates the arguments
        "--timeout", "1",
        "--log-format", "json",
    )  # fmt: skip
    assert "hunter2" not in result.stderr
    start = json_lines(result.stderr)[0]
    assert start["event"] == "start" and start["logger"] == "infantry.cli"
    settings = start["settings"]
    assert settings["source"] == [
        source.as_uri(),
        f"http://reader:***@127.0.0.1:{settings['source'][1].split(':')[-1]}",
    ]
    assert settings["header"] == ["Authorization: (hidden)"]
    assert settings["check"] == "true (arguments hidden)"
    assert settings["timeout"] == 1.0 and settings["file_mode"] == "0644" and settings["max_files"] == 100000
    assert "wait" not in settings  # install does not take it
    text = infantry("install", "--source", source.as_uri(), "--dest", str(tmp_path / "E"), "--timeout", "7")
    first = text.stderr.splitlines()[0]
    assert re.search(r"INFO infantry.cli: infantry \S+ install: source=\S+ dest=\S+ timeout=7.0$", first), first


def test_install_retries_say_the_attempt_the_delay_and_the_time_left(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/app.conf"
    result = infantry(
        "install", "--source", url, "--dest", str(tmp_path / "D"), "--timeout", "2", "--log-format", "json"
    )
    assert result.returncode == 3
    retries = [line for line in json_lines(result.stderr) if line.get("event") == "fetch_failed"]
    assert len(retries) >= 2
    assert [line["attempt"] for line in retries] == list(range(1, len(retries) + 1))
    for line in retries:
        assert line["source"] == url and "ConnectError" in line["error"]
        assert line["next_retry_s"] > 0 and 0 <= line["deadline_s"] <= 2
        assert (
            f"retrying in {line['next_retry_s']:.1f}s, {line['deadline_s']:.1f}s left of --timeout" in line["message"]
        )
    assert retries[-1]["deadline_s"] < retries[0]["deadline_s"]


def test_watch_logs_the_port_it_bound(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.conf").write_text("x")
    log = tmp_path / "watch.log"
    args = [
        "--source",
        source.as_uri(),
        "--dest",
        str(tmp_path / "D"),
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "infantry", "watch", *args], stderr=stderr)
    try:
        wait_until(
            "the listening line", lambda: any(line.get("event") == "listening" for line in json_lines(log.read_text()))
        )
        line = next(line for line in json_lines(log.read_text()) if line.get("event") == "listening")
        host, _, port = line["address"].rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0 and f"on 127.0.0.1:{port}" in line["message"]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code in (200, 503)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_watch_lines_carry_fields_and_debug_shows_each_poll(tmp_path: Path, watches: list[Watch]) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.conf").write_text("one")
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        ["--source", source.as_uri(), "--dest", str(dest), "--interval", "0.2", "--wait", "0.3:1",
         "--log-format", "json", "--log-level", "debug"],
    )  # fmt: skip
    watches.append(watch)
    watch.wait_ready()
    (source / "app.conf").write_text("two")
    wait_until("the second publish", lambda: len(events(watch, "published")) == 2)
    first, second = events(watch, "published")
    for line in (first, second):
        assert re.fullmatch(r"[0-9a-f]{64}", line["version"]) and line["files"] == 1
        assert line["duration_ms"] >= 0 and line["message"].startswith(f"published {line['version'][:12]} (1 files)")
    assert events(watch, "changed")[-1]["version"] == second["version"]
    wait_until("a poll that found nothing new", lambda: bool(events(watch, "unchanged")))
    held = events(watch, "debounce")
    assert held and "held back" in held[0]["message"] and 0 <= held[0]["deadline_s"] <= 1
    status = json.loads(watch.get("/status")[1])
    assert status["live"]["version"] == second["version"] and status["live"]["bytes"] == 3
    assert status["live"]["age_seconds"] >= 0 and status["app_told"] is True and status["fallback"] is False
    assert status["sources"][0]["last_ok_at"].endswith("Z") and status["sources"][0]["next_retry_in_s"] is None


def test_a_failing_source_logs_each_attempt_and_status_says_when_it_is_tried_next(
    tmp_path: Path, watches: list[Watch]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/app.conf"
    watch = Watch(
        tmp_path,
        [
            "--source",
            url,
            "--dest",
            str(tmp_path / "D"),
            "--interval",
            "5",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
    )
    watches.append(watch)
    wait_until("three failed attempts", lambda: len(events(watch, "source_failed")) >= 3, timeout=30)
    failed = events(watch, "source_failed")
    assert [line["attempt"] for line in failed[:3]] == [1, 2, 3]
    assert all(
        line["source"] == url and "ConnectError" in line["error"] and line["next_retry_s"] > 0 for line in failed
    )
    assert failed[0]["level"] == "warning" and failed[1]["level"] == "debug"  # the same error is warned of once
    source = json.loads(watch.get("/status")[1])["sources"][0]
    assert source["failures"] >= 3 and source["next_retry_in_s"] is not None and source["last_ok_at"] is None


def events(watch: Watch, event: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(watch.log()) if line.get("event") == event]


def test_every_field_a_line_may_carry_can_be_given_and_is_shown_in_json() -> None:
    import logging

    from infantry import logs

    values: dict[str, Any] = {name: name for name in logs.FIELDS}
    values.update(files=3, duration_ms=1.5, attempt=2, next_retry_s=0.5, deadline_s=9.0, settings={"a": 1})
    given = logs.fields(**values)
    assert set(given) == set(logs.FIELDS)
    record = logging.LogRecord("infantry.test", logging.INFO, __file__, 1, "message", None, None)
    record.__dict__.update(given)
    shown = json.loads(logs.JsonFormatter().format(record))
    assert {key: shown[key] for key in logs.FIELDS} == values
    assert logs.fields(event="x", source=None) == {"event": "x"}
