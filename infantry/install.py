"""``infantry install``: fetch every source once, check, publish, and exit (an initContainer)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from infantry import logs, spool
from infantry.assemble import Assembler, KeyAwaited
from infantry.errors import CheckFailed, InfantryError, SettingsError, SourceError, SourceTimeout, UnsafeDataError
from infantry.publish import SPOOL, Gate, Publisher, make_gate, make_publisher, mark_fallback, mark_told
from infantry.retry import Backoff
from infantry.settings import Settings, SourceSpec
from infantry.snapshot import Part, Snapshot
from infantry.sources import Source, commit_note, commits, open_sources

logger = logging.getLogger(__name__)

DEFAULT_BACKOFF = Backoff()

InstallOutcome = Literal["published", "unchanged", "fallback", "kept"]


async def run_install(
    settings: Settings, environ: Mapping[str, str], backoff: Backoff = DEFAULT_BACKOFF
) -> InstallOutcome:
    """Wire the sources, publisher and gate from settings, and install once."""
    spool.use(settings.dest / SPOOL)
    sources = open_sources(settings)
    publisher = make_publisher(settings.dest, settings.layout, settings.file_mode)
    gate = make_gate(settings.check, settings.check_timeout, environ) if settings.check else None
    return await install(settings, sources, publisher, gate, backoff, Assembler(settings, environ))


async def install(
    settings: Settings,
    sources: Sequence[tuple[SourceSpec, Source]],
    publisher: Publisher,
    gate: Gate | None,
    backoff: Backoff = DEFAULT_BACKOFF,
    assembler: Assembler | None = None,
) -> InstallOutcome:
    """Fetch every source within ``--timeout``, check, and publish once; the sources are closed after."""
    async with contextlib.AsyncExitStack() as stack:
        for _, source in sources:
            stack.push_async_callback(source.aclose)
        try:
            snapshot = await gather(settings, sources, assembler or Assembler(settings), backoff)
        except SourceError as error:
            return await _fallback(settings, publisher, gate, error)
        published = await asyncio.to_thread(publisher.publish, snapshot, gate)
        await asyncio.to_thread(publisher.tidy)
        # The app starts after install: it reads this set, so `watch` need not tell it again.
        await asyncio.to_thread(mark_told, publisher.dest, snapshot.version)
        if published:
            logger.info(
                "published %s (%d files) into %s%s",
                snapshot.short_version,
                len(snapshot.files),
                publisher.dest,
                commit_note(commits(source for _, source in sources)),
            )
            return "published"
        logger.info("destination already holds %s; nothing written", snapshot.short_version)
        return "unchanged"


async def gather(
    settings: Settings,
    sources: Sequence[tuple[SourceSpec, Source]],
    assembler: Assembler,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> Snapshot:
    """Fetch every source within ``--timeout``, and assemble the set to publish.

    The sources are the value sources, then one per template. A template that waits for a key
    (``missing: wait``) has every source fetched again, with backoff, until the key comes or
    ``--timeout`` runs out. Raises SourceError (with SourceTimeout when the time ran out) for a store
    that could not be read, and UnsafeDataError for one that answered with what cannot be published.
    """
    values = len(sources) - len(assembler.groups)
    last_errors: dict[int, SourceError] = {}
    awaited: KeyAwaited | None = None
    deadline = asyncio.get_running_loop().time() + settings.timeout
    try:
        async with asyncio.timeout_at(deadline):
            for attempt in itertools.count():
                try:
                    async with asyncio.TaskGroup() as group:
                        tasks = [
                            group.create_task(_fetch(i, source, last_errors, backoff, deadline))
                            for i, (_, source) in enumerate(sources)
                        ]
                except ExceptionGroup as group_error:
                    raise _first_error(group_error) from None
                parts = [
                    Part(spec.url, spec.dir, task.result())
                    for (spec, _), task in zip(sources[:values], tasks[:values], strict=True)
                ]
                texts = [task.result() for task in tasks[values:]]
                try:
                    return assembler.assemble(parts, texts)
                except KeyAwaited as exc:
                    if awaited is None or str(exc) != str(awaited):
                        logger.warning("%s; fetching again until --timeout", exc)
                    awaited = exc
                    await asyncio.sleep(backoff.delay(attempt))
    except TimeoutError:
        if awaited is not None:
            raise UnsafeDataError(
                awaited.source, f"key {awaited.key!r} still missing after --timeout {settings.timeout:g}s"
            ) from None
        detail = "; ".join(str(e) for e in last_errors.values()) or "no answer"
        raise SourceTimeout("install", f"sources unreachable after {settings.timeout:g}s: {detail}") from None
    raise AssertionError("unreachable: the loop returns or raises")


async def _fetch(
    index: int, source: Source, last_errors: dict[int, SourceError], backoff: Backoff, deadline: float
) -> Snapshot:
    def remember(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, SourceError):
            last_errors[index] = exc
            delay = state.next_action.sleep if state.next_action else 0.0
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            logger.warning(
                "%s (attempt %d); retrying in %.1fs, %.1fs left of --timeout",
                exc,
                state.attempt_number,
                delay,
                left,
                extra=logs.fields(
                    event="fetch_failed",
                    source=source.name,
                    error=str(exc),
                    attempt=state.attempt_number,
                    next_retry_s=round(delay, 3),
                    deadline_s=round(left, 3),
                ),
            )

    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, SourceError) and exc.temporary),
        wait=backoff.wait(),
        before_sleep=remember,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await source.fetch()
    raise AssertionError("tenacity stops only by raising")


async def _fallback(settings: Settings, publisher: Publisher, gate: Gate | None, error: SourceError) -> InstallOutcome:
    fallback = settings.fallback
    if fallback is None:
        raise error
    current = await asyncio.to_thread(publisher.current)
    if current is not None:
        logger.warning(
            "FALLBACK: %s; keeping the set already in %s (%s) rather than the fallback",
            error,
            publisher.dest,
            current.short_version,
        )
        return "kept"
    from infantry.sources.file import read_tree

    snapshot = await asyncio.to_thread(read_tree, fallback, f"fallback {fallback}", settings.limits)
    await asyncio.to_thread(publisher.publish, snapshot, gate)
    await asyncio.to_thread(publisher.tidy)
    # install has no metrics endpoint; the mark lets `watch` report the fallback until it is replaced.
    await asyncio.to_thread(mark_fallback, publisher.dest, snapshot.version)
    await asyncio.to_thread(mark_told, publisher.dest, snapshot.version)
    logger.warning(
        "FALLBACK: %s; published the fallback set from %s (%s, %d files) instead of the store's",
        error,
        fallback,
        snapshot.short_version,
        len(snapshot.files),
    )
    return "fallback"


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most telling error from a task group: unsafe data first, then settings, then sources."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for kind in (UnsafeDataError, SettingsError, CheckFailed, InfantryError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]
