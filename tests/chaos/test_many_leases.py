"""1,000 leases through Redis restarts, no overlap (issue 12, "Done when").

Two ``many_proc`` processes compete for the same 1,000 keys (one ``MutexOwner`` per key in
each, all on the process's one engine: 2,000 leases). Once every key is held, Redis is
killed with SIGKILL and started again on the same port three times in a row: with its AOF
(``appendfsync always``), with its data wiped, and with its data wiped while process p1 is
frozen (SIGSTOP) through the restart and past every lease it held, so that p2 must take
those keys over (p1 is resumed afterwards). One fleet goes through all three, which keeps
the test's cost to one start-up and one stop of 2,000 leases (~20 s).

From the processes' ledgers (holds sampled with clock brackets, tests/holdings.py) the
test proves:

- **no overlap**: for every key, no two holds (of either process, or of one process twice)
  overlap, and fencing tokens grow strictly from one holder to the next;
- **lock-delay** (docs/safety.md, point 5): no hold begins within ``ttl`` of the data loss
  (a holder whose lease was valid re-takes its key and its hold simply goes on);
- **recovery**: every key is held again within ``B = ttl + drift + call_timeout + backoff
  cap + slack`` of the restart (of the resumed process, for the frozen case);
- **never crash**: both processes exit 0 on SIGTERM with their engines alive and every
  owner stopped, no ERROR/CRITICAL library log, no thread exception; no lease key is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tests.chaos.checker import check_processes
from tests.chaos.harness import REPO, ChaosConfig
from tests.chaos.ledger import Ledger
from tests.holdings import Hold, check_holds
from tests.redis_server import RedisServer, poll, proc_state

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.timeout(90)]

KEYS = 1000
CONFIG = ChaosConfig()
TTL = CONFIG.ttl
#: Someone holds every key again within this of the fault clearing.
BOUND = CONFIG.recovery_bound
#: Steady running before and after the fault, so that a late second holder would show.
STEADY = 0.5

Record = Callable[..., None]


class ManyProcess:
    """One ``tests.chaos.many_proc`` process."""

    def __init__(self, identity: str, url: str, ledger_dir: Path) -> None:
        self.identity = identity
        self.log_path = ledger_dir / f"{identity}.log"
        cmd = [
            sys.executable, "-m", "tests.chaos.many_proc",
            "--redis", url,
            "--identity", identity,
            "--ledger", str(ledger_dir),
            "--keys", str(KEYS),
            "--ttl", str(TTL),
            "--backoff-initial", str(CONFIG.backoff_initial),
            "--backoff-max", str(CONFIG.backoff_max),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)
        assert poll(lambda: proc_state(self.popen.pid) in ("T", "t"), 5)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)
        assert poll(lambda: proc_state(self.popen.pid) not in ("T", "t"), 5)

    def stop(self, timeout: float = 30) -> Optional[int]:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            return None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


class Fleet:
    """The two processes and their ledger; ``held()`` polls who holds what now."""

    def __init__(self, server: RedisServer, tmp_path: Path) -> None:
        self.server = server
        self.ledger = Ledger(tmp_path)
        self.procs = {
            identity: ManyProcess(identity, server.url, tmp_path) for identity in ("p1", "p2")
        }
        self._open: dict[tuple[int, str, int], float] = {}

    def held(self) -> set[str]:
        """Keys some process holds now, by the ledger (each open hold: a start, no end)."""
        before = len(self.ledger.records)
        self.ledger.refresh()
        for record in self.ledger.records[before:]:
            if record["ev"] == "hold_start":
                self._open[(record["pid"], record["key"], record["token"])] = record["t"]
            elif record["ev"] == "hold_end":
                self._open.pop((record["pid"], record["key"], record["token"]), None)
        return {key for _, key, _ in self._open}

    def holders_of(self, identity: str) -> set[str]:
        self.held()
        pid = self.procs[identity].popen.pid
        return {key for p, key, _ in self._open if p == pid}

    def wait_all_held(self, timeout: float, what: str, by: Optional[str] = None) -> float:
        """Poll until every key is held (by process ``by``, else by any); when it was so."""

        def count() -> int:
            return len(self.held() if by is None else self.holders_of(by))

        ok = poll(lambda: count() == KEYS, timeout, interval=0.02)
        assert ok, f"{what}: {KEYS - count()} key(s) not held\n{self.describe()}"
        return time.monotonic()

    def pause(self, seconds: float) -> None:
        """Let ``seconds`` of steady running pass (the window itself is what is waited for);
        fails at once if a process died meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            dead = [i for i, p in self.procs.items() if p.popen.poll() is not None]
            assert not dead, f"process(es) {dead} died\n{self.describe()}"
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def holds(self) -> list[Hold]:
        self.ledger.refresh()
        return [
            Hold(
                r["key"], r["id"], r["pid"], i, int(r["token"]), r["start"], r["end"], r["samples"]
            )
            for i, r in enumerate(self.ledger.events("hold_end"))
        ]

    def stop(self) -> dict[str, Optional[int]]:
        for proc in self.procs.values():
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
        return {identity: proc.stop() for identity, proc in self.procs.items()}

    def describe(self) -> str:
        parts = []
        for identity, proc in self.procs.items():
            parts.append(f"--- {identity} (exit {proc.popen.poll()}) ---\n{proc.log_tail()}")
        return "\n".join(parts)

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait(10)


@pytest.fixture
def fleet_factory(
    redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(**server_options: Any) -> Fleet:
        fleet = Fleet(redis_server_factory(**server_options), tmp_path)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.kill()


@dataclass
class Restart:
    """One Redis restart of the sequence and what came of it."""

    case: str
    lost_at: float = 0.0
    back_at: float = 0.0
    cleared: float = 0.0
    recovered_at: float = 0.0
    taken_over: Optional[float] = None


CASES = ("restart_aof", "restart_empty", "restart_empty_p1_frozen")


def test_1000_leases_through_redis_restarts_no_overlap(
    fleet_factory: Callable[..., Fleet], record_figures: Record
) -> None:
    """One fleet through three restarts in a row: from the AOF, with the data wiped, and
    with the data wiped while p1 is frozen through it (p2 must take p1's keys over)."""
    fleet = fleet_factory(appendonly=True, appendfsync="always")
    # The first acquisition of a key on a fresh Redis waits one ttl (lock-delay).
    fleet.wait_all_held(TTL + 20, "at the start")
    fleet.pause(STEADY)
    restarts = [restart(fleet, case) for case in CASES]

    exits = fleet.stop()
    holds = fleet.holds()
    problems = check_holds(holds)
    records = fleet.ledger.refresh().records
    problems += check_processes(records, exits, killed=())
    for fault in restarts:
        problems += [
            f"{fault.case}: a hold began {h.start - fault.lost_at:.3f} s after the data loss "
            f"(lock-delay {TTL} s): {h}"
            for h in holds
            if fault.lost_at < h.start < fault.lost_at + TTL
        ]
    frozen = restarts[-1]
    pid = fleet.procs["p1"].popen.pid
    problems += [
        f"p1 held on after it was frozen through the restart: {h}"
        for h in holds
        if h.holder == pid and h.end > frozen.lost_at
    ]
    assert not problems, (
        "\n".join(problems[:20]) + f"\n{len(problems)} problem(s)\n" + (fleet.describe())
    )
    assert fleet.server.client().keys("mutexowner:*:lease") == []

    exits_records = [r for r in records if r["ev"] == "proc_exit"]
    by_key: dict[str, int] = {}
    for hold in holds:
        by_key[hold.key] = by_key.get(hold.key, 0) + 1
    record_figures(
        leases=2 * KEYS,
        faults=len(restarts),
        handoffs=sum(n - 1 for n in by_key.values()),
        holds=len(holds),
        restart_max=max(r.back_at - r.lost_at for r in restarts),
        taken_over=frozen.taken_over,
        recovery_max=max(r.recovered_at - r.cleared for r in restarts),
        bound=BOUND,
        stop_max=max(r["stop_seconds"] for r in exits_records),
        scans_min=min(r["scans"] for r in exits_records),
    )


def restart(fleet: Fleet, case: str) -> Restart:
    """Restart Redis (``case``), wait until every key is held again, run steady a moment."""
    fault = Restart(case)
    persist = case == "restart_aof"
    frozen = fleet.procs["p1"] if case.endswith("p1_frozen") else None
    if frozen is not None:
        assert fleet.holders_of("p1"), "p1 holds no key: the frozen case would prove nothing"
        frozen.freeze()
    fault.lost_at = time.monotonic()
    fleet.server.restart(persist=persist)
    fault.back_at = fault.cleared = time.monotonic()
    if frozen is not None:
        # p2 takes over p1's keys once the lock-delay has passed; p1 stays frozen past it.
        fleet.wait_all_held(TTL + BOUND, f"{case}: p2 took over", by="p2")
        fault.taken_over = time.monotonic() - fault.back_at
        frozen.thaw()
        fault.cleared = time.monotonic()
    # Every hold that will end has ended by now (a lease confirmed before the data loss has
    # passed its deadline; the ledgers are written within a sampling round); then every key
    # is held.
    fleet.pause(max(0.0, fault.lost_at + TTL + 0.3 - time.monotonic()))
    fault.recovered_at = fleet.wait_all_held(BOUND, f"{case}: after the restart")
    fleet.pause(STEADY)
    return fault
