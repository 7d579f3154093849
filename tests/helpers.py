"""Helpers shared by the unit tests of the owner and the supervisor."""

from __future__ import annotations

import time
from typing import Callable, Optional

from mutexowner import Event

#: How long a test waits for a real thread to reach an observable condition.
REAL_TIMEOUT = 5.0


def wait_for(predicate: Callable[[], bool], timeout: float = REAL_TIMEOUT) -> bool:
    """Poll an observable condition (real time) until it holds or ``timeout`` passes.

    For conditions other threads make true (a worker started, a thread ended) where no
    event exists to wait on; returns the condition's final value, so callers assert it.
    """
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return predicate()
        time.sleep(0.002)
    return True


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
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False
