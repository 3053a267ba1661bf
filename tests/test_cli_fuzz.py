"""A fuzz test of the command line: hostile options, environment and config files, never a traceback.

Hypothesis draws argument lists for ``install``, ``watch`` and ``inject`` from the documented options,
with hostile values: empty, huge, unicode, control characters, numbers that are negative, fractional,
not finite or too large, URLs that do not parse and carry passwords, paths that do not exist or are
the wrong kind. Each run must exit with a code DESIGN.md documents for that outcome, print no
traceback, and never repeat a drawn password.

It runs in-process (click's test runner), and nothing it draws can run for long or leave the machine:
every network source is a closed loopback port (or a URL the settings refuse), ``install`` always has
a ``--timeout`` of at most 50 ms or an invalid one, and ``watch`` always ends with a CA file that does
not exist, which the start-time checks refuse before anything starts.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infantry import cli
from infantry import options as infantry_options

EXIT_CODES = {"install": {0, 2, 3, 4, 5}, "watch": {2}, "inject": {0, 2}}
"""What each command may answer here: DESIGN.md's codes, less 1 (a bug). watch never gets to start."""

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers: [{name: app, image: nginx}]
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Scene:
    """A temporary directory holding what the drawn paths point at."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "store"
        self.store.mkdir()
        (self.store / "app.yaml").write_text("a: 1\n")
        self.baked = root / "baked"
        self.baked.mkdir()
        (self.baked / "app.yaml").write_text("a: 0\n")
        self.afile = root / "afile"
        self.afile.write_text("not a directory\n")
        self.deployment = root / "deploy.yaml"
        self.deployment.write_text(DEPLOYMENT)
        self.dests = root / "dests"
        self.dests.mkdir()
        self.config = root / "infantry.yaml"
        self.missing_ca = root / "missing-ca.pem"
        self.port = closed_port()


MARK = "\ue000"
"""Stands for the drawn password while values are drawn; never drawn itself (private-use characters are not)."""

hostile_text = st.one_of(
    st.sampled_from(
        ["", " ", "-", "--", "x" * 5000, "é✓\u202e", "\t\n\r", "\x01\x1b[31m\x7f", "{}", "[", "'", '"', "%s"]
    ),
    st.text(st.characters(blacklist_categories=("Cs", "Co"), blacklist_characters="\x00"), max_size=40),
)
hostile_number = st.one_of(
    st.sampled_from(
        ["-1", "0", "-0.0", "nan", "inf", "-inf", "1e400", "1e-400", "0x10", "1_000", "9" * 40, "٣", " 5 "]
    ),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(repr),
    hostile_text,
)
tiny_seconds = st.floats(min_value=0.001, max_value=0.05).map(lambda s: f"{s:.3f}")
passwords = st.builds(
    lambda shape, tail: shape.replace("*", tail),
    st.sampled_from(["Pw*", "Pw*/x", "Pw*@", "Pw:*", "Pw*?q", "Pw*#f", "Pw%40*"]),
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=10, max_size=10),
)


class Options:
    """For each documented option, the strategies its values are drawn from: hostile, and ordinary."""

    def __init__(self, scene: Scene) -> None:
        url = self._url(scene)
        path = st.one_of(
            st.sampled_from(
                [
                    str(scene.afile),
                    str(scene.afile / "sub"),
                    str(scene.root / "no"),
                    str(scene.store),
                    "/",
                    "",
                    "/dev/null",
                ]
            ),
            hostile_text,
        )
        command = st.one_of(
            st.sampled_from(
                ["true", "false", "true --strict", "/nonexistent/validator", "'unclosed", "", str(scene.afile)]
            ),
            hostile_text,
        )
        seconds = st.one_of(hostile_number, tiny_seconds)
        header = st.one_of(
            hostile_text.filter(lambda t: ":" not in t).map(lambda name: f"{name}: {MARK}"),
            st.just(f"X-Api-Key: {MARK}\x01"),
            st.just("Authorization Bearer"),
        )
        self.hostile: dict[str, st.SearchStrategy[str]] = {
            "source": url,
            "config": st.just(str(scene.config)),
            "layout": st.one_of(st.sampled_from(["kubelet", "direct", "KUBELET"]), hostile_text),
            "file_mode": st.one_of(
                st.sampled_from(["644", "0644", "0o600", "999", "0200", "7777", "-644"]), hostile_number
            ),
            "max_file_size": st.one_of(st.sampled_from(["1", "1KiB", "2MB", "1 EiB", "-5", "10XB"]), hostile_number),
            "max_total_size": st.one_of(st.sampled_from(["1", "1KiB", "2MB", "-5"]), hostile_number),
            "max_files": hostile_number,
            "check": command,
            "check_timeout": seconds,
            "publish_timeout": seconds,
            "request_timeout": seconds,
            "interval": seconds,
            "header": header,
            "bearer_token_file": path,
            "username": hostile_text,
            "password_file": path,
            "client_cert": path,
            "client_key": path,
            "log_format": st.one_of(st.sampled_from(["text", "json"]), hostile_text),
            "log_level": st.one_of(st.sampled_from(["debug", "info", "error"]), hostile_text),
            "fallback": st.one_of(st.just(str(scene.baked)), path),
            "watch_timeout": seconds,
            "wait": st.one_of(st.sampled_from(["1:5", "5:1", "1:", ":", "0", "-1:2", "nan:inf"]), hostile_number),
            "stale_after": seconds,
            "signal": st.one_of(st.sampled_from(["HUP", "SIGUSR1", "kill", "0", "SIGNOPE"]), hostile_text),
            "process": hostile_text,
            "pid_file": path,
            "reload_url": url,
            "reload_method": hostile_text,
            "reload_timeout": seconds,
            "verify_url": url,
            "verify_cmd": command,
            "verify_timeout": seconds,
            "exec": command,
            "exec_timeout": seconds,
            "listen": st.one_of(st.sampled_from(["127.0.0.1:0", ":99999", "nowhere", "[::1]:", ":"]), hostile_text),
            "file": st.one_of(st.sampled_from([str(scene.deployment), str(scene.afile), str(scene.root / "no")]), path),
            "image": hostile_text,
            "mount_path": hostile_text,
            "containers": hostile_text,
            "cpu": hostile_text,
            "memory": hostile_text,
        }
        # Values infantry accepts, so that some runs get past the settings into the job itself.
        self.ordinary: dict[str, st.SearchStrategy[str]] = {
            "source": st.sampled_from(
                [
                    scene.store.as_uri(),
                    (scene.store / "app.yaml").as_uri(),
                    (scene.root / "missing").as_uri(),
                    f"http://u:{MARK}@127.0.0.1:{scene.port}/app.yaml?token={MARK}",
                    f"etcd://127.0.0.1:{scene.port}/app/",
                ]
            ),
            "layout": st.sampled_from(["kubelet", "direct"]),
            "file_mode": st.sampled_from(["644", "0600", "0o755"]),
            "max_file_size": st.sampled_from(["1", "1KiB", "1MiB"]),
            "max_files": st.sampled_from(["1", "5"]),
            "check": st.sampled_from(["true", "false", "true --strict"]),
            "header": st.just(f"X-Api-Key: {MARK}"),
            "fallback": st.just(str(scene.baked)),
            "log_format": st.sampled_from(["text", "json"]),
            "log_level": st.sampled_from(["debug", "info"]),
            "file": st.just(str(scene.deployment)),
            "image": st.just("infantry:test"),
            "reload_url": st.just(f"http://u:{MARK}@127.0.0.1:{scene.port}/-/reload"),
            "process": st.just("nginx"),
            "signal": st.sampled_from(["HUP", "USR1"]),
            "cpu": st.just("20m"),
        }
        key = st.one_of(
            st.sampled_from(sorted(self.hostile)), st.sampled_from(["intervall", "sources", "config", "yes"])
        )
        scalar: st.SearchStrategy[Any] = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.just("1:5"))
        secrets = st.fixed_dictionaries(
            {}, optional={"reload_url": url, "verify-url": url, "header": st.lists(header, max_size=2)}
        )
        mapping = st.builds(
            lambda drawn, secret: {**drawn, **secret},
            st.dictionaries(key, st.one_of(scalar, hostile_text, st.lists(url, max_size=2)), max_size=5),
            secrets,
        )
        sources = st.lists(
            st.fixed_dictionaries(
                {"url": url},
                optional={"dir": hostile_text, "ca_file": path, "headers": st.just({"X-Key": MARK}), "urll": scalar},
            ),
            max_size=2,
        )
        raw = st.sampled_from(
            ["wait: 1:5\nfile_mode: 644\n", "a: &x [1]\nb: *x\n", "[", "\tkey: 1", "- 1\n", "--- 1\n--- 2\n", "yes: no"]
        )
        self.config: st.SearchStrategy[str | None] = st.one_of(
            st.none(),
            mapping.map(lambda m: yaml.safe_dump(m, allow_unicode=True)),
            sources.map(lambda s: yaml.safe_dump({"sources": s}, allow_unicode=True)),
            raw,
            hostile_text,
        )
        name = hostile_text.filter(lambda t: "/" not in t and t.strip() not in (".", ".."))
        self.dest = st.one_of(
            st.sampled_from(["d1", "d2", "deep/er/still"]).map(lambda n: str(scene.dests / n)),
            name.map(lambda n: str(scene.dests / n)),
            st.sampled_from([str(scene.afile), str(scene.afile / "sub"), ""]),
        )

    @staticmethod
    def _url(scene: Scene) -> st.SearchStrategy[str]:
        """URLs that reach nothing but a closed loopback port, or that the settings refuse."""
        host = st.sampled_from(
            [
                f"127.0.0.1:{scene.port}",
                f"[::1]:{scene.port}",
                "127.0.0.1:99999",
                "127.0.0.1:1,127.0.0.1:2",
                "",
                "[",
                ":x",
            ]
        )
        user = st.sampled_from(["", "u@", f"u:{MARK}@", f":{MARK}@"])
        scheme = st.sampled_from(["http", "https", "etcd", "etcds", "ftp", "gopher", "git+https", "", "HTTP"])
        query = st.sampled_from(["", f"?token={MARK}", "?", "#frag"])
        built = st.builds(lambda s, u, h, p, q: f"{s}://{u}{h}/{p}{q}", scheme, user, host, hostile_text, query)
        files = st.one_of(
            st.sampled_from([scene.store.as_uri(), (scene.root / "missing").as_uri(), f"file://u:{MARK}@host/x"]),
            hostile_text.map(lambda t: "file://" + t),
        )
        return st.one_of(built, files, hostile_text)


BOOLEAN = {"install_only", "run_as_same_user", "annotate_only"}
"""Options that are flags: drawn as present or absent."""

SECRET_OPTIONS = {"source", "header", "reload_url", "verify_url", "config"}
"""Options whose drawn values may hold the password; any other value holding it may be echoed."""


@st.composite
def invocation(draw: st.DrawFn, scene: Scene, options: Options) -> tuple[str, list[str], str | None, str, list[str]]:
    """A command, its arguments, a config file's text, the password drawn, and the non-secret values."""
    name = draw(st.sampled_from(["install", "watch", "inject"]))
    secret = draw(passwords)
    names = infantry_options.COMMANDS[name]
    ordinary = draw(st.booleans())
    values = options.ordinary if ordinary else options.hostile
    drawable = [n for n in names if n in values and n not in ("dest", "timeout", "ca_file")]
    chosen = draw(st.lists(st.sampled_from(drawable), max_size=8))
    if ordinary and name != "inject":
        chosen.append("source")
    args: list[str] = []
    plain: list[str] = []
    for option in chosen:
        flag = f"--{option.replace('_', '-')}"
        if option in BOOLEAN:
            args.append(flag)
            continue
        value = draw(values[option]).replace(MARK, secret)
        args += [flag, value]
        if option not in SECRET_OPTIONS:
            plain.append(value)
    if name == "inject":
        if draw(st.booleans()):
            args.append(draw(st.sampled_from(["--native", "--classic"])))
    else:
        value = draw(st.sampled_from([str(scene.dests / "d1")]) if ordinary else options.dest)
        args += ["--dest", value]
        plain.append(value)
    if name == "install":
        # Never longer than 50 ms of trying, so a closed port costs little.
        args += ["--timeout", draw(tiny_seconds if ordinary else st.one_of(tiny_seconds, _short(hostile_number)))]
    if name == "watch":
        args += ["--ca-file", str(scene.missing_ca)]  # last, so it wins: watch is refused before it starts
    text = draw(options.config)
    if text is not None:
        text = text.replace(MARK, secret)
        if "--config" not in args:
            args += ["--config", str(scene.config)]
    return name, args, text, secret, plain


def _short(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``values`` less any that reads as a valid timeout above 50 ms (pydantic's float parsing is lenient)."""

    def short(text: str) -> bool:
        try:
            seconds = float(text.strip().replace("_", ""))
        except ValueError:
            return True
        return not 0.05 < seconds < 1e300

    return values.filter(short)


def test_the_command_line_never_prints_a_traceback_nor_a_password() -> None:
    runner = CliRunner()
    with tempfile.TemporaryDirectory(prefix="infantry-fuzz-") as tmp:
        scene = Scene(Path(tmp))
        run = _runner(runner, scene)
        options = Options(scene)

        ran = 0

        @settings(
            max_examples=2000,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(invocation(scene, options))
        def check(drawn: tuple[str, list[str], str | None, str, list[str]]) -> None:
            nonlocal ran
            ran += 1
            run(*drawn)

        check()
        assert ran >= 2000, f"only {ran} command lines were tried"


def _runner(runner: CliRunner, scene: Scene) -> Callable[[str, list[str], str | None, str, list[str]], None]:
    def run(name: str, args: list[str], text: str | None, secret: str, plain: list[str]) -> None:
        if any(secret in value for value in plain) or (text is not None and "\x00" in text):
            return  # a drawn non-secret value that happens to hold the password may be echoed
        if text is not None:
            scene.config.write_text(text, encoding="utf-8", errors="surrogateescape")
        result = runner.invoke(cli.main, [name, *args], input="", env={"INFANTRY_CONFIG": None}, catch_exceptions=True)
        shown = f"infantry {name} {args!r}\nconfig: {text!r}\nexit {result.exit_code}\n{result.output}"
        assert result.exception is None or isinstance(result.exception, SystemExit), shown
        assert "Traceback" not in result.output, shown
        assert result.exit_code in EXIT_CODES[name], shown
        # inject writes the workload out, secrets and all, as it was asked to; its log lines must not.
        seen = result.stderr if name == "inject" else result.output
        assert secret not in seen, shown
        if result.exit_code == 2:
            log_lines = [line for line in result.stderr.splitlines() if " ERROR " in line or '"error"' in line]
            assert len(log_lines) <= 1, shown

    return run
