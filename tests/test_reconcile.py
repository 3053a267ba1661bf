"""The reconcile loop in-process, with a fake clock, source, publisher and notifier: fast and exact.

The real-process tests (test_stale.py, test_watch.py) show the same behaviour end to end; these pin
down the loop's rules: retry until in step, tell each notifier once per version, debounce, roll back,
report health by the clock, and die loudly on a bug.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from infantry.errors import CheckFailed, NotifyError, PublishError, SourceError
from infantry.publish import Gate
from infantry.retry import Backoff
from infantry.settings import Settings, SourceSpec
from infantry.snapshot import FileEntry, Snapshot
from infantry.sources import Source
from infantry.watch import Hook, Watcher

DEADLINE = 10.0


def snap(text: str) -> Snapshot:
    return Snapshot.of({"app.yaml": FileEntry(text.encode())})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """A store whose watch() yields whatever the test puts in its queue (an exception is raised)."""

    def __init__(self) -> None:
        self.name = "fake://store"
        self.refreshes = 0
        self.queue: asyncio.Queue[Snapshot | BaseException | None] = asyncio.Queue()

    async def fetch(self) -> Snapshot:
        raise AssertionError("watch does not fetch")

    async def watch(self) -> AsyncIterator[Snapshot | None]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def refresh(self) -> None:
        self.refreshes += 1

    async def aclose(self) -> None:
        pass


class FakePublisher:
    """An in-memory destination that can be made to fail, or to drift."""

    def __init__(self, dest: Path, live: Snapshot | None = None) -> None:
        self.dest = dest
        self.live = live
        self.previous: Snapshot | None = None
        self.failures: list[BaseException] = []
        self.drift: str | None = None
        self.published: list[str] = []
        self.rollbacks = 0

    @property
    def previous_version(self) -> str | None:
        return self.previous.version if self.previous else None

    def current(self) -> Snapshot | None:
        return self.live

    def occupied(self) -> bool:
        return self.live is not None

    def verify(self, snapshot: Snapshot) -> str | None:
        if self.live is None or self.live.version != snapshot.version:
            return "another version"
        return self.drift

    def publish(self, snapshot: Snapshot, gate: Gate | None = None) -> bool:
        if self.verify(snapshot) is None:
            return False
        if self.failures:
            raise self.failures.pop(0)
        if gate is not None:
            gate(self.dest)
        self.previous, self.live, self.drift = self.live, snapshot, None
        self.published.append(snapshot.version)
        return True

    def tidy(self) -> None:
        pass

    def rollback(self) -> Snapshot | None:
        if self.previous is None:
            return None
        self.live, self.previous = self.previous, None
        self.rollbacks += 1
        return self.live


class FakeNotifier:
    method = "fake"

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[str] = []

    async def notify(self, snapshot: Snapshot) -> None:
        self.calls.append(snapshot.version)
        if self.failures:
            self.failures -= 1
            raise NotifyError("the app did not answer")

    async def aclose(self) -> None:
        pass


class FakeVerifier:
    def __init__(self, problem: str | None) -> None:
        self.problem = problem
        self.calls = 0

    async def verify(self) -> str | None:
        self.calls += 1
        return self.problem

    async def aclose(self) -> None:
        pass


def settings(tmp_path: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {"source": ["file:///fake"], "dest": tmp_path, "interval": 0.05, "stale_after": 30}
    values.update(extra)
    return Settings(**values)


async def until(what: str, condition: Callable[[], bool]) -> None:
    """Wait in the event loop until ``condition`` holds, failing after DEADLINE seconds."""
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


class Harness:
    """A Watcher over fakes, running in the background of one test's event loop."""

    def __init__(
        self,
        tmp_path: Path,
        publisher: FakePublisher,
        hooks: list[FakeNotifier] = [],  # noqa: B006 (never mutated)
        verifier: FakeVerifier | None = None,
        gate: Gate | None = None,
        **extra: Any,
    ) -> None:
        self.clock = FakeClock()
        self.source = FakeSource()
        self.publisher = publisher
        spec = SourceSpec.model_validate({"url": "file:///fake"})
        sources: list[tuple[SourceSpec, Source]] = [(spec, self.source)]
        self.watcher = Watcher(
            settings(tmp_path, **extra),
            sources,
            publisher,
            [Hook(n, 5.0) for n in hooks],
            gate,
            verifier,
            clock=self.clock,
            backoff=Backoff(0.001, 0.01),
        )
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(self.watcher.run(self.stop))

    async def finish(self) -> None:
        self.stop.set()
        async with asyncio.timeout(DEADLINE):
            await self.task


def test_a_failing_publish_is_retried_until_the_destination_matches(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        publisher.failures = [PublishError("No space left on device")] * 3
        app = FakeNotifier()
        h = Harness(tmp_path, publisher, [app])
        h.source.queue.put_nowait(snap("v2"))
        await until("v2 live", lambda: publisher.live == snap("v2"))
        await until("the app told", lambda: h.watcher.report().ready)
        assert publisher.published == [snap("v2").version]
        assert app.calls == [snap("v2").version]  # told once, after the publish that worked
        assert h.watcher.metrics.publishes.labels("error")._value.get() == 3
        await h.finish()

    run(body)


def test_health_fails_after_stale_after_of_failing_publishes_and_recovers(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        publisher.failures = [PublishError("read-only file system")] * 1_000_000
        h = Harness(tmp_path, publisher, stale_after=30)
        h.source.queue.put_nowait(snap("v2"))
        await until("a failed publish", lambda: "read-only" in (h.watcher.report().status["problem"] or ""))
        report = h.watcher.report()
        assert report.healthy and not report.ready  # not yet stale: 30 s have not passed
        h.clock.now += 31
        h.source.queue.put_nowait(None)  # the source still answers: only the destination is behind
        await until("the source's answer", lambda: h.watcher.report().status["sources"][0]["seconds_since_ok"] == 0)
        report = h.watcher.report()
        assert not report.healthy
        assert any("has not matched the store" in p and "read-only file system" in p for p in report.problems), (
            report.problems
        )
        publisher.failures.clear()
        await until("v2 live", lambda: publisher.live == snap("v2"))
        await until("healthy again", lambda: h.watcher.report().healthy and h.watcher.report().ready)
        await h.finish()

    run(body)


def test_each_notifier_is_told_once_per_version_and_failures_are_retried(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        steady, flaky = FakeNotifier(), FakeNotifier(failures=3)
        h = Harness(tmp_path, publisher, [steady, flaky])
        h.source.queue.put_nowait(snap("v2"))
        await until("the flaky app to be told", lambda: len(flaky.calls) == 4)
        await until("in sync", lambda: h.watcher.report().ready)
        assert steady.calls == [snap("v2").version]
        assert publisher.published == [snap("v2").version]  # retried the reload, not the publish
        assert h.watcher.metrics.reloads.labels("fake", "error")._value.get() == 3
        await h.finish()

    run(body)


def test_a_reload_that_keeps_failing_shows_on_healthz_after_stale_after(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        app = FakeNotifier(failures=1_000_000)
        h = Harness(tmp_path, publisher, [app], stale_after=10)
        h.source.queue.put_nowait(snap("v2"))
        await until("a failed reload", lambda: len(app.calls) >= 3)
        h.clock.now += 11
        h.source.queue.put_nowait(None)
        await until("the source's answer", lambda: h.watcher.report().status["sources"][0]["seconds_since_ok"] == 0)
        report = h.watcher.report()
        assert not report.healthy and any("reload" in p for p in report.problems), report.problems
        app.failures = 0
        await until("healthy again", lambda: h.watcher.report().healthy and h.watcher.report().ready)
        await h.finish()

    run(body)


def test_a_burst_of_changes_is_published_once_after_the_debounce(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v0"))
        app = FakeNotifier()
        h = Harness(tmp_path, publisher, [app], wait="0.2:2")
        h.source.queue.put_nowait(snap("v1"))
        await until("the first sync, not delayed", lambda: publisher.live == snap("v1"))
        for i in range(2, 12):
            h.source.queue.put_nowait(snap(f"v{i}"))
        await until("the burst", lambda: publisher.live == snap("v11"))
        await until("in sync", lambda: h.watcher.report().ready)
        assert publisher.published == [snap("v1").version, snap("v11").version]
        assert app.calls == publisher.published
        await h.finish()

    run(body)


def test_drift_is_repaired_and_counted(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        app = FakeNotifier()
        h = Harness(tmp_path, publisher, [app])
        h.source.queue.put_nowait(snap("v1"))
        await until("in sync", lambda: h.watcher.report().ready)
        assert publisher.published == []  # it already held v1: nothing written, nobody told
        publisher.drift = "app.yaml was changed"
        await until("the repair", lambda: publisher.published == [snap("v1").version])
        await until("the app told of the repair", lambda: app.calls == [snap("v1").version])
        assert h.watcher.metrics.repairs._value.get() == 1
        await h.finish()

    run(body)


def test_a_version_failing_verification_is_rolled_back_and_not_retried(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("good"))
        app = FakeNotifier()
        verifier = FakeVerifier("HTTP 500")
        h = Harness(tmp_path, publisher, [app], verifier=verifier)
        h.source.queue.put_nowait(snap("bad"))
        await until("the rollback", lambda: publisher.rollbacks == 1)
        await until(
            "the app told of the restored set", lambda: app.calls == [snap("bad").version, snap("good").version]
        )
        assert publisher.live == snap("good")
        # Resyncs run every 0.05 s: the bad version stays out, health stays true, readiness says why.
        for _ in range(5):
            h.source.queue.put_nowait(None)
        await asyncio.sleep(0.3)
        assert publisher.published == [snap("bad").version]
        report = h.watcher.report()
        assert report.healthy and not report.ready
        assert "failed verification" in (report.not_ready or "")
        verifier.problem = None
        h.source.queue.put_nowait(snap("fixed"))
        await until("the fixed version", lambda: publisher.live == snap("fixed") and h.watcher.report().ready)
        await h.finish()

    run(body)


def test_a_rejected_version_is_kept_out_without_failing_health(tmp_path: Path) -> None:
    def gate(staged: Path) -> None:
        raise CheckFailed("check command 'lint' exited 1")

    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("good"))
        h = Harness(tmp_path, publisher, gate=gate)
        h.source.queue.put_nowait(snap("bad"))
        await until("the refusal", lambda: h.watcher.report().status["refused"] is not None)
        h.clock.now += 100
        h.source.queue.put_nowait(None)
        await until("the source's answer", lambda: h.watcher.report().status["sources"][0]["seconds_since_ok"] == 0)
        report = h.watcher.report()
        assert report.healthy and not report.ready
        assert publisher.live == snap("good") and publisher.published == []
        await h.finish()

    run(body)


def test_an_unexpected_error_in_a_source_ends_watch_with_that_error(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        h = Harness(tmp_path, publisher)
        h.source.queue.put_nowait(snap("v1"))
        await until("in sync", lambda: h.watcher.report().ready)
        h.source.queue.put_nowait(RecursionError("maximum recursion depth exceeded"))
        with pytest.raises(RecursionError):
            async with asyncio.timeout(DEADLINE):
                await h.task
        report = h.watcher.report()
        assert not report.healthy and any("died" in p for p in report.problems)

    run(body)


def test_a_source_error_is_retried_and_the_source_reported_stale(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        h = Harness(tmp_path, publisher, stale_after=5)
        h.source.queue.put_nowait(snap("v1"))
        await until("in sync", lambda: h.watcher.report().ready)
        h.source.queue.put_nowait(SourceError(h.source.name, "connection refused"))
        await until("the error", lambda: h.watcher.report().status["sources"][0]["error"] is not None)
        h.clock.now += 6
        report = h.watcher.report()
        assert not report.healthy and any("connection refused" in p for p in report.problems)
        h.source.queue.put_nowait(snap("v2"))  # the follower came back and reads again
        await until("v2", lambda: publisher.live == snap("v2"))
        await until("healthy", lambda: h.watcher.report().healthy)
        await h.finish()

    run(body)


def test_readiness_is_false_as_soon_as_a_version_is_refused(tmp_path: Path) -> None:
    def gate(staged: Path) -> None:
        raise CheckFailed("check command 'lint' exited 1")

    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("good"))
        h = Harness(tmp_path, publisher, gate=gate, interval=60)  # no resync to correct it later
        h.source.queue.put_nowait(snap("good"))
        await until("in sync", lambda: h.watcher.report().ready)
        h.source.queue.put_nowait(snap("bad"))
        await until("the refusal", lambda: h.watcher.report().status["refused"] is not None)
        assert not h.watcher.report().ready
        assert h.watcher.metrics.in_sync._value.get() == 0
        await h.finish()

    run(body)


def test_a_repair_is_announced_but_not_verified_or_rolled_back(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v2"))
        publisher.previous = snap("v1")
        app = FakeNotifier()
        verifier = FakeVerifier("HTTP 500")  # the app's health check happens to fail now
        h = Harness(tmp_path, publisher, [app], verifier=verifier)
        h.source.queue.put_nowait(snap("v2"))
        await until("in sync", lambda: h.watcher.report().ready)
        publisher.drift = "the mode of 'app.yaml' was changed"
        await until("the repair, announced", lambda: app.calls == [snap("v2").version])
        await until("in sync again", lambda: h.watcher.report().ready)
        assert verifier.calls == 0 and publisher.rollbacks == 0
        assert publisher.live == snap("v2") and h.watcher.report().status["refused"] is None
        await h.finish()

    run(body)


def test_a_call_to_the_destination_past_its_deadline_is_a_failed_step_not_a_crash(tmp_path: Path) -> None:
    async def body() -> None:
        publisher = FakePublisher(tmp_path, live=snap("v1"))
        release = threading.Event()
        hung = {"tidy": False}

        def tidy() -> None:
            if hung["tidy"]:
                release.wait(DEADLINE)  # a filesystem that hangs, until the test lets it go

        publisher.tidy = tidy  # type: ignore[method-assign]
        app = FakeNotifier()
        h = Harness(tmp_path, publisher, [app], publish_timeout=0.2)
        h.source.queue.put_nowait(snap("v1"))
        await until("in sync", lambda: h.watcher.report().ready)
        hung["tidy"] = True
        h.source.queue.put_nowait(snap("v2"))
        await until(
            "the hung call to be reported", lambda: "did not finish" in (h.watcher.report().status["problem"] or "")
        )
        assert not h.task.done()  # still running
        hung["tidy"] = False
        release.set()
        await until("in sync once the filesystem answers", lambda: h.watcher.report().ready)
        assert app.calls == [snap("v2").version]  # told once, although the step after it failed
        await h.finish()

    run(body)
