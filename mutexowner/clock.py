"""Injected time: a clock callable (monotonic seconds) and the wait that goes with it.

Every component takes a ``clock``. A plain callable such as ``time.monotonic`` waits in
real time; a clock object that also has a ``wait(cond, timeout)`` method (for example
``mutexowner.testing.FakeClock``) decides itself how long waiting takes, so tests can
step the machine without sleeping.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Protocol, runtime_checkable

__all__ = ["Clock", "WaitableClock", "default_clock", "wait_on"]

#: A callable returning monotonic seconds.
Clock = Callable[[], float]


@runtime_checkable
class WaitableClock(Protocol):
    """A clock that also controls how waiting on a condition passes its time."""

    def __call__(self) -> float: ...

    def wait(self, cond: threading.Condition, timeout: Optional[float]) -> None:
        """Wait on ``cond`` (whose lock the caller holds) for at most ``timeout`` clock seconds.

        May return early; callers re-check their predicate and the clock.
        """


def default_clock() -> float:
    """Monotonic seconds: the default clock (immune to wall-clock jumps)."""
    return time.monotonic()


def wait_on(clock: Clock, cond: threading.Condition, timeout: Optional[float]) -> None:
    """Wait on ``cond`` for at most ``timeout`` seconds of ``clock`` time (None: until notified).

    The caller holds ``cond``'s lock, loops, and re-checks what it waits for.
    """
    if isinstance(clock, WaitableClock):
        clock.wait(cond, timeout)
        return
    if timeout is not None and timeout <= 0:
        return
    # threading rejects timeouts above TIMEOUT_MAX (OverflowError): wait for a notify then.
    cond.wait(None if timeout is not None and timeout >= threading.TIMEOUT_MAX else timeout)
