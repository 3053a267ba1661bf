"""git sources against real git servers on loopback, through the real command line.

``git daemon`` (git://), ``git http-backend`` behind nginx and fcgiwrap (smart HTTP with basic auth and a
bearer token), sshd (git+ssh://) and plain ``file://`` repositories, each started by the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from infantry.errors import SourceError, UnsafeDataError
from infantry.publish import SPOOL
from infantry.settings import SourceSpec
from infantry.snapshot import Limits
from infantry.sources.git import GitSource, _TreeReader
from tests.git_servers import HTTP_PASSWORD, HTTP_TOKEN, HTTP_USER, GitDaemon, GitHttp, Link, Repo, Sshd, git
from tests.support import TlsFiles, Watch, free_port, infantry, infantry_measured, read_as_app, tree, wait_until

FILES = {"conf/app.yaml": "color: blue\n", "conf/extra/x.conf": "x=1\n", "README.md": "# the repo\n"}


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repos")


@pytest.fixture
def daemon(repo: Repo) -> Iterator[GitDaemon]:
    server = GitDaemon(repo.root)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def git_http(tmp_path: Path, repo: Repo) -> Iterator[GitHttp]:
    server = GitHttp(tmp_path / "http", repo.root)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path / "sshd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "secrets"
    d.mkdir()
    files = {"password": HTTP_PASSWORD, "wrong": "not-the-password", "token": HTTP_TOKEN}
    paths = {}
    for name, value in files.items():
        (d / name).write_text(value + "\n")
        paths[name] = d / name
    return paths


def install(*args: str, timeout: float = 90) -> tuple[int, str]:
    result = infantry("install", *args, timeout=timeout)
    return result.returncode, result.stderr


# -- first clone, each transport ---------------------------------------------------------------------


def test_file_repo_sub_directory_with_a_link_inside_it(repo: Repo, tmp_path: Path) -> None:
    sha = repo.commit({**FILES, "conf/current.yaml": Link("app.yaml"), "conf/run.sh": "#!/bin/sh\n"})
    dest = tmp_path / "D"
    code, err = install("--source", repo.file_url("path=conf"), "--dest", str(dest), "--timeout", "20")
    assert code == 0, err
    assert read_as_app(dest) == {
        "app.yaml": "color: blue\n",
        "current.yaml": "color: blue\n",
        "extra/x.conf": "x=1\n",
        "run.sh": "#!/bin/sh\n",
    }
    assert not any(".git" in name for name in tree(dest))
    assert f"commit {sha[:12]}" in err


def test_git_daemon_branch_tag_and_commit(repo: Repo, daemon: GitDaemon, tmp_path: Path) -> None:
    first = repo.commit({"app.yaml": "v: 1\n"})
    repo.tag("v1", first)
    repo.tag("light", first, annotated=False)
    repo.commit({"app.yaml": "v: 2\n"})
    for i, (fragment, expected) in enumerate(
        (
            ("", "v: 2\n"),
            ("ref=main", "v: 2\n"),
            ("ref=v1", "v: 1\n"),
            ("ref=light", "v: 1\n"),
            (f"ref={first}", "v: 1\n"),
        )
    ):
        dest = tmp_path / f"D{i}"
        code, err = install("--source", daemon.url(fragment=fragment), "--dest", str(dest), "--timeout", "20")
        assert code == 0, (fragment, err)
        assert read_as_app(dest) == {"app.yaml": expected}, fragment


def test_smart_http_with_basic_auth_and_a_bearer_token(
    repo: Repo, git_http: GitHttp, secrets: dict[str, Path], tmp_path: Path
) -> None:
    repo.commit(FILES)
    code, err = install(
        "--source",
        git_http.url("basic", fragment="path=conf&depth=1"),
        "--username",
        HTTP_USER,
        "--password-file",
        str(secrets["password"]),
        "--dest",
        str(tmp_path / "B"),
        "--timeout",
        "20",
    )
    assert code == 0, err
    assert read_as_app(tmp_path / "B") == {"app.yaml": "color: blue\n", "extra/x.conf": "x=1\n"}
    code, err = install(
        "--source",
        git_http.url("bearer"),
        "--bearer-token-file",
        str(secrets["token"]),
        "--dest",
        str(tmp_path / "T"),
        "--timeout",
        "20",
    )
    assert code == 0, err
    assert read_as_app(tmp_path / "T") == FILES
    # Credentials in the URL work too, sent as basic auth, and are never repeated.
    code, err = install(
        "--source", git_http.url("basic", userinfo=f"{HTTP_USER}:{HTTP_PASSWORD}"), "--dest", str(tmp_path / "U")
    )
    assert code == 0, err
    assert HTTP_PASSWORD not in err and read_as_app(tmp_path / "U") == FILES


def test_https_with_a_ca_file_and_an_untrusted_certificate(repo: Repo, tls_files: TlsFiles, tmp_path: Path) -> None:
    repo.commit(FILES)
    server = GitHttp(tmp_path / "https", repo.root, tls=tls_files)
    server.start()
    try:
        code, err = install("--source", server.tls_url(fragment="path=conf"), "--ca-file", str(tls_files.ca),
                            "--dest", str(tmp_path / "D"), "--timeout", "20")  # fmt: skip
        assert code == 0, err
        assert read_as_app(tmp_path / "D") == {"app.yaml": "color: blue\n", "extra/x.conf": "x=1\n"}
        started = time.monotonic()
        code, err = install("--source", server.tls_url(), "--dest", str(tmp_path / "E"), "--timeout", "60")
        assert code == 3, err
        assert time.monotonic() - started < 30  # at once: it will not get better by asking again
        assert "ca-file" in err
    finally:
        server.stop()


def test_wrong_credentials_exit_3_at_once_and_are_never_shown(
    repo: Repo, git_http: GitHttp, secrets: dict[str, Path], tmp_path: Path
) -> None:
    repo.commit(FILES)
    started = time.monotonic()
    code, err = install(
        "--source",
        git_http.url("basic"),
        "--username",
        HTTP_USER,
        "--password-file",
        str(secrets["wrong"]),
        "--dest",
        str(tmp_path / "D"),
        "--timeout",
        "60",
    )
    assert code == 3, err
    assert time.monotonic() - started < 30  # at once: not after --timeout of retries
    assert "refused the credentials" in err
    assert "not-the-password" not in err
    # Credentials in the URL itself are redacted from every message.
    code, err = install(
        "--source",
        git_http.url("basic", userinfo=f"{HTTP_USER}:hunter2"),
        "--dest",
        str(tmp_path / "U"),
        "--timeout",
        "60",
    )
    assert code == 3, err
    assert "hunter2" not in err and "***" in err
    assert tree(tmp_path / "D") == {} and tree(tmp_path / "U") == {}


def test_ssh_with_a_key_and_known_hosts(repo: Repo, sshd: Sshd, tmp_path: Path) -> None:
    repo.commit(FILES)
    code, err = install(
        "--source",
        sshd.url(repo.bare, "path=conf"),
        "--ssh-key-file",
        str(sshd.client_key),
        "--ssh-known-hosts",
        str(sshd.known_hosts),
        "--dest",
        str(tmp_path / "D"),
        "--timeout",
        "30",
    )
    assert code == 0, err
    assert read_as_app(tmp_path / "D") == {"app.yaml": "color: blue\n", "extra/x.conf": "x=1\n"}


def test_ssh_unknown_host_key_exits_3_with_a_hint(repo: Repo, sshd: Sshd, tmp_path: Path) -> None:
    repo.commit(FILES)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    started = time.monotonic()
    code, err = install(
        "--source",
        sshd.url(repo.bare),
        "--ssh-key-file",
        str(sshd.client_key),
        "--ssh-known-hosts",
        str(empty),
        "--dest",
        str(tmp_path / "D"),
        "--timeout",
        "60",
    )
    assert code == 3, err
    assert time.monotonic() - started < 30
    assert "host key is not in the known_hosts" in err and "ssh-keyscan" in err
    assert tree(tmp_path / "D") == {}
    # Another key for this host in known_hosts: not a key to add, a warning of a possible interception.
    code, err = install("--source", sshd.url(repo.bare), "--ssh-key-file", str(sshd.client_key),
                        "--ssh-known-hosts", str(sshd.wrong_known_hosts), "--dest", str(tmp_path / "C"),
                        "--timeout", "60")  # fmt: skip
    assert code == 3, err
    assert "host key DIFFERS" in err and "man-in-the-middle" in err and "ssh-keyscan" not in err
    assert tree(tmp_path / "C") == {}
    # A key file others may read: ssh will not use it, and says why.
    loose = tmp_path / "loose_key"
    loose.write_bytes(sshd.client_key.read_bytes())
    loose.chmod(0o644)
    code, err = install("--source", sshd.url(repo.bare), "--ssh-key-file", str(loose),
                        "--ssh-known-hosts", str(sshd.known_hosts), "--dest", str(tmp_path / "L"),
                        "--timeout", "60")  # fmt: skip
    assert code == 3, err
    assert "others may read it" in err and "chmod 600" in err
    # A key the server does not accept is refused at once too.
    code, err = install(
        "--source",
        sshd.url(repo.bare),
        "--ssh-key-file",
        str(sshd.other_key),
        "--ssh-known-hosts",
        str(sshd.known_hosts),
        "--dest",
        str(tmp_path / "K"),
        "--timeout",
        "60",
    )
    assert code == 3, err
    assert "refused the key" in err


def test_ssh_without_known_hosts_is_a_settings_error(repo: Repo, tmp_path: Path) -> None:
    code, err = install("--source", f"git+ssh://git@127.0.0.1:{free_port()}/repo.git", "--dest", str(tmp_path / "D"))
    assert code == 2, err
    assert "ssh-known-hosts" in err


# -- watching: a new commit, a force-push, a deleted ref ------------------------------------------------


def test_watch_follows_commits_force_pushes_and_keeps_the_last_set_when_the_ref_goes(
    repo: Repo, git_http: GitHttp, tmp_path: Path, watches: list[Watch]
) -> None:
    first = repo.commit({"app.yaml": "v: 1\n"})
    dest = tmp_path / "D"
    # install first, as the initContainer does: watch then finds the set in place and writes nothing,
    # yet reports the commit.
    code, err = install("--source", git_http.url(fragment="ref=main"), "--dest", str(dest), "--timeout", "20")
    assert code == 0, err
    watch = Watch(
        tmp_path,
        ["--source", git_http.url(fragment="ref=main"), "--dest", str(dest), "--interval", "0.3", "--stale-after", "3"],
    )
    watches.append(watch)
    watch.wait_ready()
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}
    assert watch.metric("infantry_git_commit_info", sha=first) == 1

    second = repo.commit({"app.yaml": "v: 2\n", "new.yaml": "n: 1\n"})
    wait_until(
        "the new commit to be published", lambda: read_as_app(dest) == {"app.yaml": "v: 2\n", "new.yaml": "n: 1\n"}
    )
    wait_until("the commit metric to follow", lambda: watch.metric("infantry_git_commit_info", sha=second) == 1)
    assert watch.metric("infantry_git_commit_info", sha=first) == 0
    assert f"commit {second[:12]}" in watch.log()
    # The pack fetched went through the spool and is gone: only blobs of the live set stay there (none
    # here: every file is small enough to be held in memory).
    wait_until("the spool to hold no pack", lambda: not any((dest / SPOOL).iterdir()))

    repo.force("main", first)  # a force-push back to the first commit
    wait_until("the force-push to be published", lambda: read_as_app(dest) == {"app.yaml": "v: 1\n"})
    wait_until("the metric to name the first commit", lambda: watch.metric("infantry_git_commit_info", sha=first) == 1)

    repo.delete("refs/heads/main")

    def reported() -> bool:
        status = json.loads(watch.get("/status")[1])
        return any("not on the remote" in (source["error"] or "") for source in status["sources"])

    wait_until("the deleted ref to be reported", reported)
    wait_until("/healthz to fail", lambda: watch.get("/healthz")[0] == 503, timeout=30)
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}  # the last good set stays

    third = repo.commit({"app.yaml": "v: 3\n"})
    wait_until("the ref's return to be published", lambda: read_as_app(dest) == {"app.yaml": "v: 3\n"})
    wait_until("/healthz to pass again", lambda: watch.get("/healthz")[0] == 200, timeout=30)
    assert watch.metric("infantry_git_commit_info", sha=third) == 1
    code, _ = watch.stop()
    assert code == 0


def test_an_unchanged_ref_costs_one_small_exchange_per_poll(
    repo: Repo, git_http: GitHttp, tmp_path: Path, watches: list[Watch]
) -> None:
    repo.commit({"app.yaml": "v: 1\n", "big.txt": os.urandom(200_000).hex()})
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", git_http.url(), "--dest", str(dest), "--interval", "0.2"])
    watches.append(watch)
    watch.wait_ready()
    wait_until("several polls", lambda: len([r for r in git_http.requests() if "/info/refs" in r[3]]) >= 6)
    # The pack (over 100 KB) was fetched once, at start; each poll since was a ref advertisement alone.
    sizes = [int(r[5]) for r in git_http.requests()]
    assert len([size for size in sizes if size > 100_000]) == 1, sizes
    assert sorted(sizes)[-2] < 5_000, sizes
    assert read_as_app(dest)["app.yaml"] == "v: 1\n"


# -- what must be refused ------------------------------------------------------------------------------


def test_a_link_out_of_path_or_into_git_is_refused(repo: Repo, tmp_path: Path) -> None:
    for i, target in enumerate(("../README.md", "/etc/passwd", "../.git/config", "extra/../../README.md")):
        repo.commit({**FILES, "conf/escape.yaml": Link(target)})
        dest = tmp_path / f"D{i}"
        code, err = install("--source", repo.file_url("path=conf"), "--dest", str(dest), "--timeout", "10")
        assert code == 5, (target, err)
        assert "outside the tree" in err, err
        assert tree(dest) == {}


def test_over_the_limits_is_refused_without_being_written(repo: Repo, tmp_path: Path) -> None:
    repo.commit({"small.yaml": "s: 1\n", "big.bin": "x" * 300_000})
    code, err = install("--source", repo.file_url(), "--dest", str(tmp_path / "D"), "--max-file-size", "100KiB")
    assert code == 5, err
    assert "per-file limit" in err
    repo.commit({f"f{i}.yaml": f"{i}\n" for i in range(30)})
    code, err = install("--source", repo.file_url(), "--dest", str(tmp_path / "E"), "--max-files", "10")
    assert code == 5, err
    assert tree(tmp_path / "D") == {} and tree(tmp_path / "E") == {}


def test_a_compression_bomb_is_refused_before_it_is_inflated(repo: Repo, tmp_path: Path) -> None:
    # 64 MiB of zeros is a pack of about 64 KiB: refused from what the pack declares, at a 1 MiB total.
    repo.commit({"bomb.bin": b"\0" * (64 << 20)})
    code, err = install("--source", repo.file_url(), "--dest", str(tmp_path / "D"), "--max-total-size", "1MiB")
    assert code == 5, err
    assert tree(tmp_path / "D") == {}


def test_hostile_names_in_a_hand_made_tree_are_refused(repo: Repo, tmp_path: Path) -> None:
    for i, name in enumerate((".git", "..data", "..", ".GIT")):
        repo.raw_tree([("100644", "ok.yaml", b"ok\n"), ("100644", name, b"planted\n")])
        code, err = install("--source", repo.file_url(), "--dest", str(tmp_path / f"D{i}"), "--timeout", "10")
        assert code == 5, (name, err)
        assert tree(tmp_path / f"D{i}") == {}


def test_a_tree_deeper_than_a_path_may_be_is_refused(repo: Repo, tmp_path: Path) -> None:
    sha = git("hash-object", "-w", "--stdin", cwd=repo.bare, stdin=b"deep\n")
    entry = f"100644 blob {sha}\tleaf"
    for _ in range(220):  # 220 names of 20 bytes: past the 4096 bytes a path may have
        made = git("mktree", cwd=repo.bare, stdin=(entry + "\n").encode())
        entry = f"040000 tree {made}\t{'d' * 19}"
    root = git("mktree", cwd=repo.bare, stdin=(entry + "\n").encode())
    git("update-ref", "refs/heads/main", git("commit-tree", root, "-m", "deep", cwd=repo.bare), cwd=repo.bare)
    code, err = install("--source", repo.file_url(), "--dest", str(tmp_path / "D"), "--timeout", "10")
    assert code == 5, err
    assert "longer than 4096" in err
    assert tree(tmp_path / "D") == {}


def test_submodules_and_lfs_pointers_are_not_followed_and_say_so(repo: Repo, tmp_path: Path) -> None:
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 12\n"
    elsewhere = repo.commit({"app.yaml": "a\n"}).encode()
    repo.raw_tree([("100644", "app.yaml", b"a\n"), ("100644", "model.bin", pointer), ("160000", "vendor", elsewhere)])
    code, err = install("--source", repo.file_url(), "--dest", str(tmp_path / "D"), "--timeout", "10")
    assert code == 0, err
    assert read_as_app(tmp_path / "D") == {"app.yaml": "a\n", "model.bin": pointer.decode()}
    assert "submodule" in err and "LFS" in err


def test_a_ref_like_an_option_is_a_settings_error(tmp_path: Path) -> None:
    for ref in ("--upload-pack=touch /tmp/pwned", "-x", "a..b", "main lock"):
        result = infantry(
            "install", "--source", f"git+https://127.0.0.1:1/r.git#ref={ref}", "--dest", str(tmp_path / "D")
        )
        assert result.returncode == 2, (ref, result.stderr)
        assert "ref" in result.stderr


def test_server_down_at_install_retries_until_the_timeout(tmp_path: Path) -> None:
    started = time.monotonic()
    code, err = install("--source", f"git+http://127.0.0.1:{free_port()}/r.git", "--dest", str(tmp_path / "D"),
                        "--timeout", "2")  # fmt: skip
    elapsed = time.monotonic() - started
    assert code == 3, err
    assert 2 <= elapsed < 2 + 8, elapsed
    assert "unreachable after 2s" in err
    assert tree(tmp_path / "D") == {}


class _Stalling:
    """A TCP server that accepts, reads, and then: says nothing (``silent``), sends ``answer`` then refs
    without end (``flood``), or sends ``answer`` a byte at a time, slowly, without end (``drip``)."""

    def __init__(self, answer: bytes = b"", mode: str = "silent") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.mode = mode
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            if self.mode == "flood":
                conn.sendall(self.answer)
                while not self.stop.is_set():
                    line = b"1" * 40 + b" refs/heads/" + os.urandom(8).hex().encode() + b"\n"
                    conn.sendall(b"%04x" % (len(line) + 4) + line)
            elif self.mode == "drip":
                conn.sendall(self.answer)
                while not self.stop.wait(0.05):
                    conn.sendall(b"a")
            else:
                self.stop.wait()
        except OSError:
            return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for conn in self.conns:
            conn.close()


_ADVERTISEMENT = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n"
    b"Connection: close\r\n\r\n001e# service=git-upload-pack\n0000"
)


def test_a_server_that_stalls_times_out(tmp_path: Path) -> None:
    server = _Stalling()
    try:
        started = time.monotonic()
        code, err = install("--source", f"git+git://127.0.0.1:{server.port}/r.git", "--dest", str(tmp_path / "D"),
                            "--request-timeout", "1", "--timeout", "4")  # fmt: skip
        assert code == 3, err
        assert time.monotonic() - started < 4 + 8
        assert "request timeout" in err
    finally:
        server.close()


def test_a_giant_ref_advertisement_is_cut_off(tmp_path: Path) -> None:
    server = _Stalling(_ADVERTISEMENT, mode="flood")
    try:
        code, err = install("--source", f"git+http://127.0.0.1:{server.port}/r.git", "--dest", str(tmp_path / "D"),
                            "--request-timeout", "20", "--timeout", "20")  # fmt: skip
        assert code == 5, err
        assert "the ref advertisement passes" in err, err
        assert tree(tmp_path / "D") == {}
    finally:
        server.close()


@pytest.mark.parametrize("scheme", ["git+http", "git+git"])
def test_a_drip_fed_answer_times_out_and_leaves_no_thread_behind(scheme: str) -> None:
    # The start of an answer, then one long packet a byte at a time: a read of the packet would wait
    # for hours, so the worker is stopped by shutting its socket down.
    head = _ADVERTISEMENT.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" if scheme == "git+http" else b""
    server = _Stalling(head + b"fff0", mode="drip")
    before = threading.active_count()

    async def polls() -> None:
        spec = SourceSpec.model_validate({"url": f"{scheme}://127.0.0.1:{server.port}/r.git"})
        source = GitSource(spec, Limits(), 1.0, request_timeout=0.3)
        try:
            for _ in range(4):
                with pytest.raises(SourceError, match="request timeout"):
                    await source.poll()
                # One worker at a time: the next poll waits for the one stopped at its deadline to end.
                assert sum(thread.name == "infantry-worker" for thread in threading.enumerate()) <= 1
        finally:
            await source.aclose()

    try:
        asyncio.run(polls())
        # Each poll's worker was stopped when its deadline passed, not left reading a byte at a time.
        wait_until("the workers to end", lambda: threading.active_count() <= before + 1, timeout=10)
    finally:
        server.close()


# -- bounds: a tree that names itself over and over, a dumb server, large objects ---------------------------


def _bomb(repo: Repo) -> None:
    """A commit of a few small tree objects naming one another a thousand times at each of three levels:
    a billion directories, from four trees."""
    made = git("mktree", cwd=repo.bare, stdin=b"")
    for _ in range(3):
        made = git("mktree", cwd=repo.bare, stdin="".join(f"040000 tree {made}\td{i}\n" for i in range(1000)).encode())
    app = git("hash-object", "-w", "--stdin", cwd=repo.bare, stdin=b"ok\n")
    root = git("mktree", cwd=repo.bare, stdin=f"100644 blob {app}\tapp.yaml\n040000 tree {made}\tbomb\n".encode())
    git("update-ref", "refs/heads/main", git("commit-tree", root, "-m", "bomb", cwd=repo.bare), cwd=repo.bare)


def test_a_billion_directories_from_four_trees_are_refused_at_once(
    repo: Repo, daemon: GitDaemon, tmp_path: Path
) -> None:
    _bomb(repo)
    started = time.monotonic()
    code, err = install("--source", daemon.url(fragment="ref=main"), "--dest", str(tmp_path / "D"), "--timeout", "60")
    assert code == 5, err
    assert "more than 210000 entries to walk (2 x max-files + 10000" in err, err
    assert time.monotonic() - started < 45  # bounded by the walk's budget, not by the tree's size
    assert tree(tmp_path / "D") == {}
    # Fewer files allowed, a smaller budget: the walk is refused sooner still.
    code, err = install("--source", repo.file_url(), "--dest", str(tmp_path / "E"), "--max-files", "100")
    assert code == 5, err
    assert "more than 10200 entries to walk" in err, err


def test_a_poll_of_a_billion_directories_ends_and_leaves_no_worker_behind(
    repo: Repo, daemon: GitDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bomb(repo)
    before = threading.active_count()
    walks = []
    walk = _TreeReader.run

    def counted(reader: _TreeReader) -> list[str]:
        walks.append(1)
        return walk(reader)

    monkeypatch.setattr(_TreeReader, "run", counted)

    async def polls() -> None:
        spec = SourceSpec.model_validate({"url": daemon.url(fragment="ref=main")})
        source = GitSource(spec, Limits(max_files=1000), 1.0, request_timeout=5)
        try:
            for _ in range(3):
                with pytest.raises(UnsafeDataError, match="more than 12000 entries to walk"):
                    await source.poll()
            source.refresh()  # as watch does when the spool was emptied: the refusal stands
            with pytest.raises(UnsafeDataError, match="more than 12000 entries to walk"):
                await source.fetch()
        finally:
            await source.aclose()

    asyncio.run(polls())
    assert len(walks) == 1  # a refused commit is refused again at once, not fetched and walked again
    wait_until("the workers to end", lambda: threading.active_count() <= before, timeout=20)


class _StaticFiles:
    """A plain web server over a directory (what "dumb" HTTP git needs), recording the paths asked for."""

    def __init__(self, root: Path) -> None:
        asked = self.asked = list[str]()

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def send_head(self) -> Any:
                asked.append(self.path)
                return super().send_head()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_dumb_http_server_is_refused_before_any_object_is_fetched(repo: Repo, tmp_path: Path) -> None:
    repo.commit(FILES)
    git("update-server-info", cwd=repo.bare)
    server = _StaticFiles(repo.root)
    try:
        started = time.monotonic()
        code, err = install("--source", f"git+http://127.0.0.1:{server.port}/repo.git#ref=main",
                            "--dest", str(tmp_path / "D"), "--timeout", "60")  # fmt: skip
        assert code == 3, err
        assert time.monotonic() - started < 30  # at once: it will not get better by asking again
        assert "smart HTTP" in err and '"dumb" HTTP' in err, err
        assert server.asked and not any("/objects/" in path for path in server.asked), server.asked
        assert tree(tmp_path / "D") == {}
    finally:
        server.close()


def test_an_object_past_max_file_size_is_refused_even_outside_path_without_being_inflated(
    repo: Repo, daemon: GitDaemon, tmp_path: Path
) -> None:
    # 96 MiB of zeros outside path is a pack of about 100 KiB: refused from what it declares, whole.
    repo.commit({"conf/app.yaml": "ok\n", "assets/zeros.bin": b"\0" * (96 << 20)})
    result, peak = infantry_measured(tmp_path, "install", "--source", daemon.url(fragment="ref=main&path=conf"),
                                     "--dest", str(tmp_path / "D"), "--timeout", "60")  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert "over the per-file limit of 8388608 (--max-file-size; every object the pack holds counts" in result.stderr
    assert peak < 90, f"peaked at {peak:.1f} MiB"
    assert tree(tmp_path / "D") == {}


def test_deltified_objects_outside_path_are_held_one_at_a_time(repo: Repo, daemon: GitDaemon, tmp_path: Path) -> None:
    # Four near-identical 6 MiB files, packed as deltas of one another, each under --max-file-size: the
    # set (path=conf) is published, and reading the pack held about one of them at a time.
    files: dict[str, str | bytes] = {"conf/app.yaml": "ok\n"}
    for i in range(4):
        data = bytearray(os.urandom(1 << 20) * 6)
        data[-8:] = i.to_bytes(8, "big")
        files[f"assets/big{i}.bin"] = bytes(data)
    repo.commit(files)
    git("repack", "-adf", "--window=10", cwd=repo.bare)
    result, peak = infantry_measured(tmp_path, "install", "--source", daemon.url(fragment="ref=main&path=conf"),
                                     "--dest", str(tmp_path / "D"), "--timeout", "60")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_as_app(tmp_path / "D") == {"app.yaml": "ok\n"}
    assert peak < 110, f"peaked at {peak:.1f} MiB"


# -- the commit reported is the live set's ----------------------------------------------------------------


def test_the_commit_reported_is_the_live_sets_after_a_refusal_and_after_a_rollback(
    repo: Repo, tmp_path: Path, watches: list[Watch]
) -> None:
    check = tmp_path / "check.sh"
    check.write_text('#!/bin/sh\n! grep -rq REFUSE "$1"\n')
    check.chmod(0o755)
    verify = tmp_path / "verify.sh"
    verify.write_text(f"#!/bin/sh\n! grep -q FAILS {tmp_path / 'D' / 'app.yaml'}\n")
    verify.chmod(0o755)
    first = repo.commit({"app.yaml": "v: 1\n"})
    dest = tmp_path / "D"
    watch = Watch(tmp_path, ["--source", repo.file_url("ref=main"), "--dest", str(dest), "--interval", "0.3",
                             "--check", str(check), "--exec", "/bin/true", "--verify-cmd", str(verify),
                             "--verify-timeout", "5"])  # fmt: skip
    watches.append(watch)
    watch.wait_ready()
    wait_until("the first commit reported", lambda: watch.metric("infantry_git_commit_info", sha=first) == 1)

    # The check refuses the second commit: the first stays live, and so does its commit.
    refused = repo.commit({"app.yaml": "REFUSE: 2\n"})
    wait_until("the refusal", lambda: "not published, keeping" in watch.log())
    assert watch.metric("infantry_git_commit_info", sha=first) == 1
    assert watch.metric("infantry_git_commit_info", sha=refused) == 0
    assert f"commit {refused[:12]}" not in watch.log()
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}

    # The third is published, fails verification, and is rolled back to the first.
    failing = repo.commit({"app.yaml": "FAILS: 3\n"})
    wait_until("the rollback", lambda: "rolled back to" in watch.log(), timeout=40)
    assert f"commit {failing[:12]}" in watch.log()  # the publish line named the commit it published
    wait_until("the first commit reported again", lambda: watch.metric("infantry_git_commit_info", sha=first) == 1)
    assert watch.metric("infantry_git_commit_info", sha=failing) == 0
    assert read_as_app(dest) == {"app.yaml": "v: 1\n"}

    # A good commit: published, and reported.
    good = repo.commit({"app.yaml": "v: 4\n"})
    wait_until("the good commit reported", lambda: watch.metric("infantry_git_commit_info", sha=good) == 1)
    assert watch.metric("infantry_git_commit_info", sha=first) == 0
    assert read_as_app(dest) == {"app.yaml": "v: 4\n"}


# -- local work has no deadline; one worker at a time -----------------------------------------------------


def test_reading_a_large_pack_is_not_cut_by_the_request_timeout(repo: Repo) -> None:
    # Thousands of files: making the pack from a local repository and reading it into a set is local
    # work, which the request timeout (meant for a peer that stalls) does not cut short.
    repo.commit({f"conf/f{i}.yaml": f"n: {i}\n" + "x" * 2000 for i in range(4000)})
    before = threading.active_count()

    async def polls() -> None:
        spec = SourceSpec.model_validate({"url": repo.file_url("ref=main")})
        source = GitSource(spec, Limits(), 1.0, request_timeout=0.05)
        try:
            snapshot = await source.fetch()
            assert len(snapshot.files) == 4000
        finally:
            await source.aclose()

    asyncio.run(polls())
    wait_until("the worker to end", lambda: threading.active_count() <= before, timeout=20)
