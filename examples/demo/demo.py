"""The scripted end-to-end demo behind `make demo`, on the embedded default (a file:// source).

It installs the config, starts a tiny app that reloads on SIGHUP beside `infantry watch`, edits the
config twice so the app prints the new values, then stops everything and exits 0.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
INFANTRY = [sys.executable, "-m", "infantry"]
DEADLINE_SECONDS = 15.0


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo failed: timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Echo:
    """Prints a child's output with a prefix, and keeps the lines so the demo can wait on them."""

    def __init__(self, proc: subprocess.Popen[str], prefix: str) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(proc, prefix), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str], prefix: str) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"{prefix}{line}", end="", flush=True)
            self.lines.put(line)

    def expect(self, text: str) -> str:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"demo failed: the app never printed {text!r}") from None
            if text in line:
                return line


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="infantry-demo-") as tmp:
        root = Path(tmp)
        store, dest, pid_file = root / "store", root / "configs", root / "app.pid"
        store.mkdir()
        config = store / "app.yaml"
        config.write_text("greeting: hello\ncolor: blue\n")
        say(f"the store is a plain directory: {store}")

        say("infantry install (the initContainer)")
        subprocess.run([*INFANTRY, "install", "--source", store.as_uri(), "--dest", str(dest)], check=True)
        print("   " + "  ".join(sorted(os.listdir(dest))))

        say("starting the app, then infantry watch (the sidecar)")
        app = subprocess.Popen(
            [sys.executable, str(HERE / "app.py"), "--config", str(dest / "app.yaml"), "--pid-file", str(pid_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        app_out = Echo(app, "   ")
        app_out.expect("started with")
        port = free_port()
        watch = subprocess.Popen(
            [
                *INFANTRY,
                "watch",
                "--source",
                store.as_uri(),
                "--dest",
                str(dest),
                "--pid-file",
                str(pid_file),
                "--signal",
                "HUP",
                "--wait",
                "0.1:1",
                "--interval",
                "5",
                "--listen",
                f"127.0.0.1:{port}",
            ],
        )

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for("infantry watch to be ready", ready)

        for color in ("green", "red"):
            say(f"editing the store: color -> {color}")
            started = time.monotonic()
            config.write_text(f"greeting: hello\ncolor: {color}\n")
            app_out.expect(f"color={color}")
            print(f"   (the app reloaded {time.monotonic() - started:.2f}s after the edit)")

        say("stopping: SIGTERM to infantry watch, then to the app")
        watch.send_signal(signal.SIGTERM)
        if watch.wait(timeout=10) != 0:
            raise SystemExit(f"demo failed: infantry watch exited {watch.returncode}")
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=10)
        say("done: the app picked up both edits, and everything stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
