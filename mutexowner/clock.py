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

__all__ = ["SAFETY_WAIT_CAP", "Clock", "WaitableClock", "default_clock", "wait_on"]

#: Longest real wait (seconds) of a thread that guards a lease deadline before it re-reads
#: the clock. A thread wait is timed by CLOCK_MONOTONIC (by the wall clock in some Python
#: 3.9/3.10 builds), which does not count a host suspend: without a cap, a step-down due
#: during a suspend would wait out the whole remaining timeout after resume.
SAFETY_WAIT_CAP = 0.25

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


_BOOTTIME: Optional[int] = getattr(time, "CLOCK_BOOTTIME", None)


def _boottime_works() -> bool:
    if _BOOTTIME is None:
        return False
    try:
        time.clock_gettime(_BOOTTIME)
    except OSError:
        return False
    return True


if _boottime_works():

    def default_clock() -> float:
        """Monotonic seconds that keep counting while the host is suspended (Linux
        CLOCK_BOOTTIME): Redis expires keys during a laptop sleep or VM pause, so our lease
        deadline must pass then too. Immune to wall-clock steps."""
        return time.clock_gettime(_BOOTTIME)  # type: ignore[arg-type]

else:

    def default_clock() -> float:
        """Monotonic seconds: the default clock (immune to wall-clock jumps). On this
        platform it may stop during a host suspend (see docs: ``ensure_held`` and fencing)."""
        return time.monotonic()


def wait_on(
    clock: Clock,
    cond: threading.Condition,
    timeout: Optional[float],
    *,
    cap: Optional[float] = None,
) -> None:
    """Wait on ``cond`` for at most ``timeout`` seconds of ``clock`` time (None: until notified).

    The caller holds ``cond``'s lock, loops, and re-checks what it waits for. ``cap`` bounds
    one real wait (the caller re-reads its clock after it): pass ``SAFETY_WAIT_CAP`` when a
    lease deadline depends on the wait. Fake clocks decide their own waiting.
    """
    if isinstance(clock, WaitableClock):
        clock.wait(cond, timeout)
        return
    if timeout is not None and timeout <= 0:
        return
    if cap is not None and (timeout is None or timeout > cap):
        timeout = cap
    # threading rejects timeouts above TIMEOUT_MAX (OverflowError): wait for a notify then.
    cond.wait(None if timeout is not None and timeout >= threading.TIMEOUT_MAX else timeout)
