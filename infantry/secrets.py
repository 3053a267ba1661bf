"""Reading small files that hold secrets or PIDs: never blocking, never large, never echoed."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from infantry.errors import SettingsError

MAX_SECRET_BYTES = 64 * 1024
# What an HTTP header value, and so a token or a password sent in one, may hold: visible ASCII and spaces.
_HEADER_SAFE = re.compile(r"[\x20-\x7e]*")


def read_small(path: Path, limit: int) -> bytes:
    """Up to ``limit`` bytes of a regular file; OSError for a FIFO, a device, or a larger file.

    Opened without blocking, so a FIFO put where a file was expected cannot stall the caller.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", closefd=True) as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def read_secret(path: Path, what: str) -> str:
    """A token or password from a file, stripped; SettingsError naming ``what`` (never the value)."""
    try:
        text = read_small(path, MAX_SECRET_BYTES).decode("utf-8")
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{what}: {path} is not UTF-8 text") from None
    value = text.strip()
    if not _HEADER_SAFE.fullmatch(value):
        raise SettingsError(f"{what}: {path} holds a line break or a character that cannot be sent in an HTTP header")
    return value
