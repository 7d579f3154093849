"""Fault injection against a real redis-server and three owner processes (issue 5).

Each test starts a `ChaosRig` (see ``harness.py``): the Redis under test, a fencing store in
a second Redis, and three ``owner_proc`` processes (ttl 2 s, renew every ttl/3, lease call
timeout ttl/9, supervisor shutdown_timeout 0.5 s, backoff 0.05 s doubling to a 0.5 s cap),
each reaching Redis through its own TCP proxy. One fault is injected, then every process is
stopped with SIGTERM and the checker (``checker.py``) proves from the ledgers:

- no two worker runs overlap (any processes), fencing tokens of successive holders strictly
  increase and the store never accepted a stale token;
- after the fault, some worker runs again within the **recovery bound**

      B = ttl + drift + call_timeout + backoff cap + slack
        = 2 + 0.022 + 0.222 + 0.5 + 1.0 = 3.744 s

  measured from the moment the fault cleared (faults of Redis or of every connection), or
  from the moment it began (faults of one owner: freeze, kill, partition). Derivation:
  within ``call_timeout + cap`` of Redis answering again every standby has made a call (a
  call in flight times out, then at most one capped backoff). That call either finds the
  key free, and if Redis lost its state the caller may run workers only once the lock-delay
  it opened has passed (``ttl + drift``); or it finds a key that expires within ``ttl``
  (the lease of a holder last renewed before the fault, or one re-set by a stale request
  that Redis executes when it resumes) and retries when it expires. ``slack`` (1 s,
  ``MUTEXOWNER_CHAOS_SLACK``) absorbs process scheduling on a loaded CI machine;
- no owner process died unless the test killed it (each exits 0 on SIGTERM with its owner
  thread alive), no thread exception, no stuck worker, no ERROR/CRITICAL library log.

Each test records its figures (see the "chaos figures" section at the end of the run).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import pytest

from tests.chaos.harness import ChaosRig
from tests.chaos.ledger import Ledger
from tests.chaos.proxy import BLACKHOLE, DROP

pytestmark = [pytest.mark.chaos, pytest.mark.redis, pytest.mark.timeout(90)]

RigFactory = Callable[..., ChaosRig]
Record = Callable[..., None]

#: A fault that must outlast the lease: 1.5 × ttl.
LONG = 3.0
#: Steady running after recovery, so that a late second runner would show in the ledgers.
STEADY = 1.0


def last_check_between(ledger: Ledger, start: float, end: float) -> Optional[float]:
    times = [
        r["t"] for r in ledger.records if r["ev"] in ("run_start", "beat") and start <= r["t"] < end
    ]
    return max(times) if times else None


def finish(rig: ChaosRig, record: Record, **extra: Any) -> None:
    verdict = rig.finish()
    record(**verdict.figures, **extra)
    rig.assert_ok(verdict)


def steady(rig: ChaosRig) -> None:
    rig.pause(STEADY)


def assert_workers_stopped_by_deadline(rig: ChaosRig, start: float, clear: float) -> float:
    """During an outage no worker may pass a check after ``start + ttl - drift`` (the latest
    possible local deadline: the last renewal was sent before the fault)."""
    rig.ledger.refresh()
    cfg = rig.config
    last = last_check_between(rig.ledger, start, clear)
    limit = start + cfg.ttl - cfg.drift
    assert last is None or last < limit, (
        f"a worker passed a check {last - start:.3f} s into the outage, after the latest "
        f"possible deadline ({cfg.ttl - cfg.drift:.3f} s)\n" + rig.describe()
    )
    return -1.0 if last is None else last - start


# -- Redis faults ------------------------------------------------------------------------------


def test_redis_sigkill_restart_without_persistence(
    chaos_rig: RigFactory, record_figures: Record
) -> None:
    rig = chaos_rig()
    rig.start(3)
    before = rig.wait_for_holder(10)
    fault = rig.redis_restart(persist=False)
    rig.wait_for_check(fault.start, rig.config.recovery_bound + 5)
    steady(rig)
    # Only the holder whose own lease was still valid may work on at once; anyone else
    # waits out the lock-delay (one ttl from the first call to the emptied Redis).
    newcomer = rig.ledger.first_check_after(fault.start, exclude=[before.identity])
    waited = None if newcomer is None else newcomer["t"] - fault.start
    assert waited is None or waited >= rig.config.ttl, rig.describe()
    finish(rig, record_figures, holder_kept=newcomer is None, newcomer_waited=waited)


def test_redis_sigkill_restart_with_aof(chaos_rig: RigFactory, record_figures: Record) -> None:
    rig = chaos_rig(appendonly=True)
    rig.start(3)
    before = rig.wait_for_holder(10)
    run_id = rig.admin().info("server")["run_id"]
    fault = rig.redis_restart(persist=True)
    after = rig.wait_for_check(fault.ref, rig.config.recovery_bound + 5)
    steady(rig)
    new_run_id = rig.admin().info("server")["run_id"]
    epoch = rig.admin().hgetall("mutexowner:{chaos}:epoch")
    assert new_run_id != run_id
    assert epoch[b"run_id"] == new_run_id.encode()  # the script noticed the new instance
    finish(rig, record_figures, holder_kept=after["id"] == before.identity)


def test_redis_outage_longer_than_ttl(chaos_rig: RigFactory, record_figures: Record) -> None:
    rig = chaos_rig(appendonly=True)
    rig.start(3)
    rig.wait_for_holder(10)
    fault = rig.redis_outage(LONG)
    assert fault.clear is not None
    stopped_after = assert_workers_stopped_by_deadline(rig, fault.start, fault.clear)
    rig.wait_for_check(fault.ref, rig.config.recovery_bound + 5)
    steady(rig)
    finish(rig, record_figures, outage=LONG, workers_stopped_after=stopped_after)


def test_redis_frozen_past_ttl(chaos_rig: RigFactory, record_figures: Record) -> None:
    rig = chaos_rig()
    rig.start(3)
    rig.wait_for_holder(10)
    fault = rig.redis_freeze(LONG)
    assert fault.clear is not None
    stopped_after = assert_workers_stopped_by_deadline(rig, fault.start, fault.clear)
    rig.wait_for_check(fault.ref, rig.config.recovery_bound + 5)
    steady(rig)
    finish(rig, record_figures, frozen=LONG, workers_stopped_after=stopped_after)


def test_client_pause_past_ttl(chaos_rig: RigFactory, record_figures: Record) -> None:
    rig = chaos_rig()
    rig.start(3)
    rig.wait_for_holder(10)
    fault = rig.client_pause(LONG)
    assert fault.clear is not None
    stopped_after = assert_workers_stopped_by_deadline(rig, fault.start, fault.clear)
    rig.wait_for_check(fault.ref, rig.config.recovery_bound + 5)
    steady(rig)
    finish(rig, record_figures, paused=LONG, workers_stopped_after=stopped_after)


def test_client_pause_ending_just_after_the_holders_deadline(
    chaos_rig: RigFactory, record_figures: Record
) -> None:
    """The holder's last retry is answered after its local deadline, three times over."""
    rig = chaos_rig()
    rig.start(3)
    for _ in range(3):
        holder = rig.wait_for_holder(rig.config.recovery_bound + 5)
        fault = rig.client_pause_past_deadline(holder)
        rig.wait_for_check(fault.ref, rig.config.recovery_bound + 5)
    steady(rig)
    finish(rig, record_figures)


def test_client_kill_of_every_owner_connection(
    chaos_rig: RigFactory, record_figures: Record
) -> None:
    rig = chaos_rig()
    rig.start(3)
    before = rig.wait_for_holder(10)
    killed = []
    for _ in range(3):
        fault = rig.client_kill()
        killed.append(fault.detail)
        rig.wait_for_check(fault.ref, rig.config.recovery_bound + 5)
        rig.pause(rig.config.renew_interval)  # let a renewal go through the new connection
    holder = rig.wait_for_holder(rig.config.recovery_bound + 5)
    steady(rig)
    finish(rig, record_figures, killed=killed, holder_kept=holder is before)


# -- faults of one owner -----------------------------------------------------------------------


def test_holder_frozen_past_ttl_stops_its_worker_on_waking(
    chaos_rig: RigFactory, record_figures: Record
) -> None:
    rig = chaos_rig()
    rig.start(3)
    holder = rig.wait_for_holder(10)
    fault = rig.freeze_owner(holder, LONG)
    assert fault.clear is not None
    # Another owner took over while it was frozen...
    other = rig.wait_for_check(fault.start, 1.0, exclude=[holder.identity])
    assert other["t"] < fault.clear
    steady(rig)
    # ...and on waking, its worker did no more work: no check passed, no write begun. (A
    # write already sent when the signal landed may be answered after waking; the store
    # accepted it only if no newer token had written yet, which the checker verifies.)
    mine = [r for r in rig.ledger.records if r["id"] == holder.identity]
    late = [r for r in mine if r["ev"] in ("run_start", "beat") and r["t"] >= fault.clear]
    late += [r for r in mine if r["ev"] == "fence" and r["t_check"] >= fault.clear]
    assert not late, late
    in_flight = [r for r in mine if r["ev"] == "fence" and r["t"] >= fault.clear]
    noticed = [
        r["t"] - fault.clear
        for r in rig.ledger.records
        if r["id"] == holder.identity
        and r["t"] >= fault.clear
        and r["ev"] in ("lease_lost", "run_end")
    ]
    assert noticed, "the resumed worker neither saw stopping nor LeaseLost\n" + rig.describe()
    finish(
        rig,
        record_figures,
        takeover=other["t"] - fault.start,
        noticed_after=min(noticed),
        write_in_flight=[r["ok"] for r in in_flight],
    )


def test_holder_frozen_between_check_and_write_is_fenced_off(
    chaos_rig: RigFactory, record_figures: Record
) -> None:
    rig = chaos_rig()
    rig.start(3)
    holder = rig.wait_for_holder(10)
    fault = rig.freeze_owner_in_gap(holder)
    frozen = next(rig.ledger.events("self_freeze", holder.identity))
    # Wait until a newer holder has written to the store, then wake the old one.
    rig.wait_until(
        lambda: any(
            r["ok"] and r["id"] != holder.identity
            for r in rig.ledger.events("fence")
            if r["t"] > fault.start
        ),
        rig.config.recovery_bound + 5,
        "another owner wrote to the fencing store",
    )
    woke = time.monotonic()
    holder.thaw()
    rig.wait_until(
        lambda: any(
            r["run"] == frozen["run"] and r["t"] >= woke
            for r in rig.ledger.events("fence", holder.identity)
        ),
        10,
        "the woken worker attempted its write",
    )
    write = next(
        r
        for r in rig.ledger.events("fence", holder.identity)
        if r["run"] == frozen["run"] and r["t"] >= woke
    )
    assert write["ok"] is False, f"the store accepted a stale write: {write}"
    assert write["t_check"] == frozen["t_check"]
    steady(rig)
    takeover = rig.ledger.first_check_after(fault.start, exclude=[holder.identity])
    assert takeover is not None
    finish(rig, record_figures, takeover=takeover["t"] - fault.start, stale_write_rejected=True)


def test_holder_sigkill(chaos_rig: RigFactory, record_figures: Record) -> None:
    rig = chaos_rig()
    rig.start(3)
    holder = rig.wait_for_holder(10)
    fault = rig.kill_owner(holder)
    other = rig.wait_for_check(fault.start, rig.config.recovery_bound + 5)
    assert other["id"] != holder.identity
    steady(rig)
    finish(rig, record_figures, takeover=other["t"] - fault.start)


@pytest.mark.parametrize("mode", [BLACKHOLE, DROP])
def test_partition_of_the_holder(chaos_rig: RigFactory, record_figures: Record, mode: str) -> None:
    rig = chaos_rig()
    rig.start(3)
    holder = rig.wait_for_holder(10)
    with rig.partition(holder, mode) as fault:
        other = rig.wait_for_check(
            fault.start, rig.config.recovery_bound + 5, exclude=[holder.identity]
        )
        steady(rig)
    stopped_after = last_check_between(rig.ledger, fault.start, other["t"])
    steady(rig)
    finish(
        rig,
        record_figures,
        takeover=other["t"] - fault.start,
        holder_stopped_after=-1.0 if stopped_after is None else stopped_after - fault.start,
    )
