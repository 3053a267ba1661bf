from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from infantry import snapshot as snapshot_module
from infantry import spool
from infantry.errors import SettingsError, UnsafeDataError
from infantry.snapshot import (
    REVISE_NEW_PATHS,
    Checked,
    FileEntry,
    Files,
    Limits,
    Part,
    Snapshot,
    SnapshotBuilder,
    check_path,
    check_revision,
    check_whole,
    digest,
    find_file_dir_clash,
    merge,
)


@pytest.mark.parametrize(
    "path",
    ["app.yaml", "conf.d/a.conf", ".hidden", "a..b", "ünïcode.txt", "x" * 255, "/".join(["d"] * 100) + "/f"],
)
def test_safe_paths_pass(path: str) -> None:
    assert check_path(path) is None


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../escape", "'..'"),
        ("a/../../b", "'..'"),
        ("..data", "reserved"),
        ("sub/..2026_01_01", "reserved"),
        ("a//b", "empty"),
        ("./a", "'.'"),
        ("nul\x00byte", "NUL"),
        ("line\nbreak", "control"),
        ("x" * 256, "longer than 255"),
        ("/".join(["d" * 200] * 21), "longer than 4096"),
        ("bad\udcff", "UTF-8"),
    ],
)
def test_unsafe_paths_are_named(path: str, reason: str) -> None:
    found = check_path(path)
    assert found is not None
    assert reason in found


def test_digest_ignores_order_and_sees_content_and_mode() -> None:
    a = Snapshot.of({"a": FileEntry(b"1"), "b": FileEntry(b"2")})
    b = Snapshot.of({"b": FileEntry(b"2"), "a": FileEntry(b"1")})
    assert a.version == b.version
    assert Snapshot.of({"a": FileEntry(b"1"), "b": FileEntry(b"3")}).version != a.version
    assert Snapshot.of({"a": FileEntry(b"1", True), "b": FileEntry(b"2")}).version != a.version
    # Path and content boundaries cannot be shifted to forge the same digest.
    assert Snapshot.of({"ab": FileEntry(b"c")}).version != Snapshot.of({"a": FileEntry(b"bc")}).version


def test_builder_enforces_limits_with_the_source_in_the_message() -> None:
    builder = SnapshotBuilder("http://store/x", Limits(max_file_size=10, max_total_size=15, max_files=2))
    builder.add("a", b"0123456789")
    with pytest.raises(UnsafeDataError, match=r"http://store/x: 'big' is 11 bytes, over the per-file limit"):
        builder.add("big", b"x" * 11)
    with pytest.raises(UnsafeDataError, match="total size"):
        builder.add("b", b"x" * 6)
    builder.add("b", b"x" * 5)
    with pytest.raises(UnsafeDataError, match="more than 2 files"):
        builder.add("c", b"")


def test_builder_refuses_empty_sets_and_file_dir_clashes() -> None:
    with pytest.raises(UnsafeDataError, match="no files"):
        SnapshotBuilder("s", Limits()).build()
    builder = SnapshotBuilder("s", Limits())
    builder.add("a", b"file")
    builder.add("a/b", b"nested")
    with pytest.raises(UnsafeDataError, match="'a' is both a file and a directory"):
        builder.build()


def test_merge_places_sources_in_their_dirs() -> None:
    one = Snapshot.of({"app.yaml": FileEntry(b"1")})
    two = Snapshot.of({"app.yaml": FileEntry(b"2")})
    merged = merge([Part("file:///one", "", one), Part("file:///two", "extra", two)])
    assert dict(merged.files) == {"app.yaml": FileEntry(b"1"), "extra/app.yaml": FileEntry(b"2")}


def test_merge_refuses_a_path_claimed_twice() -> None:
    one = Snapshot.of({"app.yaml": FileEntry(b"1")})
    with pytest.raises(SettingsError, match=r"file:///one and file:///two both provide 'app.yaml'"):
        merge([Part("file:///one", "", one), Part("file:///two", "", one)])
    with pytest.raises(SettingsError, match="file in one source and a directory"):
        merge([Part("a", "", Snapshot.of({"x": FileEntry(b"")})), Part("b", "x", one)])


def test_a_spool_removed_from_under_infantry_is_made_again(tmp_path: Path) -> None:
    from infantry.spool import Spool

    spool_dir = tmp_path / "dest" / "..spool"
    store = Spool(spool_dir)
    first = store.store(b"x" * 1000)
    assert first.read() == b"x" * 1000
    shutil.rmtree(spool_dir)
    second = store.store(b"y" * 1000)
    assert second.read() == b"y" * 1000 and spool_dir.is_dir()
    store.close()
    assert not spool_dir.exists()


def test_the_paths_of_a_set_are_bounded_together() -> None:
    builder = SnapshotBuilder("test", Limits())

    def add_many() -> None:
        for i in range(5000):  # 5,000 paths of 4,000 bytes: 20 MB of names for 5,000 bytes of content
            builder.add(f"{'d' * 200}/" * 19 + f"{i:0150d}", b"x")

    with pytest.raises(UnsafeDataError, match="paths of the set pass 16 MiB"):
        add_many()


def test_a_file_and_directory_clash_is_found_in_deep_paths_without_quadratic_cost() -> None:
    deep = "/".join(["a"] * 2000)
    paths = [f"{deep}/f{i:05d}" for i in range(1000)]
    started = time.monotonic()
    assert find_file_dir_clash(paths) is None
    assert find_file_dir_clash([*paths, f"{deep}/f00007/x"]) == f"{deep}/f00007"
    assert find_file_dir_clash(["a-b", "a", "a/b"]) == "a"  # '-' sorts between "a" and "a/"
    # Checking prefix by prefix took about 17 s for this; sorted with a binary search it takes milliseconds.
    assert time.monotonic() - started < 10


def test_a_fifo_in_the_spool_is_refused_not_waited_on(tmp_path: Path) -> None:
    from infantry.spool import Spool

    spool_dir = tmp_path / "..spool"
    store = Spool(spool_dir)
    blob = store.store(b"z" * 1000)
    for name in os.listdir(spool_dir):
        os.unlink(spool_dir / name)
        os.mkfifo(spool_dir / name)
    with pytest.raises(OSError, match="not a regular file"):
        blob.read()
    store.close()


def test_each_path_is_counted_once_toward_the_names_bound() -> None:
    builder = SnapshotBuilder("test", Limits())
    path = "/".join(["d" * 250] * 12)  # 3,011 bytes
    for i in range(5000):  # 15 MB of names: under the 16 MiB bound, counted once each
        builder.add(f"{i:05d}/{path}", b"x")
    builder.add_stream("streamed", io.BytesIO(b"y" * 1000).read)
    builder.add_entry("entry", FileEntry(b"z"))
    assert len(builder.build().files) == 5002


def test_a_spool_left_by_a_killed_process_is_removed_at_start(tmp_path: Path) -> None:
    from infantry import spool

    left = tmp_path / "dest" / "..spool"
    left.mkdir(parents=True)
    (left / "123-0").write_bytes(b"left behind")
    try:
        spool.use(left)
        assert not left.exists()
    finally:
        spool.use(None)


def test_a_forked_child_never_removes_what_the_parent_spooled(tmp_path: Path) -> None:
    """A template render runs in a forked child: the Blobs it drops and the spool it closes at exit
    stay the parent's."""
    pool = spool.Spool(tmp_path / "spool")
    blob = pool.store(b"x" * 1000)
    name = blob._name
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop the blob, close the spool, report, and leave without cleanup
        try:
            os.close(read)
            pool.discard(name)
            pool.close()
            os.write(write, b"done")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 4) == b"done"
    os.close(read)
    assert os.waitpid(pid, 0)[1] == 0
    assert blob.read() == b"x" * 1000
    assert (tmp_path / "spool" / name).exists()
    pool.close()
    assert not (tmp_path / "spool").exists()


# A set, a revision of it (None deletes), the limits, and whether the revised set is kept. Each case
# sits at the edge of one check, where a sum kept wrong or a check skipped would show.
REVISIONS = [
    ({"a": b"1234", "b": b"1234"}, {"a": b"abcd"}, Limits(max_total_size=8), True),
    ({"a": b"1234", "b": b"1234"}, {"a": b"abcde"}, Limits(max_total_size=8), False),
    ({"a": b"1234"}, {"a": b"12345"}, Limits(max_file_size=5), True),
    ({"a": b"1234"}, {"a": b"123456"}, Limits(max_file_size=5), False),
    ({"a": b"1", "b": b"2"}, {"a": None, "c": b"3"}, Limits(max_files=2), True),
    ({"a": b"1", "b": b"2"}, {"c": b"3"}, Limits(max_files=2), False),
    ({"a": b"1"}, {"a": None}, Limits(), False),
    ({"a": b"1"}, {"a/b": b"2"}, Limits(), False),
    ({"a/b/c": b"1"}, {"a/b": b"2"}, Limits(), False),
    ({"a/b/c": b"1"}, {"a/b/c": None, "a/b": b"2"}, Limits(), True),
    ({"a": b"1"}, {"b/..x": b"2"}, Limits(), False),
    ({"a": b"1"}, {"b\n": b"2"}, Limits(), False),
    ({"aaaa": b"1", "bbbb": b"2"}, {"aaaa": None, "cccc": b"3"}, Limits(), True),
    ({"aaaa": b"1", "bbbb": b"2"}, {"ccc": b"3"}, Limits(), False),
]


@pytest.mark.parametrize(("before", "revision", "limits", "kept"), REVISIONS)
def test_a_revision_is_checked_at_its_changes_as_a_whole_check_would(
    before: dict[str, bytes],
    revision: dict[str, bytes | None],
    limits: Limits,
    kept: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(snapshot_module, "MAX_NAMES_BYTES", 10)  # paths of 4 characters reach it
    checked = check_whole("test", limits, {path: FileEntry(data) for path, data in before.items()})
    after = {path: FileEntry(data) for path, data in before.items()}
    for path, data in revision.items():
        if data is None:
            del after[path]
        else:
            after[path] = FileEntry(data)
    outcomes = []
    checks: list[Callable[[], Checked]] = [
        lambda: check_whole("test", limits, after),
        lambda: check_revision("test", limits, checked, after, revision),
    ]
    for check in checks:
        try:
            outcomes.append(check().snapshot.version)
        except UnsafeDataError:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]
    assert (outcomes[1] != "refused") == kept
    assert outcomes[1] == "refused" or outcomes[1] == Snapshot.of(after).version


def test_a_revision_with_many_new_paths_is_checked_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    before = {"a": FileEntry(b"1")}
    checked = check_whole("test", Limits(), before)
    wholes: list[int] = []

    def counted(source: str, limits: Limits, files: Mapping[str, FileEntry]) -> Checked:
        wholes.append(len(files))
        return check_whole(source, limits, files)

    monkeypatch.setattr(snapshot_module, "check_whole", counted)
    few = dict(before) | {f"n{i}": FileEntry(b"2") for i in range(REVISE_NEW_PATHS)}
    check_revision("test", Limits(), checked, few, set(few) - {"a"})
    assert wholes == []
    many = few | {"a/b": FileEntry(b"3")}
    with pytest.raises(UnsafeDataError, match="both a file and a directory"):
        check_revision("test", Limits(), checked, many, set(many) - {"a"})
    assert wholes == [len(many)]


def test_a_draft_becomes_files_with_the_same_version_and_can_then_no_longer_change() -> None:
    plain = {"a": FileEntry(b"1"), "x": FileEntry(b"2", executable=True), "m": FileEntry(b"3", mode=0o600)}
    first = Snapshot.of(plain)
    assert isinstance(first.files, Files)
    draft = first.files.draft()
    draft["a"] = FileEntry(b"changed")
    draft["big"] = FileEntry(b"z" * (spool.INLINE_MAX + 1))
    del draft["x"]
    assert first.files["a"] == FileEntry(b"1") and "x" in first.files  # the draft is a copy
    second = Snapshot.of(draft)
    expected = {"a": FileEntry(b"changed"), "m": plain["m"], "big": FileEntry(b"z" * (spool.INLINE_MAX + 1))}
    assert second.version == Snapshot.of(expected).version == digest(expected)
    assert dict(second.files) == expected
    with pytest.raises(TypeError):
        draft["a"] = FileEntry(b"after")
    with pytest.raises(TypeError):
        del draft["m"]
    assert second.files["a"] == FileEntry(b"changed") and "m" in second.files
