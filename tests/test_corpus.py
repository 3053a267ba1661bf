"""The bad-input corpus (tests/corpus/cases.yaml): every case exits 5, says why, and changes nothing."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import Etcd, Nginx, infantry, tree

CORPUS = Path(__file__).parent / "corpus"
CASES: list[dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text())


def test_the_corpus_is_large_and_covers_every_source() -> None:
    assert len(CASES) >= 30
    assert {case["source"] for case in CASES} == {"http", "file", "etcd", "gateway"}
    assert len({case["id"] for case in CASES}) == len(CASES)


def _build_tree(root: Path, entries: list[dict[str, Any]]) -> None:
    root.mkdir()
    for entry in entries:
        name = base64.b64decode(entry["path_b64"]) if "path_b64" in entry else entry["path"].encode()
        path = os.path.join(os.fsencode(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if "symlink" in entry:
            os.symlink(entry["symlink"], path)
        elif entry.get("fifo"):
            os.mkfifo(path)
        else:
            text = "x" * entry["text_size"] if "text_size" in entry else entry["text"]
            with open(path, "w") as out:
                out.write(text)


def _source(case: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """Set up the case's store; return the source URL and extra arguments."""
    kind = case["source"]
    if kind == "http":
        nginx: Nginx = request.getfixturevalue("nginx")
        (nginx.root / case["serve_as"]).write_bytes((CORPUS / "data" / case["body"]).read_bytes())
        return nginx.url(case["serve_as"]), []
    if kind == "file":
        _build_tree(tmp_path / "store", case["tree"])
        return (tmp_path / "store").as_uri(), []
    if kind == "gateway":
        nginx = request.getfixturevalue("nginx")
        return f"etcd://127.0.0.1:{nginx.port}/app/", ["--header", f"X-Case: {case['case']}"]
    etcd: Etcd = request.getfixturevalue("etcd")
    for key, value in case.get("keys", {}).items():
        etcd.put(key, value)
    for key_b64, value_b64 in case.get("keys_b64", []):
        etcd.call("/v3/kv/put", {"key": key_b64, "value": value_b64})
    for key, size in case.get("keys_value_size", {}).items():
        etcd.put(key, "v" * size)
    if "keys_count" in case:
        etcd.txn({f"/app/k{i:04d}": "x" for i in range(case["keys_count"])})
    if "keys_long_name" in case:
        etcd.put("/app/" + "k" * case["keys_long_name"], "x")
    return etcd.url("/app/"), []


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input(case: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url, extra = _source(case, tmp_path, request)
    sandbox = tmp_path / "sandbox"
    dest = sandbox / "configs"
    good = tmp_path / "good"
    good.mkdir()
    (good / "app.yaml").write_text("the last good set\n")
    assert infantry("install", "--source", good.as_uri(), "--dest", str(dest)).returncode == 0
    before = tree(sandbox)

    result = infantry(
        "install", "--source", url, "--dest", str(dest), "--max-file-size", "2KiB", "--timeout", "5",
        *extra, *case.get("args", []),
    )  # fmt: skip

    assert result.returncode == 5, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert url.split("?")[0] in errors[0], errors[0]  # names the source...
    assert case["expect"] in errors[0], errors[0]  # ...and the offending item
    assert tree(sandbox) == before  # the last good set stays, and nothing else appeared
    assert not Path("/tmp/escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
