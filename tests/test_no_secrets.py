"""The secret guard itself: a run whose output holds a test secret fails, wherever the secret appeared."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A secret only the inner runs know of: their output is this test's output, which the guard searches too.
CANARY = "canary-5ecret-41"


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose runs load the guard as this suite does, with the canary among the secrets."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest(
        "import tests.secret_guard as guard\n"
        'pytest_plugins = ["tests.secret_guard"]\n'
        f"guard.SECRETS = (*guard.SECRETS, {CANARY!r})\n"
    )
    return pytester


def test_a_clean_run_passes(run: pytest.Pytester) -> None:
    run.makepyfile(test_clean="def test_quiet(tmp_path):\n    print('nothing to hide')\n")
    result = run.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert "test secrets in the output" not in result.stdout.str()


LEAKY = {
    "Captured stdout call": f"def test_leaky():\n    print('password={CANARY}')\n",
    "Captured log call": (
        f"import logging\n\ndef test_leaky():\n    logging.getLogger('x').warning('token %s', '{CANARY}')\n"
    ),
    "Captured stderr setup": (
        "import sys\nimport pytest\n\n@pytest.fixture\ndef noisy():\n"
        f"    sys.stderr.write('{CANARY}')\n\ndef test_leaky(noisy):\n    pass\n"
    ),
    "failure report (call)": (
        f"def test_leaky():\n    output = 'url http://u:{CANARY}@h/'\n    assert output.startswith('ok'), output\n"
    ),
    "watch-1.log": f"def test_leaky(tmp_path):\n    (tmp_path / 'watch-1.log').write_text('GET http://u:{CANARY}@h/')\n",
    "infantry install": (
        "from tests.secret_guard import note_output\n\n"
        f"def test_leaky():\n    note_output('infantry install', 'exited 3: u:{CANARY}@h')\n"
    ),
}


@pytest.mark.parametrize("where", list(LEAKY))
def test_a_secret_anywhere_in_the_output_fails_the_run(run: pytest.Pytester, where: str) -> None:
    run.makepyfile(test_leaky=LEAKY[where])
    result = run.runpytest_subprocess()
    assert result.ret != 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*test secrets in the output*", f"test_leaky.py::test_leaky: '{CANARY}' in *{where}*"])


def test_a_secret_in_a_failing_test_s_own_source_and_arguments_is_not_a_leak(run: pytest.Pytester) -> None:
    run.makepyfile(
        test_source=(
            "import pytest\n\n"
            f"@pytest.mark.parametrize('token', ['{CANARY}'])\n"
            "def test_fails(token):\n"
            f"    expected = '{CANARY}'\n"
            "    raise ValueError('the store said no')\n"
        )
    )
    result = run.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    assert CANARY in result.stdout.str()  # the report shows the source: the guard must not count that
    assert "test secrets in the output" not in result.stdout.str()
