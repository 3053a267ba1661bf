"""A tiny app that reads its config from a file and reloads it on SIGHUP, like many real daemons.

It writes its PID to --pid-file, prints the config it loaded, and prints it again after each SIGHUP.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    args = parser.parse_args()

    reload_requested = threading.Event()
    stop_requested = threading.Event()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload_requested.set()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()
        reload_requested.set()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    args.pid_file.write_text(f"{__import__('os').getpid()}\n")

    def load(why: str) -> None:
        text = args.config.read_text(encoding="utf-8")
        settings = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        shown = ", ".join(f"{key.strip()}={value.strip()}" for key, value in settings.items())
        print(f"[app] {why}: {shown}", flush=True)

    load("started with")
    while True:
        reload_requested.wait()
        reload_requested.clear()
        if stop_requested.is_set():
            print("[app] stopping", flush=True)
            return 0
        load("SIGHUP, reloaded")


if __name__ == "__main__":
    sys.exit(main())
