"""``python -m infantry``."""

from infantry.cli import main

main(prog_name="infantry")
