"""The bad-template corpus (tests/corpus/templates.yaml), run through `infantry install` as users run it."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import infantry, read_as_app

CASES: list[dict[str, Any]] = yaml.safe_load((Path(__file__).parent / "corpus" / "templates.yaml").read_text())
GOOD = {"web/10.0.0.5:8080": "up"}


def test_the_corpus_is_large_and_each_case_is_named_once() -> None:
    assert len(CASES) >= 15
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids))
    assert {case["code"] for case in CASES} == {2, 5}


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_template(case: dict[str, Any], tmp_path: Path) -> None:
    store = tmp_path / "store"
    for path, content in {**GOOD, **case.get("values", {})}.items():
        (store / path).parent.mkdir(parents=True, exist_ok=True)
        data = base64.b64decode(content["b64"]) if isinstance(content, dict) else content.encode()
        (store / path).write_bytes(data)
    templates = tmp_path / "templates"
    templates.mkdir()
    dest = tmp_path / "D"
    (templates / "app.j2").write_text("good {{ keys('web') | join(',') }}\n")
    first = infantry("install", "--source", store.as_uri(), "--dest", str(dest), "--template",
                     f"{templates}:app.conf")  # fmt: skip
    assert first.returncode == 0, first.stderr
    good = read_as_app(dest)
    assert good == {"app.conf": "good 10.0.0.5:8080\n"}

    (templates / "app.j2").write_text(case["template"])
    for name, text in case.get("files", {}).items():
        (templates / name).write_text(text)
    result = infantry("install", "--source", store.as_uri(), "--dest", str(dest), "--template",
                      f"{templates}:app.conf", *case.get("args", []), timeout=60)  # fmt: skip
    assert result.returncode == case["code"], result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert case["expect"] in errors[0], errors[0]
    if "line" in case:
        assert f" line {case['line']}: " in errors[0], errors[0]
    if case["code"] == 5 and "must hold one file" not in case["expect"]:
        assert "template app.conf" in errors[0], errors[0]
    assert read_as_app(dest) == good
