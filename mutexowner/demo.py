"""``mutexowner demo``: three owners in one process compete for one lease, live.

By default the owners share an embedded fake Redis (fakeredis, from the ``demo`` extra), so
the demo needs no server. The scenario injects a holder crash (``kill -9``: no release), a
clean hand-off, and a Redis outage longer than the ttl followed by recovery, and prints a
timeline (elapsed time, owner, state change, fencing token, whose workers are running) and a
one-line summary. Every worker run is recorded as an interval on the monotonic clock; the
demo fails (exit 1) if two of them ever overlapped, or if a phase did not complete in time.

Real time is used on purpose (the demo is meant to be watched), with a small ttl scaled to
``--seconds``: every phase is a multiple of the ttl.
"""

from __future__ import annotations

import logging
import random
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO, Union

from mutexowner import machine as m
from mutexowner.backoff import BackoffPolicy
from mutexowner.connection import client_from, derive_lease_client, redact_text, redact_url
from mutexowner.events import Event, Listener
from mutexowner.lease import LeaseKeys
from mutexowner.owner import MutexOwner
from mutexowner.supervisor import Supervisor, WorkerContext
from mutexowner.testing import crash, fake_redis
from mutexowner.timing import LeaseTiming

__all__ = [
    "DEFAULT_SECONDS",
    "MIN_SECONDS",
    "DemoPlan",
    "DemoResult",
    "run_demo",
]

log = logging.getLogger("mutexowner.demo")

#: Default length of the whole demo (seconds); it finishes well within it.
DEFAULT_SECONDS = 20.0
#: The shortest ``--seconds`` the scenario fits in (ttl 0.75 s).
MIN_SECONDS = 6.0
#: The ttl range the plan scales within (seconds).
MIN_TTL = 0.75
MAX_TTL = 2.5
#: The nominal scenario lasts about this many ttls; it is planned to use 70 % of --seconds.
PLAN_TTLS = 5.75
BUDGET_SHARE = 0.7
NODES = ("node-a", "node-b", "node-c")
#: How often a demo worker wakes up to check its lease (seconds).
WORK_TICK = 0.05
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class DemoPlan:
    """The demo's timings, all derived from ``--seconds``."""

    seconds: float
    ttl: float
    #: How long the demo lets each steady state run before the next injection.
    dwell: float
    #: Length of the injected Redis outage (longer than the ttl).
    outage: float
    shutdown_timeout: float
    backoff: BackoffPolicy

    @classmethod
    def for_seconds(cls, seconds: float) -> DemoPlan:
        """Scale the scenario so that it fits ``seconds`` (>= MIN_SECONDS) with room to spare."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"--seconds must be a number, got {seconds!r}")
        if not MIN_SECONDS <= seconds < float("inf"):
            raise ValueError(
                f"--seconds must be >= {MIN_SECONDS:g} (the scenario needs about "
                f"{PLAN_TTLS:g} ttls of at least {MIN_TTL:g} s), got {seconds!r}"
            )
        ttl = round(min(MAX_TTL, max(MIN_TTL, seconds * BUDGET_SHARE / PLAN_TTLS)), 2)
        return cls(
            seconds=float(seconds),
            ttl=ttl,
            dwell=round(ttl / 2, 3),
            outage=round(ttl * 1.5, 2),
            shutdown_timeout=round(ttl * 0.2, 3),
            backoff=BackoffPolicy(initial=ttl / 10, factor=2.0, max_delay=ttl / 4),
        )


@dataclass
class _Node:
    """One simulated process: a label, its owner, and which incarnation it is."""

    label: str
    owner: MutexOwner
    incarnation: int


@dataclass
class _Run:
    """One run of one node's worker, on the monotonic clock."""

    node: _Node
    token: Optional[int]
    start: float
    end: Optional[float] = None


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured (also printed as the summary line)."""

    exit_code: int
    hand_offs: int
    max_overlap: float
    worker_runs: int
    redis_errors: int
    crash_takeover: Optional[float]
    clean_hand_off: Optional[float]
    outage_step_down: Optional[float]
    outage_recovery: Optional[float]
    failures: tuple[str, ...]
    summary: str


class _Timeline:
    """Prints timeline lines as things happen and records every worker run."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._t0 = time.monotonic()
        # Re-entrant: predicates given to wait_for read the timeline under the same lock.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.runs: list[_Run] = []
        self.redis_errors = 0
        self.stuck: list[str] = []
        self._error_streak: set[int] = set()
        self.arrow = "→" if _can_encode(out, "→") else "->"

    def elapsed(self, at: Optional[float] = None) -> float:
        return (time.monotonic() if at is None else at) - self._t0

    def _write(self, who: str, what: str, token: Optional[int] = None) -> None:
        """One timeline line (lock held): time, owner, change, token, workers running."""
        running = ",".join(run.node.label for run in self.runs if run.end is None) or "-"
        token_text = "-" if token is None else str(token)
        line = f"{self.elapsed():7.3f}  {who:<7} {what:<40} {token_text:<17} {running}"
        try:
            self._out.write(line.rstrip() + "\n")
            self._out.flush()
        except (OSError, ValueError):  # a closed pipe must not break the owners' threads
            pass
        self._changed.notify_all()

    def header(self, text: str) -> None:
        with self._lock:
            try:
                self._out.write(text + "\n")
                self._out.flush()
            except (OSError, ValueError):
                pass

    def note(self, text: str) -> None:
        """A scenario step, on a line of its own."""
        with self._lock:
            try:
                self._out.write(f"{self.elapsed():7.3f}  == {text}\n")
                self._out.flush()
            except (OSError, ValueError):
                pass
            self._changed.notify_all()

    def listener(self, node: _Node) -> Listener:
        def on_event(event: Event) -> None:
            self._on_event(node, event)

        return on_event

    def _on_event(self, node: _Node, event: Event) -> None:
        with self._lock:
            key = id(node)
            if event.kind == "error":
                self.redis_errors += 1
                if key not in self._error_streak:
                    self._error_streak.add(key)
                    self._write(node.label, f"Redis error ({event.error_kind}), retrying")
                return
            if event.kind == "state":
                lease = event.state in m.LEASE_STATES or event.previous_state in m.LEASE_STATES
                why = event.reason or ""
                reason = f" ({why.replace('_', '-')})" if why and why != event.state else ""
                self._write(
                    node.label,
                    f"{event.previous_state} {self.arrow} {event.state}{reason}",
                    event.fencing_token if lease else None,
                )
            elif event.kind == "released":
                self._write(node.label, "released the lease, standbys notified")
            elif event.kind == "workers_stuck":
                self.stuck.append(node.label)
                self._write(node.label, f"WORKERS STUCK: {event.detail}")

    def end_error_streaks(self) -> None:
        with self._lock:
            self._error_streak.clear()

    def worker_started(self, node: _Node, token: Optional[int]) -> _Run:
        with self._lock:
            run = _Run(node, token, time.monotonic())
            self.runs.append(run)
            self._write(node.label, "worker started", token)
            return run

    def worker_stopped(self, run: _Run) -> None:
        with self._lock:
            run.end = time.monotonic()
            self._write(run.node.label, "worker stopped", run.token)

    def running(self) -> list[_Run]:
        with self._lock:
            return [run for run in self.runs if run.end is None]

    def wait_for(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``predicate()`` (checked on every timeline change) or ``deadline``."""
        with self._changed:
            while True:
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.25))


def _can_encode(out: TextIO, text: str) -> bool:
    """Can ``out`` print ``text`` (a terminal in a non-UTF-8 locale may not)?"""
    try:
        text.encode(getattr(out, "encoding", None) or "utf-8")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


def _max_overlap(runs: list[_Run], now: float) -> float:
    """Longest time two worker runs of different processes ran at once (0.0 if never)."""
    worst = 0.0
    for i, first in enumerate(runs):
        for second in runs[i + 1 :]:
            if first.node is second.node:
                continue
            end = min(first.end or now, second.end or now)
            worst = max(worst, end - max(first.start, second.start))
    return worst


def _hand_offs(runs: list[_Run]) -> int:
    ordered = sorted(runs, key=lambda run: run.start)
    return sum(1 for a, b in zip(ordered, ordered[1:]) if a.node is not b.node)


class _Demo:
    """The scenario: start, crash, hand-off, outage, stop; with its measurements."""

    def __init__(
        self,
        plan: DemoPlan,
        client: Any,
        name: str,
        rng: random.Random,
        out: TextIO,
        fake_server: Any,
    ) -> None:
        self.plan = plan
        self.client = client
        self.name = name
        self.rng = rng
        self.fake_server = fake_server
        self.timeline = _Timeline(out)
        self.nodes: list[_Node] = []
        self.all_nodes: list[_Node] = []
        self.failures: list[str] = []
        # Leave room at the end to stop every owner within --seconds.
        self.deadline = time.monotonic() + plan.seconds - (plan.shutdown_timeout + 1.0)
        self.crash_takeover: Optional[float] = None
        self.clean_hand_off: Optional[float] = None
        self.outage_step_down: Optional[float] = None
        self.outage_recovery: Optional[float] = None

    # -- nodes ------------------------------------------------------------------------

    def start_node(self, label: str, incarnation: int = 1) -> _Node:
        sup = Supervisor(shutdown_timeout=self.plan.shutdown_timeout)
        owner = MutexOwner(
            self.client,
            self.name,
            ttl=self.plan.ttl,
            backoff=self.plan.backoff,
            supervisor=sup,
            identity=label if incarnation == 1 else f"{label}#{incarnation}",
            stuck_worker_policy=self._stuck,
            rng=random.Random(self.rng.getrandbits(64)),  # reproducible retry jitter (--seed)
        )
        node = _Node(label, owner, incarnation)
        sup.add(self._work, name="work", args=(node,))
        owner.add_listener(self.timeline.listener(node))
        self.nodes.append(node)
        self.all_nodes.append(node)
        owner.start()
        return node

    def _work(self, ctx: WorkerContext, node: _Node) -> None:
        run = self.timeline.worker_started(node, ctx.fencing_token)
        try:
            while not ctx.sleep(WORK_TICK):
                ctx.ensure_held()  # a real worker checks before every side effect
        finally:
            self.timeline.worker_stopped(run)

    def _stuck(self, workers: tuple[str, ...]) -> None:
        # Never expected (demo workers stop at once); a failure, but no os._exit here.
        self.failures.append(f"worker(s) {', '.join(workers)} did not stop in time")

    def holder(self) -> Optional[_Node]:
        running = self.timeline.running()
        return running[0].node if running else None

    # -- waiting ----------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], what: str, until: Optional[float] = None) -> bool:
        deadline = self.deadline if until is None else min(until, self.deadline)
        if self.timeline.wait_for(predicate, deadline):
            return True
        self.failures.append(f"{what} did not happen in time")
        self.timeline.note(f"FAILED: {what} did not happen in time")
        return False

    def pause(self, seconds: float) -> None:
        """Let the current state run for a while (the demo is real time)."""
        time.sleep(max(0.0, min(seconds, self.deadline - time.monotonic())))

    def started_after(self, t: float, other_than: Optional[_Node] = None) -> Optional[_Run]:
        for run in self.timeline.running():
            if run.start >= t and run.node is not other_than:
                return run
        return None

    # -- phases -----------------------------------------------------------------------

    def phase_start(self) -> bool:
        self.timeline.note(
            f"three owners start; on an empty Redis nobody may take the lease for one ttl "
            f"({self.plan.ttl:g} s): it might have just lost a holder's key"
        )
        order = list(NODES)
        self.rng.shuffle(order)
        for label in order:
            self.start_node(label)
            time.sleep(self.rng.uniform(0.0, self.plan.ttl / 20))
        if not self.wait(lambda: self.holder() is not None, "a first holder"):
            return False
        self.pause(self.plan.dwell)
        return True

    def phase_crash(self) -> bool:
        victim = self.holder()
        if victim is None:
            return self.wait(lambda: False, "a holder to crash")
        self.timeline.note(
            f"{victim.label} crashes (kill -9): nothing released, the others wait out its "
            f"ttl ({self.plan.ttl:g} s)"
        )
        t_crash = time.monotonic()
        crash(victim.owner)
        self.nodes.remove(victim)
        if not self.wait(lambda: self.started_after(t_crash, victim) is not None, "a takeover"):
            return False
        run = self.started_after(t_crash, victim)
        assert run is not None
        self.crash_takeover = run.start - t_crash
        self.timeline.note(f"{victim.label} restarts (a new process, a new owner)")
        self.start_node(victim.label, victim.incarnation + 1)
        self.pause(self.plan.dwell)
        return True

    def phase_hand_off(self) -> bool:
        holder = self.holder()
        if holder is None:
            return self.wait(lambda: False, "a holder to hand off")
        self.timeline.note(
            f"{holder.label} stops cleanly: workers stop, lease released, standbys notified"
        )
        t_stop = time.monotonic()
        holder.owner.stop(timeout=self.plan.ttl * 2)
        self.nodes.remove(holder)
        if not self.wait(lambda: self.started_after(t_stop, holder) is not None, "a hand-off"):
            return False
        run = self.started_after(t_stop, holder)
        assert run is not None
        self.clean_hand_off = run.start - t_stop
        self.timeline.note(f"{holder.label} restarts")
        self.start_node(holder.label, holder.incarnation + 1)
        self.pause(self.plan.dwell)
        return True

    def phase_outage(self) -> bool:
        server = self.fake_server
        self.timeline.note(
            f"Redis outage for {self.plan.outage:g} s (longer than the ttl): the holder must "
            f"stop its workers before its lease can expire"
        )
        t_out = time.monotonic()
        server.connected = False
        try:
            stepped_down = self.wait(
                lambda: not self.timeline.running(),
                "the holder stepping down during the outage",
                until=t_out + self.plan.outage,
            )
            if stepped_down:
                self.outage_step_down = time.monotonic() - t_out
            self.pause(t_out + self.plan.outage - time.monotonic())
        finally:
            server.connected = True
        t_back = time.monotonic()
        self.timeline.end_error_streaks()
        self.timeline.note("Redis is back (with its data: no lock-delay needed)")
        if not stepped_down:
            return False
        if not self.wait(lambda: self.started_after(t_back) is not None, "recovery"):
            return False
        run = self.started_after(t_back)
        assert run is not None
        self.outage_recovery = run.start - t_back
        self.pause(self.plan.dwell)
        return True

    def stop_all(self) -> None:
        self.timeline.note("stopping every owner")
        holder = self.holder()
        # Standbys first, so that the holder's release hands off to no one.
        for node in sorted(self.nodes, key=lambda n: n is holder):
            if not node.owner.stop(timeout=self.plan.ttl * 3):
                self.failures.append(f"{node.label} did not stop in time")
        for node in self.all_nodes:
            sup = node.owner.supervisor
            if sup is not None and not sup.wait_idle(self.plan.ttl * 3):
                self.failures.append(f"{node.label}'s workers did not stop in time")


def _fake_client() -> tuple[Any, Any]:
    """An embedded fake Redis client and its server (ImportError without fakeredis)."""
    client = fake_redis()
    return client, client.connection_pool.connection_kwargs["server"]


def _leftover_threads(grace: float) -> list[str]:
    deadline = time.monotonic() + grace
    left = []
    for thread in threading.enumerate():
        if thread is threading.current_thread() or not thread.name.startswith("mutexowner"):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread.name)
    return left


def _fmt(value: Optional[float], unit: str = "s") -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


@dataclass(frozen=True)
class _Target:
    """Where the demo runs: the client, the fake server (None: real), the lease name."""

    client: Any
    fake_server: Any
    name: str
    where: str


def run_demo(
    *,
    seconds: float = DEFAULT_SECONDS,
    seed: Optional[int] = None,
    redis_url: Optional[str] = None,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> DemoResult:
    """Run the scenario, print the timeline and summary to ``out``; return what happened.

    ``redis_url`` None: an embedded fake Redis (needs fakeredis). With a URL, the demo uses
    a fresh random lease name on that server, deletes its keys at the end, and skips the
    outage (a real server cannot be cut off from here).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    plan = DemoPlan.for_seconds(seconds)
    if seed is None:
        seed = secrets.randbelow(10**6)
    target = _connect(redis_url, err)
    if isinstance(target, DemoResult):
        return target
    demo = _Demo(plan, target.client, target.name, random.Random(seed), out, target.fake_server)
    _print_header(demo, target, seed)
    try:
        _run_scenario(demo, with_outage=target.fake_server is not None)
    finally:
        demo.stop_all()
        if target.fake_server is None:
            _delete_demo_keys(target, err)
    left = _leftover_threads(grace=2.0)
    if left:
        demo.failures.append(f"threads left running: {', '.join(left)}")
    return _summarise(demo, target.fake_server is not None)


def _connect(redis_url: Optional[str], err: TextIO) -> Union[_Target, DemoResult]:
    """The embedded fake Redis, or the server at ``redis_url``; a usage failure if neither works."""
    if redis_url is None:
        try:
            client, fake_server = _fake_client()
        except ImportError:
            err.write(
                "mutexowner demo: the embedded fake Redis needs fakeredis with Lua: "
                "pip install 'mutexowner[demo]' (or pass --redis URL)\n"
            )
            return _usage_failure("fakeredis missing")
        return _Target(client, fake_server, "demo", "an embedded fake Redis (no server needed)")
    try:
        client = client_from(redis_url, parameter="--redis")
        derive_lease_client(client, timeout=1.0).ping()
    except Exception as exc:
        err.write(
            f"mutexowner demo: cannot use Redis at {redact_url(redis_url)}: "
            f"{redact_text(str(exc))}\n"
        )
        return _usage_failure("redis unreachable")
    return _Target(client, None, f"mutexowner-demo:{secrets.token_hex(4)}", redact_url(redis_url))


def _print_header(demo: _Demo, target: _Target, seed: int) -> None:
    """The timeline's first lines: who competes where, the timing, the seed, the columns."""
    tl, plan = demo.timeline, demo.plan
    tl.header(
        f"mutexowner demo: {len(NODES)} owners ({', '.join(NODES)}) compete for the lease "
        f"{target.name!r} on {target.where}"
    )
    tl.header(
        f"ttl {plan.ttl:g} s (renewed every {LeaseTiming.of(plan.ttl).renew_interval:.2g} s), "
        f"seed {seed}, at most "
        f"{plan.seconds:g} s; scenario: start, holder crash, clean hand-off, "
        + (
            "Redis outage, stop"
            if target.fake_server is not None
            else "stop (no outage: real server)"
        )
    )
    tl.header(f"{'time':>7}  {'owner':<7} {'change':<40} {'fencing token':<17} workers running")


def _run_scenario(demo: _Demo, *, with_outage: bool) -> None:
    """The phases in order, stopping at the first that fails; an error becomes a failure."""
    try:
        ok = demo.phase_start() and demo.phase_crash() and demo.phase_hand_off()
        if ok:
            if with_outage:
                demo.phase_outage()
            else:
                demo.timeline.note(
                    "outage phase skipped: a real Redis server cannot be cut off from here"
                )
    except Exception as exc:  # report, then still stop every owner
        log.exception("demo scenario failed")
        demo.failures.append(f"unexpected error: {redact_text(str(exc))}")


def _delete_demo_keys(target: _Target, err: TextIO) -> None:
    """Remove the random lease's keys from the real server the demo ran on."""
    try:
        derive_lease_client(target.client, timeout=1.0).delete(*LeaseKeys(target.name).all())
    except Exception as exc:
        err.write(f"mutexowner demo: could not delete the demo keys: {exc}\n")


def _usage_failure(reason: str) -> DemoResult:
    return DemoResult(EXIT_USAGE, 0, 0.0, 0, 0, None, None, None, None, (reason,), "")


def _summarise(demo: _Demo, with_outage: bool) -> DemoResult:
    tl = demo.timeline
    now = time.monotonic()
    runs = list(tl.runs)
    overlap = _max_overlap(runs, now)
    hand_offs = _hand_offs(runs)
    failures = list(demo.failures)
    if tl.stuck:
        failures.append(f"worker(s) of {', '.join(tl.stuck)} ignored stopping")
    if overlap > 0:
        failures.insert(0, f"SAFETY VIOLATION: two workers ran at once for {overlap:.3f} s")
    overlap_text = "0" if overlap == 0 else f"{overlap:.3f} s"
    outage = (
        f"outage {demo.plan.outage:g} s: stepped down after {_fmt(demo.outage_step_down)}, "
        f"back {_fmt(demo.outage_recovery)} after Redis returned"
        if with_outage
        else "outage skipped"
    )
    summary = (
        f"summary: {hand_offs} hand-offs, max overlap = {overlap_text}, crash takeover "
        f"{_fmt(demo.crash_takeover)} (ttl {demo.plan.ttl:g} s), clean hand-off "
        f"{_fmt(demo.clean_hand_off, 'ms')}, {outage}; {len(runs)} worker runs, "
        f"{tl.redis_errors} Redis errors, {tl.elapsed(now):.1f} s"
        + ("" if not failures else " — FAILED: " + "; ".join(failures))
    )
    tl.header(summary)
    return DemoResult(
        exit_code=EXIT_FAILED if failures else EXIT_OK,
        hand_offs=hand_offs,
        max_overlap=overlap,
        worker_runs=len(runs),
        redis_errors=tl.redis_errors,
        crash_takeover=demo.crash_takeover,
        clean_hand_off=demo.clean_hand_off,
        outage_step_down=demo.outage_step_down,
        outage_recovery=demo.outage_recovery,
        failures=tuple(failures),
        summary=summary,
    )
