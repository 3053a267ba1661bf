from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from infantry import publish as publish_module
from infantry.errors import CheckFailed, PublishError
from infantry.publish import DATA, PREVIOUS, DirectPublisher, KubeletPublisher
from infantry.snapshot import FileEntry, Snapshot
from tests.support import read_as_app, tree


def snap(**files: str) -> Snapshot:
    return Snapshot.of({k.replace("__", "/"): FileEntry(v.encode()) for k, v in files.items()})


def snapshot_dirs(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith("..2"))


def test_kubelet_layout_is_what_configmap_volumes_look_like(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    publisher = KubeletPublisher(dest, 0o644)
    assert publisher.publish(Snapshot.of({"app.yaml": FileEntry(b"a: 1"), "conf/d/x": FileEntry(b"x")}))
    live = os.readlink(dest / DATA)
    assert snapshot_dirs(dest) == [live]
    assert os.readlink(dest / "app.yaml") == "..data/app.yaml"
    assert os.readlink(dest / "conf") == "..data/conf"
    assert read_as_app(dest) == {"app.yaml": "a: 1", "conf/d/x": "x"}
    assert (dest / live / "app.yaml").stat().st_mode & 0o777 == 0o644
    assert (dest / live).stat().st_mode & 0o777 == 0o755


def test_unchanged_snapshot_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    assert KubeletPublisher(dest, 0o644).publish(snap(a="1"))
    before = {p: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in dest.rglob("*")}
    # A fresh publisher (a sidecar starting after install) reads the set back and sees it unchanged.
    assert not KubeletPublisher(dest, 0o644).publish(snap(a="1"))
    assert {p: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in dest.rglob("*")} == before


def test_unchanged_files_are_hard_linked_and_stale_entries_removed(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    publisher = KubeletPublisher(dest, 0o644)
    publisher.publish(snap(keep="same", gone="old", sub__x="1"))
    first = os.readlink(dest / DATA)
    publisher.publish(snap(keep="same", new="n"))
    second = os.readlink(dest / DATA)
    assert (dest / first / "keep").stat().st_ino == (dest / second / "keep").stat().st_ino
    assert read_as_app(dest) == {"keep": "same", "new": "n"}
    assert not os.path.lexists(dest / "gone")
    assert not os.path.lexists(dest / "sub")
    assert os.readlink(dest / PREVIOUS) == first
    publisher.publish(snap(third="3"))
    assert first in snapshot_dirs(dest)  # removal waits for tidy(), after the app has been told
    publisher.tidy()
    # Only the live snapshot and the one kept for rollback remain.
    assert snapshot_dirs(dest) == sorted([second, os.readlink(dest / DATA)])


def test_a_refused_gate_leaves_the_destination_as_it_was(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    publisher = KubeletPublisher(dest, 0o644)
    publisher.publish(snap(app="good"))
    before = tree(dest)
    staged_seen: list[Path] = []

    def refuse(staged: Path) -> None:
        staged_seen.append(staged)
        assert (staged / "app").read_text() == "bad"
        raise CheckFailed("no")

    with pytest.raises(CheckFailed):
        publisher.publish(snap(app="bad", extra="x"), refuse)
    assert tree(dest) == before
    assert not staged_seen[0].exists()
    assert publisher.current() == snap(app="good")


def test_startup_removes_leftovers_of_a_crash(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    KubeletPublisher(dest, 0o644).publish(snap(a="1"))
    (dest / "..2020_01_01_00_00_00.000000001").mkdir()
    (dest / "..tmp-link-1-2").symlink_to("..data/a")
    (dest / "..data_tmp").symlink_to("nowhere")
    KubeletPublisher(dest, 0o644).publish(snap(a="2"))
    names = sorted(os.listdir(dest))
    assert "..2020_01_01_00_00_00.000000001" not in names
    assert not [n for n in names if n.startswith("..tmp") or n == "..data_tmp"]
    assert read_as_app(dest) == {"a": "2"}


def test_hostile_links_in_the_destination_are_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a").write_text("precious")
    dest = tmp_path / "configs"
    dest.mkdir()
    (dest / DATA).symlink_to(outside)
    (dest / "a").symlink_to(outside / "a")
    publisher = KubeletPublisher(dest, 0o644)
    assert publisher.current() is None
    publisher.publish(snap(a="ours"))
    assert (outside / "a").read_text() == "precious"
    assert sorted(os.listdir(outside)) == ["a"]
    assert os.readlink(dest / DATA).startswith("..2")
    assert read_as_app(dest) == {"a": "ours"}


def test_a_foreign_directory_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    (dest / "app").mkdir(parents=True)
    (dest / "app" / "keep").write_text("user data")
    with pytest.raises(PublishError, match="refusing to replace directory"):
        KubeletPublisher(dest, 0o644).publish(snap(app="x"))
    assert (dest / "app" / "keep").read_text() == "user data"
    assert not os.path.lexists(dest / DATA)


def test_file_mode_and_executable_bit(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    KubeletPublisher(dest, 0o640).publish(Snapshot.of({"run.sh": FileEntry(b"#!", True), "c": FileEntry(b"")}))
    assert (dest / "c").stat().st_mode & 0o777 == 0o640
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o750


def test_direct_layout_writes_plain_files_and_removes_stale_ones(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    publisher = DirectPublisher(dest, 0o644)
    assert publisher.publish(snap(a="1", sub__deep__b="2"))
    assert (dest / "a").is_file() and not (dest / "a").is_symlink()
    ino = (dest / "a").stat().st_ino
    assert publisher.publish(snap(a="1", c="3"))
    assert (dest / "a").stat().st_ino == ino  # unchanged files are not rewritten
    assert read_as_app(dest) == {"a": "1", "c": "3"}
    assert not (dest / "sub").exists()
    assert not DirectPublisher(dest, 0o644).publish(snap(a="1", c="3"))


def test_direct_layout_never_writes_or_removes_through_a_linked_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("not infantry's")
    (outside / "gone").write_text("not infantry's either")
    dest = tmp_path / "configs"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    publisher = DirectPublisher(dest, 0o644)
    assert publisher.publish(snap(sub__x="1", sub__gone="2"))
    assert not (dest / "sub").is_symlink() and read_as_app(dest) == {"sub/x": "1", "sub/gone": "2"}
    # A published directory replaced by a link later, then a file dropped from the set under it.
    (dest / "sub").rename(tmp_path / "ours")
    (dest / "sub").symlink_to(outside)
    assert publisher.verify(snap(sub__x="1", sub__gone="2")) is not None
    assert publisher.publish(snap(sub__x="1"))
    assert read_as_app(dest) == {"sub/x": "1"}
    assert sorted(p.name for p in outside.iterdir()) == ["gone", "x"]  # the link's target is untouched
    assert (outside / "x").read_text() == "not infantry's"


def test_a_link_swapped_in_mid_publish_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both layouts write and rename by descriptor: a directory of the set swapped for a link after it
    was checked (here, just before each file is written) is not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    real_write = publish_module._write_new
    swapped: list[Path] = []

    def write_after_a_swap(path: Path | str, entry: FileEntry, mode: int, dir_fd: int | None = None) -> os.stat_result:
        for staged_sub in (tmp_path / "configs").glob("*/sub"):
            if not staged_sub.is_symlink() and staged_sub not in swapped:
                staged_sub.rename(staged_sub.with_name("sub-moved"))
                staged_sub.symlink_to(outside)
                swapped.append(staged_sub)
        return real_write(path, entry, mode, dir_fd)

    monkeypatch.setattr(publish_module, "_write_new", write_after_a_swap)
    wanted = snap(sub__a="1", sub__b="2", sub__c="3")
    for publisher in (KubeletPublisher(tmp_path / "configs", 0o644), DirectPublisher(tmp_path / "configs", 0o644)):
        try:
            publisher.publish(wanted)
        except PublishError:
            pass
        else:  # the writes went on into the directory itself, by its descriptor
            if isinstance(publisher, KubeletPublisher):
                assert publisher.verify(wanted) is not None  # the staged set is the live one: repaired next
            else:
                assert publisher.verify(wanted) is None  # staged files were moved from the directory itself
                assert read_as_app(tmp_path / "configs") == {"sub/a": "1", "sub/b": "2", "sub/c": "3"}
        assert swapped and list(outside.iterdir()) == [], "a file was written through the link"
        shutil.rmtree(tmp_path / "configs")
        swapped.clear()


def test_directories_are_opened_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not infantry's")
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "link").symlink_to(outside)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with publish_module._Dirs(fd) as dirs, pytest.raises(publish_module.NotADirectory) as refused:
            dirs.of("real/link/keep")
        assert refused.value.rel == "real/link"
        with publish_module._Dirs(fd, create=True, replace_links=True) as dirs:
            parent_fd, name = dirs.of("real/link/new")
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT, dir_fd=parent_fd))
    finally:
        os.close(fd)
    assert (root / "real" / "link").is_dir() and not (root / "real" / "link").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (root / "real" / "link" / "new").exists()


def test_marks_are_never_written_through_a_planted_link(tmp_path: Path) -> None:
    outside = tmp_path / "victim"
    outside.write_text("precious\n")
    dest = tmp_path / "configs"
    dest.mkdir()
    for name in ("told", "fallback"):  # the temporary names a predictable writer would use
        (dest / f"..tmp-{name}-{os.getpid()}").symlink_to(outside)
    version = "ab" * 32
    publish_module.mark_told(dest, version)
    publish_module.mark_fallback(dest, version)
    assert outside.read_text() == "precious\n"
    assert publish_module.told_version(dest) == version and publish_module.fallback_version(dest) == version
    assert not (dest / "..told").is_symlink()


def test_a_new_snapshot_directory_swapped_for_a_link_is_not_chmod_ed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    real_mkdir = os.mkdir

    def mkdir_then_swap(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if Path(path).name.startswith("..2"):  # a snapshot directory: swap it for a link at once
            os.rmdir(path)
            os.symlink(victim, path)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with pytest.raises(PublishError):
        KubeletPublisher(tmp_path / "configs", 0o644).publish(snap(a="1"))
    assert victim.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo"])
def test_a_hostile_manifest_is_not_read_through_or_waited_on(tmp_path: Path, kind: str) -> None:
    dest = tmp_path / "configs"
    dest.mkdir()
    manifest = dest / publish_module.MANIFEST
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    publisher = DirectPublisher(dest, 0o644)
    assert publisher.current() is None
    assert publisher.publish(snap(a="1"))
    assert read_as_app(dest) == {"a": "1"}


def test_a_link_planted_in_the_live_set_is_repaired_not_followed(tmp_path: Path) -> None:
    dest = tmp_path / "configs"
    publisher = KubeletPublisher(dest, 0o644)
    wanted = snap(sub__a="1", top="t")
    assert publisher.publish(wanted)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a").write_text("not infantry's\n")
    live = dest / os.readlink(dest / DATA)
    shutil.rmtree(live / "sub")
    (live / "sub").symlink_to(outside)
    assert publisher.verify(wanted) is not None
    assert publisher.publish(wanted)  # a fresh copy, not a hard link through the planted link
    assert publisher.verify(wanted) is None
    assert read_as_app(dest) == {"sub/a": "1", "top": "t"}
    assert (outside / "a").read_text() == "not infantry's\n"
