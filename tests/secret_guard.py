"""A pytest plugin that fails the session when any test secret shows up in any test's output.

The secrets the tests hand to infantry (passwords, tokens, keys) are listed once, in :data:`SECRETS`.
What is searched, for every test:

- what pytest captured: stdout, stderr and log records, in every phase (setup, call, teardown);
- what a failure report shows: its ``E`` lines and messages, where assertion messages carry a process's
  output. Not the test's source lines or arguments, which name the secrets on purpose;
- the output of the infantry processes a test started that went to a file under its ``tmp_path``
  (``watch*.log``, ``webhook*.log``, ``infantry*.log``). Servers' own logs (nginx's access log records
  the Authorization header it was sent) are not infantry's output and are not searched;
- output kept in memory and handed to :func:`note_output`.

A leak is printed at the end, with the test and where it appeared, and the session exits non-zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Every secret value a test gives infantry. A test that adds one adds it here.
SECRETS: tuple[str, ...] = (
    "hunter2",  # the password in URLs (sources, --reload-url)
    "s3cr3t",  # a token in a source URL's query
    "tok3n",  # a token in --reload-url's query
    "wonderland",  # nginx's basic-auth password
    "sesame",  # nginx's bearer tokens (also "opensesame")
    "SECRET-second-line",  # a token file with a second line
    "sésame-SECRET",  # a token that is not ASCII
    "wrong-token-value",
    "first-token",
    "rotated-token",
    "s3cret-pass",  # etcd's password
    "root-password",  # etcd's root user, set by the test helper
    "k3y-s3cret",  # an --header value
    "TOP-SECRET",  # a file outside a file:// store's tree
    "R3loadPass",  # a password in a rejected --reload-url
    "g1t-wonderland",  # the git smart HTTP server's basic-auth password
    "g1t-sesame",  # the git smart HTTP server's bearer token
    "not-the-password",  # a wrong password given to the git smart HTTP server
)

# The files under a test's tmp_path that hold the output of an infantry process.
OUTPUT_FILES = ("watch*.log", "webhook*.log", "infantry*.log")

_noted: list[tuple[str, str]] = []


def note_output(where: str, text: str) -> None:
    """Have the output of a process that a test kept in memory searched for secrets too."""
    _noted.append((where, text))


def secrets_in(text: str) -> list[str]:
    """The test secrets that ``text`` contains."""
    return [secret for secret in SECRETS if secret in text]


@dataclass(frozen=True)
class Leak:
    test: str
    where: str
    secret: str


class SecretGuard:
    """Collects leaks as tests report, and turns any into a failed session."""

    def __init__(self) -> None:
        self.leaks: list[Leak] = []

    def search(self, test: str, where: str, text: str) -> None:
        self.leaks.extend(Leak(test, where, secret) for secret in secrets_in(text))

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for title, content in report.sections:
            self.search(report.nodeid, title, content)
        self.search(report.nodeid, f"failure report ({report.when})", _shown(report.longrepr))

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.leaks:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.leaks:
            return
        terminalreporter.section("test secrets in the output", sep="=", red=True, bold=True)
        for leak in dict.fromkeys(self.leaks):
            terminalreporter.line(f"{leak.test}: {leak.secret!r} in {leak.where}", red=True)


def _shown(longrepr: object) -> str:
    """What a failure report shows of the run: its error lines and messages, not the test's source."""
    if longrepr is None:
        return ""
    chain = getattr(longrepr, "chain", None)
    if chain is None:
        return str(longrepr)  # a collection error or a skip: a message, with no source lines
    shown: list[str] = []
    for reprtraceback, crash, description in chain:
        for entry in getattr(reprtraceback, "reprentries", []):
            lines: list[str] = getattr(entry, "lines", [])
            shown.extend(line for line in lines if line.startswith("E"))
        if crash is not None:
            shown.append(crash.message)
        if description:
            shown.append(description)
    return "\n".join(shown)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SecretGuard(), "secret-guard")


@pytest.fixture(autouse=True)
def _search_process_output_for_secrets(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, search the infantry output it left in files and handed to note_output."""
    tmp_path: Path | None = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    del _noted[:]
    yield
    guard = request.config.pluginmanager.get_plugin("secret-guard")
    assert isinstance(guard, SecretGuard)
    test = request.node.nodeid
    for where, text in _noted:
        guard.search(test, where, text)
    del _noted[:]
    if tmp_path is not None:
        for pattern in OUTPUT_FILES:
            for path in sorted(tmp_path.rglob(pattern)):
                if path.is_file():
                    guard.search(test, str(path), path.read_text("utf-8", "replace"))
