"""The test helpers users get: FakeClock, OwnerDriver, release notices over pub/sub."""

from __future__ import annotations

import threading

import pytest

from mutexowner.clock import default_clock, wait_on
from mutexowner.owner import MutexOwner
from mutexowner.testing import FakeClock, OwnerDriver, fake_redis


def test_fake_clock_moves_only_forward_and_only_when_told() -> None:
    clock = FakeClock(start=5.0)
    assert clock() == 5.0 == clock()
    assert clock.advance(1.5) == 6.5
    assert clock.set(10.0) == 10.0
    assert clock.set(3.0) == 10.0  # monotonic: never backwards
    with pytest.raises(ValueError, match="seconds"):
        clock.advance(-1)


def test_fake_clock_wakes_waiters_when_time_moves() -> None:
    clock = FakeClock()
    cond = threading.Condition()
    target = clock() + 10.0
    reached = threading.Event()

    def waiter() -> None:
        with cond:
            while clock() < target:
                wait_on(clock, cond, target - clock())
        reached.set()

    thread = threading.Thread(target=waiter, name="test-waiter")
    thread.start()
    clock.advance(5.0)
    assert not reached.wait(0.1)
    clock.advance(5.0)
    assert reached.wait(5)
    thread.join(5)


def test_real_clock_wait_returns_at_once_for_non_positive_timeouts() -> None:
    cond = threading.Condition()
    with cond:
        start = default_clock()
        wait_on(default_clock, cond, 0)
        wait_on(default_clock, cond, -3)
    assert default_clock() - start < 0.5


def test_driver_needs_the_owners_own_fake_clock() -> None:
    owner = MutexOwner(fake_redis(), "job", clock=FakeClock())
    with pytest.raises(ValueError, match="clock"):
        OwnerDriver(owner, FakeClock())


def test_run_for_steps_through_every_renewal_without_real_time() -> None:
    clock = FakeClock()
    owner = MutexOwner(fake_redis("job"), "job", ttl=3.0, clock=clock)
    driver = OwnerDriver(owner, clock)
    start = default_clock()
    assert driver.run_until(lambda: owner.holding)
    driver.run_for(3600.0)  # one hour: 1200 renewals
    assert owner.holding
    assert default_clock() - start < 30  # fake time, not real time
    assert driver.stop()
    assert owner.state == "stopped"


def test_a_fresh_fake_server_keeps_its_lock_delay_in_real_time() -> None:
    clock = FakeClock()
    owner = MutexOwner(fake_redis(), "job", ttl=3.0, clock=clock)
    driver = OwnerDriver(owner, clock)
    assert not driver.run_until(lambda: owner.holding, max_seconds=60)
    assert owner.status().lock_delay_remaining is not None
    driver.stop()
