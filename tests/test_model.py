"""A model-based (stateful property) test of the lease protocol (issue 10, item 8).

Two or three ``MutexOwner`` objects, some with a ``Supervisor`` running a real worker thread,
share ONE ``FakeClock`` and ONE fakeredis server whose clock is that same fake clock (plus a
fixed offset: see ``fake_server_time``). Nothing runs on its own: each owner is stepped
through ``OwnerDriver.step`` (its ``_tick``) by the rules below, and fake time moves only when
a rule moves it. Hypothesis chooses a sequence of rules; the faults they inject are those
the protocol claims to survive:

- a lost request, a lost reply (Redis executed the call, the caller saw a timeout), a reply
  (or a request) delayed by up to two ttl (a frozen process, a slow network), a request
  executed by Redis later, after its caller gave up (``deliver_delayed_requests``);
- ``stop()`` requested while a call is in flight, or between two turns;
- Redis down (connection refused), paused (every call times out), restarted with its data,
  restarted from an older snapshot, or restarted empty: each restart has a new ``run_id``,
  which the acquire script reads from ``INFO server`` (fakeredis has no ``INFO``; the test
  adds one, see ``fake_info_command``);
- the lease key deleted by hand, a ``crash`` (kill -9) of an owner, the clock jumping ahead
  while no owner runs (a pause of the whole fleet);
- user code (listener, ``on_acquired``, ``on_lost``, ``stuck_worker_policy``) raising
  ``RuntimeError``, ``SystemExit`` or ``KeyboardInterrupt``; workers that ignore ``stopping``.

After every turn of every owner the model checks:

1. no two owners are ``holding`` at the same fake instant, and no two owners' workers run
   without having been told to stop (an owner that held when the key was deleted by hand
   is exempt for that holding period: deleting a key by hand breaks exclusivity by
   definition, and the fencing token is what protects then);
2. an owner that is ``holding`` has its token in Redis, with a Redis expiry no earlier than
   its local deadline, unless Redis lost the key (restart, delete) after the owner sent the
   renewal that set that deadline;
3. the fencing tokens of successive holding periods strictly increase (the same owner may
   carry its token over into a new period without anyone in between);
4. every turn returns (an exception out of ``_tick`` fails the test), a requested stop
   completes within a bounded fake time, and no owner spins (returns "due now" forever);
5. when ``stop()`` has completed, no key of that owner remains in Redis (unless a request
   of its own that was delayed in the network reaches Redis later), and no event of the
   owner comes after it reached ``stopped``.

CI runs a fixed search (seed 3): 200 examples of up to 40 steps, about 10 s (on
3d0ef59 it finds issue 10 item 4b). For a longer search::

    MUTEXOWNER_MODEL_EXAMPLES=2000 MUTEXOWNER_MODEL_STEPS=60 MUTEXOWNER_MODEL_SEED=random \
        HYPOTHESIS_PROFILE=explore python -m pytest tests/test_model.py -k protocol

(``random`` and ``explore``: a random seed per run; Hypothesis prints the shrunk failing steps and a
``@reproduce_failure`` blob). ``KNOWN_UNFIXED`` lists violations the model tolerates while
their bug is open (none now); ``MUTEXOWNER_MODEL_STRICT=1`` tolerates none. The bugs it
found are replayed step by step at the end of this file.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from mutexowner import BackoffPolicy, Event, MutexOwner, Supervisor, WorkerContext
from mutexowner.lease import Lease, LeaseKeys, classify_error
from mutexowner.testing import FakeClock, OwnerDriver, crash, fake_redis, mark_epoch
from tests.helpers import wait_for

NAME = "job"
KEYS = LeaseKeys(NAME)
TTL = 3.0
RENEW = 1.0
SHUTDOWN = 0.5
BACKOFF = BackoffPolicy(initial=0.25, factor=2.0, max_delay=2.0, jitter="none")
#: Fake unix time (what Redis' TIME and key expiry read) = this + the fake monotonic clock.
UNIX_OFFSET = 1_700_000_000.0
#: A requested stop must have completed within this much fake time.
STOP_BOUND = 3 * TTL + BACKOFF.max_delay
#: Turns at one fake instant before an owner is deemed to spin.
SPIN_LIMIT = 200

MODEL_EXAMPLES = int(os.environ.get("MUTEXOWNER_MODEL_EXAMPLES", "200"))
MODEL_STEPS = int(os.environ.get("MUTEXOWNER_MODEL_STEPS", "40"))
#: A fixed seed, so that CI explores the same examples whatever the code of this file;
#: MUTEXOWNER_MODEL_SEED=random lets Hypothesis choose (with HYPOTHESIS_PROFILE=explore).
_SEED = os.environ.get("MUTEXOWNER_MODEL_SEED", "3")
MODEL_SEED: Optional[int] = None if _SEED == "random" else int(_SEED)


# -- the fake server's clock and INFO ------------------------------------------------------


class _TimeModule(types.ModuleType):
    """Stands in for the ``time`` module inside fakeredis: ``time()`` follows a FakeClock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__("time")
        self._clock = clock

    def time(self) -> float:
        return UNIX_OFFSET + self._clock()

    def __getattr__(self, name: str) -> Any:
        import time

        return getattr(time, name)


#: The fakeredis modules that read ``time.time()``: per-command key expiry, TIME, hash-field
#: expiry. Replacing their ``time`` makes Redis' clock the fake clock, deterministically.
_FAKEREDIS_TIME_MODULES = (
    "fakeredis._socket._base",
    "fakeredis.commands_mixins.server_mixin",
    "fakeredis._helpers",
)


@contextlib.contextmanager
def fake_server_time(clock: FakeClock) -> Iterator[None]:
    """Make every fakeredis server read ``UNIX_OFFSET + clock()`` as the time, meanwhile."""
    import importlib

    modules = [importlib.import_module(name) for name in _FAKEREDIS_TIME_MODULES]
    saved = [module.time for module in modules]  # type: ignore[attr-defined]
    shim = _TimeModule(clock)
    for module in modules:
        module.time = shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.time = original  # type: ignore[attr-defined]


@contextlib.contextmanager
def fake_info_command() -> Iterator[None]:
    """Give fakeredis an ``INFO`` command that reports the server's ``run_id`` (meanwhile).

    The acquire script detects a restart from a snapshot by a changed ``run_id``; fakeredis
    2.41 has no INFO, so without this every restart would look like one with no run_id.
    The run_id is the attribute ``model_run_id`` of the ``FakeServer``.
    """
    from fakeredis._commands import SUPPORTED_COMMANDS, Signature
    from fakeredis._socket import FakeSocket

    if "info" in SUPPORTED_COMMANDS:  # a later fakeredis has its own: use it as it is
        yield
        return

    def info(self: Any, *sections: bytes) -> bytes:
        run_id = getattr(self._server, "model_run_id", "")
        return f"# Server\r\nredis_version:7.0.0\r\nrun_id:{run_id}\r\n".encode()

    SUPPORTED_COMMANDS["info"] = Signature("info", "info", (), (bytes,))  # type: ignore[arg-type]
    FakeSocket.info = info  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del SUPPORTED_COMMANDS["info"]
        del FakeSocket.info  # type: ignore[attr-defined]


def test_fake_server_clock_and_run_id_drive_expiry_and_the_epoch() -> None:
    """The two shims do what the model relies on (a test of the test harness)."""
    clock = FakeClock()
    server = fakeredis.FakeServer()
    server.model_run_id = "a" * 40  # type: ignore[attr-defined]
    client = fakeredis.FakeRedis(server=server)
    with fake_server_time(clock), fake_info_command():
        client.set("k", "v", px=1000)
        assert client.time()[0] == int(UNIX_OFFSET + clock())
        clock.advance(0.999)
        assert client.get("k") == b"v"
        clock.advance(0.002)
        assert client.get("k") is None
        assert b"run_id:" + b"a" * 40 in client.eval("return redis.call('INFO', 'server')", 0)
        # The acquire script: a changed run_id starts a quiet period (lock-delay).
        lease = Lease(client, NAME, ttl=TTL, identity="X")
        mark_epoch(client, NAME)
        assert lease.acquire("t1").lock_delay == 0  # type: ignore[union-attr]
        lease.release("t1")
        server.model_run_id = "b" * 40  # type: ignore[attr-defined]
        assert lease.acquire("t2").lock_delay == pytest.approx(TTL)  # type: ignore[union-attr]


def test_driver_finished_tells_when_the_owner_stopped_for_good() -> None:
    clock = FakeClock()
    owner = MutexOwner(fake_redis(NAME), NAME, ttl=TTL, clock=clock)
    driver = OwnerDriver(owner, clock)
    driver.step()
    assert owner.holding and not driver.finished
    owner.stop()  # only requested: the driver completes it
    assert not driver.finished
    assert driver.stop() and driver.finished


# -- faults on the wire ---------------------------------------------------------------------

FAULT_KINDS = ("lost_request", "lost_reply", "late_reply", "late_request", "delayed_request")
DELAYS = st.sampled_from([0.2, RENEW, TTL - 0.05, TTL + 0.05, 2 * TTL])


@dataclass
class Fault:
    """What happens to an owner's next lease call."""

    kind: Optional[str]  # one of FAULT_KINDS, or None: the call goes through
    delay: float = 0.0  # late_reply / late_request: seconds the call takes
    stop_midway: bool = False  # stop() is requested while the call is in flight


FAULTS = st.builds(
    Fault, kind=st.sampled_from(FAULT_KINDS), delay=DELAYS, stop_midway=st.booleans()
)


@dataclass
class Party:
    """One owner of the model and everything the model remembers about it."""

    index: int
    owner: MutexOwner
    driver: OwnerDriver
    supervisor: Optional[Supervisor]
    events: list[Event] = field(default_factory=list)
    #: Cleared: the workers ignore ``stopping`` (stuck) until it is set again.
    workers_free: threading.Event = field(default_factory=threading.Event)
    #: User code (listener, on_acquired, on_lost, stuck_worker_policy) raises this, if set.
    raises: Optional[type[BaseException]] = None
    #: Every token this owner sent to Redis in an acquire, renew or release.
    tokens: set[str] = field(default_factory=set)
    #: Every token this owner tried to release (compare-and-delete).
    release_attempts: set[str] = field(default_factory=set)
    #: token -> "op, fault, stop pending?" of the last acquire/renew call that carried it.
    last_call: dict[str, str] = field(default_factory=dict)
    fault: Optional[Fault] = None
    crashed: bool = False
    stop_requested_at: Optional[float] = None
    #: A request of this owner reached Redis after its stop completed (network delay).
    late_write_after_stop: bool = False
    #: Tokens of this owner's requests that reached Redis late (after the caller gave up).
    delivered_late: set[str] = field(default_factory=set)
    periods: int = 0  # holding periods begun ("acquired" events)
    events_after_final: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.crashed and not self.driver.finished


class Violation(AssertionError):
    """An invariant of the lease protocol does not hold."""

    def __init__(self, tag: str, message: str) -> None:
        super().__init__(f"[{tag}] {message}")
        self.tag = tag


#: Violations (by tag) of bugs that are known and not fixed yet, each pinned by a strict
#: xfail replay below: the model tolerates them so that it can look for others.
#: ``MUTEXOWNER_MODEL_STRICT=1`` tolerates none.
KNOWN_UNFIXED: frozenset[str] = frozenset()
if os.environ.get("MUTEXOWNER_MODEL_STRICT", "").strip() in ("1", "true", "yes"):
    KNOWN_UNFIXED = frozenset()


class LeaseModel(RuleBasedStateMachine):
    """Owners, one fake Redis, one fake clock, and rules that inject faults."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self._exit = contextlib.ExitStack()
        self._exit.enter_context(fake_server_time(self.clock))
        self.server = fakeredis.FakeServer()
        self._run_ids = 0
        self._new_run_id()
        self.redis = fakeredis.FakeRedis(server=self.server)
        # Redis kept its state for long (no first lock-delay), and the epoch knows this
        # server's run_id, as the acquire script records it (mark_epoch leaves it empty:
        # a restart from a snapshot of such an epoch would go unnoticed, as documented for
        # an ACL that refuses INFO).
        mark_epoch(self.redis, NAME)
        self.redis.hset(KEYS.epoch, "run_id", self.server.model_run_id)  # type: ignore[attr-defined]
        self.parties: list[Party] = []
        self.down_until = -math.inf  # connection refused until then
        self.paused_until = -math.inf  # every call times out until then
        self.delayed: list[tuple[Party, Callable[..., Any], Any, list[str], list[str]]] = []
        self.snapshot: Optional[dict[bytes, tuple[bytes, Any, Optional[int]]]] = None
        #: Fake times at which Redis lost the lease key (restart, flush, delete by hand).
        self.last_loss = -math.inf
        #: (party index, holding period) exempt from the overlap check: key deleted by hand.
        self.exempt: set[tuple[int, int]] = set()
        #: (party index, fencing token) of every holding period, in order.
        self.holders: list[tuple[int, int]] = []
        self.failed = False  # an invariant failed: teardown only cleans up
        self.tolerated: set[str] = set()  # tags of known_unfixed violations seen
        self.pending: list[Violation] = []  # violations found, first one first
        self.known_unfixed = KNOWN_UNFIXED
        self.first: list[Optional[Fault]] = [None, None, None]  # see first_faults

    # -- set-up -----------------------------------------------------------------------------

    def _new_run_id(self) -> None:
        self._run_ids += 1
        self.server.model_run_id = f"{self._run_ids:040x}"  # type: ignore[attr-defined]

    @initialize(supervised=st.lists(st.booleans(), min_size=2, max_size=3))
    def make_owners(self, supervised: list[bool]) -> None:
        for index, with_supervisor in enumerate(supervised):
            sup: Optional[Supervisor] = None
            if with_supervisor:
                sup = Supervisor(shutdown_timeout=SHUTDOWN)
                sup.add(self._worker(index), name="w")
            owner = MutexOwner(
                fakeredis.FakeRedis(server=self.server),
                NAME,
                ttl=TTL,
                renew_interval=RENEW,
                backoff=BACKOFF,
                supervisor=sup,
                identity=f"O{index}",
                clock=self.clock,
                stuck_worker_policy=self._user_code(index),
                on_acquired=self._user_code(index),
                on_lost=self._user_code(index),
                rng=random.Random(index),
            )
            party = Party(index, owner, OwnerDriver(owner, self.clock), sup)
            party.workers_free.set()
            owner.add_listener(self._user_code(index))
            party.fault = self.first[index]
            owner.add_listener(self._listener(party))
            self._wire(party, owner._lease)
            self.parties.append(party)

    def _worker(self, index: int) -> Callable[[WorkerContext], None]:
        def work(ctx: WorkerContext) -> None:
            ctx.stopping.wait()
            self.parties[index].workers_free.wait()  # a stuck worker waits for the model

        return work

    def _user_code(self, index: int) -> Callable[[Any], None]:
        """A user callback: raises what the model chose for this owner, if anything."""

        def callback(arg: Any) -> None:
            exc = self.parties[index].raises if index < len(self.parties) else None
            if exc is not None:
                raise exc("raised by user code (model)")

        return callback

    def _listener(self, party: Party) -> Callable[[Event], None]:
        def listener(event: Event) -> None:
            # "No event follows stopped": events of the final turn itself are delivered
            # after it (after the round trip), so look at what came before, not at the flag.
            # The transition into stopped reports "state" then, ending a holding period, "lost".
            stopped_at = next(
                (
                    i
                    for i, e in enumerate(party.events)
                    if e.kind == "state" and e.state == "stopped"
                ),
                None,
            )
            part_of_it = stopped_at == len(party.events) - 1 and event.kind == "lost"
            if stopped_at is not None and not part_of_it:
                party.events_after_final.append(event.kind)
            party.events.append(event)
            if event.kind == "acquired":
                party.periods += 1
                assert event.fencing_token is not None
                self._check_fence(party, event.fencing_token)

        return listener

    def _wire(self, party: Party, lease: Lease) -> None:
        """Put this model's network in front of every round trip of ``lease``.

        Acquire/renew go through ``Lease._run_with_wait`` (the script and its ``WAIT`` in one
        pipeline), release and inspect through ``Lease._run_script``; both end in the
        lease's own ``_run``, which classifies errors.
        """
        run_with_wait, run_script = lease._run_with_wait, lease._run_script

        def real(script: Any, *, keys: list[str], args: list[str]) -> Any:
            if script is lease._acquire:
                # fakeredis has no replicas: the lease never asks for a WAIT here.
                return run_with_wait(keys, args, 0)
            return run_script(script, keys=keys, args=args)

        call = self._link(party, lease, real)

        def with_wait(keys: list[str], args: list[str], wait_for: int) -> tuple[Any, Any]:
            assert wait_for == 0, wait_for
            result: tuple[Any, Any] = lease._run(lambda: call(lease._acquire, keys=keys, args=args))
            return result

        def script_call(script: Any, *, keys: list[str], args: list[str]) -> Any:
            return lease._run(lambda: call(script, keys=keys, args=args))

        lease._run_with_wait = with_wait  # type: ignore[method-assign]
        lease._run_script = script_call  # type: ignore[method-assign]

    def _link(self, party: Party, lease: Lease, real: Callable[..., Any]) -> Callable[..., Any]:
        """``Lease._run`` with this model's network and server faults in front of it."""

        def call(script: Any, *, keys: list[str], args: list[str]) -> Any:
            owner = party.owner
            if script is not lease._inspect and args:
                party.tokens.add(args[0])
            fault, party.fault = party.fault, None
            if fault is not None and fault.stop_midway:
                owner.stop()  # another thread calls stop() while this call is in flight
            if script is lease._release:
                party.release_attempts.add(args[0])
            elif script is lease._acquire:
                op = "acquire" if args[3] == "" else "renew"
                kind = fault.kind if fault is not None else None
                pending = "stop pending" if owner.slot.core.stop_requested else "no stop"
                party.last_call[args[0]] = f"{op}, {kind or 'no fault'}, {pending}"
            now = self.clock()
            if now < self.down_until:
                raise _classified(redis.exceptions.ConnectionError("Connection refused"))
            if now < self.paused_until:
                self._advance(owner.call_timeout, self._others(party))
                raise _classified(redis.exceptions.TimeoutError("Timeout reading from socket"))
            kind = fault.kind if fault is not None else None
            if kind is None:
                return real(script, keys=keys, args=args)
            assert fault is not None
            if kind == "lost_request":
                self._advance(owner.call_timeout, self._others(party))
                raise _classified(redis.exceptions.TimeoutError("Timeout reading from socket"))
            if kind == "lost_reply":
                real(script, keys=keys, args=args)
                self._advance(owner.call_timeout, self._others(party))
                raise _classified(redis.exceptions.TimeoutError("Timeout reading from socket"))
            if kind == "late_reply":
                reply = real(script, keys=keys, args=args)
                self._advance(fault.delay, self._others(party))
                return reply
            if kind == "late_request":
                self._advance(fault.delay, self._others(party))
                return real(script, keys=keys, args=args)
            if kind == "delayed_request":
                self.delayed.append((party, real, script, keys, args))
                self._advance(owner.call_timeout, self._others(party))
                raise _classified(redis.exceptions.TimeoutError("Timeout reading from socket"))
            raise AssertionError(f"unknown fault {kind!r}")

        return call

    # -- stepping ---------------------------------------------------------------------------

    def _others(self, party: Party) -> list[Party]:
        return [p for p in self.parties if p is not party]

    def _advance(self, seconds: float, stalled: Sequence[Party] = ()) -> None:
        """Move fake time, once every worker thread has caught up with the time it is now.

        Worker threads and supervisor monitors are real threads: before time jumps, workers
        told to stop must have exited, and a monitor whose step-down point has come must
        have told its workers (it wakes when the clock moves, in real time). Otherwise a
        worker would look stuck only because its thread had not been scheduled yet.
        """
        self._settle_all()
        self.clock.advance(seconds)
        self._settle_all()
        for party in stalled:
            if party.stop_requested_at is not None:
                # Time spent inside another owner's call (or a clock jump): this owner,
                # which would run meanwhile in a real fleet, had no turn. Its stop's time
                # bound waits.
                party.stop_requested_at += seconds

    def _settle_all(self) -> None:
        for party in self.parties:
            sup = party.supervisor
            if sup is None:
                continue
            if sup.running and sup._step_down_due():
                wait_for(lambda sup=sup: all(r.ctx.stopping.is_set() for r in sup._runs))  # type: ignore[misc]
            party.driver.settle_workers()

    def _tick(self, party: Party) -> Optional[float]:
        if not party.live:
            return None
        try:
            wait = party.driver.step()
        except Violation:
            raise
        except BaseException as exc:  # an owner turn must never raise
            self._violation(
                "turn raised", f"O{party.index}'s turn raised {type(exc).__name__}: {exc}"
            )
            raise  # not reached: _violation raises
        self._check()
        return wait

    def _run_for(self, seconds: float) -> None:
        """Let ``seconds`` of fake time pass, turning each owner whenever it is due."""
        end = self.clock() + seconds
        same_instant = 0
        while True:
            waits = [w for w in (self._tick(p) for p in self.parties) if w is not None]
            now = self.clock()
            soonest = min(waits, default=None)
            if soonest is not None and soonest <= 0:
                same_instant += 1
                if same_instant > SPIN_LIMIT:
                    self._violation("spin", f"an owner spins: due now {SPIN_LIMIT} turns in a row")
                    return
                continue
            same_instant = 0
            if now >= end:
                return
            self._advance(min(soonest if soonest is not None else math.inf, end - now))

    # -- rules: time and turns --------------------------------------------------------------

    @rule(index=st.integers(0, 2))
    def turn(self, index: int) -> None:
        """One owner takes a turn at the current fake time."""
        party = self._party(index)
        self._tick(party)

    @rule(seconds=st.sampled_from([0.1, 0.34, RENEW, TTL / 2, TTL, 2 * TTL]))
    def run_for(self, seconds: float) -> None:
        """Time passes; every owner acts whenever it is due."""
        self._run_for(seconds)

    @rule(seconds=st.sampled_from([0.5, TTL - 0.1, TTL + 0.1, 2 * TTL]))
    def clock_jump(self, seconds: float) -> None:
        """The clock moves while no owner runs (the whole fleet paused, or a slow host)."""
        self._advance(seconds, self.parties)
        self._check()

    # -- rules: faults on one owner's next call -------------------------------------------

    @initialize(faults=st.lists(st.one_of(st.none(), FAULTS), min_size=3, max_size=3))
    def first_faults(self, faults: list[Optional[Fault]]) -> None:
        """Faults on the owners' first calls (when the key is free: races to acquire it)."""
        self.first = faults
        for party in self.parties:
            party.fault = faults[party.index]

    @rule(
        index=st.integers(0, 2),
        kind=st.sampled_from(FAULT_KINDS),
        delay=DELAYS,
        stop_midway=st.booleans(),
    )
    def arm_fault(self, index: int, kind: str, delay: float, stop_midway: bool) -> None:
        party = self._party(index)
        party.fault = Fault(kind, delay, stop_midway)

    @rule(index=st.integers(0, 2))
    def stop_midway(self, index: int) -> None:
        """stop() is called while the owner's next call is in flight (no other fault)."""
        party = self._party(index)
        party.fault = Fault(None, 0.0, True)

    @rule()
    def deliver_delayed_requests(self) -> None:
        """Requests delayed in the network reach Redis now (their callers gave up long ago)."""
        delayed, self.delayed = self.delayed, []
        for party, real, script, keys, args in delayed:
            if self.clock() < self.down_until:
                continue  # the server they were sent to is gone
            with contextlib.suppress(Exception):
                real(script, keys=keys, args=args)
            if party.driver.finished and not party.crashed:
                party.late_write_after_stop = True
            elif args:
                party.delivered_late.add(args[0])
        self._check()

    # -- rules: the owners' lives -----------------------------------------------------------

    @rule(index=st.integers(0, 2))
    def stop(self, index: int) -> None:
        """stop() is requested between two turns."""
        party = self._party(index)
        party.owner.stop()
        self._check()

    @rule(index=st.integers(0, 2))
    def crash(self, index: int) -> None:
        """The owner's process dies (kill -9): nothing is released."""
        party = self._party(index)
        if party.crashed or party.driver.finished:
            return
        crash(party.owner)
        party.crashed = True
        self._check()

    @rule(
        index=st.integers(0, 2),
        exc=st.sampled_from([None, RuntimeError, SystemExit, KeyboardInterrupt]),
    )
    def user_code_raises(self, index: int, exc: Optional[type[BaseException]]) -> None:
        """From now on the owner's listener, on_acquired, on_lost and stuck_worker_policy
        raise ``exc`` (None: they return normally again)."""
        party = self._party(index)
        party.raises = exc

    @rule(index=st.integers(0, 2), stuck=st.booleans())
    def workers_stuck(self, index: int, stuck: bool) -> None:
        """The owner's workers ignore ``stopping`` from now on (or obey it again)."""
        party = self._party(index)
        if stuck:
            party.workers_free.clear()
            party.driver.settle_timeout = 0.02  # nothing to wait for: they will not stop
        else:
            party.workers_free.set()
            party.driver.settle_timeout = 5.0
            if party.stop_requested_at is not None:
                # While the lease is held, a stop waits for stuck workers (renewing, so
                # that no second runner can start): the stop's time bound starts now.
                party.stop_requested_at = self.clock()

    # -- rules: Redis -----------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.5, RENEW, TTL]))
    def redis_down(self, seconds: float) -> None:
        """Connections are refused for a while (the server process is down)."""
        self.down_until = max(self.down_until, self.clock() + seconds)

    @rule(seconds=st.sampled_from([0.5, RENEW, TTL, 2 * TTL]))
    def redis_pause(self, seconds: float) -> None:
        """Every call times out for a while (CLIENT PAUSE, SIGSTOP, a frozen network)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    @rule()
    def take_snapshot(self) -> None:
        """Redis writes a snapshot (RDB) that a later restart may load."""
        self.snapshot = self._dump()

    @rule(data=st.sampled_from(["kept", "snapshot", "lost"]), down=st.sampled_from([0.0, 0.5]))
    def redis_restart(self, data: str, down: float) -> None:
        """Redis restarts (new run_id, no scripts): with its data, from a snapshot, or empty."""
        if data != "kept":
            self.last_loss = self.clock()
            self.redis.flushall()
            if data == "snapshot" and self.snapshot is not None:
                self._load(self.snapshot)
        self.redis.script_flush()
        self._new_run_id()
        self.delayed.clear()  # requests in flight died with the connections
        self.down_until = max(self.down_until, self.clock() + down)
        self._check()

    @rule()
    def delete_key(self) -> None:
        """Someone deletes the lease key by hand."""
        if self.redis.delete(KEYS.lease):
            self.last_loss = self.clock()
            for party in self.parties:
                if party.owner.holding:
                    self.exempt.add((party.index, party.periods))
        self._check()

    def _dump(self) -> dict[bytes, tuple[bytes, Any, Optional[int]]]:
        """The lease's keys with their absolute expiry (fake unix ms), as an RDB keeps them."""
        out: dict[bytes, tuple[bytes, Any, Optional[int]]] = {}
        for key in KEYS.all():
            kind = self.redis.type(key)
            if kind == b"none":
                continue
            value: Any = self.redis.hgetall(key) if kind == b"hash" else self.redis.get(key)
            pttl = self.redis.pttl(key)
            expire_at = round((UNIX_OFFSET + self.clock()) * 1000) + pttl if pttl >= 0 else None
            out[key.encode()] = (kind, value, expire_at)
        return out

    def _load(self, dump: dict[bytes, tuple[bytes, Any, Optional[int]]]) -> None:
        now_ms = (UNIX_OFFSET + self.clock()) * 1000
        for key, (kind, value, expire_at) in dump.items():
            if expire_at is not None and expire_at <= now_ms:
                continue  # loading an RDB drops the keys that expired meanwhile
            if kind == b"hash":
                self.redis.hset(key, mapping=value)
            else:
                self.redis.set(key, value)
            if expire_at is not None:
                self.redis.pexpireat(key, expire_at)

    # -- invariants -------------------------------------------------------------------------

    def _party(self, index: int) -> Party:
        return self.parties[index % len(self.parties)]

    def _violation(self, tag: str, message: str) -> None:
        """Fail with ``message``, unless ``tag`` is a known bug not fixed yet (noted only)."""
        if tag in self.known_unfixed:
            self.tolerated.add(tag)
            return
        self.failed = True  # teardown then only cleans up
        violation = Violation(tag, message)
        # Raised inside a listener, the owner would swallow it: raise it again after the turn.
        self.pending.append(violation)
        raise violation

    def _check_fence(self, party: Party, fence: int) -> None:
        """A new holding period's fencing token is greater than every other holder's before."""
        for index, earlier in self.holders:
            if index != party.index and not fence > earlier:
                self._violation(
                    "fence",
                    f"O{party.index} holds with fencing token {fence}, not greater than "
                    f"O{index}'s earlier {earlier}",
                )
            if index == party.index and fence < earlier:
                self._violation(
                    "fence",
                    f"O{party.index} holds with fencing token {fence} < its own earlier {earlier}",
                )
        self.holders.append((party.index, fence))

    @invariant()
    def invariants_hold(self) -> None:
        if self.parties:
            self._check()

    def _check(self) -> None:
        if self.pending:
            raise self.pending[0]
        now = self.clock()
        lease = self.redis.hgetall(KEYS.lease)
        key_token = lease.get(b"token", b"").decode() or None
        pttl = self.redis.pttl(KEYS.lease)
        holding = [p for p in self.parties if not p.crashed and p.owner.holding]
        # 1. at most one holder at any instant
        counted = [p for p in holding if (p.index, p.periods) not in self.exempt]
        if len(counted) > 1:
            self._violation(
                "two holders",
                f"two holders at t={now:.3f}: "
                + ", ".join(f"O{p.index} (fence {p.owner.slot.core.fence})" for p in counted),
            )
        # 1b. ... and no two owners' workers run at once unless told to stop (never two runners)
        runners = [
            p
            for p in self.parties
            if p.supervisor is not None
            and (p.index, p.periods) not in self.exempt
            and any(not r.done and not r.ctx.stopping.is_set() for r in p.supervisor._runs)
        ]
        if len(runners) > 1:
            self._violation(
                "two runners",
                f"workers of {', '.join(f'O{p.index}' for p in runners)} run at t={now:.3f}, "
                "none of them told to stop",
            )
        for party in self.parties:
            owner = party.owner
            # 2. a holder's token is in Redis, expiring no earlier than its local deadline
            if party in holding:
                sent = owner.slot.core.deadline_at - owner.ttl + owner.drift
                # (Not after Redis lost the key since: the quiet period protects then.)
                lost = self.last_loss >= sent or (party.index, party.periods) in self.exempt
                if lost:
                    pass
                elif key_token is None or key_token != owner.slot.core.token:
                    self._violation(
                        "holder without key",
                        f"O{party.index} holds (deadline {owner.slot.core.deadline_at:.3f}) at "
                        f"t={now:.3f} but the key holds "
                        f"{'nothing' if key_token is None else 'another token'}, and Redis "
                        f"lost nothing since its renewal at {sent:.3f}",
                    )
                elif pttl >= 0 and now + pttl / 1000 + 0.001 < owner.slot.core.deadline_at:
                    self._violation(
                        "key expires first",
                        f"O{party.index}'s key expires at {now + pttl / 1000:.3f}, before its "
                        f"local deadline {owner.slot.core.deadline_at:.3f}",
                    )
            # 4. a requested stop completes in bounded fake time
            if owner.slot.core.stop_requested and party.stop_requested_at is None:
                party.stop_requested_at = now
            if (
                party.live
                and party.stop_requested_at is not None
                and party.workers_free.is_set()
                and now > party.stop_requested_at + STOP_BOUND
            ):
                self._violation(
                    "stop never completes",
                    f"O{party.index}'s stop, requested at t={party.stop_requested_at:.3f}, has "
                    f"not completed at t={now:.3f} (state {owner.state})",
                )
            # 5. a completed stop leaves no key of the owner behind, and no event after it
            if party.driver.finished and not party.crashed:
                if party.events_after_final:
                    self._violation(
                        "event after stopped",
                        f"O{party.index} emitted {party.events_after_final} after it stopped",
                    )
                if (
                    key_token is not None
                    and key_token in party.tokens
                    and key_token not in party.release_attempts
                    and not party.late_write_after_stop
                    # By design a key outlives its holder's local deadline by the drift.
                    and pttl > owner.drift * 1000
                ):
                    how = party.last_call.get(key_token, "?")
                    if key_token in party.delivered_late:
                        tag = "key left after stop: a request delayed in the network"
                    elif how.endswith("stop pending"):
                        tag = f"key left after stop: {how.split(',')[0]} during stop"
                    elif [e.reason for e in party.events if e.kind == "lost"][-1:] == ["expired"]:
                        tag = "key left after stop: lease expired locally"
                    else:
                        tag = "key left after stop"
                    self._violation(
                        tag,
                        f"O{party.index} stopped at or before t={now:.3f} but the key still "
                        f"holds a token it sent (last call with it: {how}) and never tried to "
                        f"release (ttl left {pttl} ms)",
                    )

    def teardown(self) -> None:
        try:
            if self.parties and not self.failed:
                for party in self.parties:
                    if party.live:
                        party.owner.stop()
                self.fault_free()
                for party in self.parties:
                    party.raises = None
                    if not party.workers_free.is_set():
                        self.workers_stuck(party.index, stuck=False)
                self._run_for(STOP_BOUND + 0.1)
                stuck = [p.index for p in self.parties if p.live]
                if stuck:
                    self._violation(
                        "stop never completes",
                        f"owner(s) {stuck} did not stop in {STOP_BOUND} s of fake time",
                    )
        finally:
            for party in self.parties:
                party.workers_free.set()
                if party.supervisor is not None:
                    party.supervisor.stop(timeout=5.0)
            self._exit.close()

    def fault_free(self) -> None:
        self.down_until = self.paused_until = -math.inf
        self.delayed.clear()
        for party in self.parties:
            party.fault = None


def _classified(exc: Exception) -> Exception:
    """What ``Lease._run`` raises for ``exc`` (errors are classified in lease.py)."""
    error = classify_error(exc)
    error.__cause__ = exc
    return error


# -- the test ------------------------------------------------------------------------------


if MODEL_SEED is not None:
    seed(MODEL_SEED)(LeaseModel)


def run_model(examples: int = MODEL_EXAMPLES, steps: int = MODEL_STEPS) -> None:
    with fake_info_command():
        run_state_machine_as_test(
            LeaseModel,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )


def test_lease_protocol_model() -> None:
    run_model()


# -- the bugs the model found, replayed deterministically (regression tests) --------------


def replay(steps: Callable[[LeaseModel], None]) -> None:
    """Run ``steps`` on a fresh model, then its teardown; any broken invariant raises."""
    with fake_info_command():
        model = LeaseModel()
        model.known_unfixed = frozenset()
        try:
            steps(model)
        finally:
            model.teardown()


def test_model_acquire_reply_lost_while_stop_pending() -> None:
    """Issue 10 item 4b, as the model found it on 3d0ef59: an acquire that Redis executed
    but whose reply was lost while stop() was pending left the owner stopped and its key
    held for a full ttl ("key left after stop: acquire during stop")."""

    def steps(model: LeaseModel) -> None:
        model.make_owners(supervised=[False, False])
        model.arm_fault(index=0, kind="lost_reply", delay=0.2, stop_midway=True)
        model.turn(index=0)  # acquire runs in Redis, stop() meanwhile, the reply is lost
        model.turn(index=0)  # the owner ends stopped without releasing

    replay(steps)


def test_model_late_renewal_reply_while_stop_pending() -> None:
    """Issue 10 item 4a, as the model found it on 3d0ef59: a renewal reply that arrived
    after the deadline while stop() was pending was processed as a renewal after "stopped"
    ("event after stopped": a "renewed" event) and the key stayed with a fresh ttl."""

    def steps(model: LeaseModel) -> None:
        model.make_owners(supervised=[False, False])
        model.turn(index=0)  # O0 holds
        model.arm_fault(index=0, kind="late_reply", delay=TTL + 0.05, stop_midway=True)
        model.run_for(seconds=RENEW)  # the renewal: stop() meanwhile, reply after the deadline

    replay(steps)


def test_model_acquire_reply_lost_then_stop() -> None:
    """Found by the model on 3d0ef59 (same class as item 4b): an acquire that Redis
    executed but whose reply was lost, then stop() before the next attempt: the owner
    ended stopped without releasing the token it had sent ("key left after stop")."""

    def steps(model: LeaseModel) -> None:
        model.make_owners(supervised=[False, False])
        model.arm_fault(index=0, kind="lost_reply", delay=0.2, stop_midway=False)
        model.turn(index=0)  # the acquire runs in Redis, its reply is lost
        model.stop(index=0)
        model.turn(index=0)  # the owner ends stopped: it must release what it may hold

    replay(steps)


def test_model_stuck_worker_policy_raising_system_exit() -> None:
    """Issue 10 item 3, replayed in the model: a stuck_worker_policy callable that raises
    SystemExit must not end the owner's turn (on 3d0ef59 it escaped ``_tick``, which in
    the threaded owner ends the owner thread: "turn raised")."""

    def steps(model: LeaseModel) -> None:
        model.make_owners(supervised=[True, False])
        model.turn(index=0)  # O0 holds; its worker runs
        model.workers_stuck(index=0, stuck=True)
        model.user_code_raises(index=0, exc=SystemExit)
        model.redis_down(seconds=TTL)
        model.run_for(seconds=2 * TTL)  # deadline: workers told to stop, stuck; policy applied
        model.workers_stuck(index=0, stuck=False)

    replay(steps)


def test_model_acquire_delayed_in_the_network_then_stop() -> None:
    """Found by the model on main: an acquire request delayed in the network reaches Redis
    after a later call with the same token was answered 'taken'; the owner had forgotten that
    token, so its stop did not release the key, which stayed held for a full ttl."""

    def steps(model: LeaseModel) -> None:
        model.make_owners(supervised=[False, False])
        model.first_faults(faults=[Fault("delayed_request"), None, None])
        model.run_for(seconds=RENEW)  # O0's acquire times out, O1 holds, O0 retries: "taken"
        model.delete_key()  # the key becomes free (by hand here; O1's release would do)
        model.deliver_delayed_requests()  # O0's first acquire reaches Redis: O0's token
        model.stop(index=0)
        model.run_for(seconds=0.1)  # O0 ends stopped without releasing its token

    replay(steps)
