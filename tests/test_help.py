"""`--help` as a user reads it: each command's own options, in groups, with defaults, variables, choices
and examples; and the README's tables made from the same options."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from infantry import cli, options
from infantry.settings import Settings, env_name

ROOT = Path(__file__).resolve().parent.parent


def help_of(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "infantry", *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def entries(section: str) -> list[str]:
    """A help section's entries, each option's wrapped lines joined into one."""
    joined: list[str] = []
    for line in section.splitlines():
        if re.match(r"  -", line):
            joined.append(line.strip())
        elif line.strip() and joined:
            joined[-1] += " " + line.strip()
    return joined


def entry(section: str, flag: str) -> str | None:
    return next((e for e in entries(section) if re.match(rf"(-\w, )?{flag}[ /]", e)), None)


def test_every_setting_is_in_one_group() -> None:
    grouped = [name for _, names in options.GROUPS for name in names]
    assert len(grouped) == len(set(grouped)), "a setting is in two groups"
    assert set(grouped) == set(Settings.model_fields)
    for command, names in options.COMMANDS.items():
        assert len(names) == len(set(names)), command


@pytest.mark.parametrize("command", list(options.COMMANDS))
def test_help_shows_each_option_of_the_command_in_its_group_with_default_variable_and_choices(command: str) -> None:
    text = help_of(command)
    sections = dict(re.findall(r"^(\w[\w ]*):\n((?:  .*\n|\n)+?)(?=^\S|\Z)", text, re.MULTILINE))
    for group, names in options.grouped(command):
        assert group in sections, f"{command} --help has no {group} group"
        for name in names:
            flag = f"--{name.replace('_', '-')}"
            line = entry(sections[group], flag)
            assert line is not None, f"{flag} not under {group} in {command} --help"
            notes = re.search(r"\[([^\[\]]*)\]$", line)
            assert notes, line
            assert f"env: {env_name(name)}" in notes[1]
            _, default = options.describe(command, name)
            assert (f"default: {default}" in notes[1]) == bool(default), line
            assert ("default:" in notes[1]) == bool(default), line
            if options.choices(name):
                assert f"one of: {', '.join(options.choices(name))}" in notes[1]
    taken = {name for _, names in options.grouped(command) for name in names}
    for name in set(Settings.model_fields) - taken:
        assert f"--{name.replace('_', '-')} " not in text, f"{command} --help shows --{name}, which it does not take"


@pytest.mark.parametrize("command", list(options.COMMANDS))
def test_each_command_ends_with_examples_that_parse(command: str) -> None:
    text = help_of(command)
    examples = text.split("Examples:\n", 1)[1].split("\n\n")[0].splitlines()
    assert len(examples) >= 2
    for example in examples:
        words = shlex.split(example.split(" | ")[0])
        assert words[:2] == ["infantry", command], example
        # Parsed as the command would parse them: an option it does not take, or a missing value, fails here.
        cli.main.commands[command].make_context(command, words[2:])


def test_the_command_list_shows_whole_summaries() -> None:
    text = help_of().split("Commands:\n", 1)[1]
    assert "..." not in text and "…" not in text
    for command in options.COMMANDS:
        summary = cli.main.commands[command].short_help or ""
        assert summary and " ".join(summary.split()) in " ".join(text.split()), command


def test_webhook_help_says_what_its_listen_serves_and_its_default() -> None:
    line = entry(help_of("webhook"), "--listen") or ""
    assert "/mutate" in line and "default: 0.0.0.0:8443" in line
    assert "/readyz" not in line and "/metrics" not in line


def test_the_readme_tables_list_exactly_the_options_of_each_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in options.COMMANDS:
        table = readme.split(f"#### `infantry {command}`\n", 1)[1].split("\n\n", 1)[0]
        listed = set(re.findall(r"^\| \w+ \| `(--[a-z-]+)`", table, re.MULTILINE))
        params = cli.main.commands[command].params
        taken = {p.opts[0] for p in params if isinstance(p, click.Option) and p.name != "help"}
        assert listed == taken, command
    inject_table = readme.split("#### `infantry inject`\n", 1)[1].split("\n\n", 1)[0]
    assert "`--mode`" not in inject_table and "`--native`/`--classic`" in inject_table
