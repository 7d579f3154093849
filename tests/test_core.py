"""The lease core on its own: canned replies, explicit times, no threads and no Redis."""

from __future__ import annotations

import math
from typing import Any

import pytest

from mutexowner.backoff import BackoffPolicy
from mutexowner.core import (
    KEEP_RUNNING,
    STEP_DOWN,
    Call,
    LeaseCore,
    OutageStrategy,
    Release,
    outage_strategy,
)
from mutexowner.errors import RedisTransientError
from mutexowner.events import Event
from mutexowner.lease import Acquired, Renewed, Taken
from mutexowner.timing import LeaseTiming

T0 = 1000.0
TIMING = LeaseTiming.of(ttl=10.0)  # renew every 3.33 s; drift 0.102 s


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lines: list[str] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def log(self, level: int, message: str, *args: object, exc: Any = None) -> None:
        self.lines.append(message % args)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def make_core(outage: OutageStrategy = STEP_DOWN) -> tuple[LeaseCore, Recorder, list[float]]:
    now = [T0]
    rec = Recorder()
    core = LeaseCore(
        key="job",
        identity="A",
        timing=TIMING,
        backoff=BackoffPolicy(initial=0.5, max_delay=4.0, jitter="none"),
        outage=outage,
        clock=lambda: now[0],
        emit=rec.emit,
        log=rec.log,
    )
    return core, rec, now


def acquire(core: LeaseCore, at: float, fence: int = 7) -> Call:
    core.begin(at)
    call = core.plan(at)
    assert isinstance(call, Call) and not call.renewing
    core.on_reply(call, Acquired(fence, 0.0), at, at + 0.001)
    return call


def test_acquire_then_renew_moves_the_deadline_from_the_time_sent() -> None:
    core, rec, _ = make_core()
    acquire(core, T0)
    assert core.state == "holding" and core.holding(T0 + 1) and core.fence == 7
    assert core.deadline_at == pytest.approx(T0 + 10.0 - TIMING.drift)
    due = core.next_due(T0 + 0.01)
    assert due == pytest.approx(T0 + TIMING.renew_interval)
    assert core.plan(T0 + 1.0) is None  # nothing due before the renew interval
    renew = core.plan(due)
    assert isinstance(renew, Call) and renew.renewing and renew.fencing_token == 7
    core.on_reply(renew, Renewed(7, 0.0), due, due + 0.002)
    assert core.deadline_at == pytest.approx(due + 10.0 - TIMING.drift)
    assert rec.kinds().count("renewed") == 1 and "acquired" in rec.kinds()


def test_the_local_deadline_ends_the_lease_without_any_reply() -> None:
    core, rec, _ = make_core()
    acquire(core, T0)
    deadline = core.deadline_at
    assert core.holding(deadline - 0.001) and not core.holding(deadline)
    core.plan(deadline)
    assert core.state == "acquiring" and rec.events[-1].kind == "lost"
    assert rec.events[-1].reason == "expired" and core.guard_until == -math.inf


def test_a_renewal_reply_after_the_deadline_confirms_nothing_old() -> None:
    core, rec, _ = make_core()
    acquire(core, T0)
    renew = core.plan(T0 + TIMING.renew_interval)
    assert isinstance(renew, Call)
    late = core.deadline_at + 0.5
    core.on_reply(renew, Renewed(7, 0.0), T0 + TIMING.renew_interval, late)
    lost = [e for e in rec.events if e.kind == "lost"]
    assert lost and lost[0].reason == "expired"  # the old holding period ended...
    # ...and the reply counts as a fresh acquisition (the key holds our token).
    assert core.state == "holding" and rec.kinds().count("acquired") == 2


def test_errors_suspend_and_one_retry_lands_before_the_step_down_point() -> None:
    core, rec, _ = make_core()
    acquire(core, T0)
    at = T0 + TIMING.renew_interval
    renew = core.plan(at)
    assert isinstance(renew, Call)
    core.on_error(renew, RedisTransientError("down", kind="connection"), at + 0.1)
    assert core.state == "suspended" and core.errors == 1
    assert core.next_attempt_at is not None
    assert core.next_attempt_at <= core.step_down_at() - 2 * TIMING.call_timeout
    assert "suspended" in rec.kinds() and any("transient" in line for line in rec.lines)


def test_taken_while_holding_is_lost_at_once() -> None:
    core, rec, _ = make_core()
    acquire(core, T0)
    renew = core.plan(T0 + TIMING.renew_interval)
    assert isinstance(renew, Call)
    core.on_reply(renew, Taken("B", 9.0, 8), T0 + 3.4, T0 + 3.41)
    assert core.state == "acquiring" and not core.holding(T0 + 3.42)
    assert rec.events[-1].kind == "lost" and rec.events[-1].reason == "taken"
    # A standby looks again when the holder's lease would expire.
    assert core.next_attempt_at == pytest.approx(T0 + 3.41 + 9.0 + 0.001)


def test_stop_releases_every_token_that_may_hold_the_key_then_finishes() -> None:
    core, rec, _ = make_core()
    call = acquire(core, T0)
    core.request_stop()
    release = core.plan(T0 + 1.0)
    assert isinstance(release, Release) and release.tokens == (call.token,)
    assert core.state == "draining"
    core.on_released(release, True, T0 + 1.001)
    assert core.finished and core.state == "stopped"
    assert "released" in rec.kinds() and rec.events[-1].state == "stopped"
    assert core.plan(T0 + 2.0) is None and core.next_due(T0 + 2.0) is None


def test_keep_running_holds_past_the_deadline_until_another_token_is_seen() -> None:
    core, _, _ = make_core(KEEP_RUNNING)
    acquire(core, T0)
    assert core.guard_until is None  # workers see no local limit
    assert core.holding(core.deadline_at + 100.0)
    core.plan(core.deadline_at + 100.0)
    assert core.state == "holding"


def test_outage_strategy_names_the_parameter_on_a_bad_mode() -> None:
    assert outage_strategy("step_down") is STEP_DOWN
    assert outage_strategy("keep_running") is KEEP_RUNNING
    with pytest.raises(ValueError, match="outage must be one of step_down, keep_running"):
        outage_strategy("sometimes")  # type: ignore[arg-type]
