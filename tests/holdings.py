"""Who held which key, when: holding intervals sampled from many owners, and the checks on them.

``HoldingSampler`` reads every owner's public ``fencing_token`` (None unless ``holding``) in
a loop on one thread, bracketing each read with two clock reads ``t_before`` / ``t_after``.
The owner decided "holding" at some instant ``s`` with ``t_before <= s <= t_after``. A run of
one owner (same token, consecutive samples true) is recorded as the *inner* interval
``[t_after of its first sample, t_before of its last sample]``, which lies inside the time
the owner really held. So two recorded runs that overlap prove a real overlap, whatever the
thread scheduling (a pause between the clock read and the check only shrinks the inner
interval); a run seen by a single sample has no inner interval and is kept aside
(``points``), never used to claim or clear an overlap.

This module imports nothing from pytest: the chaos suite's many-lease processes use it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from mutexowner import MutexOwner
from tests.chaos.checker import check_overlaps, check_tokens
from tests.chaos.ledger import Run

__all__ = ["Hold", "HoldingSampler", "check_holds"]


@dataclass
class Hold:
    """One owner's run on one key: its first and last sample that saw it holding."""

    key: str
    identity: str
    #: Distinguishes holders in the checks (a process id, or an owner's index in one process).
    holder: int
    serial: int
    token: int
    start: float  # t_after of the first sample
    end: float  # t_before of the last sample
    samples: int = 1

    def as_run(self) -> Run:
        return Run(
            identity=self.identity,
            pid=self.holder,
            run=self.serial,
            token=self.token,
            start=self.start,
            end=self.end,
            beats=self.samples,
        )


class HoldingSampler:
    """Samples ``owners`` (each given a holder number) on a thread; folds samples into holds.

    ``on_start(hold)`` / ``on_end(hold)`` are called (on the sampler's thread) when a run
    begins and when it ends; ``finish()`` ends the runs still open (the owners are about to
    be stopped) and returns every hold.
    """

    def __init__(
        self,
        owners: Sequence[tuple[MutexOwner, int]],
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.005,
        on_start: Optional[Callable[[Hold], None]] = None,
        on_end: Optional[Callable[[Hold], None]] = None,
    ) -> None:
        self.owners = list(owners)
        self.clock = clock
        self.interval = interval
        self.on_start = on_start
        self.on_end = on_end
        self.holds: list[Hold] = []
        self.scans = 0
        self._open: dict[int, Hold] = {}
        self._serial = 0
        self._finished: Optional[list[Hold]] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Not named mutexowner-*: the leak check is about library threads.
        self._thread = threading.Thread(target=self._run, name="test-holding-sampler", daemon=True)

    def start(self) -> HoldingSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """One pass over every owner."""
        with self._lock:
            for index, (owner, holder) in enumerate(self.owners):
                before = self.clock()
                token = owner.fencing_token
                after = self.clock()
                current = self._open.get(index)
                if current is not None and token == current.token:
                    current.end = before
                    current.samples += 1
                    continue
                if current is not None:
                    self._close(index)
                if token is not None:
                    self._serial += 1
                    hold = Hold(
                        owner.key, owner.identity, holder, self._serial, token, after, before
                    )
                    self._open[index] = hold
                    if self.on_start is not None:
                        self.on_start(hold)
            self.scans += 1

    def _close(self, index: int) -> None:
        hold = self._open.pop(index)
        self.holds.append(hold)
        if self.on_end is not None:
            self.on_end(hold)

    def open_holds(self) -> dict[str, Hold]:
        """The runs open now, by key (the last one seen if several owners of a key hold)."""
        with self._lock:
            return {hold.key: hold for hold in self._open.values()}

    def finish(self) -> list[Hold]:
        """Stop sampling (one last pass first), end the open runs; every hold, by start.
        Idempotent: later calls return the same holds."""
        if self._finished is not None:
            return self._finished
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.sample()
        with self._lock:
            for index in list(self._open):
                self._close(index)
            self._finished = sorted(self.holds, key=lambda hold: hold.start)
            return self._finished


def check_holds(holds: Iterable[Hold], t0: float = 0.0) -> list[str]:
    """Problems: for any key, two holds that overlap, or a fencing token that did not grow
    from one holder to the next (strictly) or went down within one holder's runs."""
    by_key: dict[str, list[Run]] = {}
    for hold in holds:
        if hold.end >= hold.start:  # a single-sample run proves nothing either way
            by_key.setdefault(hold.key, []).append(hold.as_run())
    problems: list[str] = []
    for key, runs in sorted(by_key.items()):
        runs.sort(key=lambda run: run.start)
        overlaps, _ = check_overlaps(runs, t0)
        problems += [f"key {key}: {p}" for p in overlaps]
        problems += [f"key {key}: {p}" for p in check_tokens(runs, t0)]
    return problems
