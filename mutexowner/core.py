"""The lease core: every protocol decision of one lease, with no threads, locks or sleeps.

``LeaseCore`` answers two questions, and nothing else: "what now, at time t?" (``plan``:
call acquire or renew, release some tokens, or nothing; safety actions such as telling
workers to stop happen inside it) and "here is the reply to the call sent at t0, received
at t1" (``on_reply``, ``on_error``, ``on_released``). ``next_due`` says when to ask again.
The caller serialises access (a ``LeaseSlot`` holds its lock) and does the I/O; a test can
drive the core directly with a fake clock and canned replies.

Safety rests on the local deadline (docs/safety.md, points 2-3): a lease confirmed by a reply
to a request sent at ``t_sent`` is trusted until ``t_sent + ttl - drift`` on our own clock,
which ends before Redis can expire the key. Workers are told to stop ``shutdown_budget``
before that deadline, here and, independently, by the supervisor's own monitor thread.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Protocol, Union, get_args

from transitions import EventData, Machine

from mutexowner import machine as m
from mutexowner.backoff import BackoffPolicy
from mutexowner.clock import Clock
from mutexowner.connection import redact_text
from mutexowner.errors import LeaseError
from mutexowner.events import Event, EventKind
from mutexowner.lease import Acquired, LeaseResult, Quiet, Renewed, Retaken, Taken, new_token
from mutexowner.timing import LeaseTiming

__all__ = [
    "KEEP_RUNNING",
    "OUTAGE_MODES",
    "STEP_DOWN",
    "Call",
    "LeaseCore",
    "OutageMode",
    "OutageStrategy",
    "Release",
    "WorkersPort",
    "outage_strategy",
]

#: What the owner does when Redis cannot confirm the lease (docs/owner.md, docs/safety.md).
OutageMode = Literal["step_down", "keep_running"]
OUTAGE_MODES: tuple[OutageMode, ...] = get_args(OutageMode)
#: A repeated Redis error is logged again at most this often (seconds).
ERROR_LOG_INTERVAL = 30.0
#: The "exit" stuck-worker policy fires this long before the lease deadline, so that the
#: process is gone before Redis can expire the key.
EXIT_MARGIN = 0.1
#: How many tokens that may still be in Redis (sent, outcome unknown) a lease remembers, to
#: release them all when it stops.
OUTSTANDING_TOKENS = 8
#: Prefix of our state machines' names: ``transitions`` puts it before every log line.
MACHINE_NAME_PREFIX = "mutexowner["

#: Where a core writes its log lines: ``(level, message, *args, exc=None)``; the owner defers
#: them to its events thread (docs/safety.md, point 8).
LogSink = Callable[..., None]


class WorkersPort(Protocol):
    """What the core needs of the workers (a ``Supervisor``): every call returns at once."""

    @property
    def running(self) -> bool: ...

    @property
    def alive_workers(self) -> tuple[str, ...]: ...

    @property
    def signalled_at(self) -> Optional[float]: ...

    @property
    def restarts(self) -> int: ...

    def start(self, fencing_token: Optional[int] = None) -> None: ...

    def stop(self, timeout: Optional[float] = None) -> bool: ...

    def lease_changed(self) -> None: ...


@dataclass(frozen=True)
class OutageStrategy:
    """What a lease does when Redis cannot confirm it: the one place the outage mode acts.

    ``step_down`` (the default): the local deadline ends the lease; workers are told to
    stop ``shutdown_budget`` before it. ``keep_running``: workers run on through an outage
    and stop only when another token is seen (docs/owner.md: trades safety for availability).
    """

    mode: OutageMode
    #: True when the local deadline ends the lease (and guards the workers).
    deadline_ends_lease: bool

    def guard_until(self, deadline: float) -> Optional[float]:
        """The deadline workers see (``ctx.ensure_held``); None: no local limit."""
        return deadline if self.deadline_ends_lease else None

    def holds_at(self, now: float, deadline: float) -> bool:
        return not self.deadline_ends_lease or now < deadline


STEP_DOWN = OutageStrategy("step_down", deadline_ends_lease=True)
KEEP_RUNNING = OutageStrategy("keep_running", deadline_ends_lease=False)


def outage_strategy(mode: OutageMode) -> OutageStrategy:
    """The strategy for ``outage=mode``; ValueError naming the parameter otherwise."""
    for strategy in (STEP_DOWN, KEEP_RUNNING):
        if strategy.mode == mode:
            return strategy
    raise ValueError(f"outage must be one of {', '.join(OUTAGE_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class Call:
    """An acquire (``fencing_token`` None) or renew round trip the core wants sent now."""

    token: str
    fencing_token: Optional[int]

    @property
    def renewing(self) -> bool:
        return self.fencing_token is not None


@dataclass(frozen=True)
class Release:
    """Release every token (newest last; sent newest first) that may hold the key."""

    tokens: tuple[str, ...]
    from_state: str


Plan = Union[Call, Release, None]


class _Model:
    """The object ``transitions`` drives: the state name (and the triggers it gets), and the
    core whose ``_on_state_change`` runs after each transition."""

    def __init__(self, core: LeaseCore) -> None:
        self.state = m.STOPPED
        self.core = core


def _state_changed(event: EventData) -> None:
    model = event.model
    assert isinstance(model, _Model)
    model.core._on_state_change(event)


class _MachinePool:
    """Shared ``transitions`` machines, each driving up to MODELS_PER_MACHINE leases.

    One machine per lease costs ~22 KB and ~1 ms to build; a model added to a shared machine
    costs a third of that. Machines are capped because ``add_model`` scans its model list.
    A lease joins at ``begin`` and leaves when it finishes, so a lease never started or long
    gone costs nothing here. Callers serialise their own models' triggers; the pool's lock
    guards only membership.
    """

    MODELS_PER_MACHINE = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._machines: list[Machine] = []

    def join(self, model: _Model) -> Machine:
        with self._lock:
            for machine in self._machines:
                if len(machine.models) < self.MODELS_PER_MACHINE:
                    break
            else:
                machine = Machine(
                    name=f"{MACHINE_NAME_PREFIX}pool-{len(self._machines)}]",
                    model=None,
                    states=list(m.STATES),
                    transitions=m.TRANSITIONS,
                    initial=m.STOPPED,
                    auto_transitions=False,
                    send_event=True,
                    after_state_change=_state_changed,
                )
                self._machines.append(machine)
            machine.add_model(model, initial=model.state)
            return machine

    def leave(self, machine: Machine, model: _Model) -> None:
        with self._lock:
            machine.remove_model(model)


_MACHINES = _MachinePool()


class LeaseCore:
    """The protocol decisions of one lease: state machine, token, fence, deadline, errors.

    Not thread-safe by design: one caller at a time (``LeaseSlot`` holds its lock around
    every call). ``emit`` receives events, ``log`` log lines; both must return at once.
    """

    def __init__(
        self,
        *,
        key: str,
        identity: str,
        timing: LeaseTiming,
        backoff: BackoffPolicy,
        outage: OutageStrategy,
        clock: Clock,
        emit: Callable[[Event], None],
        log: LogSink,
        workers: Optional[WorkersPort] = None,
        exit_margin: float = 0.0,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.key = key
        self.identity = identity
        self.timing = timing
        self.backoff = backoff
        self.outage = outage
        self.clock = clock
        self.workers = workers
        #: How long before the deadline the stuck-worker policy is due ("exit": EXIT_MARGIN).
        self.exit_margin = exit_margin
        self._emit_event = emit
        self._log = log
        self._rng = rng if rng is not None else random.Random()
        # A plain Machine shared with other leases (see _MachinePool): the caller serialises
        # every call, so a LockedMachine's own locking would only add cost to each transition.
        self._model = _Model(self)
        self._machine: Optional[Machine] = None
        self.token: Optional[str] = None
        #: Tokens sent to Redis whose key may still hold them (an acquire or renew executed
        #: or of unknown outcome), oldest first: a stop releases them all, so that no late
        #: reply or lost reply leaves the key held after stop() (insertion-ordered set).
        self.outstanding: dict[str, None] = {}
        self.fence: Optional[int] = None
        self.deadline_at = -math.inf
        #: The deadline workers see (None: none); -inf while they may not run.
        self.guard_until: Optional[float] = -math.inf
        self.settle_until: Optional[float] = None
        self.quiet_until: Optional[float] = None  # a standby's view of Redis' quiet period
        self.next_attempt_at: Optional[float] = None
        self.errors = 0
        self.fatal = False
        self.last_error: Optional[str] = None
        self._last_error_logged_at = -math.inf
        self._seen_holder: Optional[str] = None
        self._quiet_logged = False
        # True from entering "holding" until the workers' states are left: a holding period.
        self.holding_period = False
        self._give_up_reason: Optional[str] = None
        self._workers_failures = 0
        self._signalled_at: Optional[float] = None
        self.stuck_reported = False
        #: Workers found stuck past the lease, waiting for the caller to apply the policy.
        self._policy_due: Optional[tuple[str, ...]] = None
        # Outside events.
        self.started = False
        self.stop_requested = False
        self._release_notice = False
        self._workers_failed = False
        #: Stopped for good: nothing happens to this lease any more.
        self.finished = False

    # -- queries ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._model.state

    def holding(self, now: float) -> bool:
        """Workers may run: a holding period, in a worker state, before the local deadline."""
        if not self.holding_period or self.state not in m.WORKER_STATES:
            return False
        return self.outage.holds_at(now, self.deadline_at)

    def lock_delay_remaining(self, now: float) -> Optional[float]:
        """Seconds before workers may start anywhere because Redis lost its state, if known."""
        if self.state == m.SETTLING and self.settle_until is not None:
            return max(0.0, self.settle_until - now)
        if self.state == m.ACQUIRING and self.quiet_until is not None:
            # 0 once the quiet period has passed, until the look that follows it is answered:
            # until then nobody knows who gets the key.
            return max(0.0, self.quiet_until - now)
        return None

    def workers_alive(self) -> bool:
        return self.workers is not None and bool(self.workers.alive_workers)

    def take_policy_due(self) -> Optional[tuple[str, ...]]:
        """Workers stuck past the lease whose policy the caller must now apply (once)."""
        stuck, self._policy_due = self._policy_due, None
        return stuck

    # -- outside events -----------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """Leave ``stopped``: contend for the lease from ``now``."""
        self.started = True
        self.token = new_token()
        self.next_attempt_at = now
        self._machine = _MACHINES.join(self._model)
        self._fire("start")

    def request_stop(self) -> None:
        self.stop_requested = True

    def notice_release(self) -> None:
        """A release was published on the lease's channel (a standby may look now)."""
        self._release_notice = True

    def notice_workers_failed(self) -> None:
        self._workers_failed = True

    def crash(self) -> None:
        """As if the process died: no transition, no event, nothing released."""
        self.finished = True
        self.stop_requested = True
        self.holding_period = False
        self._set_finished()
        self._model.state = m.STOPPED

    # -- "what now, at time t?" ---------------------------------------------------------------

    def plan(self, now: float, *, early: float = 0.0) -> Plan:
        """Do what is due at ``now`` (safety actions included); return the I/O it needs.

        ``early``: an acquire or renew due within this many seconds is sent now (so that it
        shares a batch); only the call may come early, never a safety decision.
        """
        if self.finished:
            return None
        if self.state == m.STOPPED:
            if self.stop_requested and self.started:
                self._set_finished()
            return None
        self._handle_outside_events(now)
        self._check_deadline(now)
        self._check_stuck_workers(now)
        if self.state == m.SETTLING and self.settle_until is not None and now >= self.settle_until:
            self.settle_until = None
            self.guard_until = self.outage.guard_until(self.deadline_at)
            self._fire("settled")
        if self.state == m.HOLDING:
            self._ensure_workers(now)
        if self.state in (m.SUSPENDED, m.DRAINING):
            self._step_down_if_due(now)
        return self._io_due(now, early)

    def _io_due(self, now: float, early: float) -> Plan:
        state = self.state
        if state == m.DRAINING and not self.workers_alive():
            # Workers have exited: give the key back (on stop, every token that may be in
            # Redis; after workers failed, the one we hold, to contend again).
            if self.stop_requested:
                return Release(tuple(self.outstanding), state)
            return Release((self.token,) if self.token is not None else (), state)
        if self._stop_due():
            if not self.outstanding:
                self._fire("stop", reason="stopped")
                self._set_finished()
                return None
            # A late or lost reply may have left one of our tokens in the key.
            return Release(tuple(self.outstanding), state)
        if self._policy_due is not None or self.next_attempt_at is None:
            return None
        if now + early < self.next_attempt_at or (state == m.ACQUIRING and self.workers_alive()):
            return None
        token = self.token or new_token()
        self.token = token
        self._remember(token)
        return Call(token, self.fence if state in m.LEASE_STATES else None)

    def next_due(self, now: float) -> Optional[float]:
        """The next moment ``plan`` has something to do (None: only outside events)."""
        state = self.state
        if state == m.STOPPED or self.finished:
            return None
        if self._stop_due():
            return now
        due: list[float] = []
        if self.next_attempt_at is not None and not (state == m.ACQUIRING and self.workers_alive()):
            due.append(self.next_attempt_at)
        # Every moment listed must be one at which a plan changes something: a moment in
        # the past means "plan again now", so a past one that changes nothing would spin.
        if state in m.LEASE_STATES and self.outage.deadline_ends_lease:
            due.append(self.deadline_at)
            step_down_at = self.deadline_at - self.timing.shutdown_budget
            if self.workers_alive() and (step_down_at > now or self._signalled_at is None):
                due.append(step_down_at)
        if state == m.SETTLING and self.settle_until is not None:
            due.append(self.settle_until)
        signalled = self.signalled_at()
        if signalled is not None and not self.stuck_reported and self.workers_alive():
            stuck_at = self.stuck_policy_at(signalled)
            if stuck_at is not None:
                due.append(stuck_at)
        future = [t for t in due if t > now]
        if len(future) < len(due):
            return now
        return min(future) if future else None

    def _stop_due(self) -> bool:
        """stop() was asked, the lease is gone and no worker runs (or the stuck-worker policy
        was applied to those that do): the stop can complete."""
        return (
            self.state == m.ACQUIRING
            and self.stop_requested
            and (not self.workers_alive() or self.stuck_reported)
        )

    def _handle_outside_events(self, now: float) -> None:
        state = self.state
        if self.stop_requested and state in (m.SETTLING, m.HOLDING, m.SUSPENDED):
            self._give_up("stopped", now)
        elif self._workers_failed:
            self._workers_failed = False
            if state in (m.HOLDING, m.SUSPENDED):
                self._workers_failures += 1
                self._give_up("workers_failed", now)
        if self._release_notice:
            self._release_notice = False
            # A notice cuts a standby's wait, never its backoff after errors.
            if self.state == m.ACQUIRING and not self.stop_requested and not self.errors:
                self.next_attempt_at = now

    def _check_deadline(self, now: float) -> None:
        """The local deadline passed without a confirmed renewal: the lease is gone."""
        if not self.outage.deadline_ends_lease or self.state not in m.LEASE_STATES:
            return
        if now >= self.deadline_at:
            self._lose("expired", now)
            if self.errors:
                self.next_attempt_at = now + self._retry_delay()

    # -- workers ------------------------------------------------------------------------------

    def _ensure_workers(self, now: float) -> None:
        """In ``holding``, the workers run: start them if they are not running."""
        workers = self.workers
        if workers is None or workers.running or self.stop_requested:
            return
        if self.outage.deadline_ends_lease and now >= self.step_down_at():
            return  # too late in this lease: the next confirmed renewal starts them
        self._signalled_at = None
        self.stuck_reported = False
        workers.start(fencing_token=self.fence)

    def step_down_at(self) -> float:
        """When workers must be told to stop for their shutdown budget to fit the lease."""
        return self.deadline_at - self.timing.shutdown_budget

    def _signal_workers_stop(self, now: float) -> None:
        workers = self.workers
        if workers is not None and workers.running:
            if self._signalled_at is None:
                self._signalled_at = now
            workers.stop(timeout=0)

    def _step_down_if_due(self, now: float) -> None:
        """Tell workers to stop early enough that their shutdown budget fits the lease."""
        if not self.outage.deadline_ends_lease:
            return
        if now >= self.step_down_at() and self.workers_alive():
            first = self._signalled_at is None
            self._signal_workers_stop(now)
            if first:
                self._log(
                    logging.WARNING,
                    "key=%s identity=%s stepping down: lease deadline in %.3f s not confirmed",
                    self.key,
                    self.identity,
                    max(0.0, self.deadline_at - now),
                )

    def signalled_at(self) -> Optional[float]:
        """When workers were first told to stop, by the core or the supervisor's monitor."""
        sup_signalled = self.workers.signalled_at if self.workers is not None else None
        times = [t for t in (self._signalled_at, sup_signalled) if t is not None]
        return min(times) if times else None

    def stuck_policy_at(self, signalled: float) -> Optional[float]:
        """When stuck_worker_policy is due for workers told to stop at ``signalled``.

        Once the lease is gone: after their shutdown budget. While it is ours, a stuck worker
        is waited for (renewing); at the deadline the policy is due (``exit_margin`` earlier,
        so that an exiting process is gone before Redis can expire the key).
        """
        budget_end = signalled + self.timing.shutdown_budget
        if self.state in (m.ACQUIRING, m.STOPPED):
            return budget_end
        if not self.outage.deadline_ends_lease:
            return None
        return max(signalled, max(budget_end, self.deadline_at) - self.exit_margin)

    def exit_due_at(self) -> Optional[float]:
        """When the stuck-worker policy is due for workers still running; None: not."""
        if self.stuck_reported or not self.workers_alive():
            return None
        signalled = self.signalled_at()
        return None if signalled is None else self.stuck_policy_at(signalled)

    def mark_stuck_reported(self) -> tuple[str, ...]:
        """The policy is being applied now (by a watchdog): report it once; the stuck names."""
        self.stuck_reported = True
        return self.workers.alive_workers if self.workers is not None else ()

    def _check_stuck_workers(self, now: float) -> None:
        """Workers alive after the lease is gone and their budget passed: the policy is due
        (applied by the caller after the turn, outside its lock)."""
        due_at = self.exit_due_at()
        if due_at is None or now < due_at:
            return
        stuck = self.mark_stuck_reported()
        self._policy_due = stuck
        self._emit("stuck_policy", detail=", ".join(stuck), reason="lease_lost")

    # -- losing and giving up -----------------------------------------------------------------

    def _lose(self, reason: str, now: float) -> None:
        """Holding ended against our will: stop workers now, forget the token."""
        self.guard_until = -math.inf
        self._signal_workers_stop(now)
        self._workers_failures = 0  # the workers were not the problem this time
        self.token = new_token()
        self.settle_until = None
        self._fire("lost", reason=reason)
        # A pending stop completes on this turn (_stop_due), releasing what may be left.

    def _give_up(self, reason: str, now: float) -> None:
        """Voluntary end (stop or workers failed): drain workers while still renewing."""
        self._give_up_reason = reason
        self._signal_workers_stop(now)
        self._fire("give_up", reason=reason)

    def give_up_workers_failed(self, now: float) -> None:
        """The workers failed for good: drain and release, to contend again later."""
        self._give_up("workers_failed", now)

    # -- "here is the reply" ------------------------------------------------------------------

    def on_released(self, release: Release, released: bool, now: float) -> None:
        """The tokens of ``release`` were sent; ``released``: one of them held the key."""
        for token in release.tokens:
            self.outstanding.pop(token, None)
        if self.state != release.from_state or self.finished:
            return
        if released:
            self._emit("released")
        self.guard_until = -math.inf
        self.token = new_token()
        reason = self._give_up_reason or "stopped"
        self._give_up_reason = None
        if self.stop_requested:
            self._fire("stop", reason="stopped")
            self._set_finished()
            return
        self._fire("released", reason=reason)
        delay = self.backoff.delay(max(1, self._workers_failures), self._rng)
        self.next_attempt_at = now + delay

    def on_error(self, call: Call, error: LeaseError, now: float) -> None:
        """The call failed (classified ``error``); retry with backoff, still holding."""
        if self.finished:
            return
        self.errors += 1
        self.fatal = not error.transient
        self.last_error = redact_text(str(error))
        self._log_error(error, now)
        self._emit("error", error=self.last_error, error_kind=error.kind)
        if self.state == m.HOLDING:
            self._fire("renew_failed", reason=error.kind)
            self._emit("suspended", error=self.last_error, error_kind=error.kind)
        self.next_attempt_at = self._retry_at(now)

    def on_reply(self, call: Call, result: LeaseResult, t_sent: float, t_recv: float) -> None:
        """Redis answered ``call`` (sent at ``t_sent``) with ``result`` at ``t_recv``."""
        if self.state == m.STOPPED or self.finished:
            return
        # A "taken" or "quiet" reply does not make the token safe to forget: an earlier
        # request with it may still be in the network and set the key later (found by the
        # model-based test). Tokens are forgotten only once a release was tried.
        errors_before = self._clear_errors()
        if (
            call.renewing
            and self.state in m.LEASE_STATES
            and self.outage.deadline_ends_lease
            and t_recv >= self.deadline_at
        ):
            # The reply came after our lease had ended locally: whatever it says, the old
            # holding period is over. Treat the reply as a fresh acquisition.
            self._lose("expired", t_recv)
        if isinstance(result, Taken):
            self._on_taken(result, t_recv)
        elif isinstance(result, Quiet):
            self._on_quiet(result, t_recv, errors_before)
        elif self.state == m.ACQUIRING:
            self._quiet_logged = False
            # The key holds the token of this call (a late renewal reply included).
            self.token = call.token
            if not self.stop_requested:
                # (A pending stop never begins a new holding period; it releases the key,
                # whose token ``outstanding`` holds.)
                self._on_acquired(result, t_sent, t_recv)
        else:
            self._quiet_logged = False
            self._on_renewed(result, t_sent, t_recv)

    def _clear_errors(self) -> int:
        errors_before = self.errors
        if self.errors:
            self._log(
                logging.INFO,
                "key=%s Redis answering again after %d failed call(s)",
                self.key,
                self.errors,
            )
        self.errors = 0
        self.fatal = False
        self.last_error = None
        self.quiet_until = None
        return errors_before

    def _on_quiet(self, result: Quiet, t_recv: float, errors_before: int) -> None:
        # Free, but Redis lost its state less than a ttl ago: a holder from before may still
        # be running. Look again when the quiet period ends.
        self.quiet_until = t_recv + result.lock_delay
        self.next_attempt_at = self.quiet_until + 0.001
        if self._quiet_logged:
            return
        self._quiet_logged = True
        self._log(
            logging.INFO,
            "key=%s identity=%s waiting %.3f s (lock-delay) before taking the lease%s: "
            "Redis has no epoch marker for it (first use of this key, or Redis lost "
            "its data), so a holder from before may still be running",
            self.key,
            self.identity,
            result.lock_delay,
            " after the outage" if errors_before else "",
        )

    def _on_renewed(self, result: LeaseResult, t_sent: float, t_recv: float) -> None:
        """Renewal of a lease we hold was confirmed."""
        assert isinstance(result, (Acquired, Renewed, Retaken))
        self.fence = result.fencing_token
        self.deadline_at = self.timing.deadline(t_sent)
        self.guard_until = self.outage.guard_until(self.deadline_at)
        self.next_attempt_at = t_sent + self.timing.renew_interval
        if self.state == m.SETTLING and isinstance(result, Retaken) and result.lock_delay > 0:
            # Our key vanished while we waited (Redis lost its state again?): wait for the
            # quiet period Redis reports now, if it ends later than the one we wait for.
            settle = t_recv + result.lock_delay + self.timing.drift
            self.settle_until = max(self.settle_until or settle, settle)
        elif isinstance(result, Retaken) and result.lock_delay > 0:
            self._log(
                logging.WARNING,
                "key=%s Redis had lost the lease; re-taken by its valid holder %s",
                self.key,
                self.identity,
            )
        workers = self.workers
        if workers is not None:
            workers.lease_changed()
            if workers.running and workers.restarts == 0:
                self._workers_failures = 0  # the workers have been healthy for a while
        if self.state == m.SUSPENDED:
            self._fire("renewed")
        self._emit("renewed", latency=t_recv - t_sent)

    def _on_acquired(self, result: LeaseResult, t_sent: float, t_recv: float) -> None:
        assert isinstance(result, (Acquired, Renewed, Retaken))
        if t_recv >= self.timing.deadline(t_sent):
            # The reply took longer than the lease itself: it confirms nothing. The key holds
            # our token, so the next attempt (now) renews it idempotently if it still can.
            self.next_attempt_at = t_recv
            return
        self.fence = result.fencing_token
        self.deadline_at = self.timing.deadline(t_sent)
        self.next_attempt_at = t_sent + self.timing.renew_interval
        self._signalled_at = None
        self.stuck_reported = False
        self._seen_holder = None
        if result.lock_delay > 0:
            # Redis lost its state recently: a lease granted before the loss may still be
            # running on its holder's clock until the quiet period ends (docs/safety.md,
            # point 5). Counted from the reply, which comes after Redis computed the delay.
            self.settle_until = t_recv + result.lock_delay + self.timing.drift
            self.guard_until = -math.inf
            self._log(
                logging.WARNING,
                "key=%s no lease state in Redis from before (a fresh or restarted server, or "
                "data loss): waiting %.3f s (lock-delay) before starting workers",
                self.key,
                result.lock_delay,
            )
            self._fire("lock_delay", reason="lock_delay")
            return
        self.guard_until = self.outage.guard_until(self.deadline_at)
        self._fire("acquired")
        self._ensure_workers(t_recv)

    def _on_taken(self, result: Taken, t_recv: float) -> None:
        if self.state in m.LEASE_STATES:
            self._lose("taken", t_recv)
            self._log(
                logging.WARNING,
                "key=%s identity=%s lease taken by %s",
                self.key,
                self.identity,
                result.holder,
            )
        if self.state != m.ACQUIRING:
            return
        if result.holder != self._seen_holder:
            self._seen_holder = result.holder
            self._log(
                logging.INFO,
                "key=%s identity=%s standing by: the lease is held by %s (%.3f s left)",
                self.key,
                self.identity,
                result.holder,
                result.ttl_left,
            )
        # Look again when the holder's lease would expire; a release notice comes sooner.
        self.next_attempt_at = t_recv + result.ttl_left + 0.001

    def _remember(self, token: str) -> None:
        """``token`` is about to be sent in an acquire or renew: it may be in Redis from now."""
        self.outstanding.pop(token, None)
        self.outstanding[token] = None
        while len(self.outstanding) > OUTSTANDING_TOKENS:
            del self.outstanding[next(iter(self.outstanding))]

    # -- errors and retries -------------------------------------------------------------------

    def _log_error(self, error: LeaseError, now: float) -> None:
        if self.errors != 1 and now - self._last_error_logged_at < ERROR_LOG_INTERVAL:
            return
        self._last_error_logged_at = now
        self._log(
            logging.ERROR if not error.transient else logging.WARNING,
            "key=%s identity=%s state=%s Redis %s error (%d in a row): %s",
            self.key,
            self.identity,
            self.state,
            "fatal" if not error.transient else "transient",
            self.errors,
            self.last_error,
        )

    def _retry_delay(self) -> float:
        if self.fatal:
            return self.backoff.max_delay
        return self.backoff.delay(max(1, self.errors), self._rng)

    def _retry_at(self, now: float) -> float:
        """When to try again after an error; while holding, one retry lands before step-down."""
        at = now + self._retry_delay()
        call_timeout = self.timing.call_timeout
        if self.state in m.LEASE_STATES and self.outage.deadline_ends_lease:
            # Latest start for a call (up to two round trips) that still confirms the lease
            # before workers must be told to stop; after that point, keep trying until the
            # deadline, at most twice per call_timeout.
            latest = self.step_down_at() - 2 * call_timeout
            at = min(at, latest) if latest > now else min(at, now + call_timeout / 2)
            if self.workers_alive() and at + call_timeout > self.deadline_at:
                # Workers still running this close to the deadline are late to stop: be free
                # at the deadline to apply stuck_worker_policy, not inside a call whose reply
                # would come too late to keep the lease anyway.
                at = max(at, self.deadline_at)
        elif not self.outage.deadline_ends_lease and self.state in m.WORKER_STATES:
            # Workers run on regardless: re-take the lease as soon as Redis is back rather
            # than after a long backoff, so a second runner's window stays short.
            at = min(at, now + self.timing.renew_interval)
        return at

    # -- the machine --------------------------------------------------------------------------

    def _fire(self, trigger: str, **kwargs: Any) -> None:
        assert self._machine is not None, "begin() first"
        self._machine.events[trigger].trigger(self._model, **kwargs)

    def _set_finished(self) -> None:
        """Reached stopped for good: leave the shared machine."""
        self.finished = True
        self.next_attempt_at = None
        self.guard_until = -math.inf
        machine, self._machine = self._machine, None
        if machine is not None:
            _MACHINES.leave(machine, self._model)

    def _on_state_change(self, event: EventData) -> None:
        source = event.transition.source if event.transition is not None else None
        dest = self.state
        reason = event.kwargs.get("reason")
        self._log(
            logging.INFO,
            "key=%s identity=%s state %s -> %s fencing_token=%s%s",
            self.key,
            self.identity,
            source,
            dest,
            self.fence,
            f" reason={reason}" if reason else "",
        )
        self._emit("state", previous_state=source, reason=reason)
        if dest == m.HOLDING and not self.holding_period:
            self.holding_period = True
            self._emit("acquired")
        if self.holding_period and dest not in m.WORKER_STATES:
            self.holding_period = False
            self._emit("lost", reason=reason)

    def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self.finished:
            return  # nothing happens to a lease after "stopped"
        self._emit_event(
            Event(
                kind=kind,
                key=self.key,
                identity=self.identity,
                state=self.state,
                time=self.clock(),
                fencing_token=self.fence,
                **fields,
            )
        )

    def emit(self, kind: EventKind, **fields: Any) -> None:
        """Report an outside event (the supervisor restarted or found stuck workers)."""
        self._emit(kind, **fields)
