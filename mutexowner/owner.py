"""``MutexOwner``: the public handle of one lease; workers run only while it is held.

The protocol decisions live in ``LeaseCore`` (core.py: no threads, no sleeps); ``LeaseSlot``
(slot.py) puts a lock around it and does one turn's I/O; the ``Engine`` (engine.py) shared
by every owner on the same Redis client runs the turns from one scheduler thread. This
class validates the arguments, wires those parts together, and answers the public API
(start/stop, state, holding, status, listeners) from the core's state under its lock.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union, get_args

from mutexowner import machine as m
from mutexowner.backoff import BackoffPolicy
from mutexowner.clock import Clock, default_clock
from mutexowner.connection import describe_client
from mutexowner.core import (
    ERROR_LOG_INTERVAL,
    EXIT_MARGIN,
    MACHINE_NAME_PREFIX,
    OUTAGE_MODES,
    OUTSTANDING_TOKENS,
    LeaseCore,
    OutageMode,
    outage_strategy,
)
from mutexowner.engine import Engine, engine_for
from mutexowner.errors import ForkedOwnerError, MutexOwnerError, OwnerStoppedError
from mutexowner.events import Event, EventDispatcher, EventKind, Listener
from mutexowner.hub import Subscription
from mutexowner.lease import Lease, validate_name
from mutexowner.slot import (
    EXIT_LOG_BUDGET,
    STUCK_EXIT_STATUS,
    DeferredLog,
    LeaseSlot,
)
from mutexowner.supervisor import Supervisor
from mutexowner.timing import LeaseTiming, drift_for

__all__ = [
    "ERROR_LOG_INTERVAL",
    "EXIT_LOG_BUDGET",
    "EXIT_MARGIN",
    "OUTAGE_MODES",
    "OUTSTANDING_TOKENS",
    "STUCK_EXIT_STATUS",
    "STUCK_POLICIES",
    "MutexOwner",
    "OutageMode",
    "OwnerStatus",
    "StuckPolicy",
    "drift_for",
]

log = logging.getLogger("mutexowner.owner")

#: The named stuck-worker policies (a callable is the third kind).
StuckPolicyName = Literal["exit", "abandon"]
STUCK_POLICIES: tuple[StuckPolicyName, ...] = get_args(StuckPolicyName)
StuckPolicy = Union[StuckPolicyName, Callable[[tuple[str, ...]], object]]
#: stop(timeout) releases on the caller's thread only when timeout exceeds this many
#: call timeouts (a release may take OUTSTANDING_TOKENS bounded round trips; usually one).
FAST_STOP_CALLS = 3


@dataclass(frozen=True)
class OwnerStatus:
    """A consistent snapshot of an owner, safe to log or serve (no password, no token)."""

    key: str
    identity: str
    state: str
    holding: bool
    fencing_token: Optional[int]
    #: Seconds until the local lease deadline (None when not holding the key).
    lease_remaining: Optional[float]
    consecutive_errors: int
    last_error: Optional[str]
    #: Seconds until the next Redis call (None when none is scheduled).
    next_attempt_in: Optional[float]
    #: Seconds of lock-delay left before workers may start (state "settling").
    lock_delay_remaining: Optional[float] = None
    workers_running: bool = False
    stuck_workers: tuple[str, ...] = ()
    outage: OutageMode = "step_down"
    redis: str = ""


class _QuietMachines(logging.Filter):
    """Drops ``transitions``' own lines about our machines (three INFO lines per state
    change); other users of ``transitions`` in the process keep theirs. Our own
    ``mutexowner.owner`` logger reports each state change once."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        first = args[0] if isinstance(args, tuple) and args else None
        return not (isinstance(first, str) and first.startswith(MACHINE_NAME_PREFIX))


def _install_transitions_filter() -> None:
    logger = logging.getLogger("transitions.core")
    if not any(isinstance(f, _QuietMachines) for f in logger.filters):
        logger.addFilter(_QuietMachines())


_install_transitions_filter()


class _CallbackListener:
    """Adapts ``on_acquired(fencing_token)`` / ``on_lost(reason)`` to the event stream."""

    def __init__(self, kind: EventKind, callback: Callable[[Any], object]) -> None:
        self.kind = kind
        self.callback = callback

    def __call__(self, event: Event) -> None:
        if event.kind != self.kind:
            return
        self.callback(event.fencing_token if self.kind == "acquired" else event.reason)


def _check_types(
    backoff: object,
    supervisor: object,
    identity: object,
    callbacks: dict[str, object],
    outage: object,
    clock: object,
    policy: object,
    rng: object,
) -> None:
    """Reject bad arguments with a message naming the parameter and what it accepts."""
    if backoff is not None and not isinstance(backoff, BackoffPolicy):
        raise TypeError(f"backoff must be a BackoffPolicy or None, got {type(backoff).__name__}")
    if supervisor is not None and not isinstance(supervisor, Supervisor):
        raise TypeError(f"supervisor must be a Supervisor or None, got {type(supervisor).__name__}")
    if not isinstance(identity, str) or not identity.strip() or "\n" in identity:
        raise ValueError(f"identity must be a non-empty single-line string, got {identity!r}")
    for pname, callback in callbacks.items():
        if callback is not None and not callable(callback):
            raise TypeError(f"{pname} must be callable or None, got {type(callback).__name__}")
    if outage not in OUTAGE_MODES:
        raise ValueError(f"outage must be one of {', '.join(OUTAGE_MODES)}, got {outage!r}")
    if clock is not None and not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
    if not (callable(policy) or policy in STUCK_POLICIES):
        raise ValueError(
            f"stuck_worker_policy must be one of {', '.join(STUCK_POLICIES)} or a callable, "
            f"got {policy!r}"
        )
    if rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random or None, got {type(rng).__name__}")


_OWNERS: weakref.WeakSet[MutexOwner] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for owner in list(_OWNERS):
        owner.forked = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class MutexOwner:
    """Owns the Redis lease ``name`` and runs ``supervisor``'s workers only while holding it."""

    def __init__(
        self,
        redis: Any,
        name: str,
        ttl: float = 10.0,
        renew_interval: Optional[float] = None,
        backoff: Optional[BackoffPolicy] = None,
        supervisor: Optional[Supervisor] = None,
        identity: Optional[str] = None,
        on_acquired: Optional[Callable[[int], object]] = None,
        on_lost: Optional[Callable[[str], object]] = None,
        outage: OutageMode = "step_down",
        clock: Optional[Clock] = None,
        *,
        call_timeout: Optional[float] = None,
        stuck_worker_policy: StuckPolicy = "exit",
        prefix: str = "mutexowner",
        rng: Optional[random.Random] = None,
        min_replicas: Optional[int] = None,
        min_replicas_timeout: Optional[float] = None,
    ) -> None:
        self.key = validate_name(name, "name")
        #: Prefix of the lease's Redis keys (``<prefix>:{<name>}:...``).
        self.prefix = validate_name(prefix, "prefix")
        if identity is None:
            identity = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        callbacks: dict[str, object] = {"on_acquired": on_acquired, "on_lost": on_lost}
        _check_types(
            backoff, supervisor, identity, callbacks, outage, clock, stuck_worker_policy, rng
        )
        self.identity = identity
        self.backoff = backoff if backoff is not None else BackoffPolicy()
        self.supervisor = supervisor
        #: The lease's numbers (ttl, renew interval, call timeout, drift, shutdown budget).
        self.timing = LeaseTiming.of(
            ttl,
            renew_interval,
            call_timeout,
            shutdown_budget=supervisor.shutdown_timeout if supervisor is not None else 0.0,
        )
        self.ttl, self.drift = self.timing.ttl, self.timing.drift
        self.renew_interval = self.timing.renew_interval
        self.call_timeout = self.timing.call_timeout
        self.outage: OutageMode = outage
        self.stuck_worker_policy = stuck_worker_policy
        #: The injected clock (monotonic seconds); time of every lease decision.
        self.clock: Clock = clock if clock is not None else default_clock
        self._engine: Engine = engine_for(redis, self.clock)
        self._base_client = self._engine.base_client
        self._redis_description = describe_client(self._base_client)
        self._client = self._engine.lease_client(self.call_timeout)
        self._lease = self._build_lease(min_replicas, min_replicas_timeout)
        self._events = EventDispatcher(self.key)
        for kind, callback in (("acquired", on_acquired), ("lost", on_lost)):
            if callback is not None:
                self._events.add(_CallbackListener(kind, callback))  # type: ignore[arg-type]
        #: The lease's core behind its lock: what the engine and test drivers turn.
        self.slot = self._build_slot(rng)
        self._subscription: Optional[Subscription] = None
        self._watchdog: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._driven = False  # True once handed to a test driver (attach_driver)
        self._finished_event = threading.Event()
        #: True in a forked child: this owner is dead there (the parent's lease is the parent's).
        self.forked = False
        self._pid = os.getpid()
        _OWNERS.add(self)

    def _build_lease(
        self, min_replicas: Optional[int], min_replicas_timeout: Optional[float]
    ) -> Lease:
        """The lease's Redis protocol, on the engine's lease client."""
        return Lease(
            self._client,
            self.key,
            ttl=self.ttl,
            identity=self.identity,
            prefix=self.prefix,
            min_replicas=min_replicas,
            min_replicas_timeout=min_replicas_timeout,
            call_timeout=self.call_timeout,
        )

    def _build_slot(self, rng: Optional[random.Random]) -> LeaseSlot:
        """The lease's core (its decisions) in a slot (its lock and I/O), wired to the
        supervisor, the events and the deferred log."""
        deferred = DeferredLog(log, self._events)
        policy = self.stuck_worker_policy
        core = LeaseCore(
            key=self.key,
            identity=self.identity,
            timing=self.timing,
            backoff=self.backoff,
            outage=outage_strategy(self.outage),
            clock=self.clock,
            emit=deferred.add_event,
            log=deferred.add,
            workers=self.supervisor,
            exit_margin=EXIT_MARGIN if policy == "exit" else 0.0,
            rng=rng,
        )
        slot = LeaseSlot(core, self._lease, self._events, deferred, stuck_policy=policy)
        slot.on_finished = self._on_finished
        if self.supervisor is not None:
            self.supervisor.attach(
                clock=self.clock, guard=slot, key=self.key, hook=self._supervisor_hook
            )
        return slot

    # -- public API -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The machine's state: stopped, acquiring, settling, holding, suspended or draining."""
        return m.STOPPED if self.forked else self.slot.core.state

    @property
    def holding(self) -> bool:
        """True while workers may run: the lease is ours and its local deadline has not passed."""
        if self.forked:
            return False
        with self.slot.lock:
            return self.slot.core.holding(self.clock())

    @property
    def fencing_token(self) -> Optional[int]:
        """The fencing token of the current holding period, else None."""
        if self.forked:
            return None
        with self.slot.lock:
            core = self.slot.core
            return core.fence if core.holding(self.clock()) else None

    def start(self) -> None:
        """Start contending for the lease; returns at once (the engine's thread runs it).

        Idempotent while running; an owner that was stopped cannot be started again.
        """
        self._check_fork()
        with self._start_lock:
            if not self._may_start():
                return
            self._subscription = self._engine.add(
                self.slot, channel=self._lease.keys.channel, backoff=self.backoff
            )
            if self.stuck_worker_policy == "exit" and self.supervisor is not None:
                self._watchdog = threading.Thread(
                    target=self.slot.watch_exit, name=f"mutexowner-{self.key}-watchdog", daemon=True
                )
                self._watchdog.start()
        self.slot.log.flush()

    def _may_start(self) -> bool:
        with self.slot.lock:
            core = self.slot.core
            if core.finished or core.stop_requested:
                raise OwnerStoppedError(
                    f"owner {self.key!r} was stopped; stop is final, create a new MutexOwner"
                )
            if core.started:
                return False
        if self.supervisor is not None and not self.supervisor.worker_names:
            raise ValueError("supervisor has no workers registered; add them before start()")
        return True

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop workers, release the lease, notify standbys; then end every owner thread.

        Blocks until done or ``timeout`` seconds passed; returns True when fully stopped.
        Idempotent, final, and safe from any thread: from a worker, a listener or the owner's
        own thread it only requests the stop and returns False. In a forked child it does
        nothing (the parent's lease is the parent's).
        """
        if self.forked or os.getpid() != self._pid:
            log.debug("stop() in a forked child ignored for key=%s", self.key)
            return True
        if not self._request_stop():
            return True  # never started: nothing to stop
        if self._driven:  # a test driver completes the stop
            self.slot.wake()
            return self.slot.finished
        if self._on_own_thread():
            self.slot.wake()
            return False
        end = None if timeout is None else default_clock() + timeout

        def left() -> Optional[float]:
            return None if end is None else max(0.0, end - default_clock())

        fast = timeout is None or timeout > FAST_STOP_CALLS * self.call_timeout
        if fast and not self._finished_event.is_set():
            # The fast path: release on this thread, no wake-up of the engine's. Only when
            # the timeout leaves room for the release's own bounded round trips.
            self._engine.run_inline(self.slot)  # (wakes the engine if it cannot)
        else:
            self.slot.wake()
        if not self._finished_event.wait(left()):
            return False
        return self._join_helpers(left)

    def _request_stop(self) -> bool:
        """Mark the stop requested; False if the owner had never started."""
        with self.slot.lock:
            core = self.slot.core
            core.request_stop()
            if not core.started:
                core.finished = True
                self._finished_event.set()
                return False
        return True

    def _on_own_thread(self) -> bool:
        """stop() from a worker, a listener or an engine thread only asks (it would wait for
        itself)."""
        current = threading.current_thread()
        sup = self.supervisor
        if sup is not None and current.name.startswith("mutexowner-") and current in sup.threads():
            return True
        return self._events.on_its_thread() or current in self._engine.threads

    def _join_helpers(self, left: Callable[[], Optional[float]]) -> bool:
        sup = self.supervisor
        # Joins the monitor thread, which joined every worker thread; a stuck worker (policy
        # "abandon" or a callable) is waited for within the time left, and reported False.
        sup_done = sup is None or sup.stop(left())
        self._unsubscribe()
        events_done = self._events.stop(left())
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.join(left())
        watchdog_done = watchdog is None or not watchdog.is_alive()
        engine_done = self._engine.stop_threads(left())
        return sup_done and events_done and watchdog_done and engine_done

    def request_stop(self) -> None:
        """Ask for ``stop()`` without waiting: safe in a signal handler (sets flags only).

        The engine then stops workers, releases the lease and ends the owner; call ``stop()``
        later from your main flow to wait for it.
        """
        with self.slot.lock:
            self.slot.core.request_stop()
        self.slot.wake()

    def __enter__(self) -> MutexOwner:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_until_holding(self, timeout: Optional[float] = None) -> bool:
        """Block (real time) until the owner holds the lease; False on timeout or stop."""
        self._check_fork()
        core = self.slot.core
        if not core.started:
            raise MutexOwnerError("wait_until_holding() before start(): it would never return")
        end = None if timeout is None else default_clock() + timeout
        with self.slot.cond:
            while not core.holding(self.clock()):
                if core.finished or core.stop_requested:
                    return False
                remaining = None if end is None else end - default_clock()
                if remaining is not None and remaining <= 0:
                    return False
                # Re-check at least every 50 ms: the deadline can pass without a notify.
                self.slot.cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            return True

    def status(self) -> OwnerStatus:
        """A consistent snapshot of the owner (safe to log: no password, no token)."""
        self._check_fork()
        sup = self.supervisor
        with self.slot.lock:
            core = self.slot.core
            now = self.clock()
            holding = core.holding(now)
            next_at = core.next_attempt_at
            return OwnerStatus(
                key=self.key,
                identity=self.identity,
                state=core.state,
                holding=holding,
                fencing_token=core.fence if holding else None,
                lease_remaining=(
                    max(0.0, core.deadline_at - now) if core.state in m.LEASE_STATES else None
                ),
                consecutive_errors=core.errors,
                last_error=core.last_error,
                next_attempt_in=(
                    max(0.0, next_at - now)
                    if next_at is not None and core.state != m.STOPPED
                    else None
                ),
                lock_delay_remaining=core.lock_delay_remaining(now),
                workers_running=bool(sup is not None and sup.alive_workers),
                stuck_workers=sup.stuck_workers if sup is not None else (),
                outage=self.outage,
                redis=self._redis_description,
            )

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every state change and lease event (see ``Event``)."""
        self._events.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; ValueError if it was not added."""
        self._events.remove(listener)

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """The library threads serving this owner now (for thread dumps and tests): the
        engine's scheduler, events and release-hub threads, shared with the other owners
        on the same client, and its watchdog. Supervisor threads not included."""
        threads = list(self._engine.threads)
        if self._watchdog is not None:
            threads.append(self._watchdog)
        return tuple(t for t in threads if t.is_alive())

    @property
    def redis_client(self) -> Any:
        """The Redis client this owner was given (or built from a URL). The owner's own lease
        calls use a connection derived from it, with their own short timeouts."""
        return self._base_client

    def __repr__(self) -> str:
        return (
            f"MutexOwner(key={self.key!r}, identity={self.identity!r}, state={self.state!r}, "
            f"fencing_token={self.slot.core.fence}, redis={self._redis_description!r})"
        )

    # -- test drivers -----------------------------------------------------------------------

    def attach_driver(self) -> LeaseSlot:
        """Hand this owner to a test driver (``mutexowner.testing.OwnerDriver``) instead of
        ``start()``: no engine thread; the driver runs its slot's turns. Returns the slot."""
        self._check_fork()
        with self._start_lock:
            if not self._may_start():
                raise RuntimeError("the owner is already running with its own thread")
            self._driven = True
            self.slot.on_finished = None
            self.slot.begin()
        return self.slot

    def simulate_crash(self) -> None:
        """Simulate this process dying (tests, demo): threads end, nothing is released.

        Workers are told to stop (a dead process runs no workers); the key stays in Redis
        until its ttl runs out, exactly as after ``kill -9``.
        """
        with self.slot.cond:
            self.slot.core.crash()
            self._finished_event.set()
            self.slot.cond.notify_all()
        if self.supervisor is not None:
            self.supervisor.stop(timeout=0)
        self._engine.remove(self.slot)
        self._unsubscribe()
        self._events.stop()
        self._engine.stop_threads(None)

    # -- internals ------------------------------------------------------------------------

    def _check_fork(self) -> None:
        if self.forked or os.getpid() != self._pid:
            self.forked = True
            raise ForkedOwnerError(
                f"MutexOwner {self.key!r} was created in process {self._pid} and cannot be used "
                f"in forked child {os.getpid()}: create a new MutexOwner after fork"
            )

    def _on_finished(self) -> None:
        """The lease finished on an engine thread: end the owner's own helpers there too (a
        stop requested by a worker or a listener is not waited for by anyone)."""
        self._finished_event.set()
        self._unsubscribe()
        self._events.stop(timeout=0)

    def _unsubscribe(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            self._engine.unsubscribe(subscription)

    def _supervisor_hook(self, what: str, detail: str) -> None:
        with self.slot.lock:  # emitted under the lock: none can follow "stopped"
            core = self.slot.core
            if what == "failed":
                core.notice_workers_failed()
            elif what == "restarted":
                core.emit("workers_restarted", detail=detail)
            elif what == "stuck":
                core.emit("workers_stuck", detail=detail)
        self.slot.log.flush()
        if what == "idle" and not self._driven:
            # The workers have all exited (a stop, a step-down): release on this thread now,
            # no hand-over to the engine's (the stop path's latency).
            self._engine.run_inline(self.slot)
        else:
            self.slot.wake()
