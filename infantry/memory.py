"""Giving memory back to the system: a sidecar's RSS is what its pod's memory limit is measured against.

glibc keeps memory freed by Python in its heaps, and gives each thread that allocates its own heap
(an "arena"). A publish of 100,000 files runs in a worker thread and frees megabytes of transient
tables; without these two calls, that memory stays counted against the pod for the process's life.
Both are best effort: on a C library without them (musl), they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def one_arena() -> None:
    """Have every thread allocate from one heap, so memory one frees is there for the others."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, 1)


def give_back() -> None:
    """Return the free memory at the ends of the heaps to the system (after a large publish)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
