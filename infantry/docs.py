"""Regenerate the README's settings tables from each command's options: ``python -m infantry.docs README.md``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from infantry import cli, options
from infantry.settings import Settings, env_name

START = "<!-- settings-table:start -->\n"
END = "<!-- settings-table:end -->"


def _row(command: str, param: click.Option) -> str:
    name = param.name or ""
    flags = "/".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
    if name in Settings.model_fields:
        meaning, default = options.describe(command, name)
        if options.choices(name):
            meaning += " One of " + ", ".join(f"`{c}`" for c in options.choices(name)) + "."
        env = f"`{env_name(name)}`"
    else:  # an option of this command alone, not a setting (--json, --diff, --native/--classic)
        meaning, _, note = (param.help or "").partition("  [default: ")
        default, env = note.rstrip("]"), ""
    group = getattr(param, "group", "Options")
    return f"| {group} | {flags} | {env} | {f'`{default}`' if default else ''} | {meaning} |"


def settings_tables() -> str:
    """One table per command, its options in help groups, from the command's own options."""
    out: list[str] = []
    for command in options.COMMANDS:
        out += [f"#### `infantry {command}`", "", "| Group | Option | Environment | Default | Meaning |"]
        out.append("|---|---|---|---|---|")
        params = [p for p in cli.main.commands[command].params if isinstance(p, click.Option) and p.name != "help"]
        order = ["Options", *(group for group, _ in options.GROUPS)]
        params.sort(key=lambda p: order.index(getattr(p, "group", "Options")))
        out += [_row(command, param) for param in params]
        out.append("")
    return "\n".join(out)


def render(readme: str) -> str:
    """``readme`` with the text between the markers replaced by the generated tables."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError("README has no settings-table markers")
    return head + START + settings_tables() + END + tail


if __name__ == "__main__":
    path = Path(sys.argv[1])
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
