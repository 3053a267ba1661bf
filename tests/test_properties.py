"""Property tests: path validation, snapshot merging, and the publisher, for inputs nobody thought of."""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from infantry.errors import SettingsError, UnsafeDataError
from infantry.publish import DirectPublisher, KubeletPublisher
from infantry.snapshot import (
    Checked,
    FileEntry,
    Limits,
    Part,
    Snapshot,
    check_path,
    check_revision,
    check_whole,
    find_file_dir_clash,
    merge,
)
from tests.support import tree

# Names built from the characters that matter most to path handling, plus anything else.
tricky = st.lists(st.sampled_from(["/", ".", "..", "a", "\x00", "\n", "\\", "é", "\udcff", " "]), max_size=12).map(
    "".join
)
any_text = st.one_of(tricky, st.text(max_size=40))


@given(any_text)
def test_an_accepted_path_stays_inside_the_destination(path: str) -> None:
    if check_path(path) is not None:
        return
    joined = posixpath.normpath(posixpath.join("/dest", path))
    assert joined.startswith("/dest/")
    assert posixpath.normpath(path) == path  # nothing to normalise away: no '.', '..' or '//'
    assert not any(part.startswith("..") for part in path.split("/"))
    assert "\x00" not in path
    assert len(path.encode("utf-8")) <= 4096


segment = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00", min_codepoint=0x20), min_size=1, max_size=20
)


@given(st.lists(segment, min_size=1, max_size=5))
def test_plain_segments_are_accepted_unless_reserved(parts: list[str]) -> None:
    path = "/".join(parts)
    reason = check_path(path)
    bad_part = any(p in (".", "..") or p.startswith("..") or "\x7f" in p or len(p.encode()) > 255 for p in parts)
    assert (reason is None) == (not bad_part)


# "d" and "e/f" are a file in some sets and a directory in others, across a sequence.
names = st.sampled_from(["a", "b", "c.yaml", "d", "d/x", "d/y", "e/f", "e/f/g", "h/i"])
contents = st.binary(max_size=64)
snapshots = (
    st.dictionaries(names, st.tuples(contents, st.booleans()), min_size=1)
    .filter(lambda files: find_file_dir_clash(files) is None)
    .map(lambda files: Snapshot.of({path: FileEntry(data, ex) for path, (data, ex) in files.items()}))
)


@given(st.lists(st.tuples(st.sampled_from(["", "one", "two/deep"]), snapshots), min_size=1, max_size=4))
def test_merge_keeps_every_file_under_its_dir_or_refuses(parts: list[tuple[str, Snapshot]]) -> None:
    tagged = [Part(f"source{i}", subdir, snap) for i, (subdir, snap) in enumerate(parts)]
    expected: dict[str, FileEntry] = {}
    clash = False
    for part in tagged:
        for path, entry in part.snapshot.files.items():
            full = f"{part.subdir}/{path}" if part.subdir else path
            clash = clash or full in expected
            expected[full] = entry
    files = set(expected)
    clash = clash or any("/".join(p.split("/")[:i]) in files for p in files for i in range(1, p.count("/") + 1))
    if clash:
        with pytest.raises(SettingsError):
            merge(tagged)
        return
    merged = merge(tagged)
    assert dict(merged.files) == expected
    assert merged.version == Snapshot.of(expected).version
    assert merge(list(reversed(tagged))).version == merged.version


def read_bytes_as_app(dest: Path) -> dict[str, bytes]:
    """Every file reached through the destination's visible names, as bytes."""
    seen: dict[str, bytes] = {}
    for name in os.listdir(dest):
        if name.startswith(".."):
            continue
        top = dest / name
        files = [p for p in top.rglob("*") if p.is_file()] if top.is_dir() else [top]
        for file in files:
            seen[file.relative_to(dest).as_posix()] = file.read_bytes()
    return seen


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(snapshots, min_size=1, max_size=6), st.sampled_from(["kubelet", "direct"]))
def test_the_destination_always_reads_as_the_last_snapshot(sequence: list[Snapshot], layout: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        outside = sandbox / "outside"
        outside.mkdir()
        (outside / "canary").write_text("untouched")
        dest = sandbox / "configs"
        publisher = KubeletPublisher(dest, 0o644) if layout == "kubelet" else DirectPublisher(dest, 0o644)
        for snapshot in sequence:
            publisher.publish(snapshot)
            publisher.tidy()
            assert read_bytes_as_app(dest) == {p: e.data for p, e in snapshot.files.items()}
            for path, entry in snapshot.files.items():
                assert bool(os.stat(dest / path).st_mode & 0o100) == entry.executable
        assert sorted(os.listdir(sandbox)) == ["configs", "outside"]
        assert tree(outside) == {"canary": "untouched"}


# Paths of a few short segments from a small alphabet, so that clashes (a file above another) come up
# often; revisions also bring unsafe names. Small sizes and limits put many sets at a limit's edge.
safe_path = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
any_path = st.one_of(safe_path, safe_path.map(lambda path: path + "/..x"), safe_path.map(lambda path: "c\n/" + path))
content = st.binary(max_size=5)
# Each limit is either generous or small enough to be reached, so that often one reason alone refuses.
small_limits = st.builds(
    Limits,
    max_file_size=st.one_of(st.just(100), st.integers(2, 5)),
    max_total_size=st.one_of(st.just(100), st.integers(0, 16)),
    max_files=st.one_of(st.just(100), st.integers(1, 6)),
)


def _outcome(check: Callable[[], Checked]) -> tuple[str, str] | str:
    try:
        checked = check()
    except UnsafeDataError:
        return "refused"
    return checked.snapshot.version, repr(sorted(checked.snapshot.files.items()))


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(safe_path, content, max_size=4),
    st.dictionaries(any_path, content, max_size=4),
    st.lists(any_path, max_size=4),
    small_limits,
)
def test_a_revision_is_refused_or_kept_exactly_as_a_whole_check_would(
    first: dict[str, bytes], second: dict[str, bytes], dropped: list[str], limits: Limits
) -> None:
    before = {path: FileEntry(data) for path, data in first.items()}
    try:
        checked = check_whole("test", limits, before)
    except UnsafeDataError:
        return  # only a set that passed is ever revised
    after = dict(before)
    after.update({path: FileEntry(data) for path, data in second.items()})
    for path in dropped:
        after.pop(path, None)
    changed = set(second) | set(dropped)
    whole = _outcome(lambda: check_whole("test", limits, after))
    revised = _outcome(lambda: check_revision("test", limits, checked, after, changed))
    assert revised == whole
    event("refused" if whole == "refused" else "kept")
