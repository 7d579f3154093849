"""Supervisor inside MutexOwner, over fakeredis: workers run only while the lease is held.

The owners are stepped with ``OwnerDriver`` on a shared ``FakeClock`` (no owner thread, no
real waiting for time); the workers are real threads synchronised with events. A ``Ledger``
shared by every worker of every owner records who ran when, and flags any moment where
workers of two owners ran together, or where a worker ran while Redis named another holder.
Stuck-worker tests never use the default "exit" policy: they pass a callable.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

import pytest
import redis

from mutexowner import LeaseLost, MutexOwner, Supervisor, WorkerContext
from mutexowner.backoff import BackoffPolicy
from mutexowner.lease import LeaseKeys, new_token
from mutexowner.testing import FakeClock, OwnerDriver, fake_redis, mark_epoch
from tests.helpers import REAL_TIMEOUT, Recorder, wait_for

pytestmark = pytest.mark.timeout(60)

NO_JITTER = BackoffPolicy(initial=0.5, factor=2.0, max_delay=30.0, jitter="none")
KEYS = LeaseKeys("job")


def holder(client: Any) -> Optional[bytes]:
    """The identity Redis names as the lease holder (None: free; b"?": unreachable)."""
    try:
        value = client.hget(KEYS.lease, "identity")
    except redis.exceptions.ConnectionError:
        return b"?"
    return None if value is None else bytes(value)


def make_owner(
    client: Any,
    clock: FakeClock,
    sup: Optional[Supervisor],
    identity: str,
    *,
    settle_timeout: float = 5.0,
    **kwargs: Any,
) -> tuple[MutexOwner, OwnerDriver, Recorder]:
    rec = Recorder()
    kwargs.setdefault("backoff", NO_JITTER)
    kwargs.setdefault("stuck_worker_policy", rec.stuck.append)  # never "exit" in tests
    owner = MutexOwner(
        client,
        "job",
        ttl=kwargs.pop("ttl", 10.0),
        identity=identity,
        clock=clock,
        supervisor=sup,
        on_acquired=rec.acquired.append,
        on_lost=rec.lost.append,
        **kwargs,
    )
    owner.add_listener(rec)
    return owner, OwnerDriver(owner, clock, settle_timeout=settle_timeout), rec


class Ledger:
    """Shared by all workers of all owners: who ran, when, and any overlap."""

    def __init__(self, client: Any, clock: FakeClock) -> None:
        self.client = client
        self.clock = clock
        self._cond = threading.Condition()
        self.active: set[tuple[str, str]] = set()
        self.history: list[tuple[str, str, str, float, Optional[int]]] = []
        self.violations: list[str] = []
        self.contexts: dict[tuple[str, str], list[WorkerContext]] = {}

    def worker(self, identity: str) -> Callable[[WorkerContext], None]:
        def work(ctx: WorkerContext) -> None:
            me = (identity, ctx.name)
            ctx.ensure_held()  # a worker starts only while the lease is held
            seen = holder(self.client)
            with self._cond:
                if seen != identity.encode():
                    self.violations.append(f"{me} started while Redis names {seen!r}")
                others = {who for who in self.active if who[0] != identity}
                if others:
                    self.violations.append(f"{me} started while {sorted(others)} run")
                self.active.add(me)
                self.contexts.setdefault(me, []).append(ctx)
                self.history.append((identity, ctx.name, "start", self.clock(), ctx.fencing_token))
                self._cond.notify_all()
            try:
                ctx.stopping.wait()
            finally:
                seen = holder(self.client)
                with self._cond:
                    if seen not in (identity.encode(), b"?"):
                        self.violations.append(f"{me} still ran after Redis named {seen!r}")
                    self.active.discard(me)
                    self.history.append((identity, ctx.name, "end", self.clock(), None))
                    self._cond.notify_all()

        return work

    def supervisor(self, identity: str, *names: str, **kwargs: Any) -> Supervisor:
        kwargs.setdefault("shutdown_timeout", 1.0)
        sup = Supervisor(**kwargs)
        for name in names:
            sup.add(self.worker(identity), name=name)
        return sup

    def wait_running(self, identity: str, *names: str, runs: int = 1) -> None:
        """Wait until each named worker of ``identity`` is running its run number ``runs``."""

        def ready() -> bool:
            return all(
                (identity, n) in self.active and len(self.contexts.get((identity, n), [])) >= runs
                for n in names
            )

        with self._cond:
            assert self._cond.wait_for(ready, REAL_TIMEOUT), (self.active, self.history)

    def wait_stopped(self, identity: str) -> None:
        with self._cond:
            assert self._cond.wait_for(
                lambda: not any(who[0] == identity for who in self.active), REAL_TIMEOUT
            ), self.active


class Stubborn:
    """A worker that ignores ``stopping`` until the test releases it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.saw_stopping = threading.Event()
        self.release = threading.Event()
        self.exited = threading.Event()
        self.contexts: list[WorkerContext] = []

    def __call__(self, ctx: WorkerContext) -> None:
        self.contexts.append(ctx)
        self.started.set()
        try:
            ctx.stopping.wait()
            self.saw_stopping.set()
            assert self.release.wait(30), "the test never released the stuck worker"
        finally:
            self.exited.set()


def renew_once(driver: OwnerDriver) -> None:
    """Jump to the owner's next Redis call and make it."""
    driver.advance(driver.owner.status().next_attempt_in or 0.0)


# -- workers run only while holding ----------------------------------------------------------


def test_workers_run_only_while_holding_and_hand_over_without_overlap() -> None:
    client = fake_redis()
    mark_epoch(client, "job")
    clock = FakeClock()
    ledger = Ledger(client, clock)
    a, da, rec_a = make_owner(client, clock, ledger.supervisor("A", "reader", "writer"), "A")
    b, db, rec_b = make_owner(client, clock, ledger.supervisor("B", "reader", "writer"), "B")
    da.step()
    assert a.state == "holding"
    ledger.wait_running("A", "reader", "writer")
    db.step()
    assert b.state == "acquiring" and b.supervisor is not None and not b.supervisor.running
    da.run_for(30.0)  # A renews; B, told "taken", waits
    db.step()
    assert b.state == "acquiring" and not b.supervisor.running
    token_a = a.fencing_token
    assert all(ctx.fencing_token == token_a for ctx in ledger.contexts[("A", "reader")])
    # A hands over: its workers stop while it still holds the key, then it releases.
    assert da.stop()
    assert a.state == "stopped" and holder(client) is None
    ledger.wait_stopped("A")
    db.notify_released()
    db.step()
    assert b.holding
    ledger.wait_running("B", "reader", "writer")
    token_b = b.fencing_token
    assert token_a is not None and token_b is not None and token_b > token_a
    assert [ctx.fencing_token for ctx in ledger.contexts[("B", "writer")]] == [token_b]
    assert db.stop()
    assert ledger.violations == []
    ends_a = [t for who, _, what, t, _ in ledger.history if who == "A" and what == "end"]
    starts_b = [t for who, _, what, t, _ in ledger.history if who == "B" and what == "start"]
    assert max(ends_a) <= min(starts_b)
    assert rec_a.lost == ["stopped"] and rec_b.lost == ["stopped"]
    assert rec_a.stuck == [] and rec_b.stuck == []


def test_no_worker_runs_during_the_lock_delay() -> None:
    client = fake_redis()  # empty Redis: the first acquisition waits out a lock-delay
    clock = FakeClock()
    ledger = Ledger(client, clock)
    sup = ledger.supervisor("A", "reader", "writer")
    owner, driver, rec = make_owner(client, clock, sup, "A")
    driver.step()
    delay = owner.status().lock_delay_remaining
    assert delay is not None and delay >= owner.ttl  # at least one ttl
    assert not owner.holding and not sup.running
    driver.run_for(delay - 0.0625)  # renewing (or retrying) all along, never starting workers
    assert not owner.holding and not sup.running and ledger.history == []
    assert rec.acquired == [] and rec.kinds().count("workers_restarted") == 0
    assert driver.stop()
    assert ledger.history == [] and ledger.violations == []


# -- losing the lease ------------------------------------------------------------------------


def test_lease_taken_stops_workers_at_once_and_they_restart_on_reacquisition() -> None:
    client = fake_redis()
    mark_epoch(client, "job")
    clock = FakeClock()
    ledger = Ledger(client, clock)
    sup = ledger.supervisor("A", "reader", "writer")
    owner, driver, rec = make_owner(client, clock, sup, "A")
    driver.step()
    ledger.wait_running("A", "reader", "writer")
    first = ledger.contexts[("A", "reader")][0]
    token = owner.fencing_token
    # Another node's token in the key (say, after a long pause of ours).
    client.hset(KEYS.lease, mapping={"token": new_token(), "identity": "intruder"})
    client.pexpire(KEYS.lease, 7000)
    renew_once(driver)
    assert owner.state == "acquiring" and rec.lost == ["taken"]
    ledger.wait_stopped("A")
    # The workers stopped as soon as the owner saw the other token (they see it too).
    assert sorted(ledger.violations) == [
        f"('A', '{name}') still ran after Redis named b'intruder'" for name in ("reader", "writer")
    ]
    ledger.violations.clear()
    assert sup.wait_idle(REAL_TIMEOUT) and not sup.running
    with pytest.raises(LeaseLost):
        first.ensure_held()
    # No worker while another holds the key; back once the key is ours again.
    driver.run_for(5.0)
    assert not sup.running and len(ledger.contexts[("A", "reader")]) == 1
    client.delete(KEYS.lease)  # the intruder's lease expires (fakeredis ttls are real time)
    assert driver.run_until(lambda: owner.holding, max_seconds=10.0)
    ledger.wait_running("A", "reader", "writer", runs=2)
    again = ledger.contexts[("A", "reader")][1]
    assert again is not first and again.restart_count == 0
    assert again.fencing_token == owner.fencing_token and token is not None
    assert again.fencing_token is not None and again.fencing_token > token
    assert driver.stop()
    assert ledger.violations == []


def test_an_outage_stops_workers_before_the_local_deadline() -> None:
    client = fake_redis()
    mark_epoch(client, "job")
    clock = FakeClock()
    ledger = Ledger(client, clock)
    sup = ledger.supervisor("A", "reader", "writer", shutdown_timeout=2.0)
    owner, driver, rec = make_owner(client, clock, sup, "A")
    driver.step()
    ledger.wait_running("A", "reader", "writer")
    deadline = clock() + (owner.status().lease_remaining or 0.0)
    client.connection_pool.connection_kwargs["server"].connected = False
    assert driver.run_until(lambda: not sup.running, max_seconds=20.0)
    ends = [t for _, _, what, t, _ in ledger.history if what == "end"]
    assert len(ends) == 2 and all(deadline - 2.0 <= t <= deadline for t in ends)
    assert owner.state == "suspended" and owner.holding  # stopped with the budget to spare
    assert driver.run_until(lambda: owner.state == "acquiring", max_seconds=20.0)
    assert rec.lost == ["expired"] and not sup.running
    client.connection_pool.connection_kwargs["server"].connected = True
    assert driver.stop()


# -- a crash loop hands the lease over -------------------------------------------------------


def test_a_crash_loop_releases_the_lease_and_another_owner_takes_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = fake_redis()
    mark_epoch(client, "job")
    clock = FakeClock()
    ledger = Ledger(client, clock)
    sup_a = ledger.supervisor("A", "reader", max_restarts=2, max_seconds=60.0)
    crashes: list[int] = []

    def crasher(ctx: WorkerContext) -> None:
        crashes.append(ctx.restart_count)
        raise RuntimeError("bad config")

    sup_a.add(crasher)
    a, da, rec_a = make_owner(client, clock, sup_a, "A")
    b, db, rec_b = make_owner(client, clock, ledger.supervisor("B", "reader"), "B")
    da.step()
    assert sup_a.wait_idle(REAL_TIMEOUT) and sup_a.failed and sup_a.restarts == 2
    assert crashes == [0, 1, 2]
    assert da.run_until(lambda: a.state == "acquiring", max_seconds=1.0)
    assert rec_a.lost == ["workers_failed"]
    assert rec_a.kinds().count("workers_restarted") == 2
    assert holder(client) is None  # released so that a healthy node can take over
    assert a.status().next_attempt_in == pytest.approx(0.5)  # backs off, then contends again
    db.step()
    assert b.holding
    ledger.wait_running("B", "reader")
    renew_once(da)  # A's next attempt finds B holding
    assert a.state == "acquiring" and not sup_a.running
    assert len(ledger.contexts[("A", "reader")]) == 3
    assert db.stop() and da.stop()
    assert ledger.violations == []
    tracebacks = [r for r in caplog.records if r.getMessage() == "worker crasher crashed"]
    assert len(tracebacks) == 3 and all(r.exc_info is not None for r in tracebacks)


# -- stuck workers ---------------------------------------------------------------------------


def stuck_setup(
    max_restarts: int = 3,
) -> tuple[MutexOwner, OwnerDriver, Recorder, Any, Supervisor, Stubborn, threading.Event]:
    """An owner holding, with a cooperative worker and a stubborn one (1 s budget)."""
    client = fake_redis()
    mark_epoch(client, "job")
    clock = FakeClock()
    sup = Supervisor(max_restarts=max_restarts, shutdown_timeout=1.0)
    stubborn = Stubborn()
    crash = threading.Event()

    def cooperative(ctx: WorkerContext) -> None:
        while not ctx.stopping.wait(0.005):
            if crash.is_set():
                raise RuntimeError("crash on request")

    sup.add(cooperative, name="good")
    sup.add(stubborn, name="stubborn")
    # settle_timeout: the driver waits that long (real) per step for a stuck worker.
    owner, driver, rec = make_owner(client, clock, sup, "A", settle_timeout=0.05)
    driver.step()
    assert owner.state == "holding" and stubborn.started.wait(REAL_TIMEOUT)
    return owner, driver, rec, client, sup, stubborn, crash


def wait_stuck(driver: OwnerDriver, sup: Supervisor, stubborn: Stubborn) -> None:
    """Let the 1 s shutdown budget pass in fake time; wait for the report."""
    assert stubborn.saw_stopping.wait(REAL_TIMEOUT)
    # The cooperative worker exits first (real time): only then may fake time pass, or a
    # loaded machine would see it "stuck" too.
    assert wait_for(lambda: sup.alive_workers == ("stubborn",))
    driver.advance(1.0)
    assert wait_for(lambda: sup.stuck_workers == ("stubborn",))


def test_after_stop_a_stuck_worker_keeps_the_lease_renewed_until_it_exits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner, driver, rec, client, sup, stubborn, _ = stuck_setup()
    other, dother, _ = make_owner(client, driver.clock, None, "B")
    owner.stop()
    driver.step()
    assert owner.state == "draining"
    wait_stuck(driver, sup, stubborn)
    assert owner.status().stuck_workers == ("stubborn",)
    # The monitor reports to the owner right after it marks the worker stuck.
    assert wait_for(
        lambda: any(e.kind == "workers_stuck" and e.detail == "stubborn" for e in rec.events)
    )
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL] == [
        "worker stubborn ignored stopping for 1 s (shutdown_timeout) and is still running (key=job)"
    ]
    renewed = rec.kinds().count("renewed")
    for _ in range(9):  # three ttls: the lease would have expired without renewals
        renew_once(driver)
        assert owner.state == "draining" and owner.holding
        assert holder(client) == b"A"
        dother.step()  # no other node can start a second copy meanwhile
        assert other.state == "acquiring"
    assert rec.kinds().count("renewed") - renewed == 9
    assert rec.stuck == [] and rec.lost == []  # the lease was never lost: no policy
    stubborn.release.set()
    assert driver.run_until(lambda: owner.state == "stopped", max_seconds=1.0)
    assert holder(client) is None and rec.lost == ["stopped"]
    assert owner.status().stuck_workers == () and rec.stuck == []
    assert dother.stop()


def test_after_workers_failed_a_stuck_worker_keeps_the_lease_until_it_exits() -> None:
    owner, driver, rec, client, sup, stubborn, crash = stuck_setup(max_restarts=0)
    crash.set()  # "good" crashes; with max_restarts=0 the supervisor gives up at once
    assert wait_for(lambda: (driver.step(), owner.state == "draining")[1])
    assert sup.failed and rec.lost == []
    wait_stuck(driver, sup, stubborn)
    assert owner.status().stuck_workers == ("stubborn",)
    for _ in range(6):
        renew_once(driver)
        assert owner.state == "draining" and holder(client) == b"A"
    assert rec.stuck == []
    stubborn.release.set()
    assert driver.run_until(lambda: owner.state == "acquiring", max_seconds=1.0)
    assert rec.lost == ["workers_failed"] and holder(client) is None
    assert owner.status().next_attempt_in == pytest.approx(0.5)
    assert driver.stop()


def test_lease_lost_while_a_worker_is_stuck_applies_the_policy_and_never_runs_twice() -> None:
    owner, driver, rec, client, sup, stubborn, crash = stuck_setup(max_restarts=0)
    crash.set()
    assert wait_for(lambda: (driver.step(), owner.state == "draining")[1])
    wait_stuck(driver, sup, stubborn)
    client.hset(KEYS.lease, mapping={"token": new_token(), "identity": "intruder"})
    client.pexpire(KEYS.lease, 4000)
    renew_once(driver)
    assert owner.state == "acquiring" and rec.lost == ["taken"]
    driver.step()
    assert rec.stuck == [("stubborn",)]  # the callable policy, with the worker's name
    applied = [e for e in rec.events if e.kind == "stuck_policy"]
    assert len(applied) == 1 and applied[0].detail == "stubborn"
    assert applied[0].reason == "lease_lost"
    # While the stuck worker lives the owner does not contend, even once the key is free.
    client.delete(KEYS.lease)
    driver.advance(10.0)
    assert owner.state == "acquiring" and holder(client) is None and sup.running
    stubborn.release.set()
    assert sup.wait_idle(REAL_TIMEOUT)
    assert driver.run_until(lambda: owner.holding, max_seconds=60.0)
    assert rec.stuck == [("stubborn",)]
    stubborn.release.set()
    assert driver.stop()


def test_abandon_policy_logs_critical_and_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    client = fake_redis()
    mark_epoch(client, "job")
    clock = FakeClock()
    sup = Supervisor(shutdown_timeout=1.0)
    stubborn = Stubborn()
    sup.add(stubborn, name="stubborn")
    owner, driver, rec = make_owner(
        client, clock, sup, "A", settle_timeout=0.05, stuck_worker_policy="abandon"
    )
    driver.step()
    assert stubborn.started.wait(REAL_TIMEOUT)
    client.hset(KEYS.lease, mapping={"token": new_token(), "identity": "intruder"})
    renew_once(driver)  # taken: workers told to stop at once
    assert owner.state == "acquiring"
    wait_stuck(driver, sup, stubborn)
    driver.step()
    assert any(
        "applying stuck_worker_policy='abandon'" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.CRITICAL
    )
    assert owner.state == "acquiring"  # the process lives on (unsafe: the user's choice)
    stubborn.release.set()
    assert sup.wait_idle(REAL_TIMEOUT)
    assert driver.stop()


def test_draining_with_a_stuck_worker_waits_for_the_next_renewal_not_a_hot_loop() -> None:
    owner, driver, rec, client, sup, stubborn, _ = stuck_setup()
    try:
        owner.stop()
        driver.step()
        wait_stuck(driver, sup, stubborn)
        wait = driver.step()
        assert wait is not None and wait == pytest.approx(owner.status().next_attempt_in or 0)
        assert wait > 0
    finally:
        stubborn.release.set()
        driver.stop()


def test_lease_lost_after_stop_while_a_worker_is_stuck_applies_the_policy() -> None:
    owner, driver, rec, client, sup, stubborn, _ = stuck_setup()
    try:
        owner.stop()
        driver.step()
        wait_stuck(driver, sup, stubborn)
        client.hset(KEYS.lease, mapping={"token": new_token(), "identity": "intruder"})
        driver.clock.advance(owner.status().next_attempt_in or 0.0)
        driver.step()
        assert rec.lost == ["taken"]
        driver.step()
        assert rec.stuck == [("stubborn",)]  # applied before the owner ends
        assert owner.state == "stopped" and holder(client) == b"intruder"
    finally:
        stubborn.release.set()
        driver.stop()


# -- threads for real ------------------------------------------------------------------------


def test_owner_stop_is_idempotent_and_leaves_no_thread_behind() -> None:
    client = fake_redis()
    mark_epoch(client, "job")
    before = set(threading.enumerate())
    sup = Supervisor(shutdown_timeout=1.0)
    running = threading.Barrier(3)

    def work(ctx: WorkerContext) -> None:
        running.wait(REAL_TIMEOUT)
        while not ctx.sleep(0.01):
            ctx.ensure_held()

    sup.add(work, name="a")
    sup.add(work, name="b")
    owner = MutexOwner(client, "job", ttl=5.0, supervisor=sup, stuck_worker_policy="abandon")
    owner.start()
    running.wait(REAL_TIMEOUT)
    assert owner.holding and sup.running
    assert owner.stop(timeout=REAL_TIMEOUT) is True
    assert set(threading.enumerate()) == before
    assert owner.stop() is True and sup.stop() is True
    assert owner.state == "stopped" and not sup.running and holder(client) is None
