"""A cooperative one_for_all supervisor for worker threads.

Python threads cannot be killed, so workers cooperate: each gets a ``WorkerContext`` whose
``stopping`` event is set when it must stop, and whose ``ensure_held()`` raises
``LeaseLost`` when a side effect could now run twice. The supervisor starts workers in
registration order, stops them in reverse order, restarts them all together when one
ends (Erlang/OTP one_for_all), and gives up after more than ``max_restarts`` restarts
within ``max_seconds``. It is usable on its own; inside a ``MutexOwner`` it runs only
while the lease is held, and stops the workers by the lease deadline on its own clock,
even when the owner thread is busy.

One monitor thread (``mutexowner-supervisor``; ``mutexowner-<key>-supervisor`` under an
owner) does the starting and restarting; stopping sets the workers' ``stopping`` at once
(from whichever thread asks), and the monitor waits for them. A worker that ignores
``stopping`` past ``shutdown_timeout`` is reported (CRITICAL log, ``stuck_workers``, the
owner's hook) and waited for: nothing new starts while it runs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, TypeVar, Union, overload

from mutexowner.backoff import BackoffPolicy
from mutexowner.clock import SAFETY_WAIT_CAP, Clock, WaitableClock, default_clock, wait_on
from mutexowner.errors import LeaseLost

__all__ = ["LeaseGuard", "Supervisor", "WorkerContext"]

log = logging.getLogger("mutexowner.supervisor")

WorkerTarget = Callable[..., Any]
F = TypeVar("F", bound=WorkerTarget)

#: Real seconds ``stop()`` waits beyond ``shutdown_timeout`` by default (thread hand-over).
STOP_MARGIN = 1.0
#: Real seconds ``wait_settled`` blocks before re-checking (a liveness net, not timing).
SETTLE_POLL = 0.02


class LeaseGuard(Protocol):
    """What the supervisor and its workers may know of the owner's lease: its local deadline."""

    def valid_until(self) -> Optional[float]:
        """Clock time at which the lease ends by the owner's clock; None for no deadline."""


def _real_timeout(seconds: float) -> Optional[float]:
    """A timeout for ``threading`` waits: None (forever) for values it cannot represent."""
    return None if seconds >= threading.TIMEOUT_MAX else seconds


class WorkerContext:
    """What a worker sees: its name, the stop signal, the fencing token, and a lease check.

    A fresh context is made for every run of a worker, so a restarted worker never sees the
    ``stopping`` event of its previous run.
    """

    def __init__(
        self,
        name: str,
        *,
        fencing_token: Optional[int] = None,
        restart_count: int = 0,
        clock: Clock = default_clock,
        guard: Optional[LeaseGuard] = None,
        key: Optional[str] = None,
    ) -> None:
        self.name = name
        #: Set when the worker must stop; check it often, or wait on it.
        self.stopping = threading.Event()
        #: The lease's fencing token for this holding period (None without an owner).
        self.fencing_token = fencing_token
        #: How many one_for_all restarts happened before this run (0 for the first).
        self.restart_count = restart_count
        self._clock = clock
        self._guard = guard
        self._key = key
        self._wake = threading.Condition(threading.Lock())

    def __repr__(self) -> str:
        return (
            f"WorkerContext(name={self.name!r}, fencing_token={self.fencing_token}, "
            f"restart_count={self.restart_count}, stopping={self.stopping.is_set()})"
        )

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early with True as soon as ``stopping`` is set.

        Returns False when the time passed without a stop request. ``seconds <= 0`` only
        checks; ``math.inf`` waits for the stop request alone.
        """
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or math.isnan(seconds)
        ):
            raise TypeError(f"seconds must be a number, got {seconds!r}")
        seconds = max(0.0, float(seconds))
        if not isinstance(self._clock, WaitableClock):
            return self.stopping.wait(_real_timeout(seconds))
        end = self._clock() + seconds
        with self._wake:
            while not self.stopping.is_set():
                remaining = end - self._clock()
                if remaining <= 0:
                    break
                wait_on(self._clock, self._wake, remaining)
        return self.stopping.is_set()

    def ensure_held(self) -> None:
        """Raise ``LeaseLost`` if the worker must not act: stopping, or lease deadline passed.

        A local check, no Redis call: cheap enough before every side effect. After a
        process pause it is what stops a worker that wakes before the owner thread does.
        """
        if self.stopping.is_set():
            raise LeaseLost(f"worker {self.name!r} is stopping")
        if self._guard is not None:
            deadline = self._guard.valid_until()
            if deadline is not None and self._clock() >= deadline:
                raise LeaseLost(
                    f"worker {self.name!r}: the lease {self._key!r} passed its local deadline"
                )

    def _signal_stop(self) -> None:
        self.stopping.set()
        with self._wake:
            self._wake.notify_all()


@dataclass(frozen=True)
class _Spec:
    name: str
    target: WorkerTarget
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class _Run:
    """One run of one worker: its thread, its context, and how it ended."""

    spec: _Spec
    ctx: WorkerContext
    thread: threading.Thread = field(init=False)
    done: bool = False
    error: Optional[BaseException] = None
    stuck: bool = False


@dataclass
class _Exit:
    run: _Run
    #: True when the worker ended after being asked to stop (not a reason to restart).
    expected: bool = field(default=False)


def _non_negative(name: str, value: object, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or number < 0 or (math.isinf(number) and not allow_inf):
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind} >= 0, got {value!r}")
    return number


def _checked_arguments(
    max_restarts: int,
    max_seconds: float,
    shutdown_timeout: float,
    restart_backoff: Optional[BackoffPolicy],
    clock: Optional[Clock],
) -> tuple[float, float]:
    """Validate ``Supervisor``'s arguments; ``max_seconds`` and ``shutdown_timeout`` as floats."""
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
        raise TypeError(f"max_restarts must be an int, got {type(max_restarts).__name__}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts}")
    window = _non_negative("max_seconds", max_seconds)
    if window == 0:
        raise ValueError("max_seconds must be a finite number > 0, got 0")
    budget = _non_negative("shutdown_timeout", shutdown_timeout)
    if restart_backoff is not None and not isinstance(restart_backoff, BackoffPolicy):
        raise TypeError(
            "restart_backoff must be a BackoffPolicy or None, got "
            f"{type(restart_backoff).__name__}"
        )
    if clock is not None and not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
    return window, budget


class Supervisor:
    """Starts, stops and restarts registered worker threads together (one_for_all).

    ``max_restarts`` restarts are allowed within any ``max_seconds`` window; the next one
    makes the supervisor stop everything and report failure (``failed``). ``shutdown_timeout``
    is how long each worker gets, from the moment ``stopping`` is set, before it is reported
    as stuck. ``restart_backoff`` (a ``BackoffPolicy``) paces restarts: before restart ``n``
    of the current window it waits ``restart_backoff.delay(n)``; default: restart at once.
    """

    def __init__(
        self,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        shutdown_timeout: float = 5.0,
        restart_backoff: Optional[BackoffPolicy] = None,
        *,
        clock: Optional[Clock] = None,
    ) -> None:
        self._max_seconds, self._shutdown_timeout = _checked_arguments(
            max_restarts, max_seconds, shutdown_timeout, restart_backoff, clock
        )
        self._max_restarts = max_restarts
        self._restart_backoff = restart_backoff
        self._clock: Clock = clock if clock is not None else default_clock
        self._clock_given = clock is not None
        self._specs: list[_Spec] = []
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._runs: list[_Run] = []
        self._exits: list[_Exit] = []
        self._restart_times: list[float] = []
        self._restarts = 0
        # When the workers of the current run were first told to stop (clock time), if so.
        self._signalled_at: Optional[float] = None
        self._failed = False
        self._stop_requested = False
        self._monitor: Optional[threading.Thread] = None
        self._idle = threading.Event()
        self._idle.set()
        self._fencing_token: Optional[int] = None
        self._guard: Optional[LeaseGuard] = None
        self._key: Optional[str] = None
        self._hook: Optional[Callable[[str, str], None]] = None
        self._bound = False
        self._last_stop_reason: Optional[str] = None
        #: Log lines about starting workers, written by the monitor thread outside the lock:
        #: start() runs on the owner's thread, which must never wait on a log handler.
        self._announce: list[tuple[int, str, tuple[object, ...], Optional[BaseException]]] = []
        # True while the monitor thread is working (not waiting): lets test drivers with a
        # fake clock wait for it before moving time on.
        self._busy = False

    # -- registration ---------------------------------------------------------------------

    def add(
        self,
        target: WorkerTarget,
        name: Optional[str] = None,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> WorkerTarget:
        """Register ``target(ctx, *args, **kwargs)`` as a worker; returns ``target``.

        ``name`` defaults to the target's ``__name__``; names are unique per supervisor.
        """
        if not callable(target):
            raise TypeError(f"target must be callable, got {type(target).__name__}")
        if name is None:
            name = getattr(target, "__name__", None) or type(target).__name__
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if not isinstance(args, tuple):
            raise TypeError(f"args must be a tuple, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
        with self._lock:
            if self.running:
                raise RuntimeError("cannot add workers while the supervisor is running")
            if any(spec.name == name for spec in self._specs):
                raise ValueError(f"a worker named {name!r} is already registered")
            self._specs.append(_Spec(name, target, args, dict(kwargs or {})))
        return target

    @overload
    def worker(self, name: F) -> F: ...

    @overload
    def worker(
        self,
        name: Optional[str] = None,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Callable[[F], F]: ...

    def worker(
        self,
        name: Union[str, F, None] = None,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Union[F, Callable[[F], F]]:
        """Decorator form of ``add``: ``@sup.worker(name="consumer")`` (or bare ``@sup.worker``)."""
        if callable(name) and not isinstance(name, str):
            # Used bare, without parentheses: ``name`` is the decorated function.
            self.add(name, args=args, kwargs=kwargs)
            return name

        def register(target: F) -> F:
            self.add(target, name=name, args=args, kwargs=kwargs)
            return target

        return register

    @property
    def worker_names(self) -> tuple[str, ...]:
        """Registered worker names, in start order."""
        with self._lock:
            return tuple(spec.name for spec in self._specs)

    # -- state ----------------------------------------------------------------------------

    @property
    def signalled_at(self) -> Optional[float]:
        """Clock time the current run's workers were first told to stop (None: not yet)."""
        return self._signalled_at

    # The settings are read-only: an owner checks its timing rule against them once.
    @property
    def max_restarts(self) -> int:
        return self._max_restarts

    @property
    def max_seconds(self) -> float:
        return self._max_seconds

    @property
    def shutdown_timeout(self) -> float:
        return self._shutdown_timeout

    @property
    def restart_backoff(self) -> Optional[BackoffPolicy]:
        return self._restart_backoff

    @property
    def running(self) -> bool:
        """True from ``start()`` until the monitor has joined every worker thread of the run."""
        return not self._idle.is_set()

    @property
    def failed(self) -> bool:
        """True when the supervisor gave up: too many restarts within ``max_seconds``."""
        return self._failed

    @property
    def restarts(self) -> int:
        """one_for_all restarts since the last ``start()``."""
        return self._restarts

    @property
    def stuck_workers(self) -> tuple[str, ...]:
        """Workers that ignored ``stopping`` past ``shutdown_timeout`` and are still alive."""
        with self._lock:
            return tuple(run.spec.name for run in self._runs if run.stuck and not run.done)

    @property
    def alive_workers(self) -> tuple[str, ...]:
        """Names of worker threads of the current run that have not exited yet."""
        with self._lock:
            return tuple(run.spec.name for run in self._runs if not run.done)

    @property
    def last_stop_reason(self) -> Optional[str]:
        """Why the last run ended: "stopped", "lease_deadline" or "failed"."""
        return self._last_stop_reason

    def __repr__(self) -> str:
        return (
            f"Supervisor(workers={list(self.worker_names)}, running={self.running}, "
            f"failed={self.failed}, restarts={self.restarts})"
        )

    # -- control --------------------------------------------------------------------------

    def start(self, fencing_token: Optional[int] = None) -> None:
        """Start every worker, in registration order, each in a thread ``mutexowner-<name>``.

        RuntimeError if no worker is registered or the supervisor is still running (a
        ``stop(timeout=0)`` may still be in progress: ``wait_idle()`` first).
        """
        if fencing_token is not None and (
            isinstance(fencing_token, bool) or not isinstance(fencing_token, int)
        ):
            raise TypeError(f"fencing_token must be an int or None, got {fencing_token!r}")
        with self._lock:
            if not self._specs:
                raise RuntimeError("no workers registered; call add() or use @worker first")
            if self.running:
                raise RuntimeError("the supervisor is already running")
            self._fencing_token = fencing_token
            self._failed = False
            self._restarts = 0
            self._restart_times = []
            self._exits = []
            self._runs = []
            self._stop_requested = False
            self._last_stop_reason = None
            self._idle.clear()
            self._busy = True
            monitor = threading.Thread(
                target=self._monitor_main, name=self._thread_name("supervisor"), daemon=True
            )
            # The monitor first, so that no worker ever runs unsupervised; it waits for this
            # lock before looking at anything.
            try:
                monitor.start()
            except BaseException:
                self._busy = False
                self._idle.set()
                raise
            self._monitor = monitor
            self._start_run(restart_count=0)

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop all workers (reverse order); True when all have exited.

        Waits up to ``timeout`` real seconds (default: ``shutdown_timeout`` plus a margin;
        ``0`` only asks). Idempotent and safe from any thread; called from a worker it only
        asks and returns False.
        """
        wait = self.shutdown_timeout + STOP_MARGIN
        if timeout is not None:
            wait = _non_negative("timeout", timeout, allow_inf=True)
        current = threading.current_thread()
        with self._cond:
            self._stop_requested = True
            # Signal the workers here, not only from the monitor: the owner's step-down must
            # not depend on the monitor thread, which may be busy (or blocked in a log
            # handler) at this moment (docs/safety.md, point 8).
            self._signal_runs(list(self._runs))
            self._cond.notify_all()
            monitor = self._monitor
            inside = current is monitor or any(run.thread is current for run in self._runs)
        if inside:
            return not self.running
        # Real seconds, whatever the clock: with a fake clock the shutdown budget passes only
        # as the test advances it, so tests pass timeout=0 and step the clock instead.
        end = time.monotonic() + wait
        if not self._idle.wait(_real_timeout(wait)):
            return False
        if monitor is not None:
            # Past idle the monitor only calls the owner's hook: bounded by what is left.
            remaining = end - time.monotonic()
            monitor.join(_real_timeout(max(0.0, remaining)))
        return True

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait (real time) until no worker of this supervisor is running."""
        return self._idle.wait(None if timeout is None else _real_timeout(timeout))

    # -- the seam an owner drives --------------------------------------------------------
    #
    # A lease owner (``MutexOwner``) uses only these, plus start()/stop() and the read-only
    # properties above: attach once, start the workers with the lease's fencing token, wake
    # the monitor when the deadline moves (lease_changed), stop them (stop(timeout=0) only
    # asks), and hear back through the hook: "restarted", "stuck", "failed" (give up),
    # "idle". The step-down by the deadline needs no call: the monitor reads the guard.

    def attach(
        self,
        *,
        clock: Clock,
        guard: LeaseGuard,
        key: str,
        hook: Callable[[str, str], None],
    ) -> None:
        """Attach to one owner: its clock, its lease deadline, and a hook for what happens.

        The hook gets ``(what, detail)``: "restarted" (detail: the workers that ended),
        "stuck" (the stuck workers), "failed" (given up: sent as soon as decided, before
        the workers have stopped) and "idle" (the last stop reason, once all have exited).
        It is called from the monitor thread with no supervisor lock held. Thread names
        include ``key`` from now on, so a thread dump of several owners can be read.
        """
        with self._lock:
            if self._bound:
                raise ValueError("this Supervisor already belongs to another MutexOwner")
            if self._clock_given and self._clock is not clock:
                raise ValueError("the Supervisor's clock differs from the MutexOwner's clock")
            self._clock = clock
            self._guard = guard
            self._key = key
            self._hook = hook
            self._bound = True

    def lease_changed(self) -> None:
        """The owner's deadline moved: wake the monitor so it re-reads it."""
        with self._cond:
            self._cond.notify_all()

    def threads(self) -> tuple[threading.Thread, ...]:
        """This supervisor's threads (the monitor and the current workers), alive or not."""
        with self._lock:
            threads = [run.thread for run in self._runs]
            if self._monitor is not None:
                threads.append(self._monitor)
        return tuple(threads)

    def wait_settled(self, timeout: float) -> bool:
        """Wait (real time) until the monitor has nothing left to do now: it is not working,
        has seen every worker that ended, and every worker told to stop has exited. For
        test drivers that move a fake clock: they call this before moving it on."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._settled():
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, SETTLE_POLL))
        return True

    def _settled(self) -> bool:
        if self._busy or (self._stop_requested and self.running):
            return False
        if any(not exit_.expected for exit_ in self._exits):
            return False  # the monitor has yet to see a worker that ended
        return not any(run.ctx.stopping.is_set() and not run.done for run in self._runs)

    def _thread_name(self, suffix: str) -> str:
        return f"mutexowner-{self._key}-{suffix}" if self._key else f"mutexowner-{suffix}"

    # -- internals ------------------------------------------------------------------------

    def _start_run(self, restart_count: int) -> None:
        """Create and start one thread per worker, in order (called with the lock held).

        A thread that cannot be started (``can't start new thread``) counts as a worker
        that crashed: the monitor restarts everyone, within the restart intensity.
        """
        self._runs = []
        self._signalled_at = None
        for spec in self._specs:
            ctx = WorkerContext(
                spec.name,
                fencing_token=self._fencing_token,
                restart_count=restart_count,
                clock=self._clock,
                guard=self._guard,
                key=self._key,
            )
            run = _Run(spec, ctx)
            run.thread = threading.Thread(
                target=self._worker_main,
                args=(run,),
                name=self._thread_name(spec.name),
                daemon=True,
            )
            self._runs.append(run)
        for run in self._runs:
            self._announce.append(
                (
                    logging.DEBUG,
                    "starting worker %s (restart_count=%d)",
                    (run.spec.name, restart_count),
                    None,
                )
            )
            try:
                run.thread.start()
            except BaseException as exc:
                self._announce.append(
                    (logging.ERROR, "could not start worker %s", (run.spec.name,), exc)
                )
                run.done = True
                run.error = exc
                self._exits.append(_Exit(run, expected=False))
                self._cond.notify_all()

    def _worker_main(self, run: _Run) -> None:
        error: Optional[BaseException] = None
        try:
            run.spec.target(run.ctx, *run.spec.args, **run.spec.kwargs)
        except BaseException as exc:  # never lose a worker's exception to threading.excepthook
            error = exc
        finally:
            # Done first, words after: with a blocked log handler a worker that ended must
            # not look stuck (the "exit" policy would end the process for it).
            with self._cond:
                run.done = True
                run.error = error
                stopping = run.ctx.stopping.is_set()
                self._exits.append(_Exit(run, expected=stopping))
                self._cond.notify_all()
        self._report_end(run.spec.name, error, stopping)

    @staticmethod
    def _report_end(name: str, error: Optional[BaseException], stopping: bool) -> None:
        if isinstance(error, LeaseLost):
            if stopping:
                log.debug("worker %s: %s", name, error)
            else:
                log.warning(
                    "worker %s raised LeaseLost without being asked to stop", name, exc_info=error
                )
        elif error is not None:
            log.error("worker %s crashed", name, exc_info=error)
        elif not stopping:
            log.warning("worker %s returned without being asked to stop", name)

    def _wait(self, timeout: Optional[float]) -> None:
        busy, self._busy = self._busy, False
        try:
            wait_on(self._clock, self._cond, timeout, cap=self._wait_cap())
        finally:
            self._busy = busy

    def _wait_cap(self) -> Optional[float]:
        """Under a lease, re-read the clock at least every SAFETY_WAIT_CAP seconds: a thread
        wait can outlast a step of the clock the deadline is measured on (suspend, or the
        wall clock on Python < 3.11)."""
        guard = self._guard
        return SAFETY_WAIT_CAP if guard is not None and guard.valid_until() is not None else None

    def _signal_runs(self, runs: list[_Run]) -> None:
        """Set ``stopping`` for every run, in reverse order (lock held; no logging here)."""
        if runs and self._signalled_at is None:
            self._signalled_at = self._clock()
        for run in reversed(runs):
            run.ctx._signal_stop()

    def _step_down_at(self) -> Optional[float]:
        """When workers must be told to stop so that shutdown_timeout ends by the deadline."""
        guard = self._guard
        deadline = guard.valid_until() if guard is not None else None
        return None if deadline is None else deadline - self.shutdown_timeout

    def _step_down_due(self) -> bool:
        step_down = self._step_down_at()
        return step_down is not None and self._clock() >= step_down

    def _next_event(self) -> str:
        """Wait (lock held) until there is something to do: "stop", "lease_deadline", "crash"."""
        while True:
            if self._stop_requested:
                return "stop"
            step_down = self._step_down_at()
            now = self._clock()
            if step_down is not None and now >= step_down:
                return "lease_deadline"
            if any(not exit_.expected for exit_ in self._exits):
                return "crash"
            self._exits = []
            self._wait(None if step_down is None else step_down - now)

    def _monitor_main(self) -> None:
        reason = "stopped"
        self._busy = True
        try:
            while True:
                self._write_announcements()
                with self._cond:
                    event = self._next_event()
                if event == "crash":
                    reason = self._restart_or_give_up()
                    if reason:
                        break
                    continue
                if event == "stop":
                    reason = "stopped"
                    self._shutdown()
                else:
                    reason = event
                    self._shutdown(
                        "stopping workers of key=%s: the lease deadline is %.3g s away "
                        "(shutdown_timeout) and not confirmed",
                        self._key,
                        self.shutdown_timeout,
                    )
                break
        except BaseException:  # a bug here must not leave workers running unsupervised
            log.critical("supervisor monitor failed; stopping all workers", exc_info=True)
            reason = "failed"
            self._failed = True
            self._notify("failed", "supervisor error")
            self._emergency_shutdown()
        finally:
            with self._cond:
                self._last_stop_reason = reason
                self._busy = False
                self._idle.set()
                self._cond.notify_all()
            # After idle: whoever this wakes sees running == False.
            self._notify("idle", reason)

    def _write_announcements(self) -> None:
        with self._cond:
            lines, self._announce = self._announce, []
        for level, message, args, exc in lines:
            log.log(level, message, *args, exc_info=exc)

    def _restart_or_give_up(self) -> str:
        """Handle a worker that ended on its own: restart all, or give up. '' means restarted."""
        crashed, attempt = self._count_restart()
        if attempt > self.max_restarts:
            return self._give_up(crashed)
        self._shutdown(
            "worker %s ended unexpectedly; restarting all workers (one_for_all, restart %d "
            "of at most %d within %.3g s; key=%s)",
            crashed,
            attempt,
            self.max_restarts,
            self.max_seconds,
            self._key,
        )
        with self._cond:
            self._pause_before_restart(attempt)
            if self._stop_requested:
                return "stopped"
            if self._step_down_due():
                return "lease_deadline"
            self._restarts += 1
            self._exits = []
            self._start_run(restart_count=self._restarts)
        self._notify("restarted", crashed)
        return ""

    def _count_restart(self) -> tuple[str, int]:
        """Count a restart now: (the workers that crashed, restart number in the window).

        Marks the supervisor failed when that is more than ``max_restarts``.
        """
        with self._cond:
            crashed = ", ".join(e.run.spec.name for e in self._exits if not e.expected)
            now = self._clock()
            # A restart counts for max_seconds after it happened, then falls out.
            self._restart_times = [t for t in self._restart_times if now - t < self.max_seconds]
            self._restart_times.append(now)
            attempt = len(self._restart_times)
            if attempt > self.max_restarts:
                self._failed = True
        return crashed, attempt

    def _give_up(self, crashed: str) -> str:
        """Too many restarts: stop every worker and report failure; returns "failed"."""
        with self._cond:
            self._signal_runs(list(self._runs))
        # Tell the owner at once, so it drains (keeps renewing) while workers stop.
        self._notify("failed", crashed)
        self._shutdown(
            "worker %s ended unexpectedly; giving up after more than %d restart(s) within "
            "%.3g s: stopping all workers (key=%s)",
            crashed,
            self.max_restarts,
            self.max_seconds,
            self._key,
            level=logging.ERROR,
        )
        return "failed"

    def _pause_before_restart(self, attempt: int) -> None:
        """Wait ``restart_backoff.delay(attempt)``, cut short by stop() or a step-down due.

        Called with ``_cond`` held (it waits on it).
        """
        if self.restart_backoff is None or self._stop_requested:
            return
        pause_until = self._clock() + self.restart_backoff.delay(attempt)
        while not self._stop_requested and not self._step_down_due():
            now = self._clock()
            if now >= pause_until:
                break
            step_down = self._step_down_at()
            until = pause_until if step_down is None else min(pause_until, step_down)
            self._wait(until - now)

    def _shutdown(self, message: str = "", *args: object, level: int = logging.WARNING) -> None:
        """Signal every worker (reverse order), log ``message``, wait for each (reverse order).

        Workers are signalled together, so each gets ``shutdown_timeout`` from the signal (one
        shared budget: with an owner it must fit before the lease deadline). The signal comes
        before any logging: a log handler that blocks must not delay it. Workers still alive
        after the budget are reported as stuck; then we keep waiting for them, because
        starting new copies (or letting the owner release the lease) while they run would be
        a second runner.
        """
        with self._cond:
            runs = list(self._runs)
            self._signal_runs(runs)
            # The budget runs from the first signal, which stop() may have sent before this
            # thread got here.
            signalled = self._signalled_at if self._signalled_at is not None else self._clock()
            budget_end = signalled + self.shutdown_timeout
        if message:
            log.log(level, message, *args)
        for run in reversed(runs):
            log.debug("asking worker %s to stop", run.spec.name)
        with self._cond:
            for run in reversed(runs):
                while not run.done and self._clock() < budget_end:
                    self._wait(budget_end - self._clock())
            stuck = [run for run in reversed(runs) if not run.done]
            for run in stuck:
                run.stuck = True
        for run in stuck:
            log.critical(
                "worker %s ignored stopping for %.3g s (shutdown_timeout) and is still "
                "running (key=%s)",
                run.spec.name,
                self.shutdown_timeout,
                self._key,
            )
        if stuck:
            self._notify("stuck", ", ".join(run.spec.name for run in stuck))
        with self._cond:
            while not all(run.done for run in runs):
                self._wait(None)
            self._exits = [e for e in self._exits if e.run not in runs]
        for run in reversed(runs):
            if run.thread.ident is not None:  # never started: nothing to join
                run.thread.join()
            log.debug("worker %s has stopped", run.spec.name)
            if run.stuck:
                log.warning("stuck worker %s has exited (key=%s)", run.spec.name, self._key)

    def _emergency_shutdown(self) -> None:
        """After a monitor error: stop workers with as little machinery as possible."""
        try:
            self._shutdown()
            return
        except BaseException:
            log.critical("supervisor could not stop workers cleanly; retrying", exc_info=True)
        with self._cond:
            for run in self._runs:
                run.ctx.stopping.set()
            while not all(run.done for run in self._runs):
                self._cond.wait()  # every worker exit notifies; no clock involved
            runs = list(self._runs)
        for run in runs:
            if run.thread.ident is not None:
                run.thread.join()

    def _notify(self, what: str, detail: str) -> None:
        hook = self._hook
        if hook is None:
            return
        try:
            hook(what, detail)
        except BaseException:  # the monitor must outlive any hook
            log.exception("supervisor hook failed on %s", what)
