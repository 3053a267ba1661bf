"""``infantry watch``: keep the destination equal to the store, level-triggered, and say so truthfully.

The :class:`Watcher` knows two facts. *Desired* is the latest snapshot each source delivered, merged.
*Actual* is what the destination holds, read back from disk by the publisher (only files whose stat
changed are re-read). Whenever they differ (on a change, on every resync, and on retries with backoff)
it publishes, tells the app, and verifies, until they agree. So a failed publish, a full disk, a
destination edited or emptied behind its back, or a reload that failed all converge by themselves once
their cause is gone.

Its tasks run in one ``asyncio.TaskGroup``::

    follower (1/src) reads one source's watch(), keeps its latest snapshot, wakes the reconciler
    reconciler       publish → notify → verify (→ roll back), each step under a deadline
    health           the /healthz, /readyz, /status and /metrics server (with --listen)
    stopper          on SIGTERM: ends the followers and the server; the reconciler finishes its step

A source may fail only with SourceError, UnsafeDataError or SettingsError; those are retried with
backoff. Any other exception, in any task, is a bug: /healthz reports it, the group is cancelled, and
the error reaches the command line, which logs the traceback and exits 1 so the container restarts.

Deliberate refusals (content the check command rejected, a version rolled back after failing
verification) leave the destination on the last good set. They make /readyz fail and show on /status,
but not on /healthz: restarting infantry cannot fix the content, and would only re-apply a version that
already broke the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from infantry import logs, memory, spool, threads
from infantry.assemble import Assembler, is_render_error, is_template_syntax
from infantry.errors import (
    CheckFailed,
    ContentLost,
    InfantryError,
    NotifyError,
    PublishError,
    SettingsError,
    SourceError,
    UnsafeDataError,
)
from infantry.health import Clock, HealthServer, Metrics, NullMetrics, Report
from infantry.notify import (
    CommandVerifier,
    ExecNotifier,
    HttpNotifier,
    HttpVerifier,
    Notifier,
    SignalNotifier,
    Verifier,
)
from infantry.process import KILL_GRACE_SECONDS
from infantry.publish import (
    SPOOL,
    Gate,
    Publisher,
    clear_fallback,
    fallback_version,
    make_gate,
    make_publisher,
    mark_told,
    told_version,
)
from infantry.retry import Backoff
from infantry.settings import Settings, SourceSpec
from infantry.snapshot import Part, Snapshot
from infantry.sources import Source, commit_note, commits_of, open_sources
from infantry.status import iso_time, live_since

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Room for a call to give up by its own timeout and report why, before the loop stops waiting for it.
_DEADLINE_SLACK = KILL_GRACE_SECONDS + 3.0
_REMEMBERED_REFUSALS = 32


@dataclass(frozen=True)
class Hook:
    """A notifier, and how long one call to it may take in all."""

    notifier: Notifier
    deadline: float


@dataclass
class _SourceState:
    name: str
    last_ok: float
    error: str | None = None
    failures: int = 0
    # Why the store's latest content was refused (UnsafeDataError: an empty set, a bad path, too big),
    # until the source delivers a set again: the destination then holds what the store no longer does.
    refused: str | None = None
    retry_at: float | None = None  # when the next try starts, while failing (the watcher's clock)
    last_ok_wall: float | None = None  # when the source last answered (wall clock, for /status)


@dataclass
class _Pending:
    """A published version the app has not yet been told of (or not by every notifier)."""

    snapshot: Snapshot
    verify: bool
    changed_at: float | None
    told: set[int] = field(default_factory=set)


class Watcher:
    """``watch``: follows every source and reconciles the destination with them until stopped.

    Not safe to run twice at once; it owns its sources, publisher, hooks and verifier, and closes them.
    """

    def __init__(
        self,
        settings: Settings,
        sources: Sequence[tuple[SourceSpec, Source]],
        publisher: Publisher,
        hooks: Sequence[Hook] = (),
        gate: Gate | None = None,
        verifier: Verifier | None = None,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
        backoff: Backoff | None = None,
        assembler: Assembler | None = None,
    ) -> None:
        self._settings = settings
        self._sources = list(sources)
        # The value sources come first, then the sources that read the templates' texts.
        self._assembler = assembler if assembler is not None else Assembler(settings)
        self._values = len(self._sources) - len(self._assembler.groups)
        self._assembled = False  # whether a set was ever assembled: a template that never compiled is fatal
        self._render_error: tuple[str, str] | None = None  # the template and kind of the last render error
        self._publisher = publisher
        self._hooks = list(hooks)
        self._gate = gate
        self._verifier = verifier
        self._verify_deadline = settings.verify_timeout + _DEADLINE_SLACK
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._backoff = backoff if backoff is not None else Backoff(0.5, min(30.0, max(1.0, settings.interval)))
        self._stale_after = settings.stale_seconds
        self._step_deadline = settings.publish_timeout + (settings.check_timeout if gate is not None else 0.0)
        started = clock()
        self._states = [_SourceState(source.name, started) for _, source in self._sources]
        self._parts: list[Snapshot | None] = [None] * len(self._sources)
        self._wake = asyncio.Event()
        self._changed_at: float | None = None
        self._out_since: float | None = started
        self._problem: str | None = "waiting for every source to answer"
        self._refused: str | None = None
        self._refusals: dict[str, str] = {}
        self._set_commits: dict[str, list[str]] = {}  # the git commits of each set assembled lately, by version
        self._in_sync = False
        self._generation = 0  # changes delivered by the sources so far
        self._step_generation = 0  # ... when the step under way began
        self._live: Snapshot | None = None
        self._published_at: float | None = None  # when the live set was published (wall clock)
        self._has_set = True  # the destination holds a live set (as of the last look): see /configured
        self._fallback = False  # the live set is the fallback install published
        self._live_bytes: tuple[str, int] = ("", 0)  # the live set's version and size, for /status
        self._occupied = False
        self._desired: Snapshot | None = None
        self._refreshed_at: int | None = None  # the generation at which the sources were last asked to read again
        self._pending: _Pending | None = None
        self._busy: asyncio.Future[Any] | None = None
        self._dead: str | None = None
        self._logged: str | None = None

    # -- running ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, server: HealthServer | None = None) -> None:
        """Follow and reconcile until ``stop`` is set; raise the first unexpected error of any task."""
        async with contextlib.AsyncExitStack() as stack:
            for _, source in self._sources:
                stack.push_async_callback(source.aclose)
            for hook in self._hooks:
                stack.push_async_callback(hook.notifier.aclose)
            if self._verifier is not None:
                stack.push_async_callback(self._verifier.aclose)
            await self._start()
            try:
                async with asyncio.TaskGroup() as group:
                    stoppable = [
                        group.create_task(self._supervised(f"follow {state.name}", self._follow(i)))
                        for i, state in enumerate(self._states)
                    ]
                    if server is not None:
                        stoppable.append(group.create_task(self._supervised("health server", server.serve())))
                    group.create_task(self._supervised("reconcile", self._reconcile(stop)))
                    group.create_task(self._stopper(stop, stoppable))
            except BaseExceptionGroup as failed:
                raise _first_leaf(failed) from None
            finally:
                if server is not None:
                    server.close()

    async def _supervised(self, name: str, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._dead = f"task {name!r} died: {type(exc).__name__}"
            raise

    @staticmethod
    async def _stopper(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
        await stop.wait()
        # A cancellation can be lost in a race inside a library; ask again until every task has ended.
        while pending := [task for task in tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)

    async def _start(self) -> None:
        try:
            await self._read_destination()
        except OSError as exc:
            raise PublishError(f"cannot read the destination {self._publisher.dest}: {exc.strerror or exc}") from exc

    async def _read_destination(self) -> None:
        # A publish killed half-way leaves temporary entries and unused snapshots; clear them first.
        await self._blocking("tidying the destination", self._publisher.tidy)
        current = await self._blocking("reading the destination", self._publisher.current)
        self._live = current
        self._occupied = await self._blocking("reading the destination", self._publisher.occupied)
        if current is not None:
            self._published_at = await self._blocking("reading the destination", live_since, self._publisher.dest)
            self.metrics.set_version(current.version, len(current.files))
            logger.info("destination holds %s (%d files)", current.short_version, len(current.files))
            dest = self._publisher.dest
            if await self._blocking("reading the destination", fallback_version, dest) == current.version:
                self.metrics.fallback.set(1)
                self._fallback = True
                logger.warning("FALLBACK: the live set is the fallback install published; waiting for the store")
            told = await self._blocking("reading the destination", told_version, dest)
            if told is not None and told != current.version:
                # An earlier watch published it and stopped before the app was told: tell it now.
                logger.warning("the app was not told of %s before infantry stopped; telling it now",
                               current.short_version)  # fmt: skip
                self._pending = _Pending(current, verify=False, changed_at=None)

    # -- following the sources -------------------------------------------------------------------

    async def _follow(self, index: int) -> None:
        """Consume one source forever; on failure keep the last good set and back off."""
        _, source = self._sources[index]
        state = self._states[index]
        while True:
            try:
                async for item in source.watch():
                    if item is None and state.refused is not None:
                        # Unchanged since a read whose content was refused: still refused. Ask for the
                        # whole set, so that the next answer says what the store holds.
                        source.refresh()
                        continue
                    self._answered(state)
                    if item is None:
                        logger.debug(
                            "%s: unchanged", source.name, extra=logs.fields(event="unchanged", source=source.name)
                        )
                        self.metrics.syncs.labels("unchanged").inc()
                        memory.give_back()  # a source may have read a whole set to find it unchanged
                        continue
                    if logger.isEnabledFor(logging.DEBUG):  # the hot path: no fields made for nothing
                        logger.debug(
                            "%s: %s (%d files)",
                            source.name,
                            item.short_version,
                            len(item.files),
                            extra=logs.fields(
                                event="changed", source=source.name, version=item.version, files=len(item.files)
                            ),
                        )
                    self.metrics.syncs.labels("changed").inc()
                    state.refused = None
                    self._parts[index] = item
                    self._desired = None  # merged again even if the versions are the same: the content is new
                    self._in_sync = False  # until a step has put it in place and told the app
                    self._generation += 1
                    self.metrics.in_sync.set(0)
                    if self._changed_at is None:
                        self._changed_at = self._clock()
                    if self._out_since is None:
                        self._out_since = self._changed_at
                    self._wake.set()
                raise SourceError(source.name, "the watch ended unexpectedly")
            except (SourceError, UnsafeDataError, SettingsError) as exc:
                self.metrics.syncs.labels("unsafe" if isinstance(exc, UnsafeDataError) else "error").inc()
                hint = exc.retry_after if isinstance(exc, SourceError) else None
                if isinstance(exc, UnsafeDataError):
                    state.refused = str(exc)
                    source.refresh()
                delay = self._backoff.delay(state.failures, hint)
                state.failures += 1
                state.retry_at = self._clock() + delay
                failed = logs.fields(
                    event="source_failed",
                    source=source.name,
                    error=str(exc),
                    attempt=state.failures,
                    next_retry_s=round(delay, 3),
                )
                if str(exc) != state.error:
                    logger.warning("%s; keeping the last good set, retrying (next in %.1fs)", exc, delay, extra=failed)
                else:
                    logger.debug("%s (attempt %d); next try in %.1fs", exc, state.failures, delay, extra=failed)
                state.error = str(exc)
                await asyncio.sleep(delay)

    def _answered(self, state: _SourceState) -> None:
        if state.error is not None:
            logger.info(
                "source %s answers again", state.name, extra=logs.fields(event="source_recovered", source=state.name)
            )
        state.last_ok, state.error, state.failures, state.retry_at = self._clock(), None, 0, None
        state.last_ok_wall = time.time()
        self.metrics.last_sync.set(time.time())

    # -- reconciling -----------------------------------------------------------------------------

    async def _reconcile(self, stop: asyncio.Event) -> None:
        """Publish whenever desired and actual differ: on a change, every interval, and on retries."""
        failures = 0
        retry_in: float | None = None
        first = True
        while True:
            woke = await self._sleep(stop, retry_in if retry_in is not None else self._settings.interval)
            if stop.is_set():
                return
            if woke and not first:
                await self._debounce(stop)
                if stop.is_set():
                    return
            self._wake.clear()
            if any(part is None for part in self._parts):
                retry_in = None
                continue  # every source must deliver before the first merge
            first = False
            problem = await self._step()
            if problem is None:
                failures, retry_in = 0, None
                continue
            retry_in = self._backoff.delay(failures)
            failures += 1

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> bool:
        """Wait for a change, ``stop``, or ``seconds``; True when a change woke us."""
        if self._wake.is_set() or stop.is_set():
            return self._wake.is_set()
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._wake.is_set()

    async def _debounce(self, stop: asyncio.Event) -> None:
        """Wait until changes have been quiet for ``wait.min``, but no longer than ``wait.max``."""
        wait = self._settings.wait
        if wait.max <= 0:
            return
        deadline = (self._changed_at or self._clock()) + wait.max
        logger.info(
            "a change is held back until it has been quiet for %gs (--wait), at most %.1fs more",
            wait.min,
            max(0.0, deadline - self._clock()),
            extra=logs.fields(event="debounce", deadline_s=round(max(0.0, deadline - self._clock()), 3)),
        )
        while not stop.is_set():
            self._wake.clear()
            quiet = min(wait.min, deadline - self._clock())
            if quiet <= 0 or not await self._sleep(stop, quiet):
                return

    async def _step(self) -> str | None:
        """One reconcile: None when the destination is settled (in sync, or deliberately kept), or why not."""
        changed_at, self._changed_at = self._changed_at, None
        self._step_generation = self._generation
        try:
            desired = await self._merged()
        except SettingsError as exc:
            if is_template_syntax(exc):
                if not self._assembled and self._live is None:
                    raise  # nothing good to keep, and a template that never compiled: watch cannot start
                # A set is live (a restart with a broken template in the store): keep it, as when running.
                return self._not_assembled(exc, render_error=True)
            # Not a refusal of one version: no source can be followed until the clash is resolved.
            self._desired = None
            self._unsettled(str(exc))
            return str(exc)
        except UnsafeDataError as exc:
            # A template failed, waits for a key, or left nothing to publish: the last good set stays.
            return self._not_assembled(exc, render_error=is_render_error(exc))
        target = desired
        refused = self._refusals.get(desired.version)
        if refused is not None:
            if self._live is None:
                self._settle(refused=refused)
                return None
            target = self._live  # keep the last good set whole
        problem = await self._converge(target, changed_at, gate=self._gate)
        if problem is None:
            self._settle(refused=self._refusals.get(desired.version))  # the check may just have refused it
            return None
        self._unsettled(problem)
        return problem

    async def _merged(self) -> Snapshot:
        """The set to publish from the sources' latest answers: assembled again only after one of them
        answered with a set (templates are rendered again only where their inputs changed).

        Assembling runs in a thread, since renders may take seconds and the loop must go on answering
        health probes; the sources' answers are taken first, and a result that a newer answer made out
        of date while it was made is used for this step but not kept.
        """
        if self._desired is not None:
            return self._desired
        values = [
            Part(spec.url, spec.dir, part)
            for (spec, _), part in zip(self._sources[: self._values], self._parts[: self._values], strict=True)
            if part is not None
        ]
        texts = [part for part in self._parts[self._values :] if part is not None]
        versions = [part.version if part is not None else None for part in self._parts]
        generation = self._generation
        if self._assembler.templates:
            desired = await threads.run(self._assembler.assemble, values, texts)
        else:  # a merge only: quick, and no thread to start
            desired = self._assembler.assemble(values, texts)
        # The commits this set was read at, asked now: a git source remembers only its last few answers.
        self._set_commits.pop(desired.version, None)
        self._set_commits[desired.version] = commits_of((source for _, source in self._sources), versions)
        while len(self._set_commits) > _REMEMBERED_REFUSALS:
            del self._set_commits[next(iter(self._set_commits))]
        if self._generation == generation:
            self._desired = desired
        self._assembled, self._render_error = True, None
        return desired

    def _not_assembled(self, exc: InfantryError, render_error: bool) -> str:
        """The set could not be assembled (a render failed, a key is awaited): keep the last good set,
        count and log the error once, and retry; /healthz follows --stale-after."""
        problem = str(exc)
        self._desired = None
        # Counted once per template and kind of error, however its message varies from try to try.
        kind = (getattr(exc, "template", "") or "", type(exc).__name__)
        if render_error and kind != self._render_error:
            self.metrics.render_errors.labels(kind[0]).inc()
        self._render_error = kind
        self._unsettled(problem)
        return problem

    async def _converge(self, target: Snapshot, changed_at: float | None, gate: Gate | None) -> str | None:
        """Make the destination hold ``target`` and the app know of it; None once done, else why not."""
        try:
            drift = await self._blocking("checking the destination", self._publisher.verify, target)
            if drift is not None:
                # Whether a set is live at all (/configured), or the destination was emptied meanwhile.
                self._has_set = await self._blocking("reading the destination", self._publisher.occupied)
                problem = await self._publish(target, drift, changed_at, gate)
                if problem is not None:
                    return problem
            # The destination holds the target now, whether or not this step wrote it (a set install
            # already published is not written again), unless the check refused it: the last good set
            # stays live, and so do its commits.
            if self._live is not None and self._live.version == target.version:
                self._report_commits(target)
            if self._pending is not None:
                told = await self._tell(self._pending)
                # What staging and telling took is not kept counted against the pod; after the app was
                # told, since giving memory back takes a few milliseconds with a large set.
                memory.give_back()
                return told
        except ContentLost as exc:
            # The spool was emptied or changed behind infantry's back (with the destination, say): what
            # the sources gave is gone, so they read it all again, and the next step publishes that.
            self.metrics.publishes.labels("error").inc()
            if self._refreshed_at != self._generation:  # once, until the sources have answered again
                self._refreshed_at = self._generation
                for _, source in self._sources:
                    source.refresh()
            return f"{exc}; reading every source again"
        except PublishError as exc:  # including a call to the destination past its deadline
            self.metrics.publishes.labels("timeout" if isinstance(exc, _StepTimeout) else "error").inc()
            return str(exc)
        except OSError as exc:  # reading the destination back failed (an I/O error, a lost mount)
            self.metrics.publishes.labels("error").inc()
            return f"cannot read {self._publisher.dest}: {exc.strerror or exc}"
        return None

    async def _publish(self, target: Snapshot, drift: str, changed_at: float | None, gate: Gate | None) -> str | None:
        previous = self._live
        if previous is not None and previous.version == target.version:
            logger.warning("the destination was changed behind infantry's back (%s); publishing it again", drift)
            self.metrics.repairs.inc()
        started = self._clock()
        try:
            published = await self._blocking("publishing", self._publisher.publish, target, gate)
        except CheckFailed as exc:
            self._refuse(target, f"the check command refused {target.short_version}: {exc}")
            self.metrics.publishes.labels("rejected").inc()
            kept = previous.short_version if previous else "nothing"
            logger.error("%s; version %s not published, keeping %s", exc, target.short_version, kept)
            return None
        if not published:
            return None
        self._live, self._has_set = target, True
        self.metrics.publishes.labels("published").inc()
        self.metrics.set_version(target.version, len(target.files))
        self.metrics.fallback.set(0)
        self._fallback = False
        with contextlib.suppress(OSError, PublishError):
            await self._blocking("clearing the fallback mark", clear_fallback, self._publisher.dest)
        shas = self._set_commits.get(target.version, [])
        self._published_at = time.time()
        logger.info(
            "published %s (%d files)%s",
            target.short_version,
            len(target.files),
            commit_note(shas),
            extra=logs.fields(
                event="published",
                version=target.version,
                files=len(target.files),
                duration_ms=round(1000 * (self._clock() - started), 1),
                commit=",".join(shas) or None,
            ),
        )
        if previous is None and not self._occupied:
            logger.info("first set in an empty destination; nobody to notify")
            self._occupied, self._pending = True, None
            await self._record_told(target)
            await self._blocking("tidying the destination", self._publisher.tidy)
        else:
            # A repair restores a version the app was already told of and that already passed
            # verification; it is announced again, but not judged again.
            repair = previous is not None and previous.version == target.version
            self._occupied = True
            self._pending = _Pending(target, verify=self._verifier is not None and not repair, changed_at=changed_at)
        return None

    async def _tell(self, pending: _Pending) -> str | None:
        """Tell the app of ``pending`` (each notifier once), verify it, roll back if it fails."""
        failed: list[str] = []
        for index, hook in enumerate(self._hooks):
            if index in pending.told:
                continue
            try:
                async with asyncio.timeout(hook.deadline):
                    await hook.notifier.notify(pending.snapshot)
            except (NotifyError, TimeoutError) as exc:
                reason = str(exc) if isinstance(exc, NotifyError) else f"no answer within {hook.deadline:g}s"
                self.metrics.reloads.labels(hook.notifier.method, "error").inc()
                failed.append(f"{hook.notifier.method} reload of {pending.snapshot.short_version} failed: {reason}")
            else:
                pending.told.add(index)
                self.metrics.reloads.labels(hook.notifier.method, "ok").inc()
        if failed:
            return "; ".join(failed)
        if pending.changed_at is not None:
            self.metrics.propagation.observe(self._clock() - pending.changed_at)
            pending.changed_at = None
        self._pending = None
        await self._record_told(pending.snapshot)
        if pending.verify and self._verifier is not None:
            return await self._verify(pending.snapshot)
        # Old snapshot directories go only now, so removing a large one never delays the reload.
        await self._blocking("tidying the destination", self._publisher.tidy)
        return None

    async def _record_told(self, snapshot: Snapshot) -> None:
        try:
            await self._blocking("recording the reload", mark_told, self._publisher.dest, snapshot.version)
        except (OSError, PublishError) as exc:
            # Only a restart would miss it, and then the app would be told once more than needed.
            logger.warning("could not record that the app was told of %s: %s", snapshot.short_version, exc)

    async def _verify(self, snapshot: Snapshot) -> str | None:
        assert self._verifier is not None
        try:
            async with asyncio.timeout(self._verify_deadline):
                problem = await self._verifier.verify()
        except TimeoutError:
            problem = f"no verdict within {self._verify_deadline:g}s"
        if problem is None:
            await self._blocking("tidying the destination", self._publisher.tidy)
            return None
        self._refuse(snapshot, f"version {snapshot.short_version} failed verification ({problem}); rolled back")
        self.metrics.bad_version.clear()
        self.metrics.bad_version.labels(snapshot.version).set(1)
        try:
            restored = await self._blocking("rolling back", self._publisher.rollback)
        except PublishError as exc:
            logger.error("version %s failed verification (%s) and rolling back failed: %s",
                         snapshot.short_version, problem, exc)  # fmt: skip
            return None
        if restored is None:
            logger.error(
                "version %s failed verification (%s); no previous set to roll back to", snapshot.short_version, problem
            )
            return None
        self._live, self._published_at = restored, time.time()  # live again from now
        self.metrics.rollbacks.inc()
        self.metrics.set_version(restored.version, len(restored.files))
        self._report_commits(restored)
        logger.error(
            "version %s failed verification (%s); rolled back to %s, and it will not be published again "
            "until the store changes",
            snapshot.short_version, problem, restored.short_version,
        )  # fmt: skip
        self._pending = _Pending(restored, verify=False, changed_at=None)
        return await self._tell(self._pending)

    def _report_commits(self, live: Snapshot) -> None:
        """Report the git commits of ``live``, the set now live; none when they are not known (a set
        published before infantry started, and not read from the sources since)."""
        self.metrics.set_commits(self._set_commits.get(live.version, []))

    def _refuse(self, snapshot: Snapshot, reason: str) -> None:
        self._refusals[snapshot.version] = reason
        while len(self._refusals) > _REMEMBERED_REFUSALS:
            del self._refusals[next(iter(self._refusals))]

    def _settle(self, refused: str | None) -> None:
        """The step is done: in sync with the store, or deliberately kept on the last good set."""
        newer = self._generation != self._step_generation  # a change arrived while the step ran
        in_sync = refused is None and self._pending is None and not newer
        if self._logged is not None:
            logger.info("the destination matches the store again")
        if refused is not None and refused != self._refused:
            logger.warning("keeping the last good set: %s", refused)
        out_since = (self._changed_at or self._clock()) if newer else None
        self._refused, self._problem, self._out_since, self._in_sync = refused, None, out_since, in_sync
        self._logged = None
        self.metrics.in_sync.set(1 if in_sync else 0)

    def _unsettled(self, problem: str) -> None:
        if self._out_since is None:
            self._out_since = self._clock()
        self._problem, self._in_sync = problem, False
        self.metrics.in_sync.set(0)
        if problem != self._logged:
            logger.error("%s; retrying with backoff%s", problem, _hint(problem))
            self._logged = problem

    async def _blocking(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run a publisher call in a worker thread, one at a time, within the step deadline.

        A thread cannot be cancelled, so a call past its deadline is left to finish on its own, and
        no other call starts until it has: two publishes never run at once.
        """
        deadline = self._step_deadline
        if self._busy is not None and not self._busy.done():
            done, _ = await asyncio.wait({self._busy}, timeout=deadline)
            if not done:
                raise _StepTimeout(f"{what}: an earlier call to the destination has not returned")
        self._busy = threads.start(func, *args, name="infantry-destination")
        self._busy.add_done_callback(_consume)
        done, _ = await asyncio.wait({self._busy}, timeout=deadline)
        if not done:
            raise _StepTimeout(f"{what} did not finish within {deadline:g}s")
        result: T = self._busy.result()
        return result

    # -- health ----------------------------------------------------------------------------------

    def _live_status(self, live: Snapshot) -> dict[str, Any]:
        """The live set for /status: as `infantry status` shows it (its size counted once per version)."""
        if self._live_bytes[0] != live.version:
            self._live_bytes = (live.version, sum(live.files[path].size for path in live.files))
        published = self._published_at
        return {
            "version": live.version,
            "files": len(live.files),
            "bytes": self._live_bytes[1],
            "published_at": iso_time(published) if published is not None else None,
            "age_seconds": round(max(0.0, time.time() - published), 3) if published is not None else None,
        }

    def report(self) -> Report:
        """What /healthz, /readyz and /status answer now."""
        now = self._clock()
        problems: list[str] = []
        if self._dead is not None:
            problems.append(self._dead)
        sources = []
        for state in self._states:
            silent = now - state.last_ok
            if silent > self._stale_after:
                detail = f": {state.error}" if state.error else ""
                problems.append(f"source {state.name}: no good answer for {silent:.0f}s{detail}")
            sources.append(
                {
                    "name": state.name,
                    "seconds_since_ok": round(silent, 3),
                    "last_ok_at": iso_time(state.last_ok_wall) if state.last_ok_wall else None,
                    "error": state.error,
                    "failures": state.failures,
                    "next_retry_in_s": round(max(0.0, state.retry_at - now), 3) if state.retry_at is not None else None,
                }
            )
        behind = now - self._out_since if self._out_since is not None else None
        if behind is not None and behind > self._stale_after:
            detail = f": {self._problem}" if self._problem else ""
            problems.append(f"the destination has not matched the store for {behind:.0f}s{detail}")
        live = self._live
        refused = self._refused or "; ".join(f"source {s.name}: {s.refused}" for s in self._states if s.refused)
        in_sync = self._in_sync and not refused
        reason = refused or self._problem or ("a change is being published" if not in_sync else None)
        status = {
            "healthy": not problems,
            "in_sync": in_sync,
            "live": self._live_status(live) if live is not None else None,
            "configured": live is not None and self._has_set,
            "fallback": self._fallback,
            "app_told": live is not None and self._pending is None,
            "previous": self._publisher.previous_version,
            "desired": self._desired.version if self._desired is not None else None,
            "pending_reload": self._pending.snapshot.version if self._pending is not None else None,
            "refused": refused or None,
            "problem": self._problem,
            "seconds_out_of_sync": round(behind, 3) if behind is not None else None,
            "stale_after": self._stale_after,
            "sources": sources,
            "problems": problems,
        }
        return Report(not problems, in_sync, problems, status, None if in_sync else reason)


_HINTS = (
    ("No space left", "free space on the volume that holds the destination"),
    ("Read-only file system", "mount the destination read-write"),
    ("Permission denied", "give infantry's user write access to the destination"),
    ("reload", "check that the app is running and answers its reload hook"),
    ("did not finish within", "the destination's filesystem is slow or hung"),
)


def _hint(problem: str) -> str:
    """What an operator can do about ``problem``, when it is a familiar one."""
    for needle, advice in _HINTS:
        if needle in problem:
            return f" ({advice})"
    return ""


class _StepTimeout(PublishError):
    """A call to the destination ran past the step deadline (it may still be running)."""


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a worker's outcome, so a call abandoned at its deadline never logs 'never retrieved'."""
    if not future.cancelled():
        future.exception()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_leaf(error)
        return error
    return group


def build_watcher(settings: Settings, environ: Mapping[str, str]) -> Watcher:
    """Wire a Watcher from settings: sources by scheme, the publisher, the gate, notifiers and verifier."""
    spool.use(settings.dest / SPOOL)
    sources = open_sources(settings)
    publisher = make_publisher(settings.dest, settings.layout, settings.file_mode)
    gate = make_gate(settings.check, settings.check_timeout, environ) if settings.check else None
    hooks: list[Hook] = []
    if settings.process or settings.pid_file:
        notifier = SignalNotifier(settings.signal_number, process=settings.process, pid_file=settings.pid_file)
        hooks.append(Hook(notifier, 10.0))
    if settings.reload_url:
        client = httpx.AsyncClient(timeout=settings.reload_timeout, trust_env=False)
        hooks.append(
            Hook(
                HttpNotifier(client, settings.reload_url, settings.reload_method, settings.reload_timeout),
                settings.reload_timeout + _DEADLINE_SLACK,
            )
        )
    if settings.exec:
        hooks.append(
            Hook(ExecNotifier(settings.exec, settings.exec_timeout, environ), settings.exec_timeout + _DEADLINE_SLACK)
        )
    verifier: Verifier | None = None
    if settings.verify_url:
        verifier = HttpVerifier(httpx.AsyncClient(trust_env=False), settings.verify_url, settings.verify_timeout)
    elif settings.verify_cmd:
        verifier = CommandVerifier(settings.verify_cmd, settings.verify_timeout, environ)
    metrics = Metrics() if settings.listen else NullMetrics()  # nobody can read them without --listen
    assembler = Assembler(settings, environ)
    return Watcher(settings, sources, publisher, hooks, gate, verifier, metrics, assembler=assembler)
