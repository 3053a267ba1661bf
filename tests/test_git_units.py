"""The git source's parts that need no server: URL fragments, refs, the ssh command line, the pack scan."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from infantry.errors import UnsafeDataError
from infantry.settings import SourceSpec, load_settings, redact_url
from infantry.sources.git import _client, _Guard, _origin, _PackScan, _Ssh, _ssh_argv, remote_url
from tests.support import infantry

# -- settings ------------------------------------------------------------------------------------------


def test_the_fragment_carries_ref_path_and_depth() -> None:
    spec = SourceSpec.model_validate({"url": "git+https://h.example/r.git#ref=release%2F1&path=envs/prod&depth=3"})
    assert (spec.url, spec.ref, spec.path, spec.depth) == ("git+https://h.example/r.git", "release/1", "envs/prod", 3)
    assert remote_url("git+ssh://git@h.example:2222/r.git#ref=main") == "ssh://git@h.example:2222/r.git"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"url": "git+https://h/r.git#ref=a", "ref": "b"}, "given twice"),
        ({"url": "git+https://h/r.git#branch=a"}, "the fragment takes ref=, path= and depth="),
        ({"url": "git+https://h/r.git#depth=0"}, "depth"),
        ({"url": "git+https://h/r.git#path=../up"}, "unsafe path"),
        ({"url": "git+https://h/r.git#ref=--upload-pack=x"}, "ref"),
        ({"url": "https://h/app.yaml", "ref": "main"}, "only a git+ source"),
        ({"url": "git+file://host/r.git"}, "git+file:///absolute/path"),
        ({"url": "git+svn://h/r"}, "unsupported scheme"),
    ],
)
def test_bad_git_settings_are_refused_naming_the_setting(entry: dict[str, object], expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        SourceSpec.model_validate(entry)
    assert expected in str(info.value)


def test_top_level_ssh_settings_reach_every_source_and_read_the_environment() -> None:
    settings = load_settings(
        {"source": ["git+ssh://git@h/r.git"]},
        {"INFANTRY_SSH_KEY_FILE": "/keys/id", "INFANTRY_SSH_KNOWN_HOSTS": "/keys/known_hosts"},
    )
    (spec,) = settings.resolved_sources()
    assert str(spec.ssh_key_file) == "/keys/id" and str(spec.ssh_known_hosts) == "/keys/known_hosts"


# -- the ssh command line ------------------------------------------------------------------------------


def test_ssh_always_checks_host_keys_and_reads_no_config() -> None:
    argv = _ssh_argv("ssh", _Ssh(Path("/k/id"), Path("/k/kh")), "-oProxyCommand=x", 22, "git", 5)
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    assert "StrictHostKeyChecking=yes" in argv and 'UserKnownHostsFile="/k/kh"' in argv
    assert "BatchMode=yes" in argv and 'IdentityFile="/k/id"' in argv
    # A host that looks like an option comes after "--": it can only ever be a host name.
    assert argv[-2:] == ["--", "-oProxyCommand=x"]
    # Paths are quoted, and ssh's % tokens in them are not expanded.
    argv = _ssh_argv("ssh", _Ssh(Path("/my keys/%h"), Path("/k/kh")), "h", None, None, 5)
    assert 'IdentityFile="/my keys/%%h"' in argv


# -- the pack scan -------------------------------------------------------------------------------------


def _header(kind: int, size: int) -> bytes:
    out = bytearray()
    byte = (kind << 4) | (size & 15)
    size >>= 4
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def _pack(*objects: tuple[int, bytes, bytes]) -> bytes:
    body = b"".join(_header(kind, len(data)) + prefix + zlib.compress(data) for kind, prefix, data in objects)
    return b"PACK" + struct.pack(">II", 2, len(objects)) + body + b"\0" * 20


def _scan(pack: bytes, object_cap: int = 1 << 20, inflate_cap: int = 4 << 20, max_objects: int = 100) -> None:
    _PackScan(io.BytesIO(pack), "git+file:///r", max_objects, object_cap, inflate_cap).run()


def test_a_plain_pack_passes() -> None:
    _scan(_pack((3, b"", b"hello\n"), (3, b"", b"x" * 100_000), (2, b"", b"")))


def test_an_object_past_the_cap_is_refused_before_it_is_inflated() -> None:
    with pytest.raises(UnsafeDataError, match="over the per-file limit of 1048576"):
        _scan(_pack((3, b"", b"\0" * (8 << 20))), object_cap=1 << 20, inflate_cap=4 << 20)


def test_objects_past_the_total_are_refused() -> None:
    with pytest.raises(UnsafeDataError, match="together"):
        _scan(_pack(*[(3, b"", bytes([i]) * 900_000) for i in range(6)]), inflate_cap=4 << 20)


def test_a_delta_that_makes_a_huge_object_is_refused() -> None:
    # A delta of a few bytes whose header says it makes 1 GiB: refused from the header alone.
    delta = bytes([5]) + bytes([0x80, 0x80, 0x80, 0x80, 0x04]) + b"\x01x"
    with pytest.raises(UnsafeDataError, match="over the per-file limit"):
        _scan(_pack((7, b"\x11" * 20, delta)))


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_every_object_counts_against_max_file_size_whatever_its_type(kind: int) -> None:
    # The cap is --max-file-size for every object, not --max-total-size: reading the pack inflates each
    # one whole, so one object must not be larger than a file may be.
    _scan(_pack((kind, b"", b"\0" * (1 << 20))), object_cap=1 << 20, inflate_cap=64 << 20)
    with pytest.raises(UnsafeDataError, match=r"per-file limit of 1048576 \(--max-file-size; every object"):
        _scan(_pack((kind, b"", b"\0" * ((1 << 20) + 1))), object_cap=1 << 20, inflate_cap=64 << 20)


@pytest.mark.parametrize(
    ("pack", "expected"),
    [
        (b"NOPE" + b"\0" * 40, "not a git pack"),
        (_pack((3, b"", b"abc"))[:-25], "truncated"),
        (b"PACK" + struct.pack(">II", 2, 10**6), "objects"),
        (b"PACK" + struct.pack(">II", 2, 1) + _header(3, 2) + zlib.compress(b"abcdef") + b"\0" * 20, "declares"),
        (b"PACK" + struct.pack(">II", 2, 1) + _header(5, 1) + b"\0" * 30, "unknown type"),
    ],
)
def test_malformed_packs_are_refused(pack: bytes, expected: str) -> None:
    with pytest.raises(UnsafeDataError, match=expected):
        _scan(pack)


# -- credentials: to the source's origin only ----------------------------------------------------------


def test_an_origin_has_its_port_made_explicit() -> None:
    assert _origin("http://H/r.git") == _origin("http://h:80/x") == ("http", "h", 80)
    assert _origin("https://h/r.git") == ("https", "h", 443)
    assert _origin("http://h:8080/r.git") != _origin("http://h/r.git")
    assert _origin("https://h:80/") != _origin("http://h:80/")


class _RecordingPool:
    """Stands in for the HTTP connection pool: records the headers of each request, answers 200."""

    headers: dict[str, str] = {}  # noqa: RUF012

    def __init__(self) -> None:
        self.sent: dict[str, dict[str, str]] = {}

    def request(self, method: str, url: str, headers: dict[str, str], **_: object) -> object:
        self.sent[url] = headers

        class Answer:
            status = 200
            headers: dict[str, str] = {}  # noqa: RUF012

            def geturl(self) -> str:
                return url

            def read(self, n: int = -1) -> bytes:
                return b""

        return Answer()


def test_the_bearer_token_goes_to_the_sources_own_scheme_host_and_port_only(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    cases = {
        # A redirect to the same host without a port goes to port 80: another origin than :8080.
        "git+http://127.0.0.1:8080/r.git": {
            "http://127.0.0.1:8080/r.git/info/refs": True,
            "http://127.0.0.1/r.git/info/refs": False,
            "http://127.0.0.1:80/r.git/info/refs": False,
            "https://127.0.0.1:8080/r.git/info/refs": False,
            "http://localhost:8080/r.git/info/refs": False,
        },
        "git+http://127.0.0.1/r.git": {
            "http://127.0.0.1/r.git/info/refs": True,
            "http://127.0.0.1:80/r.git/info/refs": True,
            "http://127.0.0.1:8080/r.git/info/refs": False,
        },
    }
    for source, urls in cases.items():
        pool = _RecordingPool()
        spec = SourceSpec.model_validate({"url": source, "bearer_token_file": str(token), "headers": {"X-Team": "a"}})
        client, _ = _client(remote_url(source), spec, _Guard(), 1.0, pool)
        for url, own in urls.items():
            client._http_request(url)  # type: ignore[attr-defined]
            assert (pool.sent[url].get("Authorization") == "Bearer t0ken") == own, (source, url)
            assert (pool.sent[url].get("X-Team") == "a") == own, (source, url)  # --header reaches git+http


# -- what a URL may show ---------------------------------------------------------------------------------


def test_a_password_cut_at_an_unencoded_hash_is_never_shown() -> None:
    url = "git+http://alice:p4ss#ref=X@127.0.0.1:1/r.git"
    with pytest.raises(ValidationError) as info:
        SourceSpec.model_validate({"url": url})
    message = info.value.errors()[0]["msg"]
    assert "p4ss" not in message and "alice" not in message and "percent-encoded" in message
    result = infantry("install", "--source", url, "--dest", "/nonexistent/infantry-test")
    assert result.returncode == 2, result.stderr
    assert "p4ss" not in result.stderr and "alice" not in result.stderr and "git+http://…" in result.stderr
    assert redact_url("git+http://alice:p4ss") == "git+http://…"
    assert redact_url(url) == "git+http://…"
    assert redact_url("git+http://alice:p4ss@h:8080/r.git") == "git+http://alice:***@h:8080/r.git"
    # No password, none hinted at.
    assert redact_url("git+ssh://git@h:22/r.git") == "git+ssh://git@h:22/r.git"
    assert redact_url("etcd://h1:2379,h2:2379/p/") == "etcd://h1:2379,h2:2379/p/"


def test_header_values_are_never_carried_along_a_redirect() -> None:
    from infantry.snapshot import Limits
    from infantry.sources.git import GitSource

    spec = SourceSpec.model_validate(
        {"url": "git+https://git.example/r.git", "headers": {"X-Api-Key": "k", "Private-Token": "t"}}
    )
    pool = GitSource(spec, Limits(), 1.0)._http_pool()
    dropped = pool.connection_pool_kw["retries"].remove_headers_on_redirect
    assert {"x-api-key", "private-token", "authorization"} <= set(dropped)


def test_objects_met_again_in_a_walk_are_not_read_again() -> None:
    """Reading an object may mean resolving a long chain of deltas: a tree naming the same subtree and
    the same file a thousand times over must cost one read of each (each meeting is still charged)."""
    from dulwich.objects import Blob, Tree

    from infantry.snapshot import Limits, SnapshotBuilder
    from infantry.sources.git import _TreeReader

    blob = Blob.from_string(b"same content\n")
    sub = Tree()
    sub.add(b"f.conf", 0o100644, blob.id)
    root = Tree()
    for i in range(1000):
        root.add(b"d%04d" % i, 0o040000, sub.id)
        root.add(b"x%04d" % i, 0o100755, blob.id)
    objects: dict[bytes, Any] = {blob.id: blob, sub.id: sub}
    reads: list[bytes] = []

    class Pack:
        def __getitem__(self, sha: bytes) -> object:
            reads.append(sha)
            return objects[sha]

        def get_raw(self, sha: bytes) -> tuple[int, bytes]:
            reads.append(sha)
            return objects[sha].type_num, objects[sha].as_raw_string()

    class Source:
        name = "test"

        def _object(self, pack: Pack, sha: bytes) -> object:
            return pack[sha]

    builder = SnapshotBuilder("test", Limits())
    _TreeReader(Source(), Pack(), builder, root, 100_000, _Guard()).run()  # type: ignore[arg-type]
    snapshot = builder.build()
    assert len(snapshot.files) == 2000 and snapshot.files["x0007"].executable
    assert not snapshot.files["d0007/f.conf"].executable
    assert sorted(reads) == sorted([blob.id, sub.id])
