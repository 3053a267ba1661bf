"""A backend for the templates example: answers every GET with ``backend NAME`` on a loopback port.

Run it: ``python backend.py PORT NAME``. It serves until it is sent SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(port: int, name: str) -> None:
    """Answer ``backend NAME`` on 127.0.0.1:PORT until SIGTERM or SIGINT."""
    body = f"backend {name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # nginx's requests are not worth a line each

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    stop = threading.Event()
    # The handler only records; shutting down happens here, off the serving thread.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: backend.py PORT NAME", file=sys.stderr)
        return 2
    serve(int(sys.argv[1]), sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
