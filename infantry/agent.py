"""The loops that connect sources, the check gate, the publisher and the notifiers."""

from __future__ import annotations

import asyncio
import logging
import random
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.wait import wait_base, wait_random_exponential

from infantry.errors import (
    CheckFailed,
    InfantryError,
    NotifyError,
    PublishError,
    SettingsError,
    SourceError,
    SourceTimeout,
    UnsafeDataError,
)
from infantry.health import Clock, Health, Metrics
from infantry.notify import (
    CommandVerifier,
    ExecNotifier,
    HttpNotifier,
    HttpVerifier,
    Notifier,
    SignalNotifier,
    Verifier,
)
from infantry.process import run_command
from infantry.publish import Gate, Publisher, clear_fallback, fallback_version, make_publisher, mark_fallback
from infantry.settings import Settings, SourceSpec
from infantry.snapshot import Part, Snapshot, merge
from infantry.sources import Source, open_source

logger = logging.getLogger(__name__)

InstallOutcome = Literal["published", "unchanged", "fallback", "kept"]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter, for retrying a store that is down."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int, hint: float | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row; never less than the server's hint."""
        ceiling = min(self.cap, self.base * 2 ** min(failures, 32))
        return max(random.uniform(ceiling / 2, ceiling), hint or 0.0)


class _HonourRetryAfter(wait_base):
    """Exponential backoff with jitter, stretched to the server's ``Retry-After`` when it sent one."""

    def __init__(self, inner: wait_base) -> None:
        self._inner = inner

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self._inner(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = exc.retry_after if isinstance(exc, SourceError) else None
        return max(wait, hint or 0.0)


def _is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, SourceError) and exc.temporary


def make_gate(command: str, timeout: float, environ: Mapping[str, str]) -> Gate:
    """The ``--check`` gate: run the command with the staged directory appended; non-zero refuses it."""
    argv = shlex.split(command)
    if not argv:
        raise SettingsError("check: the command is empty")

    def gate(staged: Path) -> None:
        env = {**environ, "INFANTRY_STAGED": str(staged)}
        result = run_command([*argv, str(staged)], timeout, env)
        if not result.ok:
            raise CheckFailed(f"check command {argv[0]!r} {result.describe()}")

    return gate


class Agent:
    """``install`` and ``watch``, over injected sources, publisher and notifiers."""

    def __init__(
        self,
        settings: Settings,
        sources: Sequence[tuple[SourceSpec, Source]],
        publisher: Publisher,
        notifiers: Sequence[Notifier] = (),
        gate: Gate | None = None,
        verifier: Verifier | None = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
        clock: Clock = time.monotonic,
        backoff: Backoff = Backoff(),
    ) -> None:
        self._settings = settings
        self._sources = list(sources)
        self._publisher = publisher
        self._notifiers = list(notifiers)
        self._gate = gate
        self._verifier = verifier
        self.metrics = metrics if metrics is not None else Metrics()
        self.health = health if health is not None else Health(len(sources), settings.stale_seconds, clock)
        self._clock = clock
        self._backoff = backoff
        self._parts: list[Snapshot | None] = [None] * len(self._sources)
        self._changed_at: float | None = None
        self._wake = asyncio.Event()
        self._rejected: dict[str, None] = {}
        self._step: asyncio.Future[None] | None = None

    @property
    def source_names(self) -> list[str]:
        """The sources' names as logs show them (no passwords or query strings)."""
        return [source.name for _, source in self._sources]

    # -- install ---------------------------------------------------------------------------------

    async def install(self) -> InstallOutcome:
        """Fetch every source within ``--timeout``, check, and publish once."""
        try:
            return await self._install()
        finally:
            for _, source in self._sources:
                await source.aclose()

    async def _install(self) -> InstallOutcome:
        timeout = self._settings.timeout
        last_errors: dict[int, SourceError] = {}
        try:
            async with asyncio.timeout(timeout):
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._fetch(i, last_errors)) for i in range(len(self._sources))]
        except TimeoutError:
            detail = "; ".join(str(e) for e in last_errors.values()) or "no answer"
            error: SourceError = SourceTimeout("install", f"sources unreachable after {timeout:g}s: {detail}")
            return await self._install_fallback(error)
        except ExceptionGroup as group_error:
            first = _first_error(group_error)
            if isinstance(first, SourceError):
                return await self._install_fallback(first)
            raise first from None
        snapshot = merge(
            Part(spec.url, spec.dir, task.result()) for (spec, _), task in zip(self._sources, tasks, strict=True)
        )
        published = await asyncio.to_thread(self._publisher.publish, snapshot, self._gate)
        await asyncio.to_thread(self._publisher.tidy)
        if published:
            logger.info(
                "published %s (%d files) into %s", snapshot.short_version, len(snapshot.files), self._publisher.dest
            )
            return "published"
        logger.info("destination already holds %s; nothing written", snapshot.short_version)
        return "unchanged"

    async def _fetch(self, index: int, last_errors: dict[int, SourceError]) -> Snapshot:
        _, source = self._sources[index]

        def remember(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, SourceError):
                last_errors[index] = exc
                logger.warning("%s (attempt %d); retrying", exc, state.attempt_number)

        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_temporary),
            wait=_HonourRetryAfter(wait_random_exponential(multiplier=self._backoff.base, max=self._backoff.cap)),
            before_sleep=remember,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await source.fetch()
        raise AssertionError("tenacity stops only by raising")

    async def _install_fallback(self, error: SourceError) -> InstallOutcome:
        fallback = self._settings.fallback
        if fallback is None:
            raise error
        current = await asyncio.to_thread(self._publisher.current)
        if current is not None:
            logger.warning(
                "FALLBACK: %s; keeping the set already in %s (%s) rather than the fallback",
                error,
                self._publisher.dest,
                current.short_version,
            )
            return "kept"
        from infantry.sources.file import read_tree

        snapshot = await asyncio.to_thread(read_tree, fallback, f"fallback {fallback}", self._settings.limits)
        await asyncio.to_thread(self._publisher.publish, snapshot, self._gate)
        await asyncio.to_thread(self._publisher.tidy)
        # install has no metrics endpoint; the mark lets `watch` report the fallback until it is replaced.
        await asyncio.to_thread(mark_fallback, self._publisher.dest, snapshot.version)
        self.metrics.publishes.labels("fallback").inc()
        logger.warning(
            "FALLBACK: %s; published the fallback set from %s (%s, %d files) instead of the store's",
            error,
            fallback,
            snapshot.short_version,
            len(snapshot.files),
        )
        return "fallback"

    # -- watch -----------------------------------------------------------------------------------

    async def watch(self, stop: asyncio.Event) -> None:
        """Follow every source and publish each change until ``stop`` is set."""
        # A publish killed half-way leaves temporary entries and unused snapshots; clear them first.
        await asyncio.to_thread(self._publisher.tidy)
        current = await asyncio.to_thread(self._publisher.current)
        if current is not None:
            self.metrics.set_version(current.version, len(current.files))
            logger.info("destination holds %s (%d files)", current.short_version, len(current.files))
            if fallback_version(self._publisher.dest) == current.version:
                self.metrics.fallback.set(1)
                logger.warning("FALLBACK: the live set is the fallback install published; waiting for the store")
        followers = [asyncio.create_task(self._follow(i)) for i in range(len(self._sources))]
        publishing = asyncio.create_task(self._publish_loop())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, publishing], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*followers, publishing, stopping):
                task.cancel()
            await asyncio.gather(*followers, publishing, stopping, return_exceptions=True)
            if self._step is not None and not self._step.done():
                logger.info("finishing the publish under way before stopping")
                await asyncio.gather(self._step, return_exceptions=True)
            for _, source in self._sources:
                await source.aclose()
            for notifier in self._notifiers:
                await notifier.aclose()
            if self._verifier is not None:
                await self._verifier.aclose()
        if publishing.done() and not publishing.cancelled() and publishing.exception() is not None:
            raise publishing.exception()  # type: ignore[misc]

    async def _follow(self, index: int) -> None:
        """Consume one source forever; on failure keep the last good set and back off."""
        _, source = self._sources[index]
        failures = 0
        while True:
            try:
                async for item in source.watch():
                    failures = 0
                    self.health.round_trip(index)
                    self.metrics.last_sync.set(time.time())
                    if item is None:
                        self.metrics.syncs.labels("unchanged").inc()
                        continue
                    self.metrics.syncs.labels("changed").inc()
                    self._parts[index] = item
                    if self._changed_at is None:
                        self._changed_at = self._clock()
                    self._wake.set()
                raise SourceError(source.name, "watch ended unexpectedly")
            except (SourceError, UnsafeDataError, SettingsError) as exc:
                self.metrics.syncs.labels("unsafe" if isinstance(exc, UnsafeDataError) else "error").inc()
                delay = self._backoff.delay(failures, exc.retry_after if isinstance(exc, SourceError) else None)
                failures += 1
                logger.warning("%s; keeping the last good set, retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _publish_loop(self) -> None:
        first = True
        while True:
            await self._wake.wait()
            if any(part is None for part in self._parts):
                self._wake.clear()  # every source must deliver before the first merge
                continue
            if not first:
                await self._debounce()
            first = False
            self._wake.clear()
            changed_at, self._changed_at = self._changed_at, None
            self._step = asyncio.ensure_future(self._publish_and_notify(changed_at))
            await asyncio.shield(self._step)

    async def _debounce(self) -> None:
        """Wait until changes have been quiet for ``wait.min``, but no longer than ``wait.max``."""
        wait = self._settings.wait
        if wait.max <= 0:
            return
        deadline = (self._changed_at or self._clock()) + wait.max
        while True:
            self._wake.clear()
            quiet = min(wait.min, deadline - self._clock())
            if quiet <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), quiet)
            except TimeoutError:
                return

    async def _publish_and_notify(self, changed_at: float | None) -> None:
        parts = [
            Part(spec.url, spec.dir, part)
            for (spec, _), part in zip(self._sources, self._parts, strict=True)
            if part is not None
        ]
        try:
            snapshot = merge(parts)
        except SettingsError as exc:
            self.metrics.publishes.labels("error").inc()
            logger.error("%s; keeping the last good set", exc)
            return
        if snapshot.version in self._rejected:
            return
        previous = self._publisher.current()
        try:
            published = await asyncio.to_thread(self._publisher.publish, snapshot, self._gate)
        except CheckFailed as exc:
            self._remember_rejected(snapshot.version)
            self.metrics.publishes.labels("rejected").inc()
            kept = previous.short_version if previous else "nothing"
            logger.error("%s; version %s not published, keeping %s", exc, snapshot.short_version, kept)
            return
        except PublishError as exc:
            self.metrics.publishes.labels("error").inc()
            logger.error("%s", exc)
            return
        self.health.mark_ready()
        if not published:
            logger.debug("destination already holds %s", snapshot.short_version)
            return
        self.metrics.publishes.labels("published").inc()
        self.metrics.set_version(snapshot.version, len(snapshot.files))
        self.metrics.fallback.set(0)
        await asyncio.to_thread(clear_fallback, self._publisher.dest)
        logger.info("published %s (%d files)", snapshot.short_version, len(snapshot.files))
        if previous is None:
            logger.info("first set in an empty destination; nobody to notify")
        else:
            await self._notify(snapshot)
            if changed_at is not None:
                self.metrics.propagation.observe(self._clock() - changed_at)
            if self._verifier is not None:
                problem = await self._verifier.verify()
                if problem is not None:
                    await self._roll_back(snapshot, problem)
        # Old snapshot directories go only now, so removing a large one never delays the reload.
        await asyncio.to_thread(self._publisher.tidy)

    async def _roll_back(self, bad: Snapshot, problem: str) -> None:
        """The app did not come back healthy: restore the previous set, tell the app, never retry ``bad``."""
        self._remember_rejected(bad.version)
        self.metrics.bad_version.clear()
        self.metrics.bad_version.labels(bad.version).set(1)
        try:
            restored = await asyncio.to_thread(self._publisher.rollback)
        except PublishError as exc:
            logger.error(
                "version %s failed verification (%s) and rolling back failed: %s", bad.short_version, problem, exc
            )
            return
        if restored is None:
            logger.error(
                "version %s failed verification (%s); no previous set to roll back to", bad.short_version, problem
            )
            return
        self.metrics.rollbacks.inc()
        self.metrics.set_version(restored.version, len(restored.files))
        logger.error(
            "version %s failed verification (%s); rolled back to %s, and it will not be published again "
            "until the store changes",
            bad.short_version, problem, restored.short_version,
        )  # fmt: skip
        await self._notify(restored)

    def _remember_rejected(self, version: str) -> None:
        self._rejected[version] = None
        while len(self._rejected) > 32:
            del self._rejected[next(iter(self._rejected))]

    async def _notify(self, snapshot: Snapshot) -> None:
        for notifier in self._notifiers:
            try:
                await notifier.notify(snapshot)
            except NotifyError as exc:
                self.metrics.reloads.labels(notifier.method, "error").inc()
                logger.error("reload of %s failed: %s", snapshot.short_version, exc)
            else:
                self.metrics.reloads.labels(notifier.method, "ok").inc()


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


def build_agent(settings: Settings, environ: Mapping[str, str], *, with_notifiers: bool) -> Agent:
    """Wire an Agent from settings: sources by scheme, the publisher, the gate and the notifiers."""
    specs = settings.resolved_sources()
    if not specs:
        raise SettingsError("source: at least one source is required (--source or INFANTRY_SOURCE)")
    sources = [(spec, open_source(spec, settings.limits, settings.interval, settings.watch_timeout, settings.request_timeout))
        for spec in specs
    ]
    publisher = make_publisher(settings.dest, settings.layout, settings.file_mode)
    gate = make_gate(settings.check, settings.check_timeout, environ) if settings.check else None
    notifiers: list[Notifier] = []
    if with_notifiers:
        if settings.process or settings.pid_file:
            notifiers.append(
                SignalNotifier(settings.signal_number, process=settings.process, pid_file=settings.pid_file)
            )
        if settings.reload_url:
            client = httpx.AsyncClient(timeout=settings.reload_timeout, trust_env=False)
            notifiers.append(HttpNotifier(client, settings.reload_url, settings.reload_method, settings.reload_timeout))
        if settings.exec:
            notifiers.append(ExecNotifier(settings.exec, settings.exec_timeout, environ))
    verifier: Verifier | None = None
    if with_notifiers and settings.verify_url:
        client = httpx.AsyncClient(trust_env=False)
        verifier = HttpVerifier(client, settings.verify_url, settings.verify_timeout)
    elif with_notifiers and settings.verify_cmd:
        verifier = CommandVerifier(settings.verify_cmd, settings.verify_timeout, environ)
    return Agent(settings, sources, publisher, notifiers, gate, verifier)
