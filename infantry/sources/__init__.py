"""Sources: one module per backend, behind the small ``Source`` protocol, chosen by URL scheme."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from infantry.errors import SettingsError
from infantry.settings import Settings, SourceSpec
from infantry.settings import redact_url as redact_url  # the one definition; sources name it from here
from infantry.snapshot import Limits, Snapshot


class Source(Protocol):
    """A store that produces whole Snapshots.

    ``watch()`` yields a full Snapshot first, then a Snapshot each time the content changes, and
    None after a good round trip that found nothing new (that keeps ``/healthz`` informed). It
    raises SourceError or UnsafeDataError; calling it again resumes where it can.
    """

    name: str

    async def fetch(self) -> Snapshot:
        """Read the whole set once."""

    def watch(self) -> AsyncIterator[Snapshot | None]:
        """Follow the store: a full Snapshot, then one per change, or None when nothing changed."""

    def refresh(self) -> None:
        """Forget what was read: the next answer is the whole set, read again, even if unchanged.

        `watch` asks it when content held for publishing was lost (the spool emptied behind its back).
        """

    async def aclose(self) -> None:
        """Release connections and watchers."""


def tls_hint(exc: BaseException) -> str | None:
    """What to say when ``exc`` (or what caused it) is a server certificate that failed verification;
    None for any other failure. Such a failure does not go away by asking again."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "verification failed"
            return (
                f"the server's TLS certificate is not trusted ({reason}); "
                "set ca-file to the CA that signed it (--ca-file or the source's ca_file)"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def open_source(
    spec: SourceSpec, limits: Limits, interval: float, silence_timeout: float, request_timeout: float = 30.0
) -> Source:
    """The backend for the spec's URL scheme. Backends are imported only when used.

    ``request_timeout`` bounds one whole request (connect, headers and body together), so a peer that
    drip-feeds its answer costs one deadline, never a hang.
    """
    if spec.scheme == "file":
        from infantry.sources.file import FileSource

        return FileSource(spec, limits, interval)
    if spec.scheme in ("http", "https"):
        from infantry.sources.http import HttpSource

        return HttpSource(spec, limits, interval, request_timeout=request_timeout)
    if spec.scheme in ("etcd", "etcds"):
        from infantry.sources.etcd import EtcdSource

        return EtcdSource(spec, limits, interval, silence_timeout, request_timeout=request_timeout)
    if spec.scheme.startswith("git+"):
        from infantry.sources.git import GitSource

        return GitSource(spec, limits, interval, request_timeout=request_timeout)
    raise AssertionError(f"settings accepted an unknown scheme: {spec.scheme}")


def commits(sources: Iterable[Source]) -> list[str]:
    """The commits that the git sources among ``sources`` last answered with, for the publish log line
    and the ``infantry_git_commit_info`` metric."""
    found = (getattr(source, "commit", None) for source in sources)
    return [commit for commit in found if isinstance(commit, str)]


def commits_of(sources: Iterable[Source], versions: Iterable[str | None]) -> list[str]:
    """The commits of a set assembled from the answers of ``versions`` (one per source, in order): for
    each git source, the commit its answer of that version was read at, when it still remembers it."""
    found: list[str] = []
    for source, version in zip(sources, versions, strict=False):
        commit_of = getattr(source, "commit_of", None)
        commit = commit_of(version) if callable(commit_of) and version is not None else None
        if isinstance(commit, str):
            found.append(commit)
    return found


def commit_note(shas: Iterable[str]) -> str:
    """``; commit 0123456789ab`` for the publish log line, or nothing without a git source."""
    short = [sha[:12] for sha in shas]
    return f"; commit {', '.join(short)}" if short else ""


def open_sources(settings: Settings) -> list[tuple[SourceSpec, Source]]:
    """Every configured source, opened: the value sources, then one per template (read for its text).

    At least one value source is required.
    """
    specs = settings.resolved_sources()
    if not specs:
        raise SettingsError("source: at least one source is required (--source or INFANTRY_SOURCE)")
    return [
        (
            spec,
            open_source(spec, settings.limits, settings.interval, settings.watch_timeout, settings.request_timeout),
        )
        for spec in (*specs, *settings.template_sources())
    ]
