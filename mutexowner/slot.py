"""``LeaseSlot``: one lease's core behind a lock, and the I/O of one turn.

A turn is: ``prepare`` (the core decides what is due now, under the lock), the round trip
(no lock held: ``holding``, ``status()`` and ``stop()`` never wait on Redis), ``complete``
(the core reads the reply, under the lock). The engine's scheduler runs turns (batching the
round trips of leases due together); ``stop()`` runs one inline when it can; a test driver
(``mutexowner.testing.OwnerDriver``) runs them one by one on a fake clock.

A turn's stuck-worker policy and log lines are applied after it, outside the lock
(docs/safety.md, point 8).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, NoReturn, Optional, Union

from mutexowner.clock import Clock, wait_on
from mutexowner.connection import redact_text
from mutexowner.core import Call, LeaseCore, Plan, Release
from mutexowner.errors import ForkedOwnerError, LeaseError
from mutexowner.events import Event, EventDispatcher
from mutexowner.lease import Lease, LeaseResult, classify_error

__all__ = ["CallOutcome", "LeaseSlot", "exit_process"]

log = logging.getLogger("mutexowner.owner")

#: Exit status used by the "exit" stuck-worker policy (EX_SOFTWARE).
STUCK_EXIT_STATUS = 70
#: The "exit" policy spends at most this long trying to log why before ``os._exit``.
EXIT_LOG_BUDGET = 0.05

StuckPolicyCallable = Callable[[tuple[str, ...]], object]


def exit_process(message: str, *args: object) -> NoReturn:
    """End the process now (``os._exit``), after at most EXIT_LOG_BUDGET seconds of trying
    to log why: a log handler that blocks cannot delay the exit (docs/safety.md, point 8)."""

    def say() -> None:
        with contextlib.suppress(BaseException):
            log.critical(message, *args)
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):
                with contextlib.suppress(BaseException):
                    handler.flush()

    with contextlib.suppress(BaseException):
        thread = threading.Thread(target=say, name="mutexowner-exit", daemon=True)
        thread.start()
        thread.join(EXIT_LOG_BUDGET)
    os._exit(STUCK_EXIT_STATUS)


class DeferredLog:
    """A lease's events and log lines, collected during a turn and handed to the events
    thread after it, in one task: events first, then log lines.

    A log handler or a listener may block (a full stderr pipe, a stuck network handler). A
    turn never calls one: a blocked handler must not delay a step-down, a renewal or a
    release, nor hold the lock that ``holding``, ``status()`` and ``stop()`` need
    (docs/safety.md, point 8). Handing them over after the round trip also keeps the events
    thread from competing with the turn for the interpreter while the reply is awaited.
    """

    def __init__(self, logger: logging.Logger, events: EventDispatcher):
        self._logger = logger
        self._events = events
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, tuple[object, ...], Optional[BaseException]]] = []
        self._pending_events: list[Event] = []

    def add(
        self, level: int, message: str, *args: object, exc: Optional[BaseException] = None
    ) -> None:
        if self._logger.isEnabledFor(level):
            with self._lock:
                self._pending.append((level, message, args, exc))

    def add_event(self, event: Event) -> None:
        if not self._events.has_listeners:
            return  # nobody listens: no work for the events thread
        with self._lock:
            self._pending_events.append(event)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            events, self._pending_events = self._pending_events, []
        if pending or events:
            self._events.submit(lambda: self._write(events, pending))

    def _write(
        self,
        events: list[Event],
        pending: list[tuple[int, str, tuple[object, ...], Optional[BaseException]]],
    ) -> None:
        for event in events:
            self._events.deliver(event)
        for level, message, args, exc in pending:
            self._logger.log(level, message, *args, exc_info=exc)


@dataclass(frozen=True)
class CallOutcome:
    """What came back for a ``Call``: a result or a classified error, and when."""

    reply: Union[LeaseResult, LeaseError]
    sent_at: float
    received_at: float


class LeaseSlot:
    """One lease as the engine and test drivers see it: a core, its lock, its lease calls."""

    def __init__(
        self,
        core: LeaseCore,
        lease: Lease,
        events: EventDispatcher,
        deferred_log: DeferredLog,
        *,
        stuck_policy: Union[str, StuckPolicyCallable] = "exit",
        on_wake: Optional[Callable[[LeaseSlot], None]] = None,
    ) -> None:
        self.core = core
        self.lease = lease
        self.events = events
        self.log = deferred_log
        self.clock: Clock = core.clock
        self.stuck_policy = stuck_policy
        #: Called (no lock held) when an outside event wants a turn now: the engine's hook.
        self.on_wake = on_wake
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        #: Serialises turns: one turn of a lease at a time, whichever thread runs it.
        self.turn_lock = threading.Lock()
        self.woken = False
        #: A thread runs policy callables (None: run them inline, as test drivers do).
        self.threaded = False
        #: Called once (no lock held) after the lease finished on an engine thread.
        self.on_finished: Optional[Callable[[], None]] = None
        self._finished_reported = False

    # -- what workers and readers see (lock-free reads) ---------------------------------------

    def valid_until(self) -> Optional[float]:
        """The lease deadline as workers and the supervisor see it (``LeaseGuard``)."""
        return self.core.guard_until

    @property
    def finished(self) -> bool:
        return self.core.finished

    # -- outside events ------------------------------------------------------------------------

    def wake(self) -> None:
        """Ask for a turn now (lock held or not)."""
        with self.cond:
            self.woken = True
            self.cond.notify_all()
        hook = self.on_wake
        if hook is not None:
            hook(self)

    def notify_released(self) -> None:
        """A release notice arrived on the lease's channel."""
        with self.lock:
            self.core.notice_release()
        self.wake()

    def begin(self) -> None:
        """Leave ``stopped`` at the clock's now (the engine, or a test driver, turns next)."""
        with self.lock:
            self.core.begin(self.clock())
            self.cond.notify_all()
        self.log.flush()

    def take_wake(self) -> bool:
        """True (once) if something woke the slot since the last call."""
        with self.lock:
            woken, self.woken = self.woken, False
            return woken

    def wait_for_wake(self, timeout: float) -> bool:
        """Wait (real time, up to ``timeout``) for something to wake the slot; consume it."""
        with self.cond:
            woken = self.cond.wait_for(lambda: self.woken, timeout)
            self.woken = False
            return bool(woken)

    # -- one turn ------------------------------------------------------------------------------

    def turn(self) -> Optional[float]:
        """Run one turn now; seconds until the next one is due (None: only outside events)."""
        with self.turn_lock:
            plan = self.prepare()
            if plan is not None:
                self.complete(plan, self.execute(plan))
            return self.finish_turn()

    def prepare(self, early: float = 0.0) -> Plan:
        """The core's decision at the clock's now (turn lock held by the caller); a call due
        within ``early`` seconds is made now."""
        with self.lock:
            try:
                return self.core.plan(self.clock(), early=early)
            finally:
                self.cond.notify_all()

    def execute(self, plan: Union[Call, Release]) -> Union[CallOutcome, bool]:
        """The plan's round trip(s), no lock held: a CallOutcome, or for a Release whether
        one of its tokens held the key."""
        if isinstance(plan, Release):
            return self._release_all(plan.tokens)
        sent = self.clock()
        try:
            if plan.fencing_token is None:
                result: LeaseResult = self.lease.acquire(plan.token)
            else:
                result = self.lease.renew(plan.token, plan.fencing_token)
        except ForkedOwnerError:
            raise
        except Exception as exc:
            return CallOutcome(classify_error(exc), sent, self.clock())
        return CallOutcome(result, sent, self.clock())

    def complete(self, plan: Union[Call, Release], outcome: Union[CallOutcome, bool]) -> None:
        """Hand the round trip's outcome to the core, then its events to the events thread
        (after the workers it started: their first line is the hand-off's end)."""
        try:
            self._complete(plan, outcome)
        finally:
            self.log.flush()

    def _complete(self, plan: Union[Call, Release], outcome: Union[CallOutcome, bool]) -> None:
        with self.lock:
            try:
                if isinstance(plan, Release):
                    self.core.on_released(plan, bool(outcome), self.clock())
                elif isinstance(outcome, CallOutcome):
                    if isinstance(outcome.reply, LeaseError):
                        self.core.on_error(plan, outcome.reply, outcome.received_at)
                    else:
                        self.core.on_reply(
                            plan, outcome.reply, outcome.sent_at, outcome.received_at
                        )
            finally:
                self.cond.notify_all()

    def finish_turn(self) -> Optional[float]:
        """After a turn: apply a due policy, hand over log lines; seconds until due again."""
        try:
            self._apply_due_policy()
        finally:
            self.log.flush()
        with self.lock:
            now = self.clock()
            due = self.core.next_due(now)
            return None if due is None else max(0.0, due - now)

    def finished_hook(self) -> None:
        """Run ``on_finished`` once (the engine calls it when the lease has finished)."""
        with self.lock:
            if self._finished_reported:
                return
            self._finished_reported = True
        hook = self.on_finished
        if hook is not None:
            with contextlib.suppress(BaseException):
                hook()

    def next_due_at(self) -> Optional[float]:
        with self.lock:
            return self.core.next_due(self.clock())

    # -- releases ------------------------------------------------------------------------------

    def _release_all(self, tokens: tuple[str, ...]) -> bool:
        """Release every token (newest first); True if one of them held the key. Stops at the
        first error: Redis is unreachable, and what is left expires by itself."""
        released = False
        for token in reversed(tokens):
            result = self._release(token)
            if result is None:
                break
            released = released or result
        return released

    def _release(self, token: str) -> Optional[bool]:
        try:
            return self.lease.release(token)
        except ForkedOwnerError:
            raise
        except Exception as exc:
            self.log_release_error(classify_error(exc))
            return None

    def log_release_error(self, error: LeaseError) -> None:
        """A release failed: what is left expires by itself (logged, no retry)."""
        self.log.add(
            logging.WARNING,
            "key=%s could not release the lease (%s); it expires within %.3g s",
            self.core.key,
            redact_text(str(error)),
            max(0.0, self.core.deadline_at - self.clock()),
        )

    # -- stuck workers -------------------------------------------------------------------------

    def _apply_due_policy(self) -> None:
        """Apply stuck_worker_policy (lock not held: user code and exits never run under it)."""
        with self.lock:
            stuck = self.core.take_policy_due()
        if stuck is None:
            return
        policy = self.stuck_policy
        message = (
            "key=%s identity=%s lost the lease while worker(s) %s still run: applying "
            "stuck_worker_policy=%r"
        )
        args = (self.core.key, self.core.identity, ", ".join(stuck))
        name = policy if isinstance(policy, str) else "callable"
        if policy == "exit":
            exit_process(message, *args, name)
        self.log.add(logging.CRITICAL, message, *args, name)
        if callable(policy) and not self.threaded:
            self._run_policy(policy, stuck)  # a test driver: inline, as events are
        elif callable(policy):
            # On a thread of its own: a callable that blocks must not stop the lease.
            threading.Thread(
                target=self._run_policy,
                args=(policy, stuck),
                name=f"mutexowner-{self.core.key}-policy",
                daemon=True,
            ).start()

    def _run_policy(self, policy: StuckPolicyCallable, stuck: tuple[str, ...]) -> None:
        try:
            policy(stuck)
        except BaseException as exc:  # even SystemExit: nothing of the lease may end with it
            self.log.add(logging.ERROR, "stuck_worker_policy callable failed", exc=exc)
            self.log.flush()

    def watch_exit(self) -> None:
        """The "exit" policy's own thread. Turns apply the policy after their round trip,
        which may outlive ``call_timeout`` (a reconnect can block in DNS): the process must
        still be gone before the deadline (docs/safety.md, point 11). This does no I/O and
        takes the slot's lock only to read."""
        from mutexowner import machine as m
        from mutexowner.clock import SAFETY_WAIT_CAP

        core = self.core
        with self.cond:
            while True:
                if core.finished:
                    return
                due = core.exit_due_at()
                now = self.clock()
                if due is not None and now >= due:
                    stuck = core.mark_stuck_reported()
                    break
                guarding = due is not None or core.state in m.LEASE_STATES
                # Workers may be told to stop by the monitor without a notify here: re-read
                # the state at least every SAFETY_WAIT_CAP while a lease or a worker is live.
                try:
                    wait_on(
                        self.clock,
                        self.cond,
                        None if due is None else due - now,
                        cap=SAFETY_WAIT_CAP if guarding or core.workers_alive() else None,
                    )
                except BaseException:  # never die: a wait that fails is retried
                    continue
        exit_process(
            "key=%s identity=%s lost the lease while worker(s) %s still run: applying "
            "stuck_worker_policy='exit'",
            core.key,
            core.identity,
            ", ".join(stuck),
        )
