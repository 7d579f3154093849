"""Test helpers: a fake clock and a driver that steps a ``MutexOwner`` without its thread.

Use them to test your own workers deterministically::

    from mutexowner.testing import FakeClock, OwnerDriver, fake_redis

    clock = FakeClock()
    owner = MutexOwner(fake_redis("job"), "job", ttl=10, clock=clock, supervisor=sup)
    driver = OwnerDriver(owner, clock)
    driver.run_until(lambda: owner.holding)
    ...
    driver.stop()

Nothing here sleeps: fake time passes only when ``FakeClock.advance`` is called, and the
driver jumps straight to the next moment the owner has something to do.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from mutexowner.errors import OwnerStoppedError
from mutexowner.lease import LeaseKeys
from mutexowner.owner import MutexOwner

__all__ = ["FakeClock", "OwnerDriver", "crash", "expire_lease", "fake_redis", "mark_epoch"]

#: Real seconds a fake-clock waiter blocks before re-checking (a liveness net, not timing).
_REAL_POLL = 0.02


class FakeClock:
    """A monotonic clock that moves only when told to; waiting on it costs no real time."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()
        self._waiting: dict[int, threading.Condition] = {}

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now:.6f})"

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (>= 0), wake every waiter, return the new time."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        with self._lock:
            self._now += seconds
            waiting = list(self._waiting.values())
        for cond in waiting:
            with cond:
                cond.notify_all()
        return self._now

    def set(self, when: float) -> float:
        """Move time forward to ``when`` (never backwards: the clock is monotonic)."""
        return self.advance(max(0.0, when - self._now))

    def wait(self, cond: threading.Condition, timeout: Optional[float]) -> None:
        """Wait on ``cond`` until notified or fake time moves (callers re-check)."""
        if timeout is not None and timeout <= 0:
            return
        key = id(cond)
        with self._lock:
            self._waiting[key] = cond
        try:
            cond.wait(_REAL_POLL)
        finally:
            with self._lock:
                self._waiting.pop(key, None)


class OwnerDriver:
    """Steps a ``MutexOwner`` synchronously: no owner thread, no listener thread, no sleeping.

    Events (``on_acquired``, listeners) are delivered inline. Worker threads of a supervisor
    still run for real: before every step the driver waits (real time, at most
    ``settle_timeout`` seconds) for workers that were told to stop to exit, so that fake time
    never races ahead of a cooperative worker. A worker that ignores ``stopping`` for that long
    is left running, and fake time moves on (that is how stuck workers are tested).
    """

    def __init__(self, owner: MutexOwner, clock: FakeClock, *, settle_timeout: float = 5.0) -> None:
        if owner.clock is not clock:
            raise ValueError("the owner must have been created with clock=<this FakeClock>")
        self.owner = owner
        self.clock = clock
        self.settle_timeout = settle_timeout
        if owner.slot.finished:
            raise OwnerStoppedError("the owner was stopped")
        #: The owner's lease slot: its core (``slot.core``) is the machine being stepped.
        self.slot = owner.attach_driver()

    @property
    def finished(self) -> bool:
        """True once the owner has stopped for good (its stop completed, or it crashed)."""
        return self.slot.finished

    def step(self) -> Optional[float]:
        """Run one turn of the machine at the current fake time; seconds until it is due again."""
        self.settle_workers()
        return self.slot.turn()

    def settle_workers(self, timeout: Optional[float] = None) -> bool:
        """Wait (real time) until workers told to stop have exited; False if some have not."""
        sup = self.owner.supervisor
        if sup is None:
            return True
        return sup.wait_settled(self.settle_timeout if timeout is None else timeout)

    def advance(self, seconds: float) -> Optional[float]:
        """Advance fake time by ``seconds``, then step."""
        self.clock.advance(seconds)
        return self.step()

    def run_for(self, seconds: float, *, max_steps: int = 100_000) -> None:
        """Let ``seconds`` of fake time pass, stepping at every moment something is due."""
        end = self.clock() + seconds
        for _ in range(max_steps):
            wait = self.step()
            now = self.clock()
            if now >= end:
                return
            if wait is None or now + wait > end:
                self.clock.set(end)
                self.step()
                return
            self.clock.advance(max(wait, 0.0) or 1e-6)
        raise RuntimeError(f"run_for did not finish in {max_steps} steps")

    def run_until(
        self,
        predicate: Callable[[], bool],
        *,
        max_seconds: float = 3600.0,
        real_timeout: float = 10.0,
        max_steps: int = 100_000,
    ) -> bool:
        """Step, jumping fake time to each due moment, until ``predicate()`` is true.

        Returns False when ``max_seconds`` of fake time pass first. When the owner waits only
        for outside events (worker threads exiting), waits up to ``real_timeout`` real seconds.
        """
        end = self.clock() + max_seconds
        for _ in range(max_steps):
            wait = self.step()
            self.settle_workers()  # workers told to stop exit before time moves on
            if predicate():
                return True
            if self._take_wake():
                continue  # something happened meanwhile: look again at the same time
            if self.clock() >= end:
                return False
            if wait is None:
                if not self._wait_for_wake(real_timeout):
                    return predicate()
                continue
            if wait > 0:
                self.clock.advance(min(wait, end - self.clock()))
        raise RuntimeError(f"run_until did not settle in {max_steps} steps")

    def notify_released(self) -> None:
        """Deliver a release notice, as the pub/sub listener would."""
        self.slot.notify_released()

    def stop(self, *, max_seconds: float = 3600.0) -> bool:
        """Request stop and step until the owner is stopped for good."""
        self.owner.stop()
        return self.run_until(lambda: self.slot.finished, max_seconds=max_seconds)

    def _take_wake(self) -> bool:
        return self.slot.take_wake()

    def _wait_for_wake(self, timeout: float) -> bool:
        return self.slot.wait_for_wake(timeout)


def fake_redis(*marked: str, **kwargs: Any) -> Any:
    """A fakeredis client with Lua on a fresh private server (needs ``fakeredis[lua]``).

    A fresh server looks like one that just lost its data, so the first acquisition of a
    lease waits one ttl, measured on the server's own clock: real seconds, which a
    ``FakeClock`` does not move. Name leases in ``marked`` (see ``mark_epoch``) to start as
    if the server had kept its state for long.
    """
    import fakeredis

    kwargs.setdefault("server", fakeredis.FakeServer())
    client = fakeredis.FakeRedis(**kwargs)
    for name in marked:
        mark_epoch(client, name)
    return client


def expire_lease(client: Any, name: str, prefix: str = "mutexowner") -> bool:
    """Make Redis forget the lease key now, as if its ttl had run out; True if it existed."""
    return bool(client.delete(LeaseKeys(name, prefix).lease))


def crash(owner: MutexOwner) -> None:
    """Simulate the owner's process dying (``kill -9``): its threads end, its workers are told
    to stop, and nothing is released, so the key stays in Redis until its ttl runs out."""
    owner.simulate_crash()


def mark_epoch(client: Any, name: str, prefix: str = "mutexowner") -> None:
    """Make Redis look as if it had kept the lease's state for long: no lock-delay on acquire.

    A fake server's lock-delay runs on its own (real) clock, not on a ``FakeClock``; tests
    that are not about data loss call this first instead of waiting it out.
    """
    client.hset(
        LeaseKeys(name, prefix).epoch, mapping={"id": "marked", "run_id": "", "quiet_until": "0"}
    )
