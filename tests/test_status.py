"""`infantry status`: what a destination holds, read from the destination alone, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support import Watch, free_port, infantry, wait_until


def install(source: Path, dest: Path, *args: str) -> str:
    """Install ``source`` into ``dest``; the 12-digit version install logged."""
    result = infantry("install", "--source", source.as_uri(), "--dest", str(dest), *args)
    assert result.returncode == 0, result.stderr
    found = re.search(r"published ([0-9a-f]{12}) ", result.stderr)
    assert found, result.stderr
    return found.group(1)


def status(dest: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = infantry("status", "--dest", str(dest), "--json", *args)
    return result.returncode, json.loads(result.stdout)


def listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` (links not followed), with its inode, size and mtime."""
    found = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            st = os.lstat(Path(directory, name))
            found[str(Path(directory, name).relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "conf.d").mkdir(parents=True)
    (src / "app.yaml").write_text("color: blue\n")
    (src / "conf.d" / "extra.conf").write_text("x" * 2000)
    return src


def test_a_whole_destination_shows_the_live_set_and_the_one_kept_for_rollback(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    first = install(source, dest)
    (source / "app.yaml").write_text("color: green\n")
    second = install(source, dest)
    code, state = status(dest)
    assert code == 0
    assert state["whole"] is True and state["layout"] == "kubelet"
    assert state["live"]["version"].startswith(second) and state["live"]["files"] == 2
    assert state["live"]["bytes"] == len("color: green\n") + 2000
    assert state["previous"]["version"].startswith(first)
    assert state["live"]["age_seconds"] <= state["previous"]["age_seconds"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", state["live"]["published_at"])
    assert state["fallback"] is False and state["problems"] == [] and state["leftovers"] == []
    text = infantry("status", "--dest", str(dest))
    assert text.returncode == 0
    assert f"live         {second}  2 files, 2.0 KiB, published " in text.stdout
    assert f"previous     {first}  2 files" in text.stdout
    assert "(kubelet layout): whole" in text.stdout


def _point_data_outside(dest: Path) -> None:
    (dest / "..data").unlink()
    (dest / "..data").symlink_to("/etc")


def _plant_fifo(dest: Path) -> None:
    os.mkfifo(next(dest.glob("..20*")) / "fifo")


DAMAGE = {
    "top link removed": (lambda dest: (dest / "app.yaml").unlink(), "'app.yaml' is missing, or is not the link"),
    "no ..data": (lambda dest: os.replace(dest / "..data", dest / "gone"), "nothing was published here"),
    "..data points outside": (_point_data_outside, "not at a snapshot directory"),
    "temporary left": (lambda dest: (dest / "..tmp-half").mkdir(), "..tmp-half"),
    "old snapshot": (lambda dest: (dest / "..2020_01_01_00_00_00.000000000").mkdir(), "..2020_01_01_00_00_00"),
    "stale link": (lambda dest: (dest / "old.conf").symlink_to("..data/old.conf"), "old.conf"),
    "fifo in the set": (_plant_fifo, "something infantry does not write"),
}


@pytest.mark.parametrize(("damage", "expected"), DAMAGE.values(), ids=DAMAGE.keys())
def test_a_broken_destination_exits_1_names_what_is_wrong_and_is_left_as_it_is(
    source: Path, tmp_path: Path, damage: Any, expected: str
) -> None:
    dest = tmp_path / "D"
    install(source, dest)
    damage(dest)
    before = listing(dest)
    code, state = status(dest)
    assert code == 1
    assert state["whole"] is False
    assert any(expected in line for line in state["problems"] + state["leftovers"]), state
    assert listing(dest) == before  # status only reads
    text = infantry("status", "--dest", str(dest))
    assert text.returncode == 1 and "NOT WHOLE" in text.stdout and expected in text.stdout


def test_a_live_fallback_is_reported(tmp_path: Path) -> None:
    fallback = tmp_path / "baked"
    fallback.mkdir()
    (fallback / "app.yaml").write_text("safe: defaults\n")
    dest = tmp_path / "D"
    url = f"http://127.0.0.1:{free_port()}/app.yaml"
    result = infantry("install", "--source", url, "--dest", str(dest), "--timeout", "1", "--fallback", str(fallback))
    assert result.returncode == 0, result.stderr
    code, state = status(dest)
    assert code == 0 and state["fallback"] is True
    assert "yes: the baked-in fallback is live" in infantry("status", "--dest", str(dest)).stdout


def test_the_direct_layout(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    version = install(source, dest, "--layout", "direct")
    code, state = status(dest)
    assert code == 0 and state["layout"] == "direct" and state["live"]["version"].startswith(version)
    assert state["previous"] is None
    (dest / "conf.d" / "extra.conf").unlink()
    code, state = status(dest)
    assert code == 1 and state["live"] is None and "missing" in state["problems"][0]
    shutil.rmtree(dest / "conf.d")
    (dest / "conf.d").symlink_to("/etc")  # a link where a directory of the set belongs: not followed
    code, state = status(dest)
    assert code == 1 and state["live"] is None and state["problems"], state


def test_versions_are_read_back_with_the_file_mode_they_were_published_with(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    version = install(source, dest, "--file-mode", "0640")
    code, state = status(dest, "--file-mode", "0640")
    assert code == 0 and state["live"]["version"].startswith(version)
    code, state = status(dest, "--file-mode", "0644")  # the files are 0640: another set than it would write
    assert code == 0 and not state["live"]["version"].startswith(version)
    result = infantry("status", "--dest", str(dest), "--json", env={"INFANTRY_FILE_MODE": "0640"})
    assert json.loads(result.stdout)["live"]["version"].startswith(version)


def test_an_empty_or_missing_destination_is_not_whole(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, state = status(tmp_path / "empty")
    assert code == 1 and state["live"] is None and "nothing was published here" in state["problems"][0]
    code, state = status(tmp_path / "missing")
    assert code == 1 and "cannot be read" in state["problems"][0]


def test_configured_stays_ready_through_a_refused_change_while_readyz_says_out_of_step(
    source: Path, tmp_path: Path, watches: list[Watch]
) -> None:
    """The readiness `inject` gives the sidecar: a set is live. A store change every pod refuses must not
    take every pod out of its Services; /readyz says it is out of step."""
    check = tmp_path / "check.sh"
    check.write_text('#!/bin/sh\n! grep -q broken "$1/app.yaml"\n')
    check.chmod(0o755)
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path, ["--source", source.as_uri(), "--dest", str(dest), "--interval", "0.2", "--check", str(check)]
    )
    watches.append(watch)
    watch.wait_ready()
    assert watch.get("/configured")[0] == 200
    (source / "app.yaml").write_text("color: broken\n")
    wait_until("the refusal", lambda: watch.get("/readyz") == (503, f"not ready: {refusal(watch)}\n"))
    assert watch.get("/configured")[0] == 200
    assert (dest / "app.yaml").read_text() == "color: blue\n"


def refusal(watch: Watch) -> str:
    """The refusal /readyz names, once the check refused the change ("" before)."""
    reason = json.loads(watch.get("/status")[1])["refused"] or ""
    return reason if "refused" in reason else "(no refusal yet)"


def test_configured_is_503_until_a_set_is_live(tmp_path: Path, watches: list[Watch]) -> None:
    url = f"http://127.0.0.1:{free_port()}/app.yaml"
    watch = Watch(tmp_path, ["--source", url, "--dest", str(tmp_path / "D"), "--interval", "0.2"])
    watches.append(watch)
    wait_until("the health server", lambda: watch.get("/configured")[0] == 503)
    assert "no set is live" in watch.get("/configured")[1]


def test_a_tree_deeper_than_recursion_allows_is_read(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    install(source, dest)
    deep = next(dest.glob("..20*")) / "conf.d"
    made = []
    for _ in range(1500):  # deeper than Python's recursion limit: an os.walk of it raises
        deep = deep / "a"
        deep.mkdir()  # one at a time: pathlib's mkdir(parents=True) recurses too
        made.append(deep)
    (deep / "f").write_text("x")
    try:
        code, state = status(dest)
        assert code == 0 and state["live"]["files"] == 3, state
    finally:  # taken down without recursion, so that no later clean-up of the temporary tree meets it
        (deep / "f").unlink()
        for directory in reversed(made):
            directory.rmdir()


def test_a_directory_of_the_set_the_reader_cannot_list_is_not_whole(source: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="infantry-status-"))
    try:
        base.chmod(0o755)  # the unprivileged reader below may reach the destination, not what it hides
        dest = base / "D"
        install(source, dest)
        (next(dest.glob("..20*")) / "conf.d").chmod(0o700)
        result = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-m", "infantry",
             "status", "--dest", str(dest), "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        assert "cannot be read whole" in json.loads(result.stdout)["problems"][0]
    finally:
        shutil.rmtree(base)


def test_a_snapshot_name_that_is_no_time_is_reported_not_a_crash(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    install(source, dest)
    live = next(dest.glob("..20*"))
    odd = dest / "..2026_13_45_99_99_99.000000000"
    live.rename(odd)
    (dest / "..data").unlink()
    (dest / "..data").symlink_to(odd.name)
    code, state = status(dest)
    assert code == 0 and state["live"]["files"] == 2
    watch = subprocess.run(
        [sys.executable, "-m", "infantry", "install", "--source", source.as_uri(), "--dest", str(dest)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert watch.returncode == 0, watch.stderr
