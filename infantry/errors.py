"""The errors infantry raises, as one tree.

Every failure below the command line is one of these. Only ``cli.py`` turns them into
messages and exit codes::

    InfantryError
    ├── SettingsError        a setting is missing, malformed or contradictory   (exit 2)
    │   └── InvalidAnnotation    ... in an infantry.dev/ annotation of a workload
    ├── SourceError          the store could not be read                        (exit 3)
    │   └── SourceTimeout    ... and ``--timeout`` ran out while retrying       (exit 3)
    ├── UnsafeDataError      the store returned unsafe or malformed data        (exit 5)
    ├── CheckFailed          the check command rejected a staged snapshot       (exit 4)
    ├── PublishError         the destination could not be updated               (exit 1)
    └── NotifyError          the app could not be told to reload

Errors carry context (which source, which path) in their message, and never a secret.
"""

from __future__ import annotations


class InfantryError(Exception):
    """The root of every error infantry raises on purpose."""


class SettingsError(InfantryError):
    """A setting is missing, malformed or contradictory. The message names the setting."""


class InvalidAnnotation(SettingsError):
    """An ``infantry.dev/`` annotation on a workload has a value infantry cannot use."""

    def __init__(self, annotation: str, detail: str) -> None:
        super().__init__(f"{annotation}: {detail}")
        self.annotation = annotation
        self.detail = detail


class SourceError(InfantryError):
    """A source could not be read.

    ``temporary`` says whether trying again may help (a refused connection, a 503), and
    ``retry_after`` carries the server's ``Retry-After`` hint in seconds, when it sent one.
    """

    def __init__(
        self,
        source: str,
        message: str,
        *,
        temporary: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.temporary = temporary
        self.retry_after = retry_after


class SourceTimeout(SourceError):
    """A source stayed unreachable until the time allowed for it ran out."""


class UnsafeDataError(InfantryError):
    """A source returned data that must not be written: a bad path, an oversize file, a bad archive."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


class CheckFailed(InfantryError):
    """The ``--check`` command rejected a staged snapshot, so it was not published."""


class PublishError(InfantryError):
    """The destination could not be updated."""


class ContentLost(PublishError):
    """Content held in the spool was removed or changed on disk: the sources must read it again."""


class NotifyError(InfantryError):
    """The app could not be told to reload."""
