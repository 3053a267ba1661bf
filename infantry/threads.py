"""Blocking calls in daemon threads, for calls that may hang (a frozen filesystem, a stuck mount).

``asyncio.to_thread`` uses the loop's executor, whose threads ``asyncio.run`` joins at exit without a
deadline, so one call stuck in the kernel would keep ``watch`` from exiting after SIGTERM. A daemon
thread is abandoned at exit instead; what it was doing is left for the next start to tidy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def start(func: Callable[..., T], *args: Any, name: str = "infantry-worker") -> asyncio.Future[T]:
    """Run ``func(*args)`` in a new daemon thread; its outcome arrives in the returned future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # the waiter gave up at its deadline
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = func(*args)
        except BaseException as exc:  # handed to the waiting task, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed while we ran
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future


async def run(func: Callable[..., T], *args: Any) -> T:
    """Await ``func(*args)`` run in a daemon thread."""
    return await start(func, *args)
