"""What the owner logs: one line per state change, waits that explain themselves, and none of
``transitions``' own lines about our machines (issue 14, item 3)."""

from __future__ import annotations

import logging

import pytest
from transitions import Machine

from mutexowner import MutexOwner
from mutexowner.testing import FakeClock, OwnerDriver, fake_redis


def owner_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mutexowner.owner"]


def test_transitions_lines_about_our_machines_are_dropped_but_others_are_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mutexowner")  # whatever an earlier test left there
    clock = FakeClock()
    owner = MutexOwner(fake_redis("job"), "job", ttl=10, clock=clock)
    driver = OwnerDriver(owner, clock)
    driver.step()
    assert owner.holding

    class Model:
        def on_enter_b(self) -> None:
            pass

    theirs = Model()
    Machine(model=theirs, states=["a", "b"], initial="a", name="theirs")
    theirs.to_b()  # type: ignore[attr-defined]
    driver.stop()
    transitions_lines = [r.getMessage() for r in caplog.records if r.name.startswith("transitions")]
    assert not [m for m in transitions_lines if "mutexowner[" in m], transitions_lines
    assert any(m.startswith("theirs: ") for m in transitions_lines), transitions_lines
    # Our own logger reports each state change once.
    changes = [
        m.split(" state ")[1].split(" fencing")[0] for m in owner_messages(caplog) if " state " in m
    ]
    assert changes == [
        "stopped -> acquiring",
        "acquiring -> holding",
        "holding -> draining",
        "draining -> stopped",
    ], changes


def test_a_standby_says_who_holds_once_and_again_when_the_holder_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mutexowner")
    client, clock = fake_redis("job"), FakeClock()
    a = MutexOwner(client, "job", ttl=10, identity="A", clock=clock)
    da = OwnerDriver(a, clock)
    da.step()
    standby = MutexOwner(client, "job", ttl=10, identity="S", clock=clock)
    ds = OwnerDriver(standby, clock)
    for _ in range(3):
        ds.step()
        ds.notify_released()  # spurious wake-ups: asks again, sees the same holder
    da.stop()
    b = MutexOwner(client, "job", ttl=10, identity="B", clock=clock)
    db = OwnerDriver(b, clock)
    db.step()
    assert b.holding
    ds.notify_released()
    ds.step()
    held_by = [m for m in owner_messages(caplog) if "standing by: the lease is held by" in m]
    assert len(held_by) == 2, held_by
    assert "held by A" in held_by[0] and "held by B" in held_by[1]
    db.stop()
    ds.stop()


def test_the_first_holder_of_a_new_key_says_why_it_waits_and_how_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mutexowner")
    clock = FakeClock()
    owner = MutexOwner(fake_redis(), "job", ttl=10, identity="A", clock=clock)
    driver = OwnerDriver(owner, clock)
    driver.step()
    driver.advance(11.0)  # looks again: the server (on real time) still reports the delay
    assert not owner.holding
    waits = [m for m in owner_messages(caplog) if "lock-delay" in m]
    assert len(waits) == 1, waits  # once, not on every look
    assert "first use of this key, or Redis lost its data" in waits[0]
    assert "waiting 10." in waits[0] or "waiting 9." in waits[0]
    driver.stop()
