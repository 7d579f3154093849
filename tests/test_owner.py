"""MutexOwner, stepped deterministically: fakeredis (with Lua) + FakeClock + OwnerDriver.

No real sleeping: fake time moves only when a test or the driver advances it. Worker
threads (where a test has a supervisor) are real and are synchronised with events.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Optional

import pytest
import redis

from mutexowner import machine, testing
from mutexowner.backoff import BackoffPolicy
from mutexowner.errors import ForkedOwnerError, MutexOwnerError, OwnerStoppedError
from mutexowner.events import Event
from mutexowner.lease import Lease, LeaseKeys, new_token
from mutexowner.owner import MutexOwner, drift_for
from mutexowner.supervisor import Supervisor, WorkerContext
from mutexowner.testing import FakeClock, OwnerDriver, expire_lease, fake_redis
from tests.helpers import Recorder

NO_JITTER = BackoffPolicy(initial=0.5, factor=2.0, max_delay=30.0, jitter="none")


def mark_epoch(client: Any, name: str = "job") -> None:
    testing.mark_epoch(client, name)


def make_owner(
    client: Any = None,
    *,
    clock: Optional[FakeClock] = None,
    identity: str = "A",
    epoch: bool = True,
    supervisor: Optional[Supervisor] = None,
    ttl: float = 10.0,
    **kwargs: Any,
) -> tuple[MutexOwner, OwnerDriver, Recorder]:
    client = client if client is not None else fake_redis()
    clock = clock if clock is not None else FakeClock()
    if epoch:
        mark_epoch(client)
    rec = Recorder()
    kwargs.setdefault("backoff", NO_JITTER)
    # Never the default "exit" here: it would end the test process.
    kwargs.setdefault("stuck_worker_policy", rec.stuck.append)
    owner = MutexOwner(
        client,
        "job",
        ttl=ttl,
        identity=identity,
        clock=clock,
        supervisor=supervisor,
        on_acquired=rec.acquired.append,
        on_lost=rec.lost.append,
        **kwargs,
    )
    owner.add_listener(rec)
    return owner, OwnerDriver(owner, clock), rec


def lease_hash(client: Any, name: str = "job") -> dict[bytes, bytes]:
    return dict(client.hgetall(LeaseKeys(name).lease))


class Worker:
    """A cooperative worker whose runs a test can observe."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.exited = threading.Event()
        self.contexts: list[WorkerContext] = []

    def __call__(self, ctx: WorkerContext) -> None:
        self.contexts.append(ctx)
        self.exited.clear()
        self.started.set()
        try:
            ctx.stopping.wait(30)
        finally:
            self.exited.set()


def supervised(shutdown_timeout: float = 1.0) -> tuple[Supervisor, Worker]:
    worker = Worker()
    sup = Supervisor(shutdown_timeout=shutdown_timeout)
    sup.add(worker, name="w")
    return sup, worker


# -- acquiring -------------------------------------------------------------------------------


def test_acquires_at_once_when_redis_kept_its_state() -> None:
    client = fake_redis()
    owner, driver, rec = make_owner(client)
    assert owner.state == "acquiring"
    driver.step()
    assert owner.state == "holding"
    assert owner.holding
    token = owner.fencing_token
    assert isinstance(token, int) and token > 0
    assert rec.acquired == [token]
    assert lease_hash(client)[b"identity"] == b"A"
    assert lease_hash(client)[b"fence"] == str(token).encode()
    assert rec.edges() == [("stopped", "acquiring"), ("acquiring", "holding")]
    driver.stop()


def test_first_acquisition_on_an_empty_redis_waits_one_ttl_before_workers() -> None:
    client = fake_redis()
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, epoch=False, supervisor=sup)
    driver.step()
    status = owner.status()
    # An empty Redis may have just lost a holder's key: nobody new takes it for one ttl.
    assert owner.state == "acquiring" and not owner.holding
    assert status.lock_delay_remaining == pytest.approx(10.0, abs=0.05)
    assert status.next_attempt_in == pytest.approx(10.0, abs=0.05)
    assert not client.exists(LeaseKeys("job").lease) and not sup.running
    driver.run_for(status.lock_delay_remaining - 0.05)
    assert owner.state == "acquiring" and not sup.running
    mark_epoch(client)  # the quiet period is over in Redis's own time too
    assert driver.run_until(lambda: owner.holding, max_seconds=1)
    assert worker.started.wait(5)
    assert worker.contexts[0].fencing_token == owner.fencing_token
    assert rec.edges() == [("stopped", "acquiring"), ("acquiring", "holding")]
    driver.stop()
    assert worker.exited.is_set()


def test_standby_retries_when_the_holders_lease_would_end_not_on_a_fixed_poll() -> None:
    client = fake_redis()
    a, da, _ = make_owner(client, identity="A")
    da.step()
    b, db, rec_b = make_owner(client, identity="B", clock=da.clock)
    db.step()
    assert b.state == "acquiring"
    pttl = client.pttl(LeaseKeys("job").lease) / 1000
    next_in = b.status().next_attempt_in
    assert next_in is not None and next_in == pytest.approx(pttl, abs=0.02)
    assert b.status().consecutive_errors == 0
    db.stop()
    da.stop()


def test_release_notice_wakes_a_standby_at_once() -> None:
    client = fake_redis()
    a, da, _ = make_owner(client, identity="A")
    da.step()
    b, db, _ = make_owner(client, identity="B", clock=da.clock)
    db.step()
    assert (b.status().next_attempt_in or 0) > 5
    da.stop()
    assert lease_hash(client) == {}
    db.notify_released()
    db.step()
    assert b.state == "holding"
    db.stop()


def test_lost_reply_on_acquire_does_not_make_the_owner_wait_out_its_own_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = fake_redis()
    owner, driver, rec = make_owner(client)
    real_acquire = owner._lease.acquire
    calls = []

    def acquire_then_lose_reply(token: str) -> Any:
        calls.append(token)
        real_acquire(token)  # the script ran in Redis...
        raise redis.exceptions.TimeoutError("Timeout reading from socket")  # ...reply lost

    monkeypatch.setattr(owner._lease, "acquire", acquire_then_lose_reply)
    driver.step()
    assert owner.state == "acquiring"
    assert owner.status().consecutive_errors == 1
    assert "did not answer in time" in (owner.status().last_error or "")
    monkeypatch.setattr(owner._lease, "acquire", real_acquire)
    wait = owner.status().next_attempt_in
    assert wait == pytest.approx(0.5)  # first backoff step, not the ttl
    driver.advance(wait or 0)
    assert owner.state == "holding"
    assert owner.fencing_token == int(lease_hash(client)[b"fence"])
    assert owner.status().consecutive_errors == 0
    driver.stop()


# -- holding ---------------------------------------------------------------------------------


def test_renews_every_renew_interval_and_keeps_the_same_fencing_token() -> None:
    client = fake_redis()
    owner, driver, rec = make_owner(client, ttl=9.0)
    driver.step()
    token = owner.fencing_token
    renew_count = rec.kinds().count("renewed")
    driver.run_for(30.0)
    assert owner.state == "holding" and owner.fencing_token == token
    # 30 s of fake time at one renewal per 3 s (ttl/3).
    assert rec.kinds().count("renewed") - renew_count == 10
    remaining = owner.status().lease_remaining
    assert remaining is not None and 9.0 - drift_for(9.0) - 3.0 <= remaining <= 9.0
    driver.stop()


def test_another_token_in_the_key_means_lost_now() -> None:
    client = fake_redis()
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert worker.started.wait(5)
    client.hset(LeaseKeys("job").lease, mapping={"token": new_token(), "identity": "intruder"})
    client.pexpire(LeaseKeys("job").lease, 7000)
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "acquiring"
    assert not owner.holding and owner.fencing_token is None
    assert worker.exited.wait(5)
    assert rec.lost == ["taken"]
    assert owner.status().next_attempt_in == pytest.approx(7.0, abs=0.05)
    driver.stop()


def test_key_vanished_is_retaken_by_its_valid_holder_without_lock_delay() -> None:
    client = fake_redis()
    owner, driver, rec = make_owner(client)
    driver.step()
    token = owner.fencing_token
    assert expire_lease(client, "job")
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "holding" and owner.fencing_token == token
    assert lease_hash(client)[b"fence"] == str(token).encode()
    assert rec.lost == []
    driver.stop()


def test_redis_data_loss_lets_the_valid_holder_continue_and_makes_contenders_wait() -> None:
    client = fake_redis()
    sup, worker = supervised()
    a, da, rec_a = make_owner(client, identity="A", supervisor=sup)
    da.step()
    assert worker.started.wait(5)
    token = a.fencing_token
    client.flushall()  # Redis restarted without persistence
    b, db, rec_b = make_owner(client, identity="B", clock=da.clock, epoch=False)
    db.step()  # B comes first after the loss: the key is free, but not for B
    assert b.state == "acquiring" and not client.exists(LeaseKeys("job").lease)
    assert (b.status().lock_delay_remaining or 0) == pytest.approx(10.0, abs=0.05)
    da.advance(a.status().next_attempt_in or 0)  # A's renewal re-takes its own key
    assert a.state == "holding" and a.fencing_token == token and rec_a.lost == []
    assert not worker.exited.is_set()  # A's workers never stopped
    mark_epoch(client)  # even once the quiet period is over...
    db.advance(b.status().next_attempt_in or 0)
    assert b.state == "acquiring"  # ...B finds A's token
    db.stop()
    da.stop()


def test_after_data_loss_a_dead_holders_standby_starts_when_the_quiet_period_ends() -> None:
    from mutexowner.testing import crash

    client = fake_redis()
    a, da, rec_a = make_owner(client, identity="A")
    da.step()
    first = a.fencing_token
    crash(a)
    client.flushall()
    b, db, rec_b = make_owner(client, identity="B", clock=da.clock, epoch=False)
    db.step()
    assert b.state == "acquiring"
    quiet = b.status().lock_delay_remaining or 0
    db.run_for(quiet - 0.01)
    assert not b.holding
    mark_epoch(client)
    assert db.run_until(lambda: b.holding, max_seconds=1)
    assert b.fencing_token is not None and first is not None and b.fencing_token > first
    db.stop()


def test_a_late_renewal_reply_after_data_loss_waits_the_lock_delay_in_settling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = fake_redis()
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert worker.started.wait(5)
    _late_retake(owner, driver, client, monkeypatch)
    assert owner.state == "settling" and not owner.holding
    assert rec.lost == ["expired"] and worker.exited.wait(5)
    delay = owner.status().lock_delay_remaining or 0
    assert delay == pytest.approx(10.0 + drift_for(10.0), abs=0.05)
    driver.run_for(delay - 0.01)
    assert owner.state == "settling" and len(worker.contexts) == 1
    assert driver.run_until(lambda: owner.holding, max_seconds=1)
    assert worker.started.wait(5) and len(worker.contexts) == 2
    driver.stop()


def _late_retake(
    owner: MutexOwner, driver: OwnerDriver, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis loses its data; the holder's next renewal reply arrives after its deadline."""
    real_renew = owner._lease.renew

    def slow_renew(token: str, fence: int) -> Any:
        # The request hangs until just past the local deadline...
        driver.clock.advance((owner.status().lease_remaining or 0) + 0.01)
        return real_renew(token, fence)  # ...then Redis re-takes the vanished key

    client.flushall()
    monkeypatch.setattr(owner._lease, "renew", slow_renew)
    driver.advance(owner.status().next_attempt_in or 0)
    monkeypatch.setattr(owner._lease, "renew", real_renew)


def test_holder_renewing_first_after_data_loss_keeps_running() -> None:
    client = fake_redis()
    a, da, rec_a = make_owner(client, identity="A")
    da.step()
    token = a.fencing_token
    client.flushall()
    da.advance(a.status().next_attempt_in or 0)
    assert a.state == "holding" and a.fencing_token == token  # re-taken: its lease was valid
    b, db, _ = make_owner(client, identity="B", clock=da.clock, epoch=False)
    db.step()
    assert b.state == "acquiring"
    db.stop()
    da.stop()


# -- Redis trouble ---------------------------------------------------------------------------


def test_outage_while_holding_suspends_then_steps_down_at_the_local_deadline() -> None:
    client = fake_redis()
    sup, worker = supervised(shutdown_timeout=2.0)
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert worker.started.wait(5)
    deadline = driver.clock() + owner.status().lease_remaining  # type: ignore[operator]
    client.connection_pool.connection_kwargs["server"].connected = False
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "suspended"
    assert owner.holding  # still within the deadline
    assert owner.status().consecutive_errors == 1
    assert rec.kinds().count("suspended") == 1
    # Workers are told to stop shutdown_timeout before the deadline...
    assert driver.run_until(lambda: worker.exited.is_set(), max_seconds=20)
    assert driver.clock() <= deadline - 2.0 + 1e-6
    assert owner.holding
    # ...and at the deadline the lease is gone.
    assert driver.run_until(lambda: owner.state == "acquiring", max_seconds=20)
    assert driver.clock() == pytest.approx(deadline, abs=1e-6)
    assert not owner.holding and owner.fencing_token is None
    assert rec.lost == ["expired"]
    driver.stop()


def test_retries_in_suspended_land_before_the_step_down_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = fake_redis()
    sup, worker = supervised(shutdown_timeout=2.0)
    owner, driver, rec = make_owner(
        client, supervisor=sup, backoff=BackoffPolicy(initial=5, max_delay=60, jitter="none")
    )
    driver.step()
    step_down = driver.clock() + (owner.status().lease_remaining or 0) - 2.0
    attempts: list[float] = []
    real_renew = owner._lease.renew

    def failing_renew(token: str, fence: int) -> Any:
        attempts.append(driver.clock())
        raise redis.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(owner._lease, "renew", failing_renew)
    driver.run_until(lambda: owner.state == "acquiring", max_seconds=30)
    deadline = step_down + 2.0
    latest = step_down - 2 * owner.call_timeout
    # The first retry would come 5 s after the failure, past the step-down point: it is
    # pulled in to the latest moment a call (two round trips) still confirms in time...
    assert attempts[1] == pytest.approx(latest, abs=1e-6)
    # ...then retries go on, never faster than twice per call_timeout, until the deadline.
    gaps = [b - a for a, b in zip(attempts[1:], attempts[2:])]
    assert gaps and min(gaps) >= owner.call_timeout / 2 - 1e-9
    assert max(attempts) < deadline
    monkeypatch.setattr(owner._lease, "renew", real_renew)
    driver.stop()


def test_suspended_recovers_when_redis_answers_before_the_deadline() -> None:
    client = fake_redis()
    sup, worker = supervised(shutdown_timeout=1.0)
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert worker.started.wait(5)
    server = client.connection_pool.connection_kwargs["server"]
    server.connected = False
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "suspended"
    server.connected = True
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "holding"
    status = owner.status()
    assert status.consecutive_errors == 0 and status.last_error is None
    assert not worker.exited.is_set() and len(worker.contexts) == 1
    assert rec.edges()[-2:] == [("holding", "suspended"), ("suspended", "holding")]
    driver.stop()


def test_backoff_grows_while_redis_is_down_and_resets_on_the_first_success() -> None:
    client = fake_redis()
    server = client.connection_pool.connection_kwargs["server"]
    server.connected = False
    owner, driver, rec = make_owner(client, epoch=False)
    server.connected = False
    delays = []
    for _ in range(8):
        driver.step()
        delays.append(owner.status().next_attempt_in)
        driver.clock.advance(delays[-1] or 0)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert owner.status().consecutive_errors == 8
    server.connected = True
    mark_epoch(client)
    driver.step()
    assert owner.state == "holding" and owner.status().consecutive_errors == 0
    server.connected = False
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.status().consecutive_errors == 1
    server.connected = True
    driver.stop()


def test_never_crashes_and_retries_forever_through_a_long_outage() -> None:
    client = fake_redis()
    server = client.connection_pool.connection_kwargs["server"]
    owner, driver, rec = make_owner(client)
    server.connected = False
    driver.run_for(24 * 3600.0)
    status = owner.status()
    assert status.state == "acquiring"
    assert status.consecutive_errors > 2000  # about one try per 30 s cap
    assert status.next_attempt_in is not None and status.next_attempt_in <= 30.0
    server.connected = True
    driver.advance(status.next_attempt_in)
    assert owner.holding
    driver.stop()


def test_fatal_error_is_reported_and_retried_at_the_cap_not_in_a_hot_loop() -> None:
    client = fake_redis()
    client.set(LeaseKeys("job").lease, "not a hash")  # WRONGTYPE for the script
    owner, driver, rec = make_owner(client)
    driver.step()
    status = owner.status()
    assert status.state == "acquiring"
    assert "wrong type" in (status.last_error or "")
    assert status.next_attempt_in == 30.0  # the policy's cap
    errors = [e for e in rec.events if e.kind == "error"]
    assert errors and errors[-1].error_kind == "wrongtype"
    driver.run_for(300.0)
    assert owner.status().consecutive_errors == 11  # one per cap, not thousands
    client.delete(LeaseKeys("job").lease)
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.holding
    driver.stop()


def test_keep_running_mode_keeps_workers_through_an_outage_past_the_deadline() -> None:
    client = fake_redis()
    server = client.connection_pool.connection_kwargs["server"]
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, supervisor=sup, outage="keep_running")
    driver.step()
    assert worker.started.wait(5)
    token = owner.fencing_token
    server.connected = False
    driver.run_for(120.0)  # far past ttl
    assert owner.state == "suspended" and owner.holding
    assert not worker.exited.is_set()
    worker.contexts[0].ensure_held()  # does not raise in this mode
    server.connected = True
    expire_lease(client, "job")  # the key lapsed in Redis meanwhile
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "holding" and owner.fencing_token == token
    # Another token seen: step down at once, even in this mode.
    client.hset(LeaseKeys("job").lease, "token", new_token())
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "acquiring" and rec.lost == ["taken"]
    assert worker.exited.wait(5)
    driver.stop()


# -- workers and the deadline ------------------------------------------------------------------


def test_supervisor_stops_workers_by_the_deadline_even_if_the_owner_thread_is_stuck() -> None:
    client = fake_redis()
    sup, worker = supervised(shutdown_timeout=2.0)
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert worker.started.wait(5)
    ctx = worker.contexts[0]
    remaining = owner.status().lease_remaining or 0
    # Nobody steps the owner (as if its thread were blocked); only time passes.
    driver.clock.advance(remaining - 2.0 - 0.001)
    assert not ctx.stopping.is_set()
    driver.clock.advance(0.002)
    assert ctx.stopping.wait(5)  # the supervisor's monitor acted on its own
    with pytest.raises(Exception, match="stopping"):
        ctx.ensure_held()
    driver.stop()


def test_ensure_held_raises_once_the_local_deadline_has_passed() -> None:
    client = fake_redis()
    sup, worker = supervised(shutdown_timeout=0.0)
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert worker.started.wait(5)
    ctx = worker.contexts[0]
    ctx.ensure_held()
    # A process pause: the clock jumps past the deadline before any thread runs.
    ctx.stopping.clear()
    owner.slot.core.guard_until = driver.clock() + 1.0
    driver.clock.advance(1.0)
    from mutexowner.errors import LeaseLost

    with pytest.raises(LeaseLost, match="deadline"):
        ctx.ensure_held()
    driver.stop()


def test_workers_failing_release_the_lease_and_the_owner_contends_again_later() -> None:
    client = fake_redis()
    sup = Supervisor(max_restarts=1, max_seconds=60, shutdown_timeout=1.0)
    crashes = threading.Semaphore(0)

    def crashing(ctx: WorkerContext) -> None:
        crashes.release()
        raise RuntimeError("boom")

    sup.add(crashing, name="crasher")
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert crashes.acquire(timeout=5) and crashes.acquire(timeout=5)  # first run, one restart
    assert sup.wait_idle(5) and sup.failed
    assert driver.run_until(lambda: owner.state == "acquiring", max_seconds=1)
    assert rec.lost == ["workers_failed"]
    assert sup.failed and sup.restarts == 1
    assert lease_hash(client) == {}  # released so a healthy node can take over
    assert (owner.status().next_attempt_in or 0) == pytest.approx(0.5)
    other, dother, _ = make_owner(client, identity="B", clock=driver.clock)
    dother.step()
    assert other.holding
    dother.stop()
    driver.stop()


# -- stop ------------------------------------------------------------------------------------


def _drive_to(
    state: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[MutexOwner, OwnerDriver, Recorder, Any, Worker]:
    client = fake_redis()
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, supervisor=sup)
    if state == "acquiring":
        client.connection_pool.connection_kwargs["server"].connected = False
        driver.step()
        client.connection_pool.connection_kwargs["server"].connected = True
    elif state == "settling":
        driver.step()
        _late_retake(owner, driver, client, monkeypatch)
        rec.lost.clear()
        worker.exited.clear()
    elif state in ("holding", "suspended", "draining"):
        driver.step()
        assert worker.started.wait(5)
        if state == "suspended":
            client.connection_pool.connection_kwargs["server"].connected = False
            driver.advance(owner.status().next_attempt_in or 0)
            client.connection_pool.connection_kwargs["server"].connected = True
        if state == "draining":
            with owner.slot.lock:  # as the owner's own turn calls it
                owner.slot.core.give_up_workers_failed(driver.clock())
    assert owner.state == state
    return owner, driver, rec, client, worker


@pytest.mark.parametrize("state", ["acquiring", "settling", "holding", "suspended", "draining"])
def test_stop_from_every_state_releases_and_ends_stopped(
    state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, driver, rec, client, worker = _drive_to(state, monkeypatch)
    assert driver.stop(max_seconds=30)
    assert owner.state == "stopped" and not owner.holding
    assert lease_hash(client) == {}
    if state in ("holding", "suspended", "draining"):
        assert worker.exited.is_set()
        assert rec.lost[-1] in ("stopped", "workers_failed")
    else:
        assert rec.lost == []
    assert owner.stop() is True  # idempotent


def test_stop_before_start_and_start_after_stop() -> None:
    owner = MutexOwner(fake_redis(), "job")
    assert owner.stop() is True
    assert owner.state == "stopped"
    with pytest.raises(OwnerStoppedError):
        owner.start()


# -- fork ------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_renews_or_releases_the_parents_lease() -> None:
    client = fake_redis()
    owner, driver, rec = make_owner(client)
    driver.step()
    before = lease_hash(client)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            try:
                owner.start()
                code = 10
            except ForkedOwnerError:
                pass
            if owner.stop() is not True or owner.holding or owner.state != "stopped":
                code = 11
            if owner.fencing_token is not None:
                code = 13
            try:
                owner._lease.release(owner.slot.core.token or "")
                code = 12
            except ForkedOwnerError:
                pass
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    result = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert result == b"\x00"
    assert lease_hash(client) == before and owner.holding
    driver.stop()


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": -1}, ValueError, "ttl"),
        ({"ttl": math.inf}, ValueError, "ttl"),
        ({"ttl": "10"}, TypeError, "ttl"),
        ({"renew_interval": 10}, ValueError, "renew_interval"),
        ({"renew_interval": 0}, ValueError, "renew_interval"),
        ({"call_timeout": 5}, ValueError, "call_timeout"),
        ({"backoff": 3}, TypeError, "backoff"),
        ({"supervisor": object()}, TypeError, "supervisor"),
        ({"identity": ""}, ValueError, "identity"),
        ({"identity": "a\nb"}, ValueError, "identity"),
        ({"on_acquired": 1}, TypeError, "on_acquired"),
        ({"on_lost": "x"}, TypeError, "on_lost"),
        ({"outage": "ignore"}, ValueError, "outage"),
        ({"clock": 5}, TypeError, "clock"),
        ({"stuck_worker_policy": "pray"}, ValueError, "stuck_worker_policy"),
        ({"supervisor_shutdown": 9.0}, ValueError, "shutdown_timeout"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict[str, Any], error: type, match: str) -> None:
    if "supervisor_shutdown" in kwargs:
        sup = Supervisor(shutdown_timeout=kwargs.pop("supervisor_shutdown"))
        sup.add(Worker())
        kwargs["supervisor"] = sup
    with pytest.raises(error, match=match):
        MutexOwner(fake_redis(), "job", **kwargs)


@pytest.mark.parametrize(
    ("redis_arg", "name", "error", "match"),
    [
        ("http://localhost", "job", ValueError, "redis"),
        (42, "job", TypeError, "redis"),
        ("redis://localhost", "", ValueError, "name"),
        ("redis://localhost", "a{b}", ValueError, "name"),
        ("redis://localhost", 7, TypeError, "name"),
    ],
)
def test_bad_redis_or_name(redis_arg: Any, name: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MutexOwner(redis_arg, name)


def test_repr_status_and_errors_never_show_the_password() -> None:
    clock = FakeClock()
    owner = MutexOwner("redis://user:s3cret-pw@127.0.0.1:1/0", "job", clock=clock, call_timeout=0.2)
    driver = OwnerDriver(owner, clock)
    driver.step()  # connection refused on port 1
    status = owner.status()
    assert status.consecutive_errors == 1
    for text in (repr(owner), repr(status), str(status.last_error)):
        assert "s3cret-pw" not in text
    assert "***" in status.redis
    driver.stop()


def test_shutdown_rule_accepts_the_defaults() -> None:
    sup = Supervisor()  # shutdown_timeout 5 s
    sup.add(Worker())
    owner = MutexOwner(fake_redis(), "job", ttl=10.0, supervisor=sup)
    assert owner.renew_interval + sup.shutdown_timeout < owner.ttl - owner.drift


# -- the machine as data ---------------------------------------------------------------------


def test_every_transition_of_the_table_is_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """One tour that walks every edge of the table; fails if an edge is added untested."""
    seen: set[tuple[Optional[str], str]] = set()
    for state in ("acquiring", "settling", "holding", "suspended", "draining"):
        owner, driver, rec, client, worker = _drive_to(state, monkeypatch)
        driver.stop(max_seconds=30)
        seen.update(rec.edges())
    client = fake_redis()
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.run_until(lambda: owner.holding)
    client.hset(LeaseKeys("job").lease, "token", new_token())  # lost from holding
    driver.run_until(lambda: owner.state == "acquiring")
    expire_lease(client, "job")
    driver.run_until(lambda: owner.holding)
    _late_retake(owner, driver, client, monkeypatch)  # holding -> acquiring -> settling
    driver.run_until(lambda: owner.holding, max_seconds=30)  # settled
    _late_retake(owner, driver, client, monkeypatch)
    assert owner.state == "settling"
    client.hset(LeaseKeys("job").lease, "token", new_token())  # lost from settling
    driver.run_until(lambda: owner.state == "acquiring")
    expire_lease(client, "job")
    mark_epoch(client)
    driver.run_until(lambda: owner.holding)
    server = client.connection_pool.connection_kwargs["server"]
    server.connected = False
    driver.run_until(lambda: owner.state == "suspended")
    server.connected = True
    driver.run_until(lambda: owner.state == "holding")  # renewed
    server.connected = False
    driver.run_until(lambda: owner.state == "acquiring", max_seconds=60)  # lost from suspended
    client.connection_pool.connection_kwargs["server"].connected = True
    expire_lease(client, "job")
    driver.run_until(lambda: owner.holding, max_seconds=60)
    with owner.slot.lock:  # as the owner's own turn calls it
        owner.slot.core.give_up_workers_failed(driver.clock())
    driver.run_until(lambda: owner.state == "acquiring")  # released
    driver.run_until(lambda: owner.holding, max_seconds=60)
    with owner.slot.lock:  # as the owner's own turn calls it
        owner.slot.core.give_up_workers_failed(driver.clock())
    client.hset(LeaseKeys("job").lease, "token", new_token())  # lost from draining
    driver.run_until(lambda: owner.state == "acquiring")
    driver.stop(max_seconds=60)
    seen.update(rec.edges())
    assert rec.stuck == []
    table = {(source, t["dest"]) for t in machine.TRANSITIONS for source in t["source"]}
    missing = table - seen
    assert not missing, f"transitions never exercised: {sorted(missing)}"


# -- threads (real time, fakeredis) ----------------------------------------------------------


def test_threaded_hand_off_uses_the_release_notice_not_the_ttl() -> None:
    client = fake_redis()
    mark_epoch(client)
    a = MutexOwner(client, "job", ttl=60.0, identity="A")
    b = MutexOwner(client, "job", ttl=60.0, identity="B")
    with a:
        assert a.wait_until_holding(5)
        b.start()
        # B was told "taken, ~60 s left"; only the notice can wake it sooner.
        a.stop()
        assert b.wait_until_holding(5)
    b.stop()
    assert a.state == b.state == "stopped"


def test_stop_from_a_worker_requests_and_returns_without_deadlock() -> None:
    client = fake_redis()
    mark_epoch(client)
    sup = Supervisor(shutdown_timeout=1.0)
    results: list[bool] = []
    owner_box: list[MutexOwner] = []
    done = threading.Event()

    def stopper(ctx: WorkerContext) -> None:
        results.append(owner_box[0].stop())
        done.set()
        ctx.stopping.wait(10)

    sup.add(stopper)
    owner = MutexOwner(client, "job", ttl=5.0, supervisor=sup)
    owner_box.append(owner)
    owner.start()
    assert done.wait(5)
    assert results == [False]
    assert owner.stop(timeout=5)
    assert owner.state == "stopped"


def test_a_failing_listener_does_not_break_the_owner() -> None:
    client = fake_redis()
    mark_epoch(client)
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    owner = MutexOwner(client, "job", ttl=5.0)
    owner.add_listener(broken)
    owner.add_listener(lambda e: seen.append(e.kind))
    with owner:
        assert owner.wait_until_holding(5)
    assert "acquired" in seen and "lost" in seen
    owner.remove_listener(broken)
    with pytest.raises(ValueError):
        owner.remove_listener(broken)


def test_wait_until_holding_times_out_while_another_holds() -> None:
    client = fake_redis()
    mark_epoch(client)
    Lease(client, "job", ttl=30, identity="other").acquire(new_token())
    owner = MutexOwner(client, "job", ttl=5.0)
    with owner:
        assert owner.wait_until_holding(0.2) is False
        assert owner.state == "acquiring"


def test_crash_leaves_the_key_to_expire_and_a_standby_takes_over_after_ttl() -> None:
    from mutexowner.testing import crash

    client = fake_redis()
    sup, worker = supervised()
    a, da, rec_a = make_owner(client, identity="A", supervisor=sup)
    da.step()
    assert worker.started.wait(5)
    crash(a)
    assert worker.exited.wait(5)
    assert a.state == "stopped" and not a.holding
    assert lease_hash(client)[b"identity"] == b"A"  # not released
    assert rec_a.lost == []  # a dead process reports nothing
    b, db, _ = make_owner(client, identity="B", clock=da.clock)
    db.step()
    assert b.state == "acquiring"
    expire_lease(client, "job")  # Redis expires the dead holder's key
    db.advance(b.status().next_attempt_in or 0)
    assert b.holding
    db.stop()


def test_suspended_does_not_spin_while_workers_take_their_time_to_stop() -> None:
    client = fake_redis()
    release = threading.Event()
    sup = Supervisor(shutdown_timeout=2.0)

    def slow_to_stop(ctx: WorkerContext) -> None:
        ctx.stopping.wait(30)
        release.wait(30)  # takes its time after being asked (within shutdown_timeout)

    sup.add(slow_to_stop)
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    server = client.connection_pool.connection_kwargs["server"]
    server.connected = False
    step_down = driver.clock() + (owner.status().lease_remaining or 0) - 2.0
    driver.settle_timeout = 0.0  # do not wait for the slow worker before stepping
    while driver.clock() < step_down:
        driver.advance(driver.step() or 0.01)
    wait = driver.step()
    assert wait is not None and wait > 0  # waits for the next retry or the deadline
    release.set()
    server.connected = True
    driver.settle_timeout = 5.0
    driver.stop()


# -- regressions from the safety review ------------------------------------------------------


def test_workers_may_act_as_soon_as_a_lock_delay_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    client = fake_redis()
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, supervisor=sup)
    driver.step()
    assert worker.started.wait(5)
    _late_retake(owner, driver, client, monkeypatch)
    worker.started.clear()
    assert driver.run_until(lambda: owner.holding, max_seconds=30)
    assert worker.started.wait(5)
    worker.contexts[-1].ensure_held()  # before the first renewal too: the guard is set
    driver.stop()


def test_workers_do_not_start_when_the_lease_is_confirmed_too_late_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = fake_redis()
    sup, worker = supervised(shutdown_timeout=2.0)
    owner, driver, rec = make_owner(client, supervisor=sup)
    real_acquire = owner._lease.acquire

    def slow_acquire(token: str) -> Any:
        result = real_acquire(token)
        driver.clock.advance(owner.ttl - owner.drift - 2.0 + 0.1)  # past the step-down point
        return result

    monkeypatch.setattr(owner._lease, "acquire", slow_acquire)
    driver.step()
    monkeypatch.setattr(owner._lease, "acquire", real_acquire)
    assert owner.state == "holding" and not sup.running  # no worker "stuck by construction"
    # The next renewal gives them a full lease again, and they start.
    assert driver.run_until(lambda: sup.running, max_seconds=owner.renew_interval + 0.1)
    assert worker.started.wait(5)
    driver.stop()


def test_keep_running_retries_every_renew_interval_not_at_the_backoff_cap() -> None:
    client = fake_redis()
    sup, worker = supervised()
    owner, driver, rec = make_owner(client, supervisor=sup, outage="keep_running")
    driver.step()
    client.connection_pool.connection_kwargs["server"].connected = False
    driver.run_for(600.0)
    wait = owner.status().next_attempt_in
    assert wait is not None and wait <= owner.renew_interval
    client.connection_pool.connection_kwargs["server"].connected = True
    driver.stop()


def test_request_stop_only_asks_and_wait_until_holding_needs_start() -> None:
    client = fake_redis("job")
    owner = MutexOwner(client, "job", ttl=5.0)
    with pytest.raises(MutexOwnerError, match="start"):
        owner.wait_until_holding(0.1)
    owner.start()
    assert owner.wait_until_holding(5)
    owner.request_stop()  # what a signal handler may call: sets flags, returns at once
    assert owner.stop(timeout=5)
    assert not client.exists(LeaseKeys("job").lease)


def test_stop_honours_its_timeout_even_with_a_slow_listener() -> None:
    client = fake_redis("job")
    gate = threading.Event()
    owner = MutexOwner(client, "job", ttl=5.0, on_lost=lambda reason: gate.wait(10))
    owner.start()
    assert owner.wait_until_holding(5)
    start = threading.Event()
    assert owner.stop(timeout=0.3) is False  # on_lost still blocks the events thread
    start.set()
    gate.set()
    assert owner.stop(timeout=5) is True


def test_the_first_events_are_delivered_on_the_events_thread() -> None:
    client = fake_redis("job")
    threads: list[str] = []
    owner = MutexOwner(client, "job", ttl=5.0)
    owner.add_listener(lambda e: threads.append(threading.current_thread().name))
    with owner:
        assert owner.wait_until_holding(5)
    assert threads and all(t.startswith("mutexowner-events-") for t in threads)


def test_a_huge_backoff_cap_never_kills_the_owner_thread() -> None:
    client = fake_redis("job")
    client.set(LeaseKeys("job").lease, "not a hash")  # fatal: retried at the cap
    owner = MutexOwner(client, "job", ttl=5.0, backoff=BackoffPolicy(initial=1, max_delay=1e10))
    owner.start()
    deadline = threading.Event()
    for _ in range(500):
        if owner.status().consecutive_errors:
            break
        deadline.wait(0.01)
    assert owner.status().consecutive_errors == 1
    assert any(t.name.startswith("mutexowner-engine-") for t in owner.threads)
    assert owner.stop(timeout=5)


def test_stop_requested_by_a_worker_ends_every_owner_thread_without_another_call() -> None:
    client = fake_redis("job")
    sup = Supervisor(shutdown_timeout=1.0)
    box: list[MutexOwner] = []

    def stopper(ctx: WorkerContext) -> None:
        box[0].stop()
        ctx.stopping.wait(10)

    sup.add(stopper)
    owner = MutexOwner(client, "job", ttl=5.0, supervisor=sup)
    box.append(owner)
    owner.start()
    assert owner._finished_event.wait(10)
    # No second stop(): the autouse fixture fails the test if any mutexowner thread lingers.
