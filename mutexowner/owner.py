"""``MutexOwner``: holds a Redis lease from a background thread and runs workers only while held.

One thread drives a ``transitions`` state machine (declared in ``machine.py``). Each turn of
its loop (``_tick``) does what is due at the injected clock's time: acquire, renew, step
down, release. Between turns it waits on a condition until the next due time or an outside
event (stop, a release notice, the supervisor). The same turn can be called directly in
tests (``mutexowner.testing.OwnerDriver``), without the thread and without real time.

Safety rests on the local deadline (docs/safety.md, points 2-3): a lease confirmed by a
reply to a request sent at ``t_sent`` is trusted until ``t_sent + ttl - drift`` on our own
clock, which ends before Redis can expire the key. Workers are told to stop
``shutdown_timeout`` before that deadline, by this thread and, independently, by the
supervisor's own monitor thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import secrets
import socket
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal, NoReturn, Optional, Union, get_args

from transitions import EventData, Machine

from mutexowner import machine as m
from mutexowner.backoff import BackoffPolicy
from mutexowner.clock import SAFETY_WAIT_CAP, Clock, default_clock, wait_on
from mutexowner.connection import (
    client_from,
    derive_lease_client,
    describe_client,
    redact_text,
)
from mutexowner.errors import ForkedOwnerError, LeaseError, MutexOwnerError, OwnerStoppedError
from mutexowner.events import Event, EventDispatcher, EventKind, Listener
from mutexowner.lease import (
    Acquired,
    Lease,
    LeaseResult,
    Quiet,
    Renewed,
    Retaken,
    Taken,
    classify_error,
    new_token,
    validate_name,
)
from mutexowner.notify import ReleaseListener
from mutexowner.supervisor import Supervisor
from mutexowner.timing import LeaseTiming, drift_for

__all__ = ["MutexOwner", "OwnerStatus", "drift_for"]

log = logging.getLogger("mutexowner.owner")

#: What the owner does when Redis cannot confirm the lease (docs/owner.md, docs/safety.md).
OutageMode = Literal["step_down", "keep_running"]
OUTAGE_MODES: tuple[OutageMode, ...] = get_args(OutageMode)
#: The named stuck-worker policies (a callable is the third kind).
StuckPolicyName = Literal["exit", "abandon"]
STUCK_POLICIES: tuple[StuckPolicyName, ...] = get_args(StuckPolicyName)
#: Exit status used by the "exit" stuck-worker policy (EX_SOFTWARE).
STUCK_EXIT_STATUS = 70
#: A repeated Redis error is logged again at most this often (seconds).
ERROR_LOG_INTERVAL = 30.0
#: The "exit" stuck-worker policy fires this long before the lease deadline, so that the
#: process is gone before Redis can expire the key (it spends at most EXIT_LOG_BUDGET of it
#: trying to log why).
EXIT_MARGIN = 0.1
EXIT_LOG_BUDGET = 0.05
#: How many tokens that may still be in Redis (sent, outcome unknown) an owner remembers, to
#: release them all when it stops.
OUTSTANDING_TOKENS = 8
#: Prefix of our state machines' names: ``transitions`` puts it before every log line.
MACHINE_NAME_PREFIX = "mutexowner["

StuckPolicy = Union[StuckPolicyName, Callable[[tuple[str, ...]], object]]


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


def _exit_process(message: str, *args: object) -> NoReturn:
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


class _DeferredLog:
    """The owner's log lines, collected as it works and written by the events thread.

    A log handler may block (a full stderr pipe, a stuck network handler). The owner thread
    never calls one: a blocked handler must not delay a step-down, a renewal or a release,
    nor hold the lock that ``holding``, ``status()`` and ``stop()`` need (docs/safety.md,
    point 8). A turn's lines are written on the events thread after that turn's events;
    without an events thread (test drivers) they are written by the caller of ``flush``.
    """

    def __init__(self, logger: logging.Logger, submit: Callable[[Callable[[], object]], None]):
        self._logger = logger
        self._submit = submit
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, tuple[object, ...], Optional[BaseException]]] = []

    def add(
        self, level: int, message: str, *args: object, exc: Optional[BaseException] = None
    ) -> None:
        if self._logger.isEnabledFor(level):
            with self._lock:
                self._pending.append((level, message, args, exc))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            self._submit(lambda: self._write(pending))

    def _write(
        self, pending: list[tuple[int, str, tuple[object, ...], Optional[BaseException]]]
    ) -> None:
        for level, message, args, exc in pending:
            self._logger.log(level, message, *args, exc_info=exc)


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


def _default_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _CallbackListener:
    """Adapts ``on_acquired(fencing_token)`` / ``on_lost(reason)`` to the event stream."""

    def __init__(self, kind: EventKind, callback: Callable[[Any], object]) -> None:
        self.kind = kind
        self.callback = callback

    def __call__(self, event: Event) -> None:
        if event.kind != self.kind:
            return
        self.callback(event.fencing_token if self.kind == "acquired" else event.reason)


class _Model:
    """The object ``transitions`` drives: it holds only the state name (and gets the triggers)."""

    state: str


class _Guard:
    """The lease deadline as workers and the supervisor see it (a lock-free float read)."""

    def __init__(self) -> None:
        self.until: Optional[float] = -math.inf

    def valid_until(self) -> Optional[float]:
        return self.until


_OWNERS: weakref.WeakSet[MutexOwner] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for owner in list(_OWNERS):
        owner._forked = True


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
        if backoff is not None and not isinstance(backoff, BackoffPolicy):
            raise TypeError(
                f"backoff must be a BackoffPolicy or None, got {type(backoff).__name__}"
            )
        self.backoff = backoff if backoff is not None else BackoffPolicy()
        if supervisor is not None and not isinstance(supervisor, Supervisor):
            raise TypeError(
                f"supervisor must be a Supervisor or None, got {type(supervisor).__name__}"
            )
        self.supervisor = supervisor
        #: The lease's numbers (ttl, renew interval, call timeout, drift, shutdown budget).
        self.timing = LeaseTiming.of(
            ttl,
            renew_interval,
            call_timeout,
            shutdown_budget=supervisor.shutdown_timeout if supervisor is not None else 0.0,
        )
        self.ttl = self.timing.ttl
        self.drift = self.timing.drift
        self.renew_interval = self.timing.renew_interval
        self.call_timeout = self.timing.call_timeout
        self._shutdown_budget = self.timing.shutdown_budget
        if identity is None:
            identity = _default_identity()
        if not isinstance(identity, str) or not identity.strip() or "\n" in identity:
            raise ValueError(f"identity must be a non-empty single-line string, got {identity!r}")
        self.identity = identity
        for pname, callback in (("on_acquired", on_acquired), ("on_lost", on_lost)):
            if callback is not None and not callable(callback):
                raise TypeError(f"{pname} must be callable or None, got {type(callback).__name__}")
        if outage not in OUTAGE_MODES:
            raise ValueError(f"outage must be one of {', '.join(OUTAGE_MODES)}, got {outage!r}")
        self.outage = outage
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock: Clock = clock if clock is not None else default_clock
        if not (callable(stuck_worker_policy) or stuck_worker_policy in STUCK_POLICIES):
            raise ValueError(
                f"stuck_worker_policy must be one of {', '.join(STUCK_POLICIES)} or a callable, "
                f"got {stuck_worker_policy!r}"
            )
        self.stuck_worker_policy = stuck_worker_policy

        self._base_client = client_from(redis)
        self._redis_description = describe_client(self._base_client)
        self._client = derive_lease_client(self._base_client, timeout=self.call_timeout)
        self._lease = Lease(
            self._client,
            self.key,
            ttl=self.ttl,
            identity=identity,
            prefix=prefix,
            min_replicas=min_replicas,
            min_replicas_timeout=min_replicas_timeout,
            call_timeout=self.call_timeout,
        )

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # A plain Machine: every trigger is fired with the owner's lock held (see _fire), so a
        # trigger and the fields it reads change together; the machine's own locking (a
        # LockedMachine) would only add cost to every transition.
        self._model = _Model()
        self._machine = Machine(
            name=f"{MACHINE_NAME_PREFIX}{self.key}]",
            model=self._model,
            states=list(m.STATES),
            transitions=m.TRANSITIONS,
            initial=m.STOPPED,
            auto_transitions=False,
            send_event=True,
            after_state_change=self._on_state_change,
        )
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random or None, got {type(rng).__name__}")
        # Jitter of retry delays; pass a seeded Random for reproducible runs (tests, demo).
        self._rng = rng if rng is not None else random.Random()
        self._events = EventDispatcher(self.key)
        if on_acquired is not None:
            self._events.add(_CallbackListener("acquired", on_acquired))
        if on_lost is not None:
            self._events.add(_CallbackListener("lost", on_lost))
        self._guard = _Guard()
        self._log = _DeferredLog(log, self._events.submit)
        if supervisor is not None:
            supervisor.attach(
                clock=self._clock, guard=self._guard, key=self.key, hook=self._supervisor_hook
            )
        self._listener: Optional[ReleaseListener] = None

        # Machine variables; written by the thread that runs _tick (lock held).
        self._token: Optional[str] = None
        #: Tokens sent to Redis whose key may still hold them (an acquire or renew executed
        #: or of unknown outcome), oldest first: a stop releases them all, so that no late
        #: reply or lost reply leaves the key held after stop() (insertion-ordered set).
        self._outstanding: dict[str, None] = {}
        #: Workers found stuck past the lease: the policy runs outside the lock.
        self._policy_due: Optional[tuple[str, ...]] = None
        #: What a standby last reported about the holder (logged once per change).
        self._seen_holder: Optional[str] = None
        self._quiet_logged = False
        self._fence: Optional[int] = None
        self._deadline = -math.inf
        self._settle_until: Optional[float] = None
        self._quiet_until: Optional[float] = None  # a standby's view of Redis' quiet period
        self._next_attempt: Optional[float] = None
        self._errors = 0
        self._fatal = False
        self._last_error: Optional[str] = None
        self._last_error_logged = -math.inf
        # True from entering "holding" until the workers' states are left: a holding period.
        self._holding_period = False
        self._give_up_reason: Optional[str] = None
        self._workers_failures = 0
        self._stop_signalled_at: Optional[float] = None
        self._stuck_reported = False
        # Outside events; written by any thread (lock held), read by the machine.
        self._stop_requested = False
        self._release_notice = False
        self._workers_failed = False
        self._wake = False
        # Lifecycle.
        self._thread: Optional[threading.Thread] = None
        #: Applies the "exit" stuck-worker policy on time whatever the owner thread is doing.
        self._watchdog: Optional[threading.Thread] = None
        self._started = False
        self._finished = False
        self._finished_event = threading.Event()
        self._forked = False
        self._pid = os.getpid()
        _OWNERS.add(self)

    # -- public API -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The machine's state: stopped, acquiring, settling, holding, suspended or draining."""
        return m.STOPPED if self._forked else self._fsm_state

    @property
    def holding(self) -> bool:
        """True while workers may run: the lease is ours and its local deadline has not passed."""
        if self._forked:
            return False
        with self._lock:
            return self._holding_now(self._clock())

    @property
    def fencing_token(self) -> Optional[int]:
        """The fencing token of the current holding period, else None."""
        if self._forked:
            return None
        with self._lock:
            return self._fence if self._holding_now(self._clock()) else None

    def start(self) -> None:
        """Start contending for the lease; returns at once (the machine runs in a daemon thread).

        Idempotent while running; an owner that was stopped cannot be started again.
        """
        self._check_fork()
        with self._lock:
            if self._finished or self._stop_requested:
                raise OwnerStoppedError(
                    f"owner {self.key!r} was stopped; stop is final, create a new MutexOwner"
                )
            if self._started:
                return
            if self.supervisor is not None and not self.supervisor.worker_names:
                raise ValueError("supervisor has no workers registered; add them before start()")
            self._events.start()
            self._begin()
            self._listener = ReleaseListener(
                derive_lease_client(self._base_client, timeout=max(1.0, self.call_timeout)),
                self._lease.keys.channel,
                self._on_release_notice,
                name=self.key,
                backoff=self.backoff,
                ignore_from=self.identity,  # our own release must not cut our own backoff
            )
            self._listener.start()
            self._thread = threading.Thread(
                target=self._run, name=f"mutexowner-{self.key}", daemon=True
            )
            self._thread.start()
            if self.stuck_worker_policy == "exit" and self.supervisor is not None:
                self._watchdog = threading.Thread(
                    target=self._watch_exit, name=f"mutexowner-{self.key}-watchdog", daemon=True
                )
                self._watchdog.start()
        self._log.flush()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop workers, release the lease, notify standbys; then end every owner thread.

        Blocks until done or ``timeout`` seconds passed; returns True when fully stopped.
        Idempotent, final, and safe from any thread: from a worker, a listener or the owner's
        own thread it only requests the stop and returns False. In a forked child it does
        nothing (the parent's lease is the parent's).
        """
        if self._forked or os.getpid() != self._pid:
            log.debug("stop() in a forked child ignored for key=%s", self.key)
            return True
        with self._cond:
            self._stop_requested = True
            self._wake = True
            self._cond.notify_all()
            thread = self._thread
            started = self._started
        if not started:
            with self._lock:
                self._finished = True
                self._finished_event.set()
            return True
        if thread is None:  # manual mode (tests): the driver completes the stop
            return self._finished_event.is_set()
        current = threading.current_thread()
        supervised = self.supervisor is not None and current.name.startswith("mutexowner-")
        if current is thread or (supervised and current in self._supervisor_threads()):
            return False
        if self._events.on_its_thread():
            return False
        end = None if timeout is None else default_clock() + timeout

        def left() -> Optional[float]:
            return None if end is None else max(0.0, end - default_clock())

        if not self._finished_event.wait(left()):
            return False
        thread.join(left())
        sup = self.supervisor
        # Joins the monitor thread, which joined every worker thread; a stuck worker (policy
        # "abandon" or a callable) is waited for within the time left, and reported False.
        sup_done = sup is None or sup.stop(left())
        listener = self._listener
        listener_done = listener is None or listener.stop(left())
        events_done = self._events.stop(left())
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.join(left())
        watchdog_done = watchdog is None or not watchdog.is_alive()
        return (
            sup_done and listener_done and events_done and watchdog_done and not thread.is_alive()
        )

    def request_stop(self) -> None:
        """Ask for ``stop()`` without waiting: safe in a signal handler (sets flags only).

        The owner thread then stops workers, releases the lease and ends; call ``stop()``
        later from your main flow to wait for it.
        """
        with self._cond:
            self._stop_requested = True
            self._wake = True
            self._cond.notify_all()

    def __enter__(self) -> MutexOwner:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_until_holding(self, timeout: Optional[float] = None) -> bool:
        """Block (real time) until the owner holds the lease; False on timeout or stop."""
        self._check_fork()
        if not self._started:
            raise MutexOwnerError("wait_until_holding() before start(): it would never return")
        with self._cond:
            end = None if timeout is None else default_clock() + timeout
            while not self._holding_now(self._clock()):
                if self._finished or self._stop_requested:
                    return False
                remaining = None if end is None else end - default_clock()
                if remaining is not None and remaining <= 0:
                    return False
                # Re-check at least every 50 ms: the deadline can pass without a notify.
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
            return True

    def status(self) -> OwnerStatus:
        """A consistent snapshot of the owner (safe to log: no password, no token)."""
        self._check_fork()
        with self._lock:
            now = self._clock()
            lease_states = self._fsm_state in m.LEASE_STATES
            sup = self.supervisor
            return OwnerStatus(
                key=self.key,
                identity=self.identity,
                state=self._fsm_state,
                holding=self._holding_now(now),
                fencing_token=self._fence if self._holding_now(now) else None,
                lease_remaining=max(0.0, self._deadline - now) if lease_states else None,
                consecutive_errors=self._errors,
                last_error=self._last_error,
                next_attempt_in=(
                    max(0.0, self._next_attempt - now)
                    if self._next_attempt is not None and self._fsm_state != m.STOPPED
                    else None
                ),
                lock_delay_remaining=self._lock_delay_remaining(now),
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
    def redis_client(self) -> Any:
        """The Redis client this owner was given (or built from a URL). The owner's own lease
        calls use a connection derived from it, with their own short timeouts."""
        return self._base_client

    def __repr__(self) -> str:
        return (
            f"MutexOwner(key={self.key!r}, identity={self.identity!r}, state={self.state!r}, "
            f"fencing_token={self._fence}, redis={self._redis_description!r})"
        )

    # -- lifecycle internals --------------------------------------------------------------

    def _check_fork(self) -> None:
        if self._forked or os.getpid() != self._pid:
            self._forked = True
            raise ForkedOwnerError(
                f"MutexOwner {self.key!r} was created in process {self._pid} and cannot be used "
                f"in forked child {os.getpid()}: create a new MutexOwner after fork"
            )

    def _begin(self) -> None:
        """Leave ``stopped`` (lock held); ``start()`` then starts the threads, a test driver
        steps ``_tick`` itself."""
        self._started = True
        self._token = new_token()
        self._next_attempt = self._clock()
        self._fire("start")

    def _run(self) -> None:
        """The owner thread: turn the machine until it reaches stopped for good."""
        while True:
            error: Optional[BaseException] = None
            try:
                wait = self._tick()
            except BaseException as exc:  # never die (not even on SystemExit): log, carry on
                error = exc
                wait = min(self.renew_interval, 1.0)
            if error is not None:
                with contextlib.suppress(BaseException):
                    self._log.add(
                        logging.CRITICAL,
                        "owner machine error for key=%s; continuing",
                        self.key,
                        exc=error,
                    )
                    self._log.flush()
            with self._cond:
                if self._finished:
                    break
                if not self._wake:
                    # Under a lease, re-read the clock often: see SAFETY_WAIT_CAP.
                    guarding = self._fsm_state in m.LEASE_STATES or self._workers_alive()
                    cap = SAFETY_WAIT_CAP if guarding else None
                    try:
                        wait_on(self._clock, self._cond, wait, cap=cap)
                    except BaseException:  # never die, never spin
                        self._cond.wait(min(1.0, SAFETY_WAIT_CAP))
                self._wake = False
        # Final. The stop may have been requested by a worker or a listener, which do not
        # wait for it: end the helper threads here as well (stop() joins them when it waits).
        listener = self._listener
        if listener is not None:
            listener.stop(timeout=0)
        self._events.stop(timeout=0)

    def _crash(self) -> None:
        """Simulate this process dying (tests, demo): threads end, nothing is released.

        Workers are told to stop (a dead process runs no workers); the key stays in Redis
        until its ttl runs out, exactly as after ``kill -9``.
        """
        with self._cond:
            self._finished = True
            self._stop_requested = True
            self._guard.until = -math.inf
            self._next_attempt = None
            self._model.state = m.STOPPED  # no transition: a dead process reports nothing
            self._holding_period = False
            self._finished_event.set()
            self._wake = True
            self._cond.notify_all()
        if self.supervisor is not None:
            self.supervisor.stop(timeout=0)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._listener is not None:
            self._listener.stop()
        self._events.stop()

    def _supervisor_threads(self) -> tuple[threading.Thread, ...]:
        return self.supervisor.threads() if self.supervisor is not None else ()

    # -- outside events -------------------------------------------------------------------

    def _on_release_notice(self) -> None:
        with self._cond:
            self._release_notice = True
            self._wake = True
            self._cond.notify_all()

    def _supervisor_hook(self, what: str, detail: str) -> None:
        with self._cond:  # emitted under the lock: none can follow "stopped"
            if what == "failed":
                self._workers_failed = True
            self._wake = True
            self._cond.notify_all()
            if what == "restarted":
                self._emit("workers_restarted", detail=detail)
            elif what == "stuck":
                self._emit("workers_stuck", detail=detail)

    # -- the machine ----------------------------------------------------------------------

    @property
    def _fsm_state(self) -> str:
        return self._model.state

    def _fire(self, trigger: str, **kwargs: Any) -> None:
        """Move the machine (the owner's lock is held by every caller)."""
        self._machine.events[trigger].trigger(self._model, **kwargs)

    def _on_state_change(self, event: EventData) -> None:
        source = event.transition.source if event.transition is not None else None
        dest = self._fsm_state
        reason = event.kwargs.get("reason")
        self._log.add(
            logging.INFO,
            "key=%s identity=%s state %s -> %s fencing_token=%s%s",
            self.key,
            self.identity,
            source,
            dest,
            self._fence,
            f" reason={reason}" if reason else "",
        )
        self._emit("state", previous_state=source, reason=reason)
        if dest == m.HOLDING and not self._holding_period:
            self._holding_period = True
            self._emit("acquired")
        if self._holding_period and dest not in m.WORKER_STATES:
            self._holding_period = False
            self._emit("lost", reason=reason)
        self._cond.notify_all()

    def _emit(self, kind: EventKind, **fields: Any) -> None:
        if self._finished:
            return  # nothing happens to an owner after "stopped"
        self._events.emit(
            Event(
                kind=kind,
                key=self.key,
                identity=self.identity,
                state=self._fsm_state,
                time=self._clock(),
                fencing_token=self._fence,
                **fields,
            )
        )

    def _lock_delay_remaining(self, now: float) -> Optional[float]:
        """Seconds before workers may start anywhere because Redis lost its state, if known."""
        state = self._fsm_state
        if state == m.SETTLING and self._settle_until is not None:
            return max(0.0, self._settle_until - now)
        if state == m.ACQUIRING and self._quiet_until is not None:
            # 0 once the quiet period has passed, until the look that follows it is answered:
            # until then nobody knows who gets the key.
            return max(0.0, self._quiet_until - now)
        return None

    def _holding_now(self, now: float) -> bool:
        if not self._holding_period or self._fsm_state not in m.WORKER_STATES:
            return False
        return self.outage == "keep_running" or now < self._deadline

    def _tick(self) -> Optional[float]:
        """Do what is due now; return seconds until something is due again (None: only events).

        Safety actions happen inside the turn; a stuck-worker policy and the turn's log
        lines come after it, outside the lock (docs/safety.md, point 8).
        """
        try:
            return self._turn()
        finally:
            self._apply_due_policy()
            self._log.flush()

    def _turn(self) -> Optional[float]:
        with self._lock:
            if self._finished:
                return None
            now = self._clock()
            state = self._fsm_state
            if state == m.STOPPED:
                if self._stop_requested and self._started:
                    self._set_finished()
                return None
            self._handle_outside_events(now)
            self._check_deadline(now)
            self._check_stuck_workers(now)
            if (
                self._fsm_state == m.SETTLING
                and self._settle_until is not None
                and now >= self._settle_until
            ):
                self._settle_until = None
                self._guard.until = None if self.outage == "keep_running" else self._deadline
                self._fire("settled")
            if self._fsm_state == m.HOLDING:
                self._ensure_workers()
            if self._fsm_state in (m.SUSPENDED, m.DRAINING):
                self._step_down_if_due(now)
            tokens: Optional[list[str]] = None
            if self._fsm_state == m.DRAINING and not self._workers_alive():
                # Workers have exited: give the key back (on stop, every token that may be
                # in Redis; after workers failed, the one we hold, to contend again).
                if self._stop_requested:
                    tokens = list(self._outstanding)
                else:
                    tokens = [self._token] if self._token is not None else []
            elif self._stop_due():
                if not self._outstanding:
                    self._fire("stop", reason="stopped")
                    self._set_finished()
                    return None
                # A late or lost reply may have left one of our tokens in the key.
                tokens = list(self._outstanding)
            releasing_from = self._fsm_state
            call_due = (
                tokens is None
                and self._policy_due is None
                and (
                    self._next_attempt is not None
                    and self._clock() >= self._next_attempt
                    and self._fsm_state != m.STOPPED
                    and not (self._fsm_state == m.ACQUIRING and self._workers_alive())
                )
            )
        # Redis round trips happen without the lock: status() and stop() never wait on Redis.
        if tokens is not None:
            released = self._release_all(tokens)
            with self._lock:
                for token in tokens:
                    self._outstanding.pop(token, None)
                if self._fsm_state == releasing_from and not self._finished:
                    self._after_release(released)
        elif call_due:
            self._call_redis()
        with self._lock:
            return self._seconds_until_due()

    def _stop_due(self) -> bool:
        """stop() was asked, the lease is gone and no worker runs (or the stuck-worker policy
        was applied to those that do): the stop can complete."""
        return (
            self._fsm_state == m.ACQUIRING
            and self._stop_requested
            and (not self._workers_alive() or self._stuck_reported)
        )

    def _handle_outside_events(self, now: float) -> None:
        state = self._fsm_state
        if self._stop_requested and state in (m.SETTLING, m.HOLDING, m.SUSPENDED):
            self._give_up("stopped", now)
        elif self._workers_failed:
            self._workers_failed = False
            if state in (m.HOLDING, m.SUSPENDED):
                self._workers_failures += 1
                self._give_up("workers_failed", now)
        if self._release_notice:
            self._release_notice = False
            # A notice cuts a standby's wait, never its backoff after errors.
            if self._fsm_state == m.ACQUIRING and not self._stop_requested and not self._errors:
                self._next_attempt = now

    def _check_deadline(self, now: float) -> None:
        """The local deadline passed without a confirmed renewal: the lease is gone."""
        if self.outage == "keep_running" or self._fsm_state not in m.LEASE_STATES:
            return
        if now >= self._deadline:
            self._lose("expired", now)
            if self._errors:
                self._next_attempt = now + self._retry_delay()

    def _lose(self, reason: str, now: float) -> None:
        """Holding ended against our will: stop workers now, forget the token."""
        self._guard.until = -math.inf
        self._signal_workers_stop(now)
        self._workers_failures = 0  # the workers were not the problem this time
        self._token = new_token()
        self._settle_until = None
        self._fire("lost", reason=reason)
        # A pending stop completes on this turn (_stop_due), releasing what may be left.

    def _give_up(self, reason: str, now: float) -> None:
        """Voluntary end (stop or workers failed): drain workers while still renewing."""
        self._give_up_reason = reason
        self._signal_workers_stop(now)
        self._fire("give_up", reason=reason)

    def _signal_workers_stop(self, now: float) -> None:
        sup = self.supervisor
        if sup is not None and sup.running:
            if self._stop_signalled_at is None:
                self._stop_signalled_at = now
            sup.stop(timeout=0)

    def _workers_alive(self) -> bool:
        sup = self.supervisor
        return sup is not None and bool(sup.alive_workers)

    def _ensure_workers(self) -> None:
        """In ``holding``, the workers run: start them if they are not running."""
        sup = self.supervisor
        if sup is None or sup.running or self._stop_requested:
            return
        if self.outage == "step_down" and self._clock() >= self._deadline - self._shutdown_budget:
            return  # too late in this lease: the next confirmed renewal starts them
        self._stop_signalled_at = None
        self._stuck_reported = False
        sup.start(fencing_token=self._fence)

    def _step_down_if_due(self, now: float) -> None:
        """Tell workers to stop early enough that shutdown_timeout fits before the deadline."""
        if self.outage == "keep_running":
            return
        if now >= self._deadline - self._shutdown_budget and self._workers_alive():
            first = self._stop_signalled_at is None
            self._signal_workers_stop(now)
            if first:
                self._log.add(
                    logging.WARNING,
                    "key=%s identity=%s stepping down: lease deadline in %.3f s not confirmed",
                    self.key,
                    self.identity,
                    max(0.0, self._deadline - now),
                )

    def _signalled_at(self) -> Optional[float]:
        """When workers were first told to stop, by this thread or the supervisor's monitor."""
        sup_signalled = self.supervisor.signalled_at if self.supervisor is not None else None
        times = [t for t in (self._stop_signalled_at, sup_signalled) if t is not None]
        return min(times) if times else None

    def _stuck_policy_at(self, signalled: float) -> Optional[float]:
        """When stuck_worker_policy is due for workers told to stop at ``signalled``.

        Once the lease is gone: after their shutdown budget. While it is ours, a stuck worker
        is waited for (renewing); at the deadline the policy is due, and "exit" is due
        EXIT_MARGIN earlier, so the process is gone before Redis can expire the key.
        """
        budget_end = signalled + self._shutdown_budget
        if self._fsm_state in (m.ACQUIRING, m.STOPPED):
            return budget_end
        if self.outage != "step_down":
            return None
        margin = EXIT_MARGIN if self.stuck_worker_policy == "exit" else 0.0
        return max(signalled, max(budget_end, self._deadline) - margin)

    def _check_stuck_workers(self, now: float) -> None:
        """Workers alive after the lease is gone and shutdown_timeout passed: the policy is due
        (applied by _apply_due_policy, outside the lock)."""
        signalled = self._signalled_at()
        if self._stuck_reported or signalled is None or not self._workers_alive():
            return
        due_at = self._stuck_policy_at(signalled)
        if due_at is None or now < due_at:
            return
        self._stuck_reported = True
        stuck = self.supervisor.alive_workers if self.supervisor is not None else ()
        self._policy_due = stuck
        self._emit("stuck_policy", detail=", ".join(stuck), reason="lease_lost")

    def _exit_due_at(self) -> Optional[float]:
        """When the "exit" policy is due for workers still running (lock held); None: not."""
        if self._stuck_reported or not self._workers_alive():
            return None
        signalled = self._signalled_at()
        return None if signalled is None else self._stuck_policy_at(signalled)

    def _watch_exit(self) -> None:
        """The "exit" policy's own thread. The owner thread applies the policy after its turn,
        which may sit in a Redis call that outlives ``call_timeout`` (a reconnect can block in
        DNS): the process must still be gone EXIT_MARGIN before the deadline (docs/safety.md,
        point 11). This thread does no I/O and takes the owner's lock only to read."""
        with self._cond:
            while True:
                if self._finished:
                    return
                due = self._exit_due_at()
                now = self._clock()
                if due is not None and now >= due:
                    self._stuck_reported = True
                    stuck = self.supervisor.alive_workers if self.supervisor is not None else ()
                    break
                guarding = due is not None or self._fsm_state in m.LEASE_STATES
                # Workers may be told to stop by the monitor without a notify here: re-read
                # the state at least every SAFETY_WAIT_CAP while a lease or a worker is live.
                try:
                    wait_on(
                        self._clock,
                        self._cond,
                        None if due is None else due - now,
                        cap=SAFETY_WAIT_CAP if guarding or self._workers_alive() else None,
                    )
                except BaseException:  # never die: a wait that fails is retried
                    continue
        _exit_process(
            "key=%s identity=%s lost the lease while worker(s) %s still run: applying "
            "stuck_worker_policy='exit'",
            self.key,
            self.identity,
            ", ".join(stuck),
        )

    def _apply_due_policy(self) -> None:
        """Apply stuck_worker_policy (lock not held: user code and exits never run under it)."""
        with self._lock:
            stuck, self._policy_due = self._policy_due, None
        if stuck is None:
            return
        policy = self.stuck_worker_policy
        message = (
            "key=%s identity=%s lost the lease while worker(s) %s still run: applying "
            "stuck_worker_policy=%r"
        )
        name = policy if isinstance(policy, str) else "callable"
        if policy == "exit":
            _exit_process(message, self.key, self.identity, ", ".join(stuck), name)
        self._log.add(logging.CRITICAL, message, self.key, self.identity, ", ".join(stuck), name)
        if callable(policy) and self._thread is None:
            self._run_policy(policy, stuck)  # a test driver: inline, as events are
        elif callable(policy):
            # On a thread of its own: a callable that blocks must not stop the owner.
            threading.Thread(
                target=self._run_policy,
                args=(policy, stuck),
                name=f"mutexowner-{self.key}-policy",
                daemon=True,
            ).start()

    def _run_policy(
        self, policy: Callable[[tuple[str, ...]], object], stuck: tuple[str, ...]
    ) -> None:
        try:
            policy(stuck)
        except BaseException as exc:  # even SystemExit: nothing of the owner may end with it
            self._log.add(logging.ERROR, "stuck_worker_policy callable failed", exc=exc)
            self._log.flush()

    def _release_all(self, tokens: list[str]) -> bool:
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
        """Release the key if it holds ``token`` (one bounded round trip); None on error, when
        it expires by itself."""
        try:
            return self._lease.release(token)
        except ForkedOwnerError:
            raise
        except Exception as exc:
            error = classify_error(exc)
            self._log.add(
                logging.WARNING,
                "key=%s could not release the lease (%s); it expires within %.3g s",
                self.key,
                redact_text(str(error)),
                max(0.0, self._deadline - self._clock()),
            )
            return None

    def _after_release(self, released: bool) -> None:
        """Workers have all exited and the key is released (also a key we never held, taken
        by a reply that came after stop() was requested): stop, or contend again later."""
        if released:
            self._emit("released")
        self._guard.until = -math.inf
        self._token = new_token()
        reason = self._give_up_reason or "stopped"
        self._give_up_reason = None
        if self._stop_requested:
            self._fire("stop", reason="stopped")
            self._set_finished()
            return
        self._fire("released", reason=reason)
        delay = self.backoff.delay(max(1, self._workers_failures), self._rng)
        self._next_attempt = self._clock() + delay

    def _set_finished(self) -> None:
        """Reached stopped for good (lock held)."""
        self._finished = True
        self._next_attempt = None
        self._guard.until = -math.inf
        self._finished_event.set()
        self._cond.notify_all()

    def _seconds_until_due(self) -> Optional[float]:
        now = self._clock()
        state = self._fsm_state
        if state == m.STOPPED:
            return None
        if self._stop_due():
            return 0.0
        due: list[float] = []
        if self._next_attempt is not None and not (state == m.ACQUIRING and self._workers_alive()):
            due.append(self._next_attempt)
        # Every moment listed must be one at which a tick changes something: a moment in
        # the past means "tick again now", so a past one that changes nothing would spin.
        if state in m.LEASE_STATES and self.outage == "step_down":
            due.append(self._deadline)
            step_down = self._deadline - self._shutdown_budget
            if self._workers_alive() and (step_down > now or self._stop_signalled_at is None):
                due.append(step_down)
        if state == m.SETTLING and self._settle_until is not None:
            due.append(self._settle_until)
        signalled = self._signalled_at()
        if signalled is not None and not self._stuck_reported and self._workers_alive():
            stuck_at = self._stuck_policy_at(signalled)
            if stuck_at is not None:
                due.append(stuck_at)
        future = [t for t in due if t > now]
        if len(future) < len(due):
            return 0.0
        return min(future) - now if future else None

    # -- Redis round trips ----------------------------------------------------------------

    def _call_redis(self) -> None:
        """One acquire or renew round trip (no lock held while waiting for Redis)."""
        with self._lock:
            state = self._fsm_state
            token = self._token or new_token()
            self._token = token
            self._remember(token)
            fence = self._fence if state in m.LEASE_STATES else None
        t_sent = self._clock()
        try:
            if fence is None:
                result: LeaseResult = self._lease.acquire(token)
            else:
                result = self._lease.renew(token, fence)
        except ForkedOwnerError:
            raise
        except Exception as exc:
            with self._lock:
                if not self._finished:
                    self._on_error(classify_error(exc))
            return
        t_recv = self._clock()
        with self._lock:
            self._on_reply(result, token, t_sent, t_recv, renewing=fence is not None)

    def _remember(self, token: str) -> None:
        """``token`` is about to be sent in an acquire or renew: it may be in Redis from now."""
        self._outstanding.pop(token, None)
        self._outstanding[token] = None
        while len(self._outstanding) > OUTSTANDING_TOKENS:
            del self._outstanding[next(iter(self._outstanding))]

    def _on_reply(
        self, result: LeaseResult, token: str, t_sent: float, t_recv: float, *, renewing: bool
    ) -> None:
        if self._fsm_state == m.STOPPED or self._finished:
            return
        # A "taken" or "quiet" reply does not make the token safe to forget: an earlier
        # request with it may still be in the network and set the key later (found by the
        # model-based test). Tokens are forgotten only once a release was tried.
        errors_before = self._errors
        if self._errors:
            self._log.add(
                logging.INFO,
                "key=%s Redis answering again after %d failed call(s)",
                self.key,
                self._errors,
            )
        self._errors = 0
        self._fatal = False
        self._last_error = None
        self._quiet_until = None
        if (
            renewing
            and self._fsm_state in m.LEASE_STATES
            and self.outage == "step_down"
            and t_recv >= self._deadline
        ):
            # The reply came after our lease had ended locally: whatever it says, the old
            # holding period is over. Treat the reply as a fresh acquisition.
            self._lose("expired", t_recv)
        if isinstance(result, Taken):
            self._on_taken(result, t_recv)
            return
        if isinstance(result, Quiet):
            # Free, but Redis lost its state less than a ttl ago: a holder from before may
            # still be running. Look again when the quiet period ends.
            self._quiet_until = t_recv + result.lock_delay
            self._next_attempt = self._quiet_until + 0.001
            if not self._quiet_logged:
                self._quiet_logged = True
                self._log.add(
                    logging.INFO,
                    "key=%s identity=%s waiting %.3f s (lock-delay) before taking the lease%s: "
                    "Redis has no epoch marker for it (first use of this key, or Redis lost "
                    "its data), so a holder from before may still be running",
                    self.key,
                    self.identity,
                    result.lock_delay,
                    " after the outage" if errors_before else "",
                )
            return
        self._quiet_logged = False
        if self._fsm_state == m.ACQUIRING:
            # The key holds the token of this call (a late renewal reply included).
            self._token = token
            if self._stop_requested:
                # stop() is pending (waiting for a draining worker, say): never begin a new
                # holding period; the stop releases the key (_outstanding holds the token).
                return
            self._on_acquired(result, t_sent, t_recv)
            return
        # Renewal of a lease we hold.
        self._fence = result.fencing_token
        self._deadline = self.timing.deadline(t_sent)
        self._guard.until = None if self.outage == "keep_running" else self._deadline
        self._next_attempt = t_sent + self.renew_interval
        if self._fsm_state == m.SETTLING and isinstance(result, Retaken) and result.lock_delay > 0:
            # Our key vanished while we waited (Redis lost its state again?): wait for the
            # quiet period Redis reports now, if it ends later than the one we wait for.
            settle = t_recv + result.lock_delay + self.drift
            self._settle_until = max(self._settle_until or settle, settle)
        elif isinstance(result, Retaken) and result.lock_delay > 0:
            self._log.add(
                logging.WARNING,
                "key=%s Redis had lost the lease; re-taken by its valid holder %s",
                self.key,
                self.identity,
            )
        sup = self.supervisor
        if sup is not None:
            sup.lease_changed()
            if sup.running and sup.restarts == 0:
                self._workers_failures = 0  # the workers have been healthy for a while
        if self._fsm_state == m.SUSPENDED:
            self._fire("renewed")
        self._emit("renewed", latency=t_recv - t_sent)

    def _on_acquired(self, result: LeaseResult, t_sent: float, t_recv: float) -> None:
        assert isinstance(result, (Acquired, Renewed, Retaken))
        if t_recv >= self.timing.deadline(t_sent):
            # The reply took longer than the lease itself: it confirms nothing. The key holds
            # our token, so the next attempt (now) renews it idempotently if it still can.
            self._next_attempt = t_recv
            return
        self._fence = result.fencing_token
        self._deadline = self.timing.deadline(t_sent)
        self._next_attempt = t_sent + self.renew_interval
        self._stop_signalled_at = None
        self._stuck_reported = False
        self._seen_holder = None
        if result.lock_delay > 0:
            # Redis lost its state recently: a lease granted before the loss may still be
            # running on its holder's clock until the quiet period ends (docs/safety.md,
            # point 5).
            # Counted from the reply, which comes after Redis computed the delay.
            self._settle_until = t_recv + result.lock_delay + self.drift
            self._guard.until = -math.inf
            self._log.add(
                logging.WARNING,
                "key=%s no lease state in Redis from before (a fresh or restarted server, or "
                "data loss): waiting %.3f s (lock-delay) before starting workers",
                self.key,
                result.lock_delay,
            )
            self._fire("lock_delay", reason="lock_delay")
            return
        self._guard.until = None if self.outage == "keep_running" else self._deadline
        self._fire("acquired")
        self._ensure_workers()

    def _on_taken(self, result: Taken, t_recv: float) -> None:
        if self._fsm_state in m.LEASE_STATES:
            self._lose("taken", t_recv)
            self._log.add(
                logging.WARNING,
                "key=%s identity=%s lease taken by %s",
                self.key,
                self.identity,
                result.holder,
            )
        if self._fsm_state == m.ACQUIRING:
            if result.holder != self._seen_holder:
                self._seen_holder = result.holder
                self._log.add(
                    logging.INFO,
                    "key=%s identity=%s standing by: the lease is held by %s (%.3f s left)",
                    self.key,
                    self.identity,
                    result.holder,
                    result.ttl_left,
                )
            # Look again when the holder's lease would expire; a release notice comes sooner.
            self._next_attempt = t_recv + result.ttl_left + 0.001

    def _on_error(self, error: LeaseError) -> None:
        now = self._clock()
        self._errors += 1
        self._fatal = not error.transient
        self._last_error = redact_text(str(error))
        self._log_error(error, now)
        self._emit("error", error=self._last_error, error_kind=error.kind)
        if self._fsm_state == m.HOLDING:
            self._fire("renew_failed", reason=error.kind)
            self._emit("suspended", error=self._last_error, error_kind=error.kind)
        self._next_attempt = self._retry_at(now)

    def _log_error(self, error: LeaseError, now: float) -> None:
        first = self._errors == 1
        if not first and now - self._last_error_logged < ERROR_LOG_INTERVAL:
            return
        self._last_error_logged = now
        level = logging.ERROR if not error.transient else logging.WARNING
        self._log.add(
            level,
            "key=%s identity=%s state=%s Redis %s error (%d in a row): %s",
            self.key,
            self.identity,
            self._fsm_state,
            "fatal" if not error.transient else "transient",
            self._errors,
            self._last_error,
        )

    def _retry_delay(self) -> float:
        if self._fatal:
            return self.backoff.max_delay
        return self.backoff.delay(max(1, self._errors), self._rng)

    def _retry_at(self, now: float) -> float:
        """When to try again after an error; while holding, one retry lands before step-down."""
        at = now + self._retry_delay()
        if self._fsm_state in m.LEASE_STATES and self.outage == "step_down":
            # Latest start for a call (up to two round trips) that still confirms the lease
            # before workers must be told to stop; after that point, keep trying until the
            # deadline, at most twice per call_timeout.
            latest = self._deadline - self._shutdown_budget - 2 * self.call_timeout
            at = min(at, latest) if latest > now else min(at, now + self.call_timeout / 2)
            if self._workers_alive() and at + self.call_timeout > self._deadline:
                # Workers still running this close to the deadline are late to stop: be free
                # at the deadline to apply stuck_worker_policy, not inside a call whose reply
                # would come too late to keep the lease anyway.
                at = max(at, self._deadline)
        elif self.outage == "keep_running" and self._fsm_state in m.WORKER_STATES:
            # Workers run on regardless: re-take the lease as soon as Redis is back rather
            # than after a long backoff, so a second runner's window stays short.
            at = min(at, now + self.renew_interval)
        return at
