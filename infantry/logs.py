"""Log lines on stderr, as text or JSON.

A line can carry fields beside its message, given as ``extra=fields(event="published", version=…)``.
JSON lines hold them as keys a machine can query; text lines stay the message alone, as readable as
ever (the message already says what the fields hold).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# The fields a line may carry (anything else given as extra is not shown): what happened, to which
# source and version, how many files, how long it took, what went wrong, and retry progress.
FIELDS = (
    "event",
    "source",
    "version",
    "files",
    "duration_ms",
    "error",
    "attempt",
    "next_retry_s",
    "deadline_s",
    "commit",
    "dest",
    "address",
    "settings",
)


def fields(
    *,
    event: str | None = None,
    source: str | None = None,
    version: str | None = None,
    files: int | None = None,
    duration_ms: float | None = None,
    error: str | None = None,
    attempt: int | None = None,
    next_retry_s: float | None = None,
    deadline_s: float | None = None,
    commit: str | None = None,
    dest: str | None = None,
    address: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fields for a log line's ``extra`` (named, so a field that does not exist is a type error, not a
    line lost); None values are left out."""
    given = {
        "event": event,
        "source": source,
        "version": version,
        "files": files,
        "duration_ms": duration_ms,
        "error": error,
        "attempt": attempt,
        "next_retry_s": next_retry_s,
        "deadline_s": deadline_s,
        "commit": commit,
        "dest": dest,
        "address": address,
        "settings": settings,
    }
    return {key: value for key, value in given.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(log_format: str, level: str) -> None:
    """Send infantry's logs to stderr in ``log_format`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("infantry")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # httpx logs every request URL at INFO, query string and all; keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
