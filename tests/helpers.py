"""Helpers shared by the tests: polling with a deadline, process liveness, event recording."""

from __future__ import annotations

from typing import Callable, Optional

from mutexowner import Event, MutexOwner
from mutexowner.clock import default_clock
from tests.redis_server import poll, proc_state

#: How long a test waits for a real thread to reach an observable condition.
REAL_TIMEOUT = 5.0


def wait_for(predicate: Callable[[], bool], timeout: float = REAL_TIMEOUT) -> bool:
    """Poll an observable condition (real time) until it holds or ``timeout`` passes.

    For conditions other threads or processes make true (a worker started, a process
    ended) where no event exists to wait on; callers assert the result.
    """
    return poll(predicate, timeout, interval=0.002)


class Recorder:
    """Events of one owner, plus its on_acquired/on_lost and stuck_worker_policy calls."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.acquired: list[int] = []
        self.lost: list[str] = []
        self.stuck: list[tuple[str, ...]] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def edges(self) -> list[tuple[Optional[str], str]]:
        return [(e.previous_state, e.state) for e in self.events if e.kind == "state"]


def alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    return proc_state(pid) not in (None, "Z", "X")


def errors_of(owner: MutexOwner) -> list[Event]:
    """The owner's "error" events, as they are delivered (a list that grows)."""
    events: list[Event] = []
    owner.add_listener(lambda e: events.append(e) if e.kind == "error" else None)
    return events


def stop_to_acquired(a: MutexOwner, b: MutexOwner, ttl: float) -> float:
    """A holds and B waits: stop A, wait for B to hold; seconds from A's ``stop()`` call to
    B's ``acquired`` event (the owners' clock, which stamps their events). Stops B too."""
    acquired: list[float] = []
    b.add_listener(lambda e: acquired.append(e.time) if e.kind == "acquired" else None)
    stop_called = default_clock()
    assert a.stop(timeout=5)
    assert b.wait_until_holding(ttl + 5), b.status()
    # Listeners are called from the events thread, maybe after wait_until_holding returns.
    assert poll(lambda: bool(acquired), 5), b.status()
    assert b.stop(timeout=5)
    return acquired[0] - stop_called
