"""The chaos harness: a real redis-server, N owner processes competing for one lease, faults.

``ChaosRig`` starts the Redis under test, a second Redis for the fencing store (never
faulted), one ``TcpProxy`` per owner (so any one owner can be partitioned), and owner
processes (``tests/chaos/owner_proc.py``), each writing its ledger. Faults are methods of
the rig that record when they started and cleared; ``finish()`` stops every process with
SIGTERM and hands the ledgers to the checker.

Waiting is poll-with-deadline on the ledgers (an observable condition), never a bare
sleep; the only timed waits are the lengths of the faults themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import redis

from mutexowner.owner import drift_for
from tests.chaos import checker
from tests.chaos.fence_store import FenceStore
from tests.chaos.ledger import Ledger
from tests.chaos.owner_proc import FREEZE_IN_GAP, LEASE_NAME, control_path
from tests.chaos.proxy import PASS, TcpProxy
from tests.redis_server import RedisServer, poll, proc_state

__all__ = ["ChaosConfig", "ChaosRig", "OwnerProcess"]

REPO = Path(__file__).resolve().parents[2]
POLL = 0.02
#: Extra seconds on every recovery bound: process scheduling on a loaded 2-core CI machine.
SLACK_ENV = "MUTEXOWNER_CHAOS_SLACK"


@dataclass(frozen=True)
class ChaosConfig:
    """Timing of the chaos owners (ttl <= 2 s keeps the suite fast)."""

    ttl: float = 2.0
    shutdown_timeout: float = 0.5
    backoff_initial: float = 0.05
    backoff_max: float = 0.5
    beat: float = 0.02
    slack: float = float(os.environ.get(SLACK_ENV, "1.0"))

    @property
    def renew_interval(self) -> float:
        return self.ttl / 3

    @property
    def call_timeout(self) -> float:
        return min(1.0, self.renew_interval / 3)

    @property
    def drift(self) -> float:
        return drift_for(self.ttl)

    @property
    def recovery_bound(self) -> float:
        """Seconds from a fault's reference time until some worker runs again.

        ``ttl + drift + call_timeout + backoff_max + slack``: every owner not holding makes
        a call within ``call_timeout + backoff_max`` of the fault clearing (a call in flight
        times out, then at most one capped backoff); that call either finds the key free
        (and if Redis lost its state, workers may start only after the lock-delay it opened,
        ``ttl + drift``), or finds a key that expires within ``ttl`` (a stale request
        replayed when Redis came back, or the lease of a holder that died or froze, last
        renewed before the fault) and is retried when it expires.
        """
        return self.ttl + self.drift + self.call_timeout + self.backoff_max + self.slack

    def args(self) -> list[str]:
        return [
            "--ttl", str(self.ttl),
            "--shutdown", str(self.shutdown_timeout),
            "--backoff-initial", str(self.backoff_initial),
            "--backoff-max", str(self.backoff_max),
            "--beat", str(self.beat),
        ]  # fmt: skip


class OwnerProcess:
    """One ``tests.chaos.owner_proc`` process."""

    def __init__(
        self,
        identity: str,
        redis_url: str,
        store_url: str,
        ledger_dir: Path,
        config: ChaosConfig,
        proxy: Optional[TcpProxy] = None,
    ) -> None:
        self.identity = identity
        self.redis_url = redis_url
        self.store_url = store_url
        self.ledger_dir = ledger_dir
        self.config = config
        self.proxy = proxy
        self.log_path = ledger_dir / f"{identity}.log"
        self.popen: Optional[subprocess.Popen[bytes]] = None
        self.killed = False
        #: Stopped on purpose with SIGTERM before the end (must have exited 0).
        self.retired = False
        self.exit_code: Optional[int] = None

    def start(self) -> OwnerProcess:
        cmd = [
            sys.executable, "-m", "tests.chaos.owner_proc",
            "--redis", self.redis_url,
            "--store", self.store_url,
            "--identity", self.identity,
            "--ledger", str(self.ledger_dir),
            "--name", LEASE_NAME,
            *self.config.args(),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def frozen(self) -> bool:
        return self.alive and proc_state(self.pid) in ("T", "t")

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        if not poll(lambda: self.frozen, 5.0):
            raise RuntimeError(f"{self.identity} did not stop")

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        if not poll(lambda: not self.frozen, 5.0):
            raise RuntimeError(f"{self.identity} did not resume")

    def kill(self) -> None:
        """SIGKILL (the scenario's own kill: the checker does not count it as a crash)."""
        self.killed = True
        assert self.popen is not None
        self.popen.kill()
        self.exit_code = self.popen.wait(10)

    def control(self, command: str) -> None:
        """Leave a command for the worker (see owner_proc); atomic via rename."""
        path = control_path(self.ledger_dir, self.identity)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(command)
        tmp.replace(path)

    def send_term(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> Optional[int]:
        """Wait for exit; None (after a SIGKILL) if it did not exit in ``timeout`` seconds."""
        assert self.popen is not None
        try:
            self.exit_code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            self.exit_code = None
        return self.exit_code

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "killed" if self.killed else "frozen" if self.frozen else "alive"
        state = state if self.alive or self.killed else f"exited {self.exit_code}"
        return f"<OwnerProcess {self.identity} pid={self.popen and self.popen.pid} {state}>"


class ChaosRig:
    """Redis under test + fencing store + N owner processes + faults + the checker."""

    def __init__(
        self,
        redis_factory: Callable[..., RedisServer],
        tmp_path: Path,
        config: Optional[ChaosConfig] = None,
        *,
        appendonly: bool = False,
        proxied: bool = True,
    ) -> None:
        options: dict[str, Any] = {}
        if appendonly:
            options.update(appendonly=True, appendfsync="always")
        self._setup(
            config or ChaosConfig(),
            redis_factory(**options),
            redis_factory(),
            tmp_path,
            proxied=proxied,
        )

    def _setup(
        self,
        config: ChaosConfig,
        server: RedisServer,
        store_server: RedisServer,
        tmp_path: Path,
        *,
        proxied: bool,
    ) -> None:
        """What every rig has: the Redis under test, the fencing store, the ledger."""
        self.config = config
        self.t0 = time.monotonic()
        self.server = server
        self.store_server = store_server
        self.store = FenceStore(store_server.client())
        self.ledger_dir = tmp_path / "ledger"
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.ledger_dir)
        self.proxied = proxied
        self.owners: dict[str, OwnerProcess] = {}
        self.faults: list[checker.Fault] = []
        self._serial = 0
        self._admin: Optional[redis.Redis] = None

    # -- processes -----------------------------------------------------------------------

    def spawn(self, identity: Optional[str] = None) -> OwnerProcess:
        self._serial += 1
        identity = identity or f"o{self._serial}"
        proxy = None
        url = self.server.url
        if self.proxied:
            proxy = TcpProxy(self.server.port, name=f"proxy-{identity}").start()
            url = proxy.url
        owner = OwnerProcess(
            identity, url, self.store_server.url, self.ledger_dir, self.config, proxy
        )
        self.owners[identity] = owner
        return owner.start()

    def start(self, n: int = 3, *, timeout: float = 20.0) -> list[OwnerProcess]:
        """Start ``n`` owners and wait until one of them runs its worker."""
        owners = [self.spawn() for _ in range(n)]
        self.wait_until(
            lambda: {r["id"] for r in self.ledger.events("ready")} >= {o.identity for o in owners},
            timeout,
            "every owner process reported ready",
        )
        self.wait_for_holder(timeout)
        return owners

    @property
    def alive_owners(self) -> list[OwnerProcess]:
        return [o for o in self.owners.values() if o.alive and not (o.killed or o.retired)]

    def holder(self, fresh: float = 0.25, stable: float = 0.2) -> Optional[OwnerProcess]:
        """The owner whose worker passed a check in the last ``fresh`` seconds and whose run
        has lasted ``stable`` seconds (None if there is none, or it is frozen)."""
        self.ledger.refresh()
        last = self.ledger.last_check()
        now = time.monotonic()
        if last is None or now - last["t"] > fresh:
            return None
        runs = [r for r in self.ledger.runs() if r.pid == last["pid"] and r.run == last["run"]]
        if not runs or now - runs[0].start < stable:
            return None
        owner = self.owners.get(last["id"])
        return owner if owner is not None and owner.alive and not owner.frozen else None

    def wait_for_holder(self, timeout: float) -> OwnerProcess:
        found: list[OwnerProcess] = []

        def has_holder() -> bool:
            owner = self.holder()
            if owner is not None:
                found.append(owner)
            return owner is not None

        self.wait_until(has_holder, timeout, "some owner holds and runs its worker")
        return found[-1]

    def wait_for_check(
        self, after: float, timeout: float, exclude: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The first passed worker check at or after ``after`` (by an owner not excluded)."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            record = self.ledger.first_check_after(after, exclude)
            if record is not None:
                found.append(record)
            return record is not None

        self.wait_until(seen, timeout, f"a worker check after t={after - self.t0:.3f}")
        return found[-1]

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll the ledgers until ``predicate()``; AssertionError with diagnostics on timeout."""
        end = time.monotonic() + timeout
        while True:
            self.ledger.refresh()
            if predicate():
                return
            if time.monotonic() >= end:
                raise AssertionError(
                    f"timed out after {timeout} s waiting until {what}\n" + self.describe()
                )
            time.sleep(POLL)

    def pause(self, seconds: float) -> None:
        """Let a fault last ``seconds``; fails at once if an owner process dies meanwhile."""
        end = time.monotonic() + seconds
        while True:
            dead = [o for o in self.owners.values() if not (o.killed or o.retired or o.alive)]
            if dead:
                raise AssertionError(f"owner process(es) died: {dead}\n" + self.describe())
            remaining = end - time.monotonic()
            if remaining <= 0:
                self.ledger.refresh()
                return
            time.sleep(min(remaining, 0.05))

    def describe(self) -> str:
        self.ledger.refresh()
        parts = [f"t0={self.t0:.3f} owners={list(self.owners.values())}"]
        for run in self.ledger.runs()[-12:]:
            parts.append(
                f"  run {run.identity}/{run.run} token={run.token} "
                f"[{run.start - self.t0:.3f}, {run.end - self.t0:.3f}] {run.end_reason}"
            )
        for owner in self.owners.values():
            parts.append(f"--- {owner.identity} log tail ---\n{owner.log_tail()}")
        return "\n".join(parts)

    # -- faults --------------------------------------------------------------------------

    def admin(self) -> redis.Redis:
        if self._admin is None:
            self._admin = self.server.client()
        return self._admin

    @contextlib.contextmanager
    def fault(
        self, kind: str, *, measure_from: str = "clear", detail: str = ""
    ) -> Iterator[checker.Fault]:
        """Record one fault: ``start`` on entry, ``clear`` on exit."""
        fault = checker.Fault(
            kind,
            start=time.monotonic(),
            measure_from=measure_from,
            bound=self.config.recovery_bound,
            detail=detail,
        )
        self.faults.append(fault)
        yield fault
        if fault.clear is None:
            fault.clear = time.monotonic()

    def redis_restart(self, *, persist: bool) -> checker.Fault:
        """redis-server SIGKILL, then start on the same port (data kept only if ``persist``)."""
        kind = "redis_restart_aof" if persist else "redis_restart_empty"
        with self.fault(kind) as fault:
            self.server.restart(persist=persist)
        return fault

    def redis_outage(self, seconds: float) -> checker.Fault:
        """redis-server gone (SIGKILL) for ``seconds``, then started again (same data dir)."""
        with self.fault("redis_outage", detail=f"{seconds:.1f} s") as fault:
            self.server.kill()
            self.pause(seconds)
            self.server.start()
        return fault

    def redis_freeze(self, seconds: float) -> checker.Fault:
        """redis-server SIGSTOPped for ``seconds``, then SIGCONT."""
        with self.fault("redis_freeze", detail=f"{seconds:.1f} s") as fault:
            self.server.freeze()
            self.pause(seconds)
            fault.clear = time.monotonic()
            self.server.thaw()
        self.server.wait_until_ready()
        return fault

    def client_pause(self, seconds: float) -> checker.Fault:
        """``CLIENT PAUSE <ms> ALL``: Redis up, accepting connections, answering nothing."""
        with self.fault("client_pause", detail=f"{seconds:.1f} s") as fault:
            self.admin().execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
            fault.clear = time.monotonic() + seconds
            self.pause(seconds)
            poll(lambda: self._answers(), 10.0)
        return fault

    def client_pause_past_deadline(
        self, holder: OwnerProcess, after: float = 0.03
    ) -> checker.Fault:
        """``CLIENT PAUSE`` from just after a renewal of ``holder`` until ``after`` seconds past
        its local deadline: the holder's last retry, sent before the deadline, is answered
        after it (a late reply), as are its rivals' acquires."""
        since = time.monotonic()
        found: list[float] = []

        def renewed() -> bool:
            for record in self.ledger.owner_events("renewed", holder.identity):
                if record["t"] > since:
                    found.append(record["t"])
            return bool(found)

        self.wait_until(renewed, 2 * self.config.renew_interval + 1, "a renewal")
        # The renewal was sent before its event: the deadline is at most this.
        deadline = found[0] + self.config.ttl - self.config.drift
        seconds = deadline + after - time.monotonic()
        with self.fault("client_pause_past_deadline", detail=f"{seconds:.2f} s") as fault:
            self.admin().execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
            fault.clear = time.monotonic() + seconds
            self.pause(seconds)
            poll(lambda: self._answers(), 10.0)
        return fault

    def client_kill(self) -> checker.Fault:
        """``CLIENT KILL`` of every other connection: lease calls and subscriptions."""
        with self.fault("client_kill") as fault:
            admin = self.admin()
            killed = 0
            for kind in ("normal", "pubsub"):
                killed += int(
                    admin.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
                )
            fault.detail = f"{killed} connections"
        return fault

    def freeze_owner(self, owner: OwnerProcess, seconds: float) -> checker.Fault:
        """SIGSTOP one owner process for ``seconds``; the others must take over meanwhile."""
        with self.fault(
            "holder_freeze", measure_from="start", detail=f"{owner.identity} {seconds:.1f} s"
        ) as fault:
            owner.freeze()
            self.pause(seconds)
            fault.clear = time.monotonic()
            owner.thaw()
        return fault

    def freeze_owner_in_gap(self, owner: OwnerProcess) -> checker.Fault:
        """Make the holder's worker SIGSTOP its own process between a check and its write."""
        with self.fault(
            "holder_freeze_in_gap", measure_from="start", detail=owner.identity
        ) as fault:
            owner.control(FREEZE_IN_GAP)
            self.wait_until(
                lambda: any(True for _ in self.ledger.events("self_freeze", owner.identity)),
                10.0,
                f"{owner.identity} froze itself",
            )
            fault.start = next(self.ledger.events("self_freeze", owner.identity))["t"]
        return fault

    def stop_owner(self, owner: OwnerProcess, timeout: float = 15.0) -> checker.Fault:
        """SIGTERM: a clean stop (workers, release, notice); the process must exit 0."""
        with self.fault("holder_stop", measure_from="start", detail=owner.identity) as fault:
            owner.retired = True
            owner.send_term()
            code = owner.wait(timeout)
            fault.detail += f" exit {code}"
        return fault

    def kill_owner(self, owner: OwnerProcess) -> checker.Fault:
        with self.fault("holder_kill", measure_from="start", detail=owner.identity) as fault:
            owner.kill()
        return fault

    @contextlib.contextmanager
    def partition(self, owner: OwnerProcess, mode: str) -> Iterator[checker.Fault]:
        """Cut ``owner`` off from Redis with its proxy (``drop`` or ``blackhole``)."""
        if owner.proxy is None:
            raise RuntimeError("partitions need ChaosRig(proxied=True)")
        with self.fault(f"partition_{mode}", measure_from="start", detail=owner.identity) as fault:
            owner.proxy.set_mode(mode)
            yield fault
            owner.proxy.set_mode(PASS)

    def _answers(self) -> bool:
        try:
            return bool(self.admin().ping())
        except redis.RedisError:
            return False

    # -- the end -------------------------------------------------------------------------

    def finish(
        self, *, expected_logs: Sequence[str] = (), timeout: float = 20.0
    ) -> checker.Verdict:
        """SIGTERM every owner, wait for them, and run the checker on everything recorded."""
        for owner in self.owners.values():
            if owner.proxy is not None and owner.proxy.mode != PASS:
                owner.proxy.set_mode(PASS)
        for owner in self.owners.values():
            if not (owner.killed or owner.retired):
                owner.send_term()
        exits: dict[str, Optional[int]] = {}
        for identity, owner in self.owners.items():
            exits[identity] = owner.exit_code if owner.killed else owner.wait(timeout)
        self.ledger.refresh()
        verdict = checker.check(
            self.ledger.records,
            self.store.log(),
            self.faults,
            exits,
            killed=[o.identity for o in self.owners.values() if o.killed],
            t0=self.t0,
            expected_logs=expected_logs,
        )
        return verdict

    def assert_ok(self, verdict: checker.Verdict, context: str = "") -> None:
        """Fail with every problem found, the recent runs and the processes' log tails."""
        if verdict.problems:
            raise AssertionError(
                f"{context}{len(verdict.problems)} problem(s) (ledgers in {self.ledger_dir}):\n"
                + "\n".join(verdict.problems)
                + "\n"
                + self.describe()
            )

    def close(self) -> None:
        """Teardown: kill whatever still runs, close the proxies (servers: the fixture)."""
        for owner in self.owners.values():
            if owner.alive:
                with contextlib.suppress(Exception):
                    owner.popen.kill()  # type: ignore[union-attr]
                    owner.popen.wait(10)  # type: ignore[union-attr]
        for owner in self.owners.values():
            if owner.proxy is not None:
                owner.proxy.close()
