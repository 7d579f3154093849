"""The engine: one scheduler for many leases, batched round trips, and its failure modes."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mutexowner import MutexOwner
from mutexowner import engine as engine_module
from mutexowner import lease as lease_module
from mutexowner.engine import engine_for
from mutexowner.testing import FakeClock, fake_redis
from tests.helpers import REAL_TIMEOUT, wait_for

TTL = 10.0


def engine_threads() -> set[str]:
    return {
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("mutexowner-engine-", "mutexowner-events-"))
    }


def test_owners_on_one_client_share_one_engine_and_its_threads() -> None:
    names = [f"job{i}" for i in range(30)]
    client = fake_redis(*names)
    owners = [MutexOwner(client, name, ttl=TTL) for name in names]
    for owner in owners:
        owner.start()
    assert wait_for(lambda: all(o.holding for o in owners))
    threads = engine_threads()
    assert len(threads) == 3, threads  # scheduler, events, release hub: not 3 per owner
    assert len({id(o._engine) for o in owners}) == 1
    for owner in owners:
        assert owner.stop(REAL_TIMEOUT)
    assert not engine_threads()  # the last stop ended the engine's threads


def test_another_client_or_clock_gets_another_engine() -> None:
    client = fake_redis()
    clock = FakeClock()
    assert engine_for(client, clock) is engine_for(client, clock)
    assert engine_for(client, clock) is not engine_for(fake_redis(), clock)
    assert engine_for(client, clock) is not engine_for(client, FakeClock())
    url = "redis://127.0.0.1:1/0"
    assert engine_for(url, clock) is engine_for(url, clock)


def test_leases_due_together_go_out_in_one_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"job{i}" for i in range(20)]
    client = fake_redis(*names)
    clock = FakeClock()
    batches: list[int] = []
    real = lease_module._run_batch

    def recording(calls: Any, batch: list[int], results: Any) -> None:
        batches.append(len(batch))
        real(calls, batch, results)

    monkeypatch.setattr(lease_module, "_run_batch", recording)
    owners = [MutexOwner(client, name, ttl=TTL, clock=clock) for name in names]
    for owner in owners:
        owner.start()
    assert wait_for(lambda: all(o.holding for o in owners))
    before = len(batches)
    fences = [o.fencing_token for o in owners]
    clock.advance(TTL / 3 + 0.01)  # every renewal is due at once
    assert wait_for(lambda: len(batches) > before)
    assert max(batches[before:]) > 1  # renewals shared a round trip
    assert [o.fencing_token for o in owners] == fences and all(o.holding for o in owners)
    for owner in owners:
        owner.request_stop()
    assert all(o.stop(REAL_TIMEOUT) for o in owners)


def test_a_batch_failure_is_an_error_for_each_lease_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["a", "b", "c"]
    client = fake_redis(*names)
    clock = FakeClock()
    owners = [MutexOwner(client, name, ttl=TTL, clock=clock) for name in names]
    for owner in owners:
        owner.start()
    assert wait_for(lambda: all(o.holding for o in owners))

    def down(calls: Any, batch: list[int]) -> list[Any]:
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(lease_module, "_pipeline", down)
    clock.advance(TTL / 3 + 0.01)
    assert wait_for(lambda: all(o.status().consecutive_errors >= 1 for o in owners))
    assert all(o.state == "suspended" and o.holding for o in owners)
    monkeypatch.undo()
    clock.advance(1.0)  # past every retry (backoff from 0.5 s, before the step-down point)
    assert wait_for(lambda: all(o.state == "holding" for o in owners))
    for owner in owners:
        assert owner.stop(REAL_TIMEOUT)


def test_a_stop_that_arrives_during_a_turn_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    # A wake-up while the engine is inside a lease's round trip must be honoured right after
    # it, not at the lease's next due time (fake time does not move here at all).
    client = fake_redis("job")
    clock = FakeClock()
    owner = MutexOwner(client, "job", ttl=TTL, clock=clock)
    owner.start()
    assert wait_for(lambda: owner.holding)
    inside, let_go = threading.Event(), threading.Event()
    real_renew = owner._lease.renew

    def slow_renew(token: str, fence: int) -> Any:
        inside.set()
        let_go.wait(REAL_TIMEOUT)
        return real_renew(token, fence)

    monkeypatch.setattr(owner._lease, "renew", slow_renew)
    clock.advance(TTL / 3 + 0.01)
    assert inside.wait(REAL_TIMEOUT)
    owner.request_stop()  # the engine thread is inside the renewal
    let_go.set()
    assert wait_for(lambda: owner.state == "stopped"), owner.status()
    assert owner.stop(REAL_TIMEOUT)
    assert not client.exists("mutexowner:{job}:lease")


def test_a_lease_whose_turn_raises_does_not_stall_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = fake_redis("good", "bad")
    clock = FakeClock()
    good = MutexOwner(client, "good", ttl=TTL, clock=clock)
    bad = MutexOwner(client, "bad", ttl=TTL, clock=clock)
    calls = {"n": 0}
    real_prepare = bad.slot.prepare

    def exploding(early: float = 0.0) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit("a bug in a turn")  # even this must not end the engine
        return real_prepare(early)

    monkeypatch.setattr(bad.slot, "prepare", exploding)
    good.start()
    bad.start()
    assert wait_for(lambda: good.holding)
    clock.advance(engine_module.ERROR_RETRY)  # the failed lease is retried
    assert wait_for(lambda: bad.holding)
    assert good.stop(REAL_TIMEOUT) and bad.stop(REAL_TIMEOUT)


def test_a_batch_that_fails_outside_any_turn_does_not_end_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["a", "b"]
    client = fake_redis(*names)
    clock = FakeClock()
    owners = [MutexOwner(client, name, ttl=TTL, clock=clock) for name in names]
    for owner in owners:
        owner.start()
    assert wait_for(lambda: all(o.holding for o in owners))
    real = lease_module.call_many
    failures = {"n": 0}

    def broken_once(calls: Any) -> Any:
        if failures["n"] == 0:
            failures["n"] += 1
            raise TypeError("a bug in the batch")  # not a Redis error: nothing classifies it
        return real(calls)

    monkeypatch.setattr(engine_module, "call_many", broken_once)
    fences = [o.fencing_token for o in owners]
    clock.advance(TTL / 3 + 0.01)  # both renewals due together: one batch, which raises
    assert wait_for(lambda: failures["n"] == 1)
    clock.advance(engine_module.ERROR_RETRY)  # retried on their own turns
    assert wait_for(lambda: all((o.status().next_attempt_in or 0.0) > 1.0 for o in owners))
    assert [o.fencing_token for o in owners] == fences and all(o.holding for o in owners)
    assert any(t.name.startswith("mutexowner-engine-") for t in owners[0].threads)
    for owner in owners:
        assert owner.stop(REAL_TIMEOUT)
