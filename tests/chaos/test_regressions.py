"""Deterministic regression tests for bugs the chaos suite found (fakeredis + FakeClock).

Each test replays, without real time or processes, what a fault did to an owner:

- a renewal answered after the local deadline (chaos:
  ``test_client_pause_ending_just_after_the_holders_deadline``) left the owner with a new
  token while the key held the one it had sent: it then "lost" the lease to itself and
  waited out its own lease;
- a renewal that reached Redis after the key expired and another owner had held and
  released it re-created the key with the renewer's older fencing token;
- a renewal answered after the deadline while ``stop()`` waited for a slow worker started a
  new holding period (an ``acquired`` event, ``holding`` true) after the stop request.

Each failed before its fix.
"""

from __future__ import annotations

import threading
from typing import Any

from mutexowner import BackoffPolicy, Event, MutexOwner, Supervisor, WorkerContext
from mutexowner.lease import Acquired, Lease, LeaseKeys, LeaseResult, new_token
from mutexowner.testing import FakeClock, OwnerDriver, expire_lease, fake_redis, mark_epoch

TTL = 10.0
NO_JITTER = BackoffPolicy(initial=0.5, max_delay=30.0, jitter="none")


def holder(client: Any) -> tuple[MutexOwner, OwnerDriver, list[Event]]:
    """Owner "A" on ``client`` (Redis state seeded: no first-acquire lock-delay), holding."""
    mark_epoch(client, "job")
    clock = FakeClock()
    owner = MutexOwner(
        client,
        "job",
        ttl=TTL,
        identity="A",
        clock=clock,
        backoff=NO_JITTER,
        stuck_worker_policy="abandon",
    )
    events: list[Event] = []
    owner.add_listener(events.append)
    driver = OwnerDriver(owner, clock)
    driver.step()
    assert owner.holding
    return owner, driver, events


def answer_late(owner: MutexOwner, clock: FakeClock, delay: float, before: Any = None) -> list[Any]:
    """Make the next renewal's reply arrive ``delay`` seconds after it was sent (``before()``
    runs first, as if other clients acted while the request was on its way)."""
    real = owner._lease.renew
    calls: list[Any] = []

    def late(token: str, fence: int) -> LeaseResult:
        owner._lease.renew = real  # type: ignore[method-assign]
        if before is not None:
            before()
        result = real(token, fence)
        calls.append(result)
        clock.advance(delay)
        return result

    owner._lease.renew = late  # type: ignore[method-assign,assignment]
    return calls


def test_a_renewal_answered_after_the_local_deadline_does_not_make_the_owner_lose_to_itself() -> (
    None
):
    # Chaos: test_client_pause_ending_just_after_the_holders_deadline ("lease taken by o1").
    client = fake_redis()
    owner, driver, events = holder(client)
    drift = TTL * 0.01 + 0.002
    # Sent at renew_interval (3.33 s), answered at 10.33 s: after the deadline (9.898 s),
    # before the deadline this reply would give (3.33 + 9.898 = 13.23 s).
    calls = answer_late(owner, driver.clock, delay=7.0)
    assert driver.run_until(lambda: bool(calls), max_seconds=TTL)
    assert driver.clock() >= TTL - drift
    driver.run_for(3 * TTL)
    lost = [e.reason for e in events if e.kind == "lost"]
    assert "taken" not in lost, f"the owner lost the lease to its own token: {lost}"
    assert owner.holding
    driver.stop()


def test_a_late_renewal_never_brings_back_an_older_fencing_token() -> None:
    client = fake_redis()
    owner, driver, events = holder(client)
    old_token = owner.fencing_token
    assert old_token is not None
    newer: list[int] = []

    def meanwhile() -> None:
        # A's request is delayed in the network: its key expires, B takes the lease and
        # releases it, then A's renewal reaches Redis.
        expire_lease(client, "job")
        rival = Lease(client, "job", ttl=TTL, identity="B")
        token = new_token()
        acquired = rival.acquire(token)
        assert isinstance(acquired, Acquired)
        newer.append(acquired.fencing_token)
        assert rival.release(token)

    calls = answer_late(owner, driver.clock, delay=7.0, before=meanwhile)
    assert driver.run_until(lambda: bool(calls), max_seconds=TTL)
    driver.run_for(3 * TTL)
    assert newer and newer[0] > old_token
    # Every holding period after the first began after B's acquisition: greater tokens.
    later = [e.fencing_token for e in events if e.kind == "acquired"][1:]
    assert later and all(token is not None and token > newer[0] for token in later), (
        f"A held again with fencing token(s) {later}, B's (issued earlier) was {newer[0]}"
    )
    driver.stop()


def test_a_late_renewal_reply_during_stop_does_not_start_a_new_holding_period() -> None:
    client = fake_redis()
    mark_epoch(client, "job")
    clock = FakeClock()
    finish_job = threading.Event()
    sup = Supervisor(shutdown_timeout=1.0)

    def slow_to_stop(ctx: WorkerContext) -> None:
        finish_job.wait(10)  # finishing a long job: stop() has to wait for it

    sup.add(slow_to_stop, name="slow")
    owner = MutexOwner(
        client,
        "job",
        ttl=TTL,
        identity="A",
        clock=clock,
        supervisor=sup,
        backoff=NO_JITTER,
        stuck_worker_policy=lambda names: None,
    )
    events: list[Event] = []
    owner.add_listener(events.append)
    driver = OwnerDriver(owner, clock, settle_timeout=0.05)
    try:
        driver.step()
        assert owner.holding
        owner.stop()  # manual mode: only requests the stop
        driver.step()
        assert owner.state == "draining"
        calls = answer_late(owner, clock, delay=7.0)  # renewed while draining, answered late
        assert driver.run_until(lambda: bool(calls), max_seconds=TTL)
        acquired = [e for e in events if e.kind == "acquired"]
        assert len(acquired) == 1, f"a new holding period began after stop(): {acquired}"
        assert not owner.holding
        # The late reply left the key holding our token: it stays ours (nobody else
        # starts) while the old worker finishes, and is given back when the stop completes.
        assert client.hget(LeaseKeys("job").lease, "identity") == b"A"
    finally:
        finish_job.set()
        assert sup.wait_idle(5)
    assert driver.run_until(lambda: owner.state == "stopped", max_seconds=TTL / 2)
    assert not client.exists(LeaseKeys("job").lease), "stop() left the key for standbys to wait out"
    assert [e.kind for e in events].count("released") == 1
