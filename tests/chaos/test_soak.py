"""Randomized soak: every fault of ``test_faults.py``, mixed, for a bounded time (issue 5).

A clean stop of the holder (SIGTERM: release and hand-off) is mixed in as well.
``MUTEXOWNER_SOAK_SECONDS`` (default 60) sets how long faults keep coming;
``MUTEXOWNER_SOAK_SEED`` (default fixed) picks the sequence: the seed is part of the
recorded figures and of every failure message, so a failing sequence can be replayed
(fault kinds and durations repeat exactly; timings within them vary with the machine).
The same checker and recovery bound as ``test_faults.py`` apply after every fault.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Callable

import pytest

from tests.chaos import checker
from tests.chaos.harness import ChaosRig, OwnerProcess
from tests.chaos.proxy import BLACKHOLE, DROP

SOAK_SECONDS = float(os.environ.get("MUTEXOWNER_SOAK_SECONDS", "60"))
SOAK_SEED = int(os.environ.get("MUTEXOWNER_SOAK_SEED", "20240605"))

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.redis,
    pytest.mark.timeout(SOAK_SECONDS + 150),
]

KINDS = (
    "redis_restart_empty",
    "redis_restart_aof",
    "redis_outage",
    "redis_freeze",
    "client_pause",
    "client_kill",
    "holder_freeze",
    "holder_freeze_in_gap",
    "holder_kill",
    "holder_stop",
    "partition_holder",
    "partition_standby",
)


class Soak:
    """Applies one randomly chosen fault at a time and waits for recovery."""

    def __init__(self, rig: ChaosRig, rng: random.Random) -> None:
        self.rig = rig
        self.rng = rng
        self.counts: Counter[str] = Counter()
        self.timeout = rig.config.recovery_bound + 5

    def duration(self) -> float:
        return round(self.rng.uniform(0.3, 1.6 * self.rig.config.ttl), 2)

    def inject(self, kind: str, holder: OwnerProcess) -> checker.Fault:
        rig = self.rig
        if kind == "redis_restart_empty":
            return rig.redis_restart(persist=False)
        if kind == "redis_restart_aof":
            return rig.redis_restart(persist=True)
        if kind == "redis_outage":
            return rig.redis_outage(self.duration())
        if kind == "redis_freeze":
            return rig.redis_freeze(self.duration())
        if kind == "client_pause":
            return rig.client_pause(self.duration())
        if kind == "client_kill":
            return rig.client_kill()
        if kind == "holder_freeze":
            return rig.freeze_owner(holder, self.duration())
        if kind == "holder_freeze_in_gap":
            return self.freeze_in_gap(holder)
        if kind == "holder_kill":
            fault = rig.kill_owner(holder)
            rig.spawn()  # keep three owners contending
            return fault
        if kind == "holder_stop":
            fault = rig.stop_owner(holder)
            rig.spawn()
            return fault
        if kind == "partition_holder":
            return self.partition(holder)
        if kind == "partition_standby":
            standbys = [o for o in rig.alive_owners if o is not holder]
            return self.partition(self.rng.choice(standbys))
        raise ValueError(kind)

    def partition(self, owner: OwnerProcess) -> checker.Fault:
        mode = self.rng.choice((BLACKHOLE, DROP))
        seconds = self.duration()
        with self.rig.partition(owner, mode) as fault:
            fault.detail += f" {seconds:.2f} s"
            self.rig.pause(seconds)
        return fault

    def freeze_in_gap(self, holder: OwnerProcess) -> checker.Fault:
        rig = self.rig
        fault = rig.freeze_owner_in_gap(holder)
        try:
            rig.wait_until(
                lambda: any(
                    r["ok"] and r["id"] != holder.identity and r["t"] > fault.start
                    for r in rig.ledger.events("fence")
                ),
                self.timeout,
                "another owner wrote to the fencing store",
            )
        finally:
            holder.thaw()
        return fault


def test_randomized_soak(
    chaos_rig: Callable[..., ChaosRig], record_figures: Callable[..., None]
) -> None:
    rng = random.Random(SOAK_SEED)
    rig = chaos_rig(appendonly=True)
    rig.start(3)
    soak = Soak(rig, rng)
    end = time.monotonic() + SOAK_SECONDS
    sequence: list[str] = []
    pending: list[str] = []
    try:
        while time.monotonic() < end:
            holder = rig.wait_for_holder(soak.timeout)
            if not pending:  # shuffled rounds: every kind comes up once per round
                pending = rng.sample(KINDS, len(KINDS))
            kind = pending.pop()
            fault = soak.inject(kind, holder)
            sequence.append(f"{fault.kind}({fault.detail})")
            soak.counts[kind] += 1
            rig.wait_for_check(fault.ref, soak.timeout)
            rig.pause(round(rng.uniform(0.2, 1.2), 2))
    except AssertionError as exc:
        raise AssertionError(f"soak seed={SOAK_SEED}, faults so far: {sequence}\n{exc}") from exc
    verdict = rig.finish()
    record_figures(
        seed=SOAK_SEED,
        seconds=SOAK_SECONDS,
        **verdict.figures,
        kinds=dict(sorted(soak.counts.items())),
    )
    rig.assert_ok(verdict, context=f"soak seed={SOAK_SEED}, faults: {sequence}\n")
