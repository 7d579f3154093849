"""Regression tests for issue 10: paths to two runners, a dead owner thread or a key left held.

Each test failed on the code before its fix (checked by running it against that commit):

- a log handler that blocks stalled both step-down paths (the owner thread logged while
  holding its lock, the supervisor's monitor logged before it signalled the workers);
- a ``stuck_worker_policy`` callable raising ``SystemExit`` ended the owner thread, so
  nothing renewed or released and ``stop()`` never completed;
- a late renewal reply during ``stop()`` was processed after ``stopped`` (an event after
  ``stopped``) and left the key held; an acquire executed by Redis whose reply was lost
  while ``stop()`` was pending left the key held for a full ttl;
- the "exit" policy fired at the deadline itself (and logged first), too late to be gone
  before Redis could expire the key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import redis

from mutexowner import BackoffPolicy, MutexOwner, Supervisor, WorkerContext, clock, owner
from mutexowner import engine as engine_module
from mutexowner import slot as slot_module
from mutexowner.lease import LeaseKeys
from mutexowner.testing import FakeClock, OwnerDriver, expire_lease, fake_redis
from tests.helpers import REAL_TIMEOUT, Recorder, errors_of, wait_for

TTL = 10.0
DRIFT = TTL * 0.01 + 0.002
NO_JITTER = BackoffPolicy(initial=0.5, max_delay=30.0, jitter="none")


class BlockingHandler(logging.Handler):
    """A log handler whose ``emit`` blocks until released (a full pipe, a stuck socket)."""

    def __init__(self, only_threads: Optional[set[int]] = None) -> None:
        super().__init__(logging.DEBUG)
        self.gate = threading.Event()
        self.blocked = threading.Event()
        self.only_threads = only_threads
        self.except_threads: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if self.only_threads is not None and record.thread not in self.only_threads:
            return
        if record.thread in self.except_threads:
            return
        self.blocked.set()
        self.gate.wait(60)


@pytest.fixture
def blocking_handler() -> Iterator[BlockingHandler]:
    """Installed on the library's logger at INFO; always released and removed at teardown."""
    handler = BlockingHandler()
    logger = logging.getLogger("mutexowner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        handler.gate.set()
        logger.removeHandler(handler)
        logger.setLevel(level)


class Worker:
    """Records its runs; ``stubborn`` workers ignore ``stopping`` until ``let_go`` is set."""

    def __init__(self, stubborn: bool = False) -> None:
        self.stubborn = stubborn
        self.started = threading.Event()
        self.exited = threading.Event()
        self.let_go = threading.Event()
        self.contexts: list[WorkerContext] = []
        self.started_at: list[float] = []
        self.exited_at: list[float] = []

    def __call__(self, ctx: WorkerContext) -> None:
        self.contexts.append(ctx)
        self.started_at.append(time.monotonic())
        self.exited.clear()
        self.started.set()
        try:
            if self.stubborn:
                self.let_go.wait(60)
            else:
                ctx.stopping.wait(60)
        finally:
            self.exited_at.append(time.monotonic())
            self.exited.set()


def supervised_owner(
    client: Any,
    fake: FakeClock,
    identity: str,
    worker: Worker,
    *,
    shutdown_timeout: float = 1.0,
    **kwargs: Any,
) -> tuple[MutexOwner, Recorder]:
    sup = Supervisor(shutdown_timeout=shutdown_timeout)
    sup.add(worker, name=f"w-{identity}")
    rec = Recorder()
    kwargs.setdefault("stuck_worker_policy", rec.stuck.append)
    mo = MutexOwner(
        client,
        "job",
        ttl=TTL,
        identity=identity,
        clock=fake,
        supervisor=sup,
        backoff=NO_JITTER,
        **kwargs,
    )
    mo.add_listener(rec)
    return mo, rec


def redis_down(mo: MutexOwner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lease call of ``mo`` fails as if Redis were unreachable."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Connection refused")

    for name in ("acquire", "renew", "release"):
        monkeypatch.setattr(mo._lease, name, refuse)


def walk(fake: FakeClock, until: float, done: threading.Event, step: float = 0.01) -> None:
    """Move fake time forward in small steps (as a real clock passes) until ``done`` is set
    or ``until`` is reached, giving the owner's threads a moment at each step."""
    while not done.is_set() and fake() < until:
        fake.advance(step)
        done.wait(0.002)


def owner_threads(mo: MutexOwner) -> set[int]:
    """Thread idents of an owner's own threads: engine, events, supervisor monitor."""
    threads = list(mo.threads)
    if mo.supervisor is not None:
        threads.append(mo.supervisor._monitor)
    return {t.ident or 0 for t in threads if t is not None}


def engine_alive(mo: MutexOwner) -> bool:
    return any(t.name.startswith("mutexowner-engine-") for t in mo.threads)


def in_thread(fn: Any, timeout: float = REAL_TIMEOUT) -> tuple[bool, Any]:
    """Run ``fn`` in a thread: (finished within ``timeout``, its result)."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    return (not thread.is_alive(), box[0] if box else None)


# -- 2. step-down never waits on logging -------------------------------------------------------


def test_a_blocked_log_handler_does_not_delay_either_step_down_path(
    monkeypatch: pytest.MonkeyPatch, blocking_handler: BlockingHandler
) -> None:
    fake = FakeClock()
    client = fake_redis("job")
    worker_a, worker_b = Worker(), Worker()
    a, _ = supervised_owner(client, fake, "A", worker_a)
    b, rec_b = supervised_owner(client, fake, "B", worker_b)
    blocking_handler.gate.set()  # let start-up log freely
    a.start()
    assert wait_for(lambda: a.holding) and worker_a.started.wait(REAL_TIMEOUT)
    b.start()
    assert wait_for(lambda: b.state == "acquiring" and b.status().next_attempt_in is not None)
    # From now on, every line A's threads log blocks forever; B logs freely.
    blocking_handler.only_threads = owner_threads(a)
    blocking_handler.gate.clear()
    redis_down(a, monkeypatch)  # A's Redis is cut off: its renewals fail (and it logs them)
    fake.advance(TTL / 3 + 0.01)
    assert blocking_handler.blocked.wait(REAL_TIMEOUT), "A's owner thread never logged"
    # The owner thread is stuck in a handler; the lease's state stays readable without it.
    done, holding = in_thread(lambda: a.holding)
    assert done, "a.holding waited on a log handler"
    assert holding is True
    # Step-down point (deadline - shutdown_timeout): A's worker is told to stop.
    fake.set(1000.0 + TTL - DRIFT - 1.0 + 0.001)
    assert worker_a.exited.wait(REAL_TIMEOUT), "A's worker ran on past its step-down point"
    done, holding = in_thread(lambda: a.holding)
    assert done and holding is True  # still before the deadline
    fake.set(1000.0 + TTL - DRIFT + 0.001)
    done, holding = in_thread(lambda: a.holding)
    assert done and holding is False
    # Redis expires A's key; B takes over, and its worker starts after A's exited.
    expire_lease(client, "job")
    b.slot.notify_released()
    assert wait_for(lambda: b.holding) and worker_b.started.wait(REAL_TIMEOUT)
    assert worker_a.exited_at[-1] <= worker_b.started_at[0]
    blocking_handler.gate.set()
    assert b.stop(REAL_TIMEOUT) and a.stop(REAL_TIMEOUT)


def test_holding_status_and_stop_never_wait_on_a_blocked_handler(
    monkeypatch: pytest.MonkeyPatch, blocking_handler: BlockingHandler
) -> None:
    # The owner thread logs a failed renewal; with the handler blocked it stalls in its log
    # flush, but never while holding the lock that holding/status()/stop() need.
    fake = FakeClock()
    mo = MutexOwner(fake_redis("job"), "job", ttl=TTL, clock=fake, backoff=NO_JITTER)
    blocking_handler.gate.set()
    mo.start()
    assert wait_for(lambda: mo.holding) and engine_alive(mo)
    blocking_handler.only_threads = owner_threads(mo)
    blocking_handler.gate.clear()
    redis_down(mo, monkeypatch)
    fake.advance(TTL / 3 + 0.01)
    assert blocking_handler.blocked.wait(REAL_TIMEOUT)
    done, _ = in_thread(mo.status)
    assert done, "status() waited on a log handler"
    done, _ = in_thread(lambda: mo.holding)
    assert done
    assert mo.stop(timeout=0.05) is False  # the owner thread cannot end while it is blocked
    blocking_handler.gate.set()
    assert mo.stop(REAL_TIMEOUT)


def test_starting_workers_never_waits_on_a_blocked_handler(
    blocking_handler: BlockingHandler,
) -> None:
    # The owner thread starts the workers (Supervisor.start()): that path must not log.
    logging.getLogger("mutexowner").setLevel(logging.DEBUG)
    blocking_handler.except_threads = {threading.get_ident()}
    fake = FakeClock()
    worker = Worker()
    mo, _ = supervised_owner(fake_redis("job"), fake, "A", worker)
    mo.start()
    assert worker.started.wait(REAL_TIMEOUT), "the worker never started"
    done, holding = in_thread(lambda: mo.holding)
    assert done and holding is True
    blocking_handler.gate.set()
    assert mo.stop(REAL_TIMEOUT)


# -- 3. user code cannot end an owner thread ---------------------------------------------------


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), RuntimeError("boom")])
def test_a_stuck_policy_that_raises_anything_does_not_end_the_owner_thread(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    fake = FakeClock()
    client = fake_redis("job")
    worker = Worker(stubborn=True)
    calls: list[tuple[str, ...]] = []
    applied = threading.Event()

    def policy(names: tuple[str, ...]) -> None:
        calls.append(names)
        applied.set()
        raise exc

    mo, rec = supervised_owner(client, fake, "A", worker, stuck_worker_policy=policy)
    mo.start()
    assert wait_for(lambda: mo.holding) and worker.started.wait(REAL_TIMEOUT)
    redis_down(mo, monkeypatch)
    walk(fake, 1000.0 + TTL + 2.0, applied)  # past the deadline; the worker ignores stopping
    assert applied.is_set(), "the policy was never applied"
    assert wait_for(lambda: mo.state == "acquiring")
    fake.advance(1.0)
    assert engine_alive(mo), "the engine thread died"
    worker.let_go.set()  # the stuck worker ends: the owner contends again (Redis is down)
    assert wait_for(lambda: mo.status().consecutive_errors >= 1)
    assert mo.stop(REAL_TIMEOUT), "stop() never completed"


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_callbacks_and_listeners_that_raise_base_exceptions_do_not_end_any_thread(
    exc: BaseException,
) -> None:
    seen: list[str] = []

    def raising(value: object) -> None:
        seen.append(str(value))
        raise exc

    mo = MutexOwner(fake_redis("job"), "job", ttl=5.0, on_acquired=raising, on_lost=raising)
    mo.add_listener(raising)
    mo.start()
    assert mo.wait_until_holding(REAL_TIMEOUT)
    assert wait_for(lambda: len(seen) >= 2)
    assert mo.stop(REAL_TIMEOUT)
    assert "stopped" in seen  # on_lost was still called, after on_acquired raised


def test_a_stuck_policy_callable_that_blocks_does_not_stop_the_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by review: the callable ran on the owner thread; one that blocks stopped it.
    fake = FakeClock()
    worker = Worker(stubborn=True)
    called = threading.Event()
    release = threading.Event()

    def blocking_policy(names: tuple[str, ...]) -> None:
        called.set()
        release.wait(60)

    mo, _ = supervised_owner(
        fake_redis("job"), fake, "A", worker, stuck_worker_policy=blocking_policy
    )
    mo.start()
    assert wait_for(lambda: mo.holding) and worker.started.wait(REAL_TIMEOUT)
    redis_down(mo, monkeypatch)
    walk(fake, 1000.0 + TTL + 2.0, called)
    assert called.is_set()
    try:
        errors = errors_of(mo)
        worker.let_go.set()  # the stuck worker ends: a live owner turns and contends again
        seen = len(errors)
        retried = threading.Event()
        mo.add_listener(lambda e: retried.set() if len(errors) > seen else None)
        walk(fake, fake() + 60.0, retried, step=0.1)  # through its backoff
        assert retried.is_set(), mo.status()
    finally:
        release.set()
    assert mo.stop(REAL_TIMEOUT)


def test_stop_says_false_while_a_stuck_worker_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClock()
    worker = Worker(stubborn=True)
    mo, _ = supervised_owner(fake_redis("job"), fake, "A", worker, stuck_worker_policy="abandon")
    mo.start()
    assert wait_for(lambda: mo.holding) and worker.started.wait(REAL_TIMEOUT)
    mo.request_stop()
    walk(fake, 1000.0 + TTL + 2.0, threading.Event(), step=0.05)  # past the lease
    assert mo.stop(timeout=0.5) is False  # its thread is alive: stop() must not say done
    worker.let_go.set()
    assert mo.stop(REAL_TIMEOUT) is True


def test_a_crashed_worker_is_seen_as_ended_even_when_its_log_line_blocks(
    blocking_handler: BlockingHandler,
) -> None:
    # Found by review: "worker crashed" was logged before run.done; with a blocked handler
    # the worker looked stuck (and the "exit" policy would have ended the process).
    sup = Supervisor(shutdown_timeout=1.0, max_restarts=0)
    go = threading.Event()

    def crasher(ctx: WorkerContext) -> None:
        go.wait(REAL_TIMEOUT)
        raise RuntimeError("boom")

    sup.add(crasher, name="crasher")
    sup.start()
    blocking_handler.except_threads = {threading.get_ident()}
    go.set()
    try:
        assert wait_for(lambda: sup.alive_workers == ()), sup.alive_workers
        assert sup.stuck_workers == ()
    finally:
        blocking_handler.gate.set()
    assert sup.stop(REAL_TIMEOUT)


# -- 4. a late or lost reply during stop() leaves no key and no event after "stopped" -----------


def holder(client: Any, fake: FakeClock) -> tuple[MutexOwner, OwnerDriver, Recorder]:
    rec = Recorder()
    mo = MutexOwner(client, "job", ttl=TTL, identity="A", clock=fake, backoff=NO_JITTER)
    mo.add_listener(rec)
    driver = OwnerDriver(mo, fake)
    return mo, driver, rec


def assert_clean_stop(client: Any, rec: Recorder) -> None:
    kinds = rec.kinds()
    last_stopped = max(i for i, e in enumerate(rec.events) if e.state == "stopped")
    assert last_stopped == len(kinds) - 1, f"events after stopped: {kinds[last_stopped:]}"
    assert not client.exists(LeaseKeys("job").lease), "stop() left the key held"


def test_a_renewal_answered_after_the_deadline_while_stop_is_pending_is_released() -> None:
    client, fake = fake_redis("job"), FakeClock()
    mo, driver, rec = holder(client, fake)
    driver.step()
    assert mo.holding
    real = mo._lease.renew

    def renew_while_stop_is_requested(token: str, fence: int) -> Any:
        mo.request_stop()  # stop() arrives while the renewal is on its way...
        result = real(token, fence)  # ...Redis renews the key (fresh ttl)...
        fake.advance(TTL)  # ...and the reply comes after the local deadline
        return result

    mo._lease.renew = renew_while_stop_is_requested  # type: ignore[method-assign]
    assert driver.run_until(lambda: mo.state == "stopped", max_seconds=2 * TTL)
    assert_clean_stop(client, rec)
    assert "renewed" not in rec.kinds()


def test_an_acquire_whose_reply_was_lost_while_stop_is_pending_is_released() -> None:
    client, fake = fake_redis("job"), FakeClock()
    mo, driver, rec = holder(client, fake)
    real = mo._lease.acquire

    def acquire_then_lose_reply(token: str) -> Any:
        mo.request_stop()
        real(token)  # the script ran in Redis: the key holds our token...
        raise redis.exceptions.TimeoutError("Timeout reading from socket")  # ...reply lost

    mo._lease.acquire = acquire_then_lose_reply  # type: ignore[method-assign]
    assert driver.run_until(lambda: mo.state == "stopped", max_seconds=TTL)
    assert_clean_stop(client, rec)
    assert "acquired" not in rec.kinds()


def test_a_stop_releases_a_token_left_in_redis_by_an_earlier_lost_reply() -> None:
    # Lost reply on one attempt, then the key is taken over by a fresh token of ours after
    # a deadline: both may be in Redis; stop() gives back whichever is.
    client, fake = fake_redis("job"), FakeClock()
    mo, driver, rec = holder(client, fake)
    real = mo._lease.acquire
    lost = []

    def lose_first_reply(token: str) -> Any:
        result = real(token)
        if not lost:
            lost.append(token)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return result

    mo._lease.acquire = lose_first_reply  # type: ignore[method-assign]
    assert driver.run_until(lambda: mo.holding, max_seconds=TTL)
    assert lost and mo.slot.core.token == lost[0]  # idempotent acquire: the same token
    driver.stop()
    assert_clean_stop(client, rec)


# -- 7. clocks and the "exit" policy -----------------------------------------------------------


def test_the_exit_policy_fires_before_the_deadline_and_without_waiting_on_logging(
    monkeypatch: pytest.MonkeyPatch, blocking_handler: BlockingHandler
) -> None:
    fake = FakeClock()
    worker = Worker(stubborn=True)
    mo, _ = supervised_owner(fake_redis("job"), fake, "A", worker, stuck_worker_policy="exit")
    exits: list[tuple[int, float, bool]] = []
    exited = threading.Event()
    entered_at: list[float] = []
    real_exit_process = slot_module.exit_process

    def exit_process(message: str, *args: object) -> None:
        entered_at.append(fake())
        real_exit_process(message, *args)

    def fake_exit(status: int) -> None:  # records instead of ending the test process
        exits.append((status, fake(), blocking_handler.gate.is_set()))
        exited.set()  # returns: the thread that called it then simply ends its work

    monkeypatch.setattr(slot_module, "exit_process", exit_process)
    monkeypatch.setattr(slot_module.os, "_exit", fake_exit)
    blocking_handler.gate.set()
    mo.start()
    assert wait_for(lambda: mo.holding) and worker.started.wait(REAL_TIMEOUT)
    blocking_handler.only_threads = owner_threads(mo)
    blocking_handler.gate.clear()  # from now on every log line of the owner's threads blocks
    redis_down(mo, monkeypatch)
    deadline = 1000.0 + TTL - DRIFT
    walk(fake, deadline + 1.0, exited)
    assert exited.wait(REAL_TIMEOUT), "the exit waited on a blocked log handler"
    status, _, handler_released = exits[0]
    assert status == owner.STUCK_EXIT_STATUS
    assert not handler_released
    # Due EXIT_MARGIN before the deadline (three 10 ms steps of slack for the walk: still
    # well before the deadline, where the exit used to fire).
    assert deadline - 1.0 <= entered_at[0] <= deadline - owner.EXIT_MARGIN + 0.03
    blocking_handler.gate.set()
    worker.let_go.set()
    assert mo.stop(REAL_TIMEOUT)


def test_the_exit_policy_fires_on_time_while_the_owner_thread_is_stuck_in_a_redis_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by review: a lease call can outlive call_timeout (a reconnect blocks in DNS), and
    # the owner thread applied "exit" only after its turn: 1.99 s of two workers (real Redis).
    fake = FakeClock()
    worker = Worker(stubborn=True)
    mo, _ = supervised_owner(fake_redis("job"), fake, "A", worker, stuck_worker_policy="exit")
    entered_at: list[float] = []
    exited = threading.Event()

    def exit_process(message: str, *args: object) -> None:
        entered_at.append(fake())
        exited.set()  # stands in for os._exit (returning ends the watchdog's work)

    monkeypatch.setattr(slot_module, "exit_process", exit_process)
    mo.start()
    assert wait_for(lambda: mo.holding) and worker.started.wait(REAL_TIMEOUT)
    unblock = threading.Event()

    def hang(*args: object, **kwargs: object) -> object:
        unblock.wait(60)  # far longer than call_timeout
        raise redis.exceptions.ConnectionError("Error -3 connecting: Temporary failure in DNS")

    monkeypatch.setattr(mo._lease, "renew", hang)
    deadline = 1000.0 + TTL - DRIFT
    try:
        walk(fake, deadline + 1.0, exited)
        assert exited.is_set(), "the exit waited for the owner thread's Redis call"
        assert deadline - 1.0 <= entered_at[0] <= deadline - owner.EXIT_MARGIN + 0.03
    finally:
        unblock.set()
        worker.let_go.set()
    assert mo.stop(REAL_TIMEOUT)


class RecordingCondition:
    """Stands in for a Condition: records the timeouts a waiter asks for."""

    def __init__(self) -> None:
        self.timeouts: list[Optional[float]] = []

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.timeouts.append(timeout)
        return False


def test_safety_waits_are_capped_so_a_suspend_or_clock_step_is_noticed() -> None:
    cond = RecordingCondition()
    clock.wait_on(time.monotonic, cond, 60.0, cap=clock.SAFETY_WAIT_CAP)  # type: ignore[arg-type]
    clock.wait_on(time.monotonic, cond, None, cap=clock.SAFETY_WAIT_CAP)  # type: ignore[arg-type]
    clock.wait_on(time.monotonic, cond, 0.1, cap=clock.SAFETY_WAIT_CAP)  # type: ignore[arg-type]
    clock.wait_on(time.monotonic, cond, 60.0)  # type: ignore[arg-type]
    assert cond.timeouts == [clock.SAFETY_WAIT_CAP, clock.SAFETY_WAIT_CAP, 0.1, 60.0]


def test_the_owner_thread_caps_its_waits_only_while_it_has_a_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caps: dict[str, set[Optional[float]]] = {}
    real_wait_on = engine_module.wait_on

    def recording(clk: Any, cond: Any, timeout: Any, *, cap: Optional[float] = None) -> None:
        caps.setdefault(mo.state, set()).add(cap)
        real_wait_on(clk, cond, timeout, cap=cap)

    monkeypatch.setattr(engine_module, "wait_on", recording)
    client = fake_redis("job")
    fake = FakeClock()
    other = MutexOwner(client, "job", ttl=TTL, identity="other", clock=fake)
    other_driver = OwnerDriver(other, fake)
    other_driver.step()
    assert other.holding
    mo = MutexOwner(client, "job", ttl=TTL)
    mo.start()
    assert wait_for(lambda: "acquiring" in caps)
    other_driver.stop()  # releases: the notice wakes mo
    assert mo.wait_until_holding(REAL_TIMEOUT)
    assert wait_for(lambda: "holding" in caps)
    assert mo.stop(REAL_TIMEOUT)
    assert caps["acquiring"] == {None}  # a standby waits without waking up for nothing
    assert caps["holding"] == {clock.SAFETY_WAIT_CAP}


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="CLOCK_BOOTTIME is Linux-only")
def test_the_default_clock_counts_time_the_host_spends_suspended() -> None:
    # CLOCK_BOOTTIME = CLOCK_MONOTONIC + time suspended. On a host that never slept they
    # agree, so compare with each clock read around the call.
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    now = clock.default_clock()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= now <= after
    assert os.uname().sysname == "Linux"
