"""What an archive is called, and how much one may hold: the light half of :mod:`infantry.archive`.

A source that may never meet an archive (an HTTP document that is not one) needs only this; the
unpacking code, with tarfile and zipfile, is imported when an archive is read.
"""

from __future__ import annotations

from typing import Literal

from infantry.snapshot import Limits

ArchiveKind = Literal["tar", "tar.gz", "zip"]


def archive_kind(name: str) -> ArchiveKind | None:
    """The archive kind a file name says, or None for a plain document."""
    lowered = name.lower()
    if lowered.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lowered.endswith(".tar"):
        return "tar"
    if lowered.endswith(".zip"):
        return "zip"
    return None


def member_cap(limits: Limits) -> int:
    """The most members an archive may hold, directories included."""
    return 2 * limits.max_files


def inflate_cap(limits: Limits) -> int:
    """The most bytes an archive may inflate to: the content limit plus per-member header room."""
    return limits.max_total_size + 1024 * member_cap(limits)
