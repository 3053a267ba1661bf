"""The one retry policy: capped exponential backoff with jitter, stretched to a server's hint.

Every retry in infantry (a source that is down, a publish that failed, a reload that was refused)
waits by :class:`Backoff`. Tests pass ``Backoff(base=0, cap=0)`` to switch the waits off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tenacity import RetryCallState
from tenacity.wait import wait_base


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int, hint: float | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row; never less than the server's hint.

        The delay is drawn from the upper half of the exponential step, so many pods that failed
        together do not retry together, and a retry never comes much sooner than planned.
        """
        ceiling = min(self.cap, self.base * 2 ** min(failures, 32))
        return max(random.uniform(ceiling / 2, ceiling), hint or 0.0)

    def wait(self) -> wait_base:
        """The same policy as a tenacity ``wait``, honouring ``retry_after`` on the error raised."""
        return _TenacityWait(self)


class _TenacityWait(wait_base):
    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        return self._backoff.delay(retry_state.attempt_number - 1, hint if isinstance(hint, int | float) else None)
