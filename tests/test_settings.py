from __future__ import annotations

from pathlib import Path

import click
import pytest

from infantry.cli import main
from infantry.docs import render, settings_tables
from infantry.errors import SettingsError
from infantry.settings import Settings, TemplateSpec, Wait, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    settings = load_settings({}, {})
    assert settings.dest == Path("/configs")
    assert settings.interval == 10
    assert settings.timeout == 60
    assert settings.file_mode == 0o644
    assert settings.layout == "kubelet"
    assert settings.wait == Wait(0, 0)
    assert settings.stale_seconds == 30


def test_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    config = tmp_path / "infantry.yaml"
    config.write_text("interval: 3\ntimeout: 7\nsignal: USR1\nfile-mode: '0600'\n")
    env = {"INFANTRY_CONFIG": str(config), "INFANTRY_TIMEOUT": "8", "INFANTRY_SIGNAL": "TERM"}
    settings = load_settings({"signal": "INT"}, env)
    assert settings.interval == 3  # file
    assert settings.timeout == 8  # env over file
    assert settings.signal == "INT"  # flag over env
    assert settings.file_mode == 0o600
    assert settings.check_timeout == 30  # default


def test_env_lists_split_on_whitespace_and_newlines() -> None:
    settings = load_settings(
        {},
        {"INFANTRY_SOURCE": "file:///a\n  http://h/x.tar.gz  file:///b", "INFANTRY_HEADER": "X-A: 1\nX-B: two words"},
    )
    assert [s.url for s in settings.source] == ["file:///a", "http://h/x.tar.gz", "file:///b"]
    assert settings.resolved_sources()[0].headers == {"X-A": "1", "X-B": "two words"}


def test_config_file_holds_several_sources_with_their_own_dirs_and_auth(tmp_path: Path) -> None:
    config = tmp_path / "infantry.yaml"
    config.write_text(
        """
sources:
  - url: https://store.example/app.tar.gz
    dir: app
    bearer_token_file: /var/run/token
    headers: {X-Env: prod}
  - file:///etc/defaults
bearer-token-file: /var/run/default-token
header: ["X-Team: platform"]
"""
    )
    settings = load_settings({"config": str(config)}, {})
    first, second = settings.resolved_sources()
    assert (first.dir, first.bearer_token_file, first.headers) == (
        "app",
        Path("/var/run/token"),
        {"X-Team": "platform", "X-Env": "prod"},
    )
    assert (second.url, second.dir, second.bearer_token_file) == (
        "file:///etc/defaults",
        "",
        Path("/var/run/default-token"),
    )


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        ({"interval": "-1"}, {}, "--interval"),
        ({}, {"INFANTRY_SIGNAL": "NOPE"}, "INFANTRY_SIGNAL"),
        ({"wait": "2:1"}, {}, "--wait"),
        ({"source": ["gopher://x"]}, {}, "--source"),
        ({"listen": "nowhere"}, {}, "--listen"),
        ({"file_mode": "0999"}, {}, "--file-mode"),
        ({"process": "nginx", "pid_file": "/p"}, {}, "pid-file"),
        ({"header": ["no colon"]}, {}, "--header"),
        ({}, {"INFANTRY_LAYOUT": "sideways"}, "INFANTRY_LAYOUT"),
    ],
)
def test_errors_name_the_setting(flags: dict[str, object], env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(flags, env)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("interval: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings({"config": str(bad)}, {})
    bad.write_text("unknown_setting: 1\n")
    with pytest.raises(SettingsError, match="unknown key 'unknown_setting'"):
        load_settings({"config": str(bad)}, {})
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"config": str(tmp_path / "missing.yaml")}, {})


def test_readme_settings_table_matches_the_model() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render(readme) == readme, "README settings table is stale: run `make readme`"
    assert settings_tables() in readme


def test_every_cli_option_is_a_setting_and_reads_its_variable() -> None:
    fields = set(Settings.model_fields)
    for name in ("install", "watch"):
        command = main.commands[name]
        assert isinstance(command, click.Command)
        options = {p.name for p in command.params if isinstance(p, click.Option) and p.name != "help"}
        assert options <= fields, options - fields
        assert {"source", "dest", "config", "check", "log_format"} <= options
    watch = main.commands["watch"]
    assert {p.name for p in watch.params} >= {"wait", "signal", "process", "pid_file", "reload_url", "exec", "listen"}


@pytest.mark.parametrize(
    ("given", "src", "dest"),
    [
        ("file:///etc/t/app.conf.j2:app.conf", "file:///etc/t/app.conf.j2", "app.conf"),
        ("file:///etc/t/404.html.j2:404", "file:///etc/t/404.html.j2", "404"),  # a name of digits is a name
        ("/etc/t/page.j2:500/page.html", "file:///etc/t/page.j2", "500/page.html"),
        ("http://127.0.0.1:8080/t/app.j2:app.conf", "http://127.0.0.1:8080/t/app.j2", "app.conf"),
    ],
)
def test_template_src_and_dest(given: str, src: str, dest: str) -> None:
    spec = TemplateSpec.parse(given)
    assert (spec.src, spec.dest) == (src, dest)


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("http://127.0.0.1:8080/t/app.j2", "expected SRC:DEST"),  # the port is not a DEST
        ("file:///etc/t/app.j2", "expected SRC:DEST"),
        ("/etc/t/app.j2", "expected SRC:DEST"),
        ("/etc/t/app.j2:/etc/passwd", "expected SRC:DEST"),
        ("/etc/t/app.j2: app.conf", "white space"),
        ("/etc/t/app.j2:app.conf ", "white space"),
    ],
)
def test_template_specs_refused(given: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        TemplateSpec.parse(given)
