"""Run a job once, on one host of a fleet: ``run_once`` and the ``once_job`` decorator.

The cron / scheduled-task case: every host fires the same job at about the same time; the
one that gets the lease runs it, the others skip it (they do not wait and run it after)::

    from mutexowner import run_once

    result = run_once("redis://redis:6379/0", "nightly-report", make_report, wait=0,
                      hold_at_least=300)
    if not result.ran:
        print("skipped:", result.reason)      # another host has it

``wait`` is how long to try for the lease (0: one attempt, like ``flock -n``). When Redis has
no record of the lease (a fresh server, or one that lost its data), nobody may take it for
one ttl (lock-delay, docs/safety.md point 5): every host then waits that quiet period out before
its attempt, and ``wait`` does not count it. One host then runs the job, the others skip.

``hold_at_least`` (ShedLock's ``lockAtLeastFor``): after a quick job, keep the lease (running
nothing) until that many seconds after the job started, so that hosts whose trigger fires a
little later still find it taken and skip. The lease is then released.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from mutexowner import machine as m
from mutexowner._validate import finite_number
from mutexowner.events import Event
from mutexowner.owner import MutexOwner

__all__ = ["RunOnceResult", "once_job", "run_once", "wait_for_lease"]

log = logging.getLogger("mutexowner.once")

#: How often the waits below look at the owner (seconds).
_POLL = 0.02

#: ``RunOnceResult.reason`` values.
RAN = "ran"
HELD_ELSEWHERE = "held_elsewhere"
REDIS_UNAVAILABLE = "redis_unavailable"
LOST_BEFORE_START = "lost_before_start"

T = TypeVar("T")


def _decided(owner: MutexOwner) -> Optional[str]:
    """From one status snapshot: "ours", "stopped", "taken", "unavailable", or None (not yet).

    "taken" and "unavailable" mean an acquisition attempt was answered "taken", or failed. A
    "quiet" answer (Redis lost its state, or never had the lease: nobody may take the key for
    one ttl) is no answer yet: the attempt that decides comes when the quiet period ends.
    """
    st = owner.status()
    if st.state in m.LEASE_STATES:
        return "ours"
    if st.state == m.STOPPED:
        return "stopped"
    if st.consecutive_errors > 0:
        return "unavailable"
    if st.next_attempt_in and st.lock_delay_remaining is None:
        return "taken"
    return None


def wait_for_lease(
    owner: MutexOwner, wait: float, cancelled: Callable[[], bool] = lambda: False
) -> str:
    """Wait (real time) until the started ``owner`` has the lease's key, at most ``wait`` s.

    Returns ``"ours"`` (the key is ours: holding, or waiting out a lock-delay), ``"taken"``
    (another holder had it when ``wait`` ran out), ``"unavailable"`` (Redis did not answer),
    or ``"cancelled"`` (``cancelled()`` became true, or the owner stopped). ``wait=0`` means
    one answered attempt; a quiet period (Redis has no record of the lease) is waited out
    first and not counted.
    """
    end = time.monotonic() + wait
    pause = threading.Event()
    while True:
        decided = _decided(owner)
        if decided == "ours":
            return decided
        if decided == "stopped" or cancelled():
            return "cancelled"
        if decided is not None and time.monotonic() >= end:
            return decided
        pause.wait(_POLL)


@dataclass(frozen=True)
class RunOnceResult:
    """What ``run_once`` did. True (``bool(result)``) when this process ran the job."""

    #: This process ran the job.
    ran: bool
    #: ran | held_elsewhere | redis_unavailable | lost_before_start
    reason: str
    #: What the job returned (None when it did not run).
    value: Any = None
    #: Fencing token of the lease the job ran under (None when it did not run).
    fencing_token: Optional[int] = None
    #: The lease was lost (its deadline passed unconfirmed) while the job was running.
    lost: bool = False

    def __bool__(self) -> bool:
        return self.ran


def run_once(
    redis: Any,
    name: str,
    fn: Callable[[], T],
    wait: float = 0.0,
    hold_at_least: float = 0.0,
    *,
    ttl: float = 10.0,
    **owner_options: Any,
) -> RunOnceResult:
    """Run ``fn()`` here if this process gets lease ``name`` within ``wait`` seconds.

    ``redis`` is a URL or a ``redis.Redis`` client; ``owner_options`` go to ``MutexOwner``
    (``identity``, ``prefix``...). The job runs in the calling thread while the lease is
    renewed in the background; the lease is released when it returns (after
    ``hold_at_least`` seconds from its start, if longer). An exception from ``fn`` is
    raised after the lease was released (``hold_at_least`` applies to it too).

    Returns a ``RunOnceResult``: ``ran`` says whether this process ran the job. Python
    cannot stop ``fn`` when the lease is lost; ``lost`` reports it afterwards, and a job
    with side effects that must not happen twice should check a fencing token (the
    ``MutexOwner`` API with workers does this for you).
    """
    wait, hold_at_least = _checked_arguments(fn, wait, hold_at_least)
    owner = MutexOwner(redis, name, ttl=ttl, **owner_options)
    lost = _lost_flag(owner)
    owner.start()
    try:
        outcome = wait_for_lease(owner, wait)
        if outcome != "ours":
            reason = REDIS_UNAVAILABLE if outcome == "unavailable" else HELD_ELSEWHERE
            log.info("lease %r %s: not running the job", name, reason.replace("_", " "))
            return RunOnceResult(ran=False, reason=reason)
        # The key is ours; a lock-delay may still be running (Redis had lost its state).
        if not _wait_until_holding(owner):
            log.warning("lease %r lost before the job could start: not running it", name)
            return RunOnceResult(ran=False, reason=LOST_BEFORE_START)
        token = owner.fencing_token
        started = time.monotonic()
        log.info("lease %r is ours (fencing token %s): running the job", name, token)
        try:
            value = fn()
        finally:
            _hold_until(owner, name, started + hold_at_least)
        return RunOnceResult(
            ran=True, reason=RAN, value=value, fencing_token=token, lost=lost.is_set()
        )
    finally:
        owner.stop()


def _checked_arguments(
    fn: Callable[[], Any], wait: float, hold_at_least: float
) -> tuple[float, float]:
    """``wait`` and ``hold_at_least`` as finite numbers >= 0; ``fn`` must be callable."""
    wait = finite_number("wait", wait)
    if wait < 0:
        raise ValueError(f"wait must be >= 0 seconds, got {wait!r}")
    hold_at_least = finite_number("hold_at_least", hold_at_least)
    if hold_at_least < 0:
        raise ValueError(f"hold_at_least must be >= 0 seconds, got {hold_at_least!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    return wait, hold_at_least


def _lost_flag(owner: MutexOwner) -> threading.Event:
    """An event set when ``owner`` loses the lease other than by being stopped."""
    lost = threading.Event()

    def on_event(event: Event) -> None:
        if event.kind == "lost" and event.reason != "stopped":
            lost.set()

    owner.add_listener(on_event)
    return lost


def _wait_until_holding(owner: MutexOwner) -> bool:
    """Wait out a lock-delay on a key that is ours; False if the lease went first."""
    pause = threading.Event()
    while not owner.holding:
        if owner.state not in m.LEASE_STATES:
            return False
        pause.wait(_POLL)
    return True


def _hold_until(owner: MutexOwner, name: str, until: float) -> None:
    """Keep the lease, running nothing, until monotonic time ``until`` (``hold_at_least``)."""
    left = until - time.monotonic()
    if left > 0 and owner.holding:
        log.info("lease %r: keeping it %.3g s more (hold_at_least)", name, left)
        end = time.monotonic() + left
        pause = threading.Event()
        while owner.holding and time.monotonic() < end:
            pause.wait(min(_POLL * 5, max(0.0, end - time.monotonic())))


def once_job(
    redis: Any,
    name: str,
    *,
    wait: float = 0.0,
    hold_at_least: float = 0.0,
    ttl: float = 10.0,
    **owner_options: Any,
) -> Callable[[Callable[..., T]], Callable[..., RunOnceResult]]:
    """Decorator: every call of the job goes through ``run_once`` and returns its result.

    For scheduled jobs (Celery beat, APScheduler, Django management commands)::

        @once_job("redis://redis:6379/0", "nightly-report", hold_at_least=300)
        def nightly_report(day): ...

        nightly_report("2026-01-01").ran   # False on the hosts that skipped it
    """

    def decorate(fn: Callable[..., T]) -> Callable[..., RunOnceResult]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> RunOnceResult:
            return run_once(
                redis,
                name,
                functools.partial(fn, *args, **kwargs),
                wait=wait,
                hold_at_least=hold_at_least,
                ttl=ttl,
                **owner_options,
            )

        return wrapper

    return decorate
