"""The chaos checker: turns the ledgers and the fencing store's log into a verdict.

What it proves, from records the owner processes wrote (see ``ledger.py``):

1. **No overlap**: worker runs are intervals [first passed ``ensure_held()``, last passed
   ``ensure_held()``] (a run's side effects happen right after its checks). Sorted by start,
   every run starts strictly after every earlier run of *any* process (same process
   included: a second runner in one process is just as wrong) has ended. Since a worker runs
   only while its owner is ``holding`` and ``ensure_held()`` checks the same local deadline
   that ``owner.holding`` does, non-overlapping runs mean no two owners had workers running
   at once; ``owner.holding`` itself is not sampled (it is a function of the time and a
   deadline that only the owner knows).
2. **Fencing**: a run's token is at least that of the run before it, and strictly greater
   when the run before belongs to another process; the store's log of accepted writers has
   strictly increasing tokens, each token used by one identity only (so no write with a
   stale token was accepted).
3. **Recovery**: after each fault, the first passed check of any process comes within the
   fault's bound of its reference time (when it cleared, or when it started for faults of
   one owner).
4. **Never crash**: every process the scenario did not kill exited 0 after SIGTERM with its
   owner thread alive; no ``stuck`` or ``thread_exception`` record; no ERROR or CRITICAL log
   from the library except those a test says it expects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from tests.chaos.fence_store import FenceLogEntry
from tests.chaos.ledger import Run, build_runs

__all__ = ["Fault", "Verdict", "check"]

_TAKEN_BY = re.compile(r"identity=(\S+) lease taken by (\S+)$")


@dataclass
class Fault:
    """One injected fault: what, when it started and cleared, and the recovery bound."""

    kind: str
    start: float
    clear: Optional[float] = None
    #: "clear": recovery is measured from `clear` (faults of Redis or of the network);
    #: "start": from `start` (faults of one owner: the others must take over).
    measure_from: str = "clear"
    bound: float = 0.0
    detail: str = ""
    #: Seconds from the reference time to the first passed check (set by `check`).
    recovery: Optional[float] = None

    @property
    def ref(self) -> float:
        if self.measure_from == "start" or self.clear is None:
            return self.start
        return self.clear


@dataclass
class Verdict:
    """The problems found (empty: all promises kept) and the figures measured."""

    problems: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _describe(run: Run, t0: float) -> str:
    return (
        f"{run.identity}(pid {run.pid}, run {run.run}, token {run.token}) "
        f"[{run.start - t0:.3f}, {run.end - t0:.3f}]"
    )


def check_overlaps(runs: Sequence[Run], t0: float) -> tuple[list[str], dict[str, Any]]:
    """Problems for overlapping runs; figures: hand-offs, smallest gap, largest overlap."""
    problems = []
    handoffs = 0
    min_gap: Optional[float] = None
    max_overlap = 0.0
    latest: Optional[Run] = None  # the run with the latest end so far
    previous: Optional[Run] = None
    for run in runs:
        if latest is not None and run.start <= latest.end:
            max_overlap = max(max_overlap, latest.end - run.start)
            problems.append(
                f"overlap of {latest.end - run.start:.6f} s: {_describe(run, t0)} started "
                f"before {_describe(latest, t0)} ended"
            )
        if previous is not None and previous.pid != run.pid:
            handoffs += 1
            gap = run.start - previous.end
            min_gap = gap if min_gap is None else min(min_gap, gap)
        if latest is None or run.end > latest.end:
            latest = run
        previous = run
    return problems, {"handoffs": handoffs, "min_gap": min_gap, "max_overlap": max_overlap}


def check_tokens(runs: Sequence[Run], t0: float) -> list[str]:
    problems = []
    for before, after in zip(runs, runs[1:]):
        if before.pid != after.pid and not after.token > before.token:
            problems.append(
                f"fencing token did not increase between holders: {_describe(before, t0)} "
                f"then {_describe(after, t0)}"
            )
        elif before.pid == after.pid and after.token < before.token:
            problems.append(
                f"fencing token went down in one process: {_describe(before, t0)} then "
                f"{_describe(after, t0)}"
            )
    return problems


def check_fence_log(log: Sequence[FenceLogEntry]) -> tuple[list[str], dict[str, Any]]:
    problems = []
    owners: dict[int, str] = {}
    last: Optional[FenceLogEntry] = None
    rejected = 0
    for entry in log:
        if not entry.accepted:
            rejected += 1
            continue
        if owners.setdefault(entry.token, entry.identity) != entry.identity:
            problems.append(
                f"fencing token {entry.token} used by {owners[entry.token]} and {entry.identity}"
            )
        if last is not None and entry.token <= last.token:
            problems.append(
                f"store accepted token {entry.token} ({entry.identity}) after "
                f"{last.token} ({last.identity})"
            )
        last = entry
    writers = sum(1 for entry in log if entry.accepted)
    return problems, {"fence_rejected": rejected, "fence_writers": writers}


def check_recovery(faults: Iterable[Fault], records: Sequence[dict[str, Any]]) -> list[str]:
    checks = sorted(r["t"] for r in records if r["ev"] in ("run_start", "beat"))
    problems = []
    for fault in faults:
        first = next((t for t in checks if t >= fault.ref), None)
        if first is None:
            problems.append(f"{fault.kind}: no owner held again after the fault")
            continue
        fault.recovery = first - fault.ref
        if fault.recovery > fault.bound:
            problems.append(
                f"{fault.kind}: workers ran again {fault.recovery:.3f} s after the fault "
                f"{'cleared' if fault.measure_from == 'clear' else 'began'}, bound "
                f"{fault.bound:.3f} s ({fault.detail})"
            )
    return problems


def check_processes(
    records: Sequence[dict[str, Any]],
    exits: dict[str, Optional[int]],
    killed: Iterable[str],
    expected_logs: Sequence[str] = (),
) -> list[str]:
    problems = []
    killed = set(killed)
    for identity, code in sorted(exits.items()):
        if identity in killed:
            continue
        if code != 0:
            problems.append(f"owner process {identity} exited with {code} (not killed by us)")
    exits_recorded = {r["id"]: r for r in records if r["ev"] == "proc_exit"}
    for identity in exits:
        if identity in killed:
            continue
        final = exits_recorded.get(identity)
        if final is None:
            problems.append(f"owner process {identity} wrote no proc_exit record")
        elif not final.get("owner_alive"):
            problems.append(f"owner thread of {identity} was dead at the end: {final}")
    for record in records:
        # The owner thought another token held the key, but it was its own earlier one:
        # it now waits out its own lease (see the regression tests in test_regressions.py).
        match = _TAKEN_BY.search(record.get("msg", "")) if record["ev"] == "log" else None
        if match and match.group(1) == match.group(2):
            problems.append(f"{record['id']} lost the lease to its own earlier token: {record}")
    allowed = [re.compile(pattern) for pattern in expected_logs]
    for record in records:
        ev = record["ev"]
        if ev in ("stuck", "thread_exception"):
            problems.append(f"{record['id']}: {ev}: {record}")
        elif (
            ev == "log"
            and record["level"] in ("ERROR", "CRITICAL")
            and not any(p.search(record["msg"]) for p in allowed)
        ):
            problems.append(f"{record['id']}: {record['level']} log: {record['msg']}")
    return problems


def check(
    records: Sequence[dict[str, Any]],
    fence_log: Sequence[FenceLogEntry],
    faults: Sequence[Fault],
    exits: dict[str, Optional[int]],
    killed: Iterable[str] = (),
    *,
    t0: float = 0.0,
    expected_logs: Sequence[str] = (),
) -> Verdict:
    """Run every check; see the module docstring."""
    runs = build_runs(records)
    verdict = Verdict(runs=runs, faults=list(faults))
    overlap_problems, overlap_figures = check_overlaps(runs, t0)
    fence_problems, fence_figures = check_fence_log(fence_log)
    verdict.problems += overlap_problems
    verdict.problems += check_tokens(runs, t0)
    verdict.problems += fence_problems
    verdict.problems += check_recovery(faults, records)
    verdict.problems += check_processes(records, exits, killed, expected_logs)
    recoveries = [f.recovery for f in faults if f.recovery is not None]
    verdict.figures = {
        "faults": len(faults),
        "runs": len(runs),
        **overlap_figures,
        "recovery_max": max(recoveries) if recoveries else None,
        "bound": max((f.bound for f in faults), default=None),
        **fence_figures,
        # Checks that failed on the local deadline with the stop flag not (yet) set.
        "deadline_stops": sum(
            1 for r in records if r["ev"] == "lease_lost" and not r.get("stopping")
        ),
    }
    return verdict
