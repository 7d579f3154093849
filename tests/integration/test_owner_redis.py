"""MutexOwner against a real redis-server (issue 3): hand-off, kill -9, restarts, freeze, fatal
errors. Owners run as threads here, or as processes through the chaos harness
(``tests/chaos/harness.py``) where a process must die or freeze. Figures are printed in the
"integration figures" section at the end of the run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

import pytest
import redis

from mutexowner import BackoffPolicy, Event, MutexOwner, Supervisor, WorkerContext
from mutexowner.lease import Lease, LeaseKeys
from tests.chaos.harness import ChaosRig
from tests.redis_server import RedisServer, poll

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

Record = Callable[..., None]
FAST = BackoffPolicy(initial=0.05, max_delay=0.5)


class TimedWorker:
    """A cooperative worker that records when each run started and stopped (monotonic)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.stops: list[float] = []
        self.tokens: list[Optional[int]] = []
        self.started = threading.Event()

    def __call__(self, ctx: WorkerContext) -> None:
        self.starts.append(time.monotonic())
        self.tokens.append(ctx.fencing_token)
        self.started.set()
        try:
            while not ctx.sleep(0.01):
                ctx.ensure_held()
        finally:
            self.stops.append(time.monotonic())


def supervised_owner(
    url: str, name: str, identity: str, *, ttl: float = 2.0, shutdown: float = 0.5, **kwargs: Any
) -> tuple[MutexOwner, TimedWorker]:
    worker = TimedWorker()
    sup = Supervisor(shutdown_timeout=shutdown)
    sup.add(worker, name=f"worker-{identity}")
    owner = MutexOwner(
        url,
        name,
        ttl=ttl,
        supervisor=sup,
        identity=identity,
        backoff=kwargs.pop("backoff", FAST),
        stuck_worker_policy="abandon",
        **kwargs,
    )
    return owner, worker


# -- hand-off, kill -9 -------------------------------------------------------------------------


def test_two_owner_threads_hand_off_via_stop(
    redis_server: RedisServer, owners: list[MutexOwner], record_figures: Record
) -> None:
    a, worker_a = supervised_owner(redis_server.url, "handoff", "A")
    b, worker_b = supervised_owner(redis_server.url, "handoff", "B")
    owners += [a, b]
    a.start()
    assert a.wait_until_holding(10)
    b.start()
    # B has been told "taken" and waits for the key to expire, more than a second away.
    assert poll(lambda: (b.status().next_attempt_in or 0) > 0.5, 5), b.status()
    t_stop = time.monotonic()
    assert a.stop(timeout=5)
    t_stopped = time.monotonic()
    assert b.wait_until_holding(5)
    t_held = time.monotonic()
    assert worker_b.started.wait(5)
    handoff = t_held - t_stop
    worker_gap = worker_b.starts[0] - worker_a.stops[-1]
    assert 0 < worker_gap < 0.5, worker_gap  # the release notice, not the ttl, woke B
    assert worker_b.tokens[0] is not None and worker_a.tokens[0] is not None
    assert worker_b.tokens[0] > worker_a.tokens[0]
    record_figures(handoff=handoff, stop_call=t_stopped - t_stop, worker_gap=worker_gap, ttl=2.0)


def test_kill_9_of_the_holder_process_standby_takes_over_within_ttl(
    chaos_rig: Callable[..., ChaosRig], record_figures: Record
) -> None:
    rig = chaos_rig(proxied=False)
    rig.start(2)
    holder = rig.wait_for_holder(10)
    fault = rig.kill_owner(holder)
    took_over = rig.wait_for_check(fault.start, rig.config.recovery_bound + 5)
    assert took_over["id"] != holder.identity
    takeover = took_over["t"] - fault.start
    cfg = rig.config
    # The key outlives the dead holder by at most ttl; the standby retries at its expiry.
    assert takeover <= cfg.ttl + cfg.call_timeout + cfg.slack, takeover
    rig.pause(0.5)
    verdict = rig.finish()
    rig.assert_ok(verdict)
    record_figures(takeover=takeover, ttl=cfg.ttl)


# -- Redis restarts ----------------------------------------------------------------------------


def test_redis_restart_without_persistence_makes_the_next_holder_wait_the_lock_delay(
    chaos_rig: Callable[..., ChaosRig], record_figures: Record
) -> None:
    rig = chaos_rig(proxied=False)
    rig.start(2)
    holder = rig.wait_for_holder(10)
    standby = next(o for o in rig.owners.values() if o is not holder)
    ttl = rig.config.ttl
    # The holder is frozen through the restart and past its lease, so that the standby must
    # take over from a Redis that lost every key: it may run only after the lock-delay.
    holder.freeze()
    fault = rig.redis_restart(persist=False)
    rig.pause(ttl + 0.5)
    holder.thaw()
    took_over = rig.wait_for_check(fault.start, rig.config.recovery_bound + 5)
    assert took_over["id"] == standby.identity, rig.describe()
    waited = took_over["t"] - fault.start
    assert waited >= ttl, rig.describe()
    rig.pause(0.5)
    # On waking, the old holder saw its lease gone and did no more work.
    assert rig.ledger.first_check_after(fault.start, exclude=[standby.identity]) is None
    verdict = rig.finish()
    rig.assert_ok(verdict)
    record_figures(
        lock_delay_waited=waited,
        restart=(fault.clear or fault.start) - fault.start,
        max_overlap=verdict.figures["max_overlap"],
        ttl=ttl,
    )


def test_redis_restart_with_aof_opens_the_quiet_period_and_the_holder_continues(
    redis_server_factory: Callable[..., RedisServer],
    owners: list[MutexOwner],
    record_figures: Record,
) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    admin = server.client()
    ttl = 3.0
    a, worker_a = supervised_owner(server.url, "aof", "A", ttl=ttl)
    b, worker_b = supervised_owner(server.url, "aof", "B", ttl=ttl)
    owners += [a, b]
    events: list[Event] = []
    renewed = threading.Event()

    def listen(event: Event) -> None:
        events.append(event)
        if event.kind == "renewed":
            renewed.set()

    a.add_listener(listen)
    a.start()
    assert a.wait_until_holding(15)
    b.start()
    token = a.fencing_token
    run_id = admin.info("server")["run_id"]
    # Restart right after a renewal: the holder has its whole lease to ride it out.
    renewed.clear()
    assert renewed.wait(5)
    renewed.clear()
    t0 = time.monotonic()
    server.restart(persist=True)
    restart = time.monotonic() - t0
    assert renewed.wait(5), a.status()  # the first renewal on the new instance
    new_run_id = admin.info("server")["run_id"]
    assert new_run_id != run_id
    keys = LeaseKeys("aof")
    # The new instance is recorded by the first call that reads the run_id: the standby's
    # acquire, or the holder's own periodic check (a renewal of its own key reads it at most
    # one ttl after the last reading; docs/safety.md, point 5).
    assert poll(lambda: admin.hget(keys.epoch, "run_id") == new_run_id.encode(), ttl + 1.0)
    info = Lease(admin, "aof", ttl=ttl, identity="probe").inspect()
    assert info.holder == "A" and info.fencing_token == token
    assert 0 < info.lock_delay_remaining <= ttl  # the quiet period opened on the new run_id
    assert a.holding and a.fencing_token == token
    assert len(worker_a.starts) == 1 and not worker_a.stops  # never interrupted
    assert not any(e.kind == "lost" for e in events)
    assert not b.holding and not worker_b.starts
    record_figures(
        restart=restart,
        quiet_period_left=info.lock_delay_remaining,
        holder_kept=True,
        ttl=ttl,
    )


# -- Redis frozen ------------------------------------------------------------------------------


def test_redis_frozen_workers_stop_by_the_local_deadline_then_someone_holds_again(
    redis_server: RedisServer, owners: list[MutexOwner], record_figures: Record
) -> None:
    a, worker_a = supervised_owner(redis_server.url, "frozen", "A")
    b, worker_b = supervised_owner(redis_server.url, "frozen", "B")
    owners += [a, b]
    a.start()
    assert a.wait_until_holding(10) and worker_a.started.wait(5)
    b.start()
    redis_server.freeze()
    t_freeze = time.monotonic()
    deadline = 0.0

    def worker_stopped() -> bool:
        nonlocal deadline
        before = time.monotonic()
        remaining = a.status().lease_remaining
        if remaining is not None and a.holding:
            deadline = max(deadline, before + remaining)
        return bool(worker_a.stops)

    try:
        assert poll(worker_stopped, 5, interval=0.002)
        stopped = worker_a.stops[0]
        assert poll(lambda: not a.holding, 5)
    finally:
        redis_server.thaw()
    t_thaw = time.monotonic()
    early = deadline - stopped
    assert 0 < early <= 0.5 + 0.05, (early, deadline - t_freeze)  # about shutdown_timeout
    assert poll(lambda: a.holding or b.holding, 2.0 + 0.5 + 0.25 + 1.0)
    recovery = time.monotonic() - t_thaw
    record_figures(
        stopped_before_deadline=early,
        stopped_after_freeze=stopped - t_freeze,
        recovery=recovery,
        shutdown_timeout=0.5,
        ttl=2.0,
    )


# -- fatal errors ------------------------------------------------------------------------------


def error_events(owner: MutexOwner) -> list[Event]:
    events: list[Event] = []
    owner.add_listener(lambda e: events.append(e) if e.kind == "error" else None)
    return events


def assert_fatal_retried_at_the_cap(
    owner: MutexOwner, errors: list[Event], kind: str, cap: float
) -> dict[str, Any]:
    assert poll(lambda: len(errors) >= 5, 6 * cap + 5), owner.status()
    status = owner.status()
    assert status.state == "acquiring" and not status.holding
    assert status.consecutive_errors >= 3
    assert status.last_error and kind in {e.error_kind for e in errors}, errors
    assert status.next_attempt_in is not None and status.next_attempt_in <= cap
    gaps = [b.time - a.time for a, b in zip(errors, errors[1:])]
    # At the cap, not a hot loop. One early retry may come sooner: the release listener
    # wakes the owner once when its subscription starts (a release may have been missed).
    assert sum(gap < cap * 0.9 for gap in gaps) <= 1, gaps
    assert any(t.name.startswith("mutexowner-engine-") for t in owner.threads)
    return {"last_error": status.last_error, "retry_gap_median": sorted(gaps)[len(gaps) // 2]}


def test_wrong_password_is_reported_and_retried_at_the_backoff_cap(
    redis_server_factory: Callable[..., RedisServer],
    owners: list[MutexOwner],
    caplog: pytest.LogCaptureFixture,
    record_figures: Record,
) -> None:
    server = redis_server_factory()
    # Set after start: RedisServer waits for PING, which NOAUTH would fail.
    server.client().config_set("requirepass", "right-pass-5150")
    password = "wrong-pass-7391"
    cap = 0.3
    url = f"redis://:{password}@127.0.0.1:{server.port}/0"
    caplog.set_level(logging.DEBUG, logger="mutexowner")
    owner = MutexOwner(url, "fatal-auth", ttl=2.0, backoff=BackoffPolicy(0.05, max_delay=cap))
    owners.append(owner)
    errors = error_events(owner)
    owner.start()
    figures = assert_fatal_retried_at_the_cap(owner, errors, "auth", cap)
    assert "authentication" in (owner.status().last_error or "")
    owner.stop(timeout=5)
    shown = caplog.text + repr(owner) + repr(owner.status()) + repr(errors)
    assert caplog.records and password not in shown
    assert "right-pass" not in shown
    record_figures(**figures)


def test_acl_user_without_eval_permission_is_reported_then_recovers_when_granted(
    redis_server: RedisServer,
    owners: list[MutexOwner],
    caplog: pytest.LogCaptureFixture,
    record_figures: Record,
) -> None:
    admin = redis_server.client()
    password = "limited-pass-2718"
    admin.execute_command(
        "ACL", "SETUSER", "limited", "on", f">{password}", "~*", "&*", "+@all", "-@scripting"
    )
    cap = 0.3
    url = f"redis://limited:{password}@127.0.0.1:{redis_server.port}/0"
    caplog.set_level(logging.DEBUG, logger="mutexowner")
    owner = MutexOwner(url, "fatal-acl", ttl=2.0, backoff=BackoffPolicy(0.05, max_delay=cap))
    owners.append(owner)
    errors = error_events(owner)
    owner.start()
    figures = assert_fatal_retried_at_the_cap(owner, errors, "noperm", cap)
    assert "ACL" in (owner.status().last_error or "")
    admin.execute_command("ACL", "SETUSER", "limited", "+@scripting")
    t_granted = time.monotonic()
    assert owner.wait_until_holding(10)  # next try at the cap, then the first-acquire delay
    recovered = time.monotonic() - t_granted
    owner.stop(timeout=5)
    shown = caplog.text + repr(owner) + repr(owner.status()) + repr(errors)
    assert caplog.records and password not in shown
    record_figures(**figures, recovered_after_grant=recovered)


# -- done when -----------------------------------------------------------------------------------


def test_done_when_script(redis_server: RedisServer) -> None:
    url = redis_server.url
    o = MutexOwner(url, "demo", ttl=2)
    o.start()
    assert o.wait_until_holding(10)
    o.stop()
    assert o.state == "stopped"
    assert redis.Redis.from_url(url).exists(LeaseKeys("demo").lease) == 0  # released
