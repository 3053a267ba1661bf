"""Regenerate the settings table in the README from the settings model: ``python -m infantry.docs README.md``."""

from __future__ import annotations

import sys
from pathlib import Path

from infantry.settings import settings_table

START = "<!-- settings-table:start -->\n"
END = "<!-- settings-table:end -->"


def render(readme: str) -> str:
    """``readme`` with the text between the markers replaced by the generated table."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError("README has no settings-table markers")
    return head + START + settings_table() + END + tail


if __name__ == "__main__":
    path = Path(sys.argv[1])
    path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
