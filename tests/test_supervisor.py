"""Supervisor and WorkerContext on their own: real worker threads, synchronised with events.

Time that matters (the restart window, restart pacing, the shutdown budget, a lease
deadline) is a ``FakeClock`` that moves only when a test advances it; assertions on *when*
something happened compare fake timestamps taken by the workers, so they are exact. Waiting
for a thread to react is done on events or by polling an observable condition with a
deadline, never by sleeping.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from mutexowner import LeaseLost, Supervisor, WorkerContext
from mutexowner.backoff import BackoffPolicy
from mutexowner.testing import FakeClock
from tests.helpers import REAL_TIMEOUT, wait_for

pytestmark = pytest.mark.timeout(30)

LOGGER = "mutexowner.supervisor"


class Boom(Exception):
    """What a scripted worker raises when told to crash."""


def parked(sup: Supervisor) -> bool:
    """The monitor thread is waiting, not working (the flag ``OwnerDriver`` relies on)."""
    with sup._cond:
        return not sup._busy


def pacing(sup: Supervisor) -> bool:
    """The monitor has stopped the old run and waits before starting the next one."""
    with sup._cond:
        return sup.running and not sup._busy and not sup._exits and not sup.alive_workers


class Run:
    """One run of a scripted worker, as the test sees it."""

    def __init__(self, ctx: WorkerContext, started_at: float) -> None:
        self.ctx = ctx
        self.started_at = started_at
        self.commands: queue.Queue[str] = queue.Queue()
        self.exited = threading.Event()
        self.ended_at: Optional[float] = None
        self.saw_stopping_at: Optional[float] = None

    def order(self, command: str) -> None:
        self.commands.put(command)


class Script:
    """A worker the test drives: each run waits for a command (crash, return, ...) or stop.

    ``stubborn`` runs ignore ``stopping`` until told to "return". ``on_start(index, ctx)``
    runs first in every run (it may raise, for crash loops).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        stubborn: bool = False,
        on_start: Optional[Callable[[int, WorkerContext], None]] = None,
    ) -> None:
        self.clock = clock
        self.stubborn = stubborn
        self.on_start = on_start
        self.runs: list[Run] = []
        self._cond = threading.Condition()

    def __call__(self, ctx: WorkerContext) -> None:
        run = Run(ctx, self.clock())
        with self._cond:
            self.runs.append(run)
            index = len(self.runs) - 1
            self._cond.notify_all()
        try:
            if self.on_start is not None:
                self.on_start(index, ctx)
            while True:
                try:
                    command = run.commands.get(timeout=0.005)
                except queue.Empty:
                    if ctx.stopping.is_set():
                        if run.saw_stopping_at is None:
                            run.saw_stopping_at = self.clock()
                        if not self.stubborn:
                            return
                    continue
                if command == "crash":
                    raise Boom(f"{ctx.name} crashed on purpose")
                if command == "return":
                    return
                if command == "system_exit":
                    raise SystemExit(3)
                if command == "lease_lost":
                    raise LeaseLost("raised by the worker itself")
                raise AssertionError(f"unknown command {command!r}")
        finally:
            run.ended_at = self.clock()
            run.exited.set()

    def run(self, index: int, timeout: float = REAL_TIMEOUT) -> Run:
        """The run number ``index`` (0-based), waiting for it to start."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.runs) > index, timeout):
                raise AssertionError(f"run {index} never started ({len(self.runs)} so far)")
            return self.runs[index]

    @property
    def count(self) -> int:
        with self._cond:
            return len(self.runs)


class Hook:
    """Records what the supervisor tells its owner, with the fake time of each call."""

    def __init__(self, sup: Supervisor, clock: Callable[[], float]) -> None:
        self.sup = sup
        self.clock = clock
        self.calls: list[tuple[str, str, float, tuple[str, ...]]] = []
        #: ``sup.running`` as seen by each call.
        self.running: list[bool] = []

    def __call__(self, what: str, detail: str) -> None:
        self.calls.append((what, detail, self.clock(), self.sup.alive_workers))
        self.running.append(self.sup.running)

    def whats(self) -> list[str]:
        return [call[0] for call in self.calls]


class Guard:
    """A lease deadline the test sets by hand."""

    def __init__(self, until: Optional[float]) -> None:
        self.until = until

    def valid_until(self) -> Optional[float]:
        return self.until


def bind(
    sup: Supervisor, clock: FakeClock, guard: Optional[Guard] = None, hook: Any = None
) -> Hook:
    recorder = hook if hook is not None else Hook(sup, clock)
    sup.attach(
        clock=clock, guard=guard if guard is not None else Guard(None), key="job", hook=recorder
    )
    return recorder


@pytest.fixture(autouse=True)
def no_excepthook(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail a test in which any exception reached ``threading.excepthook``."""
    seen: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    yield seen
    assert not seen, f"exceptions reached threading.excepthook: {[a.exc_value for a in seen]}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1000.0)


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno == level and text in r.getMessage()
    ]


# -- construction and bad input --------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    sup = Supervisor()
    assert (sup.max_restarts, sup.max_seconds, sup.shutdown_timeout) == (3, 5.0, 5.0)
    assert sup.restart_backoff is None
    assert not sup.running and not sup.failed and sup.restarts == 0
    assert sup.stuck_workers == () and sup.alive_workers == () and sup.last_stop_reason is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_restarts": -1}, ValueError, "max_restarts"),
        ({"max_restarts": 1.5}, TypeError, "max_restarts"),
        ({"max_restarts": True}, TypeError, "max_restarts"),
        ({"max_restarts": "3"}, TypeError, "max_restarts"),
        ({"max_seconds": 0}, ValueError, "max_seconds"),
        ({"max_seconds": -1.0}, ValueError, "max_seconds"),
        ({"max_seconds": math.nan}, ValueError, "max_seconds"),
        ({"max_seconds": math.inf}, ValueError, "max_seconds"),
        ({"max_seconds": "5"}, TypeError, "max_seconds"),
        ({"shutdown_timeout": -0.1}, ValueError, "shutdown_timeout"),
        ({"shutdown_timeout": math.nan}, ValueError, "shutdown_timeout"),
        ({"shutdown_timeout": math.inf}, ValueError, "shutdown_timeout"),
        ({"shutdown_timeout": None}, TypeError, "shutdown_timeout"),
        ({"restart_backoff": 1.0}, TypeError, "restart_backoff"),
        ({"clock": 5}, TypeError, "clock"),
    ],
)
def test_bad_constructor_arguments_name_the_parameter(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        Supervisor(**kwargs)


def _noop(ctx: WorkerContext) -> None:
    ctx.stopping.wait()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((None,), {}, TypeError, "target must be callable"),
        (("not a function",), {}, TypeError, "target must be callable"),
        ((_noop,), {"name": ""}, ValueError, "name"),
        ((_noop,), {"name": 7}, ValueError, "name"),
        ((_noop,), {"args": [1]}, TypeError, "args"),
        ((_noop,), {"kwargs": [("a", 1)]}, TypeError, "kwargs"),
    ],
)
def test_add_rejects_bad_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    sup = Supervisor()
    with pytest.raises(error, match=match):
        sup.add(*args, **kwargs)
    assert sup.worker_names == ()


def test_duplicate_worker_names_are_rejected() -> None:
    sup = Supervisor()
    sup.add(_noop)
    with pytest.raises(ValueError, match="'_noop' is already registered"):
        sup.add(_noop)  # same default name
    sup.add(_noop, name="second")
    with pytest.raises(ValueError, match="'second' is already registered"):

        @sup.worker(name="second")
        def other(ctx: WorkerContext) -> None: ...

    assert sup.worker_names == ("_noop", "second")


def test_worker_decorator_forms_register_and_return_the_function() -> None:
    sup = Supervisor(shutdown_timeout=1.0)
    got: dict[str, Any] = {}
    ready = threading.Barrier(4)

    @sup.worker(name="consumer", args=(1, 2), kwargs={"flag": True})
    def consume(ctx: WorkerContext, a: int, b: int, *, flag: bool) -> None:
        got[ctx.name] = (a, b, flag)
        ready.wait(REAL_TIMEOUT)
        ctx.stopping.wait()

    @sup.worker()
    def producer(ctx: WorkerContext) -> None:
        got[ctx.name] = ()
        ready.wait(REAL_TIMEOUT)
        ctx.stopping.wait()

    @sup.worker
    def bare(ctx: WorkerContext) -> None:
        got[ctx.name] = ()
        ready.wait(REAL_TIMEOUT)
        ctx.stopping.wait()

    assert consume.__name__ == "consume" and callable(producer) and callable(bare)
    assert sup.worker_names == ("consumer", "producer", "bare")
    sup.start()
    ready.wait(REAL_TIMEOUT)
    assert got == {"consumer": (1, 2, True), "producer": (), "bare": ()}
    assert sup.stop()


def test_start_and_stop_reject_bad_input() -> None:
    sup = Supervisor(shutdown_timeout=1.0)
    with pytest.raises(RuntimeError, match="no workers registered"):
        sup.start()
    sup.add(_noop)
    for token in ("1", True, 1.0):
        with pytest.raises(TypeError, match="fencing_token"):
            sup.start(fencing_token=token)  # type: ignore[arg-type]
    for timeout, error in ((-1, ValueError), (math.nan, ValueError), ("1", TypeError)):
        with pytest.raises(error, match="timeout"):
            sup.stop(timeout=timeout)  # type: ignore[arg-type]
    assert not sup.running  # nothing was started by the failed calls
    sup.start()
    with pytest.raises(RuntimeError, match="already running"):
        sup.start()
    with pytest.raises(RuntimeError, match="while the supervisor is running"):
        sup.add(_noop, name="late")
    assert sup.stop()
    sup.add(_noop, name="late")  # fine once stopped
    assert sup.worker_names == ("_noop", "late")


@pytest.mark.parametrize("seconds", ["1", None, math.nan, True])
def test_sleep_rejects_what_is_not_a_number(seconds: Any) -> None:
    with pytest.raises(TypeError, match="seconds"):
        WorkerContext("w").sleep(seconds)


# -- start order, reverse stop, no thread left behind ----------------------------------------


def test_workers_start_in_registration_order_and_stop_in_reverse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    sup = Supervisor(shutdown_timeout=2.0)
    scripts = {name: Script() for name in ("a", "b", "c")}
    for name, script in scripts.items():
        sup.add(script, name=name)
    sup.start(fencing_token=42)
    runs = {name: script.run(0) for name, script in scripts.items()}
    assert {t.name for t in threading.enumerate() if t.name.startswith("mutexowner-")} >= {
        "mutexowner-supervisor",
        "mutexowner-a",
        "mutexowner-b",
        "mutexowner-c",
    }
    for name, run in runs.items():
        assert (run.ctx.name, run.ctx.fencing_token, run.ctx.restart_count) == (name, 42, 0)
    assert sup.alive_workers == ("a", "b", "c")
    assert sup.stop()

    def order(prefix: str) -> list[str]:
        return [
            r.getMessage().split()[2]
            for r in caplog.records
            if r.name == LOGGER and r.getMessage().startswith(prefix)
        ]

    assert order("starting worker") == ["a", "b", "c"]
    assert order("asking worker") == ["c", "b", "a"]
    assert [
        r.getMessage().split()[1]
        for r in caplog.records
        if r.name == LOGGER and r.getMessage().endswith("has stopped")
    ] == ["c", "b", "a"]
    assert all(run.exited.is_set() for run in runs.values())
    assert sup.last_stop_reason == "stopped" and sup.alive_workers == ()


def test_stop_is_idempotent_and_leaves_no_thread_behind() -> None:
    before = set(threading.enumerate())
    sup = Supervisor(shutdown_timeout=1.0)
    assert sup.stop() is True  # before any start: nothing to do
    sup.add(Script(), name="a")
    sup.add(Script(), name="b")
    sup.start()
    assert sup.running
    assert sup.stop() is True
    assert set(threading.enumerate()) == before  # at once, not after a grace period
    assert sup.stop() is True and sup.stop(timeout=0) is True
    assert not sup.running and not sup.failed


def test_start_again_after_stop_gives_fresh_contexts_and_counters(clock: FakeClock) -> None:
    sup = Supervisor(max_restarts=0, clock=clock, shutdown_timeout=1.0)
    script = Script(clock)
    sup.add(script, name="w")
    sup.start(fencing_token=1)
    script.run(0).order("crash")
    assert sup.wait_idle(REAL_TIMEOUT) and sup.failed
    assert sup.stop() is True  # after failure: idle already
    sup.start(fencing_token=2)
    second = script.run(1)
    assert not sup.failed and sup.restarts == 0 and sup.last_stop_reason is None
    assert second.ctx is not script.runs[0].ctx and not second.ctx.stopping.is_set()
    assert (second.ctx.fencing_token, second.ctx.restart_count) == (2, 0)
    assert sup.stop()


def test_start_right_after_a_non_blocking_stop_waits_for_the_old_run() -> None:
    sup = Supervisor(shutdown_timeout=5.0)
    slow = Script(stubborn=True)
    sup.add(slow, name="slow")
    sup.start()
    run = slow.run(0)
    assert sup.stop(timeout=0) is False  # only asks
    assert wait_for(lambda: run.saw_stopping_at is not None)
    with pytest.raises(RuntimeError, match="already running"):
        sup.start()  # the old run is still shutting down
    run.order("return")
    assert sup.wait_idle(REAL_TIMEOUT)
    sup.start()
    assert slow.run(1).ctx.restart_count == 0
    assert sup.stop(timeout=0) is False
    slow.run(1).order("return")  # stubborn: let it go once asked to stop
    assert sup.stop() is True and sup.restarts == 0


def test_stop_from_inside_a_worker_only_asks_and_nothing_restarts() -> None:
    sup = Supervisor(shutdown_timeout=1.0)
    results: list[bool] = []

    def quitter(ctx: WorkerContext) -> None:
        results.append(sup.stop())  # must not deadlock waiting for itself
        # ...and returns at once, before the monitor has set ``stopping``.

    other = Script()
    sup.add(quitter)
    sup.add(other, name="other")
    sup.start()
    assert sup.wait_idle(REAL_TIMEOUT)
    assert results == [False]
    assert sup.restarts == 0 and not sup.failed and sup.last_stop_reason == "stopped"
    assert other.count == 1 and other.runs[0].exited.is_set()
    assert sup.stop()


def test_stop_with_an_infinite_timeout_waits_until_done() -> None:
    sup = Supervisor(shutdown_timeout=1.0)
    sup.add(Script(), name="w")
    sup.start()
    assert sup.stop(timeout=math.inf) is True
    assert sup.wait_idle(math.inf)


# -- WorkerContext ---------------------------------------------------------------------------


def test_sleep_returns_early_with_true_when_stopping() -> None:
    sup = Supervisor(shutdown_timeout=5.0)
    results: dict[str, list[bool]] = {"long": [], "forever": []}
    contexts: list[WorkerContext] = []

    def sleeper(ctx: WorkerContext, seconds: float) -> None:
        results[ctx.name].append(ctx.sleep(0))  # only checks
        results[ctx.name].append(ctx.sleep(-1))
        contexts.append(ctx)
        results[ctx.name].append(ctx.sleep(seconds))

    def blocked(ctx: WorkerContext) -> bool:
        # CPython detail: a thread blocked in Event.wait() is queued on its condition.
        return bool(ctx.stopping._cond._waiters)  # type: ignore[attr-defined]

    sup.add(sleeper, name="long", args=(3600.0,))
    sup.add(sleeper, name="forever", args=(math.inf,))
    sup.start()
    assert wait_for(lambda: len(contexts) == 2 and all(blocked(c) for c in contexts))
    started = time.monotonic()
    assert sup.stop(timeout=REAL_TIMEOUT)
    assert time.monotonic() - started < REAL_TIMEOUT
    assert results == {"long": [False, False, True], "forever": [False, False, True]}
    assert sup.restarts == 0


def test_sleep_on_a_fake_clock_lasts_exactly_its_fake_time(clock: FakeClock) -> None:
    ctx = WorkerContext("w", clock=clock)
    outcome: list[tuple[bool, float]] = []
    thread = threading.Thread(target=lambda: outcome.append((ctx.sleep(10), clock())))
    thread.start()
    assert wait_for(lambda: id(ctx._wake) in clock._waiting)  # inside sleep, end computed
    clock.advance(9.9375)  # binary-exact steps
    clock.advance(0.0625)
    thread.join(REAL_TIMEOUT)
    assert outcome == [(False, 1010.0)]  # returned neither early nor late
    # And a stop request wakes it at once, without time moving.
    thread = threading.Thread(target=lambda: outcome.append((ctx.sleep(10), clock())))
    thread.start()
    assert wait_for(lambda: id(ctx._wake) in clock._waiting)
    ctx._signal_stop()
    thread.join(REAL_TIMEOUT)
    assert outcome[1] == (True, 1010.0)


def test_ensure_held_raises_lease_lost_when_stopping_or_past_the_deadline(
    clock: FakeClock,
) -> None:
    ctx = WorkerContext("w", clock=clock)
    ctx.ensure_held()  # no owner, not stopping: fine
    ctx._signal_stop()
    with pytest.raises(LeaseLost, match="'w' is stopping"):
        ctx.ensure_held()
    guard = Guard(until=1005.0)
    ctx = WorkerContext("w", clock=clock, guard=guard, key="job")
    clock.advance(4.9375)
    ctx.ensure_held()
    clock.advance(0.0625)
    with pytest.raises(LeaseLost, match="'job' passed its local deadline"):
        ctx.ensure_held()
    guard.until = None  # keep_running mode: no local deadline
    ctx.ensure_held()


# -- one_for_all -----------------------------------------------------------------------------


def test_a_crash_restarts_every_worker_with_fresh_contexts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    sup = Supervisor(shutdown_timeout=2.0)
    a, b = Script(), Script()
    sup.add(a, name="a")
    sup.add(b, name="b")
    sup.start(fencing_token=7)
    a0, b0 = a.run(0), b.run(0)
    b0.order("crash")
    a1, b1 = a.run(1), b.run(1)
    assert a0.exited.is_set() and b0.exited.is_set()
    assert a0.ctx.stopping.is_set()  # the healthy sibling was stopped too
    assert not a1.ctx.stopping.is_set() and not b1.ctx.stopping.is_set()
    assert a1.ctx is not a0.ctx and b1.ctx is not b0.ctx
    assert (a1.ctx.restart_count, b1.ctx.restart_count) == (1, 1)
    assert (a1.ctx.fencing_token, b1.ctx.fencing_token) == (7, 7)
    assert sup.restarts == 1 and sup.running and not sup.failed
    crash = [r for r in caplog.records if r.getMessage() == "worker b crashed"]
    assert len(crash) == 1 and crash[0].levelno == logging.ERROR
    assert crash[0].exc_info is not None and crash[0].exc_info[0] is Boom
    assert "Traceback" in caplog.text and "b crashed on purpose" in caplog.text
    assert messages(caplog, logging.WARNING, "restarting all workers (one_for_all")
    assert sup.stop()


@pytest.mark.parametrize("command", ["return", "system_exit", "lease_lost"])
def test_ending_without_being_asked_is_restarted_like_a_crash(
    command: str, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(shutdown_timeout=2.0)
    a, b = Script(), Script()
    sup.add(a, name="a")
    sup.add(b, name="b")
    sup.start()
    a.run(0).order(command)
    assert b.run(1).ctx.restart_count == 1 and a.run(1).ctx.restart_count == 1
    assert sup.restarts == 1 and sup.running
    records = [r for r in caplog.records if r.name == LOGGER and "worker a " in r.getMessage()]
    assert records, caplog.text
    if command == "system_exit":  # a BaseException: logged with its traceback, not lost
        assert records[0].levelno == logging.ERROR and records[0].exc_info is not None
        assert records[0].exc_info[0] is SystemExit
    elif command == "lease_lost":  # without a lease problem it is just a worker ending
        assert records[0].exc_info is not None and records[0].exc_info[0] is LeaseLost
    else:
        assert "returned without being asked to stop" in records[0].getMessage()
    assert sup.stop()


def test_workers_ending_together_count_as_one_restart() -> None:
    sup = Supervisor(shutdown_timeout=2.0)
    a, b = Script(), Script()
    sup.add(a, name="a")
    sup.add(b, name="b")
    sup.start()
    a0, b0 = a.run(0), b.run(0)
    a0.order("crash")
    b0.order("crash")
    a.run(1)
    b.run(1)
    assert sup.stop()
    assert sup.restarts == 1 and a.count == 2 and b.count == 2


def test_a_worker_raising_while_it_stops_is_logged_but_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervisor(shutdown_timeout=2.0)

    def fragile(ctx: WorkerContext) -> None:
        ctx.stopping.wait()
        raise Boom("cleanup failed")

    sup.add(fragile)
    sup.start()
    assert sup.stop()
    assert sup.restarts == 0 and not sup.failed and sup.last_stop_reason == "stopped"
    assert messages(caplog, logging.ERROR, "worker fragile crashed")
    assert "cleanup failed" in caplog.text


def test_a_stop_request_during_a_restart_wins(clock: FakeClock) -> None:
    sup = Supervisor(shutdown_timeout=2.0, clock=clock)
    crasher, slow = Script(clock), Script(clock, stubborn=True)
    sup.add(crasher, name="crasher")
    sup.add(slow, name="slow")
    sup.start()
    slow0 = slow.run(0)
    crasher.run(0).order("crash")
    assert wait_for(lambda: slow0.saw_stopping_at is not None)  # restart under way
    assert sup.stop(timeout=0) is False
    slow0.order("return")
    assert sup.wait_idle(REAL_TIMEOUT)
    assert crasher.count == 1 and slow.count == 1 and sup.restarts == 0
    assert sup.last_stop_reason == "stopped" and not sup.failed
    assert sup.stop()


def test_a_worker_thread_that_cannot_start_counts_as_a_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name == "mutexowner-b" and not refused:
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    sup = Supervisor(shutdown_timeout=2.0)
    a, b = Script(), Script()
    sup.add(a, name="a")
    sup.add(b, name="b")
    sup.start()  # does not raise: the monitor handles it like a crash
    assert b.run(0).ctx.restart_count == 1
    assert a.run(1).ctx.restart_count == 1 and a.runs[0].exited.is_set()
    assert sup.restarts == 1 and refused == ["mutexowner-b"]
    assert messages(caplog, logging.ERROR, "could not start worker b")
    assert sup.stop()


def test_no_worker_starts_when_the_monitor_thread_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "mutexowner-supervisor":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    sup = Supervisor(shutdown_timeout=1.0)
    w = Script()
    sup.add(w, name="w")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        sup.start()
    assert w.count == 0 and not sup.running  # no worker runs unsupervised
    monkeypatch.setattr(threading.Thread, "start", real_start)
    sup.start()
    w.run(0)
    assert sup.stop()


# -- restart intensity -----------------------------------------------------------------------


@pytest.mark.parametrize("max_restarts", [0, 1, 3])
def test_exactly_max_restarts_are_allowed_and_the_next_one_fails(
    max_restarts: int, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def crash_on_start(index: int, ctx: WorkerContext) -> None:
        raise Boom(f"run {index}")

    sup = Supervisor(max_restarts=max_restarts, max_seconds=1.0, clock=clock)
    steady, crasher = Script(clock), Script(clock, on_start=crash_on_start)
    sup.add(steady, name="steady")
    sup.add(crasher, name="crasher")
    sup.start()  # fake time never moves: every restart is within the window
    assert sup.wait_idle(REAL_TIMEOUT)
    assert sup.failed and sup.restarts == max_restarts
    assert crasher.count == steady.count == max_restarts + 1
    assert all(run.exited.is_set() for run in steady.runs)
    assert sup.last_stop_reason == "failed" and sup.alive_workers == ()
    assert len(messages(caplog, logging.WARNING, "restarting all workers")) == max_restarts
    assert messages(caplog, logging.ERROR, f"more than {max_restarts} restart(s) within 1 s")
    assert sup.stop()


def test_restarts_older_than_max_seconds_fall_out_of_the_window(clock: FakeClock) -> None:
    sup = Supervisor(max_restarts=2, max_seconds=10.0, clock=clock)
    w = Script(clock)
    sup.add(w, name="w")
    sup.start()
    for index, advance in enumerate([0.0, 5.0, 5.0]):
        # Crashes at 1000, 1005 and 1010: at 1010 the first is exactly max_seconds old and
        # no longer counts, so the window holds two and a third restart is still allowed.
        clock.advance(advance)
        w.run(index).order("crash")
        assert w.run(index + 1).started_at == clock()
        assert sup.restarts == index + 1 and not sup.failed
    clock.advance(4.9375)  # 1014.9375: 1005, 1010 and this one are within 10 s: too many
    w.run(3).order("crash")
    assert sup.wait_idle(REAL_TIMEOUT)
    assert sup.failed and sup.restarts == 3 and w.count == 4


def test_failure_and_restart_count_reset_on_the_next_start(clock: FakeClock) -> None:
    sup = Supervisor(max_restarts=1, clock=clock)

    def crash_on_start(index: int, ctx: WorkerContext) -> None:
        raise Boom(f"run {index}")

    w = Script(clock, on_start=crash_on_start)
    sup.add(w, name="w")
    sup.start()
    assert sup.wait_idle(REAL_TIMEOUT) and sup.failed and sup.restarts == 1
    sup.start()
    assert sup.wait_idle(REAL_TIMEOUT) and sup.failed and sup.restarts == 1
    assert w.count == 4 and [r.ctx.restart_count for r in w.runs] == [0, 1, 0, 1]


# -- restart pacing --------------------------------------------------------------------------


def test_restart_backoff_paces_restarts_by_its_delays(clock: FakeClock) -> None:
    policy = BackoffPolicy(initial=1.0, factor=2.0, max_delay=3.0, jitter="none")
    sup = Supervisor(max_restarts=5, max_seconds=100.0, restart_backoff=policy, clock=clock)
    w, steady = Script(clock), Script(clock)
    sup.add(w, name="w")
    sup.add(steady, name="steady")
    sup.start()
    for index, delay in enumerate([1.0, 2.0, 3.0]):  # delay(1), delay(2), delay(3) (capped)
        crashed_at = clock()
        w.run(index).order("crash")
        assert wait_for(lambda: pacing(sup))
        assert w.count == index + 1 and steady.count == index + 1  # not restarted yet
        clock.advance(delay)
        assert w.run(index + 1).started_at == crashed_at + delay
        assert steady.run(index + 1).started_at == crashed_at + delay
    assert sup.restarts == 3
    assert sup.stop()


def test_stop_during_restart_pacing_returns_at_once_without_restarting(
    clock: FakeClock,
) -> None:
    policy = BackoffPolicy(initial=60.0, max_delay=60.0, jitter="none")
    sup = Supervisor(restart_backoff=policy, clock=clock)
    w = Script(clock)
    sup.add(w, name="w")
    sup.start()
    w.run(0).order("crash")
    assert wait_for(lambda: pacing(sup))
    assert sup.stop(timeout=REAL_TIMEOUT) is True  # no fake time passes
    assert w.count == 1 and sup.restarts == 0 and sup.last_stop_reason == "stopped"


def test_restart_pacing_ends_at_the_lease_step_down_point(clock: FakeClock) -> None:
    policy = BackoffPolicy(initial=60.0, max_delay=60.0, jitter="none")
    sup = Supervisor(restart_backoff=policy, shutdown_timeout=1.0)
    hook = bind(sup, clock, Guard(until=1020.0))
    w = Script(clock)
    sup.add(w, name="w")
    sup.start()
    w.run(0).order("crash")
    assert wait_for(lambda: pacing(sup))
    clock.advance(19.0)  # the step-down point: no restart may begin now
    assert wait_for(lambda: not sup.running)
    assert sup.last_stop_reason == "lease_deadline" and w.count == 1
    assert hook.whats() == ["idle"]


# -- lease deadline (bound, without an owner) ------------------------------------------------


def test_bound_supervisor_stops_workers_shutdown_timeout_before_the_deadline(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(shutdown_timeout=2.0)
    guard = Guard(until=1010.0)
    hook = bind(sup, clock, guard)
    w = Script(clock)
    sup.add(w, name="w")
    sup.start(fencing_token=5)
    run = w.run(0)
    clock.advance(5.0)
    guard.until = 1020.0  # a renewal moved the deadline
    sup.lease_changed()
    clock.advance(12.9375)  # 1017.9375: just before 1020 - 2 (binary-exact steps)
    assert wait_for(lambda: parked(sup))
    clock.advance(0.0625)
    assert run.exited.wait(REAL_TIMEOUT)
    assert run.saw_stopping_at == 1018.0
    assert sup.wait_idle(REAL_TIMEOUT) and sup.last_stop_reason == "lease_deadline"
    assert hook.whats() == ["idle"] and hook.calls[0][1] == "lease_deadline"
    assert messages(caplog, logging.WARNING, "stopping workers of key=job")
    assert sup.stop()


def test_a_bound_supervisor_started_without_a_lease_stops_at_once(clock: FakeClock) -> None:
    sup = Supervisor(shutdown_timeout=1.0)
    bind(sup, clock, Guard(until=-math.inf))  # the owner's guard when it holds nothing
    w = Script(clock)
    sup.add(w, name="w")
    sup.start()
    assert w.run(0).exited.wait(REAL_TIMEOUT)
    assert sup.wait_idle(REAL_TIMEOUT) and sup.last_stop_reason == "lease_deadline"


# -- stuck workers ---------------------------------------------------------------------------


def test_a_stuck_worker_is_reported_at_critical_and_waited_for(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(shutdown_timeout=2.0)
    hook = bind(sup, clock)
    good, stubborn = Script(clock), Script(clock, stubborn=True)
    sup.add(good, name="good")
    sup.add(stubborn, name="stubborn")
    sup.start()
    good0, stuck0 = good.run(0), stubborn.run(0)
    assert sup.stop(timeout=0) is False
    assert good0.exited.wait(REAL_TIMEOUT)
    assert wait_for(lambda: stuck0.saw_stopping_at is not None)
    clock.advance(1.9375)  # binary-exact steps: the budget ends at exactly 1002.0
    assert wait_for(lambda: parked(sup))
    assert sup.stuck_workers == ()
    clock.advance(0.0625)
    assert wait_for(lambda: sup.stuck_workers == ("stubborn",))
    assert wait_for(lambda: "stuck" in hook.whats())
    assert hook.calls[0][:3] == ("stuck", "stubborn", 1002.0)
    critical = messages(caplog, logging.CRITICAL, "worker stubborn ignored stopping for 2 s")
    assert len(critical) == 1 and "key=job" in critical[0]
    assert sup.running and sup.alive_workers == ("stubborn",)
    assert sup.stop(timeout=0) is False  # still waiting for it; nothing else starts
    stuck0.order("return")
    assert sup.wait_idle(REAL_TIMEOUT)
    assert sup.stuck_workers == () and not sup.running
    assert messages(caplog, logging.WARNING, "stuck worker stubborn has exited")
    assert wait_for(lambda: hook.whats() == ["stuck", "idle"])
    assert sup.stop()


def test_a_stuck_worker_holds_back_the_restart_until_it_exits(clock: FakeClock) -> None:
    sup = Supervisor(shutdown_timeout=1.0, clock=clock)
    crasher, stubborn = Script(clock), Script(clock, stubborn=True)
    sup.add(crasher, name="crasher")
    sup.add(stubborn, name="stubborn")
    sup.start()
    stuck0 = stubborn.run(0)
    crasher.run(0).order("crash")
    assert wait_for(lambda: stuck0.saw_stopping_at is not None)
    clock.advance(1.0)
    assert wait_for(lambda: sup.stuck_workers == ("stubborn",))
    assert wait_for(lambda: parked(sup))
    assert crasher.count == 1 and sup.restarts == 0  # no second copy next to the stuck one
    stuck0.order("return")
    assert crasher.run(1).ctx.restart_count == 1 and stubborn.run(1).ctx.restart_count == 1
    assert sup.restarts == 1 and sup.stuck_workers == ()
    assert sup.stop(timeout=0) is False
    stubborn.run(1).order("return")
    assert sup.stop()


def test_stop_gives_up_waiting_for_a_stuck_worker_after_its_timeout() -> None:
    sup = Supervisor(shutdown_timeout=0.05)
    stubborn = Script(stubborn=True)
    sup.add(stubborn, name="stubborn")
    sup.start()
    run = stubborn.run(0)
    assert sup.stop(timeout=0.01) is False  # real clock: 50 ms budget, then reported
    assert wait_for(lambda: sup.stuck_workers == ("stubborn",)) and sup.running
    assert sup.stop(timeout=0.01) is False
    run.order("return")
    assert sup.stop() is True and sup.stuck_workers == ()


# -- what the owner is told, and failures of the machinery itself ----------------------------


def test_hook_is_told_of_restarts_then_failure_before_workers_have_stopped(
    clock: FakeClock,
) -> None:
    sup = Supervisor(max_restarts=1, shutdown_timeout=1.0)
    hook = bind(sup, clock)
    crasher, slow = Script(clock), Script(clock, stubborn=True)
    sup.add(crasher, name="crasher")
    sup.add(slow, name="slow")
    sup.start()
    crasher.run(0).order("crash")
    assert wait_for(lambda: slow.run(0).saw_stopping_at is not None)
    slow.run(0).order("return")  # stubborn: let the first run go once asked
    crasher.run(1).order("crash")
    assert wait_for(lambda: "failed" in hook.whats())
    # The owner learns of the failure at once (it drains, keeps renewing) while the
    # surviving worker is still being stopped.
    failed = hook.calls[hook.whats().index("failed")]
    assert failed[1] == "crasher" and "slow" in failed[3]
    assert sup.failed
    slow.run(1).order("return")
    assert sup.wait_idle(REAL_TIMEOUT)
    assert wait_for(lambda: hook.whats()[-1:] == ["idle"])
    assert hook.whats() == ["restarted", "failed", "idle"]
    assert [c[1] for c in hook.calls] == ["crasher", "crasher", "failed"]
    # "idle" comes once running is False, so an owner woken by it can start workers again.
    assert hook.running == [True, True, False]
    assert sup.stop()


@pytest.mark.parametrize("error", [RuntimeError, SystemExit])
def test_a_failing_hook_never_breaks_the_supervisor(
    error: type[BaseException], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(shutdown_timeout=1.0)
    calls: list[str] = []

    def broken(what: str, detail: str) -> None:
        calls.append(what)
        raise error("hook bug")

    bind(sup, clock, hook=broken)
    w = Script(clock)
    sup.add(w, name="w")
    sup.start()
    w.run(0).order("crash")
    assert w.run(1).ctx.restart_count == 1
    assert sup.stop(timeout=REAL_TIMEOUT) is True
    assert not sup.running and calls == ["restarted", "idle"]
    assert len(messages(caplog, logging.ERROR, "supervisor hook failed")) == 2


def test_a_monitor_error_stops_every_worker_and_reports_failure(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def bug(self: Supervisor) -> str:
        raise RuntimeError("monitor bug")

    monkeypatch.setattr(Supervisor, "_restart_or_give_up", bug)
    sup = Supervisor(shutdown_timeout=1.0)
    hook = bind(sup, clock)
    a, b = Script(clock), Script(clock)
    sup.add(a, name="a")
    sup.add(b, name="b")
    sup.start()
    a.run(0).order("crash")
    assert sup.wait_idle(REAL_TIMEOUT)
    assert b.runs[0].exited.is_set() and b.count == 1
    assert sup.failed and sup.last_stop_reason == "failed"
    assert wait_for(lambda: hook.whats() == ["failed", "idle"])
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical and "monitor failed" in critical[0].getMessage()
    assert critical[0].exc_info is not None and "monitor bug" in caplog.text
    assert sup.stop()


def test_workers_are_stopped_even_when_the_shutdown_code_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_shutdown(self: Supervisor) -> None:
        raise RuntimeError("shutdown bug")

    monkeypatch.setattr(Supervisor, "_shutdown", broken_shutdown)
    before = set(threading.enumerate())
    sup = Supervisor(shutdown_timeout=1.0)
    a, b = Script(), Script()
    sup.add(a, name="a")
    sup.add(b, name="b")
    sup.start()
    runs = [a.run(0), b.run(0)]
    assert sup.stop(timeout=REAL_TIMEOUT) is True
    assert all(run.exited.is_set() for run in runs)
    assert sup.failed and sup.alive_workers == ()
    assert set(threading.enumerate()) == before
    assert "could not stop workers cleanly" in caplog.text


def test_settings_are_read_only_once_built() -> None:
    sup = Supervisor(max_restarts=2, max_seconds=3.0, shutdown_timeout=1.0)
    assert (sup.max_restarts, sup.max_seconds, sup.shutdown_timeout) == (2, 3.0, 1.0)
    assert sup.restart_backoff is None
    for name in ("max_restarts", "max_seconds", "shutdown_timeout", "restart_backoff"):
        with pytest.raises(AttributeError):
            setattr(sup, name, 0)
