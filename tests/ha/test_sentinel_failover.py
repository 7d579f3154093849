"""Fail-overs of a real Sentinel topology under three (then four) owner processes.

1 master + 2 replicas + 3 ``redis-sentinel``s on loopback ports (``tests/ha/topology.py``);
owners connect with ``redis+sentinel://`` and run the chaos suite's ledger worker. Each test
injects one fault, starts one more owner while the fail-over is under way, lets the new
topology run for a while, and hands everything to the chaos checker: no overlapping worker
runs, fencing tokens strictly increasing between holders (in the ledgers and in the fencing
store), some worker running again within ``HaConfig.promotion_bound`` of the promotion
Sentinel reported, and no owner process dying or logging an error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Callable

import pytest

from mutexowner.lease import LeaseKeys
from tests.chaos.checker import Verdict
from tests.chaos.harness import REPO
from tests.chaos.owner_proc import LEASE_NAME
from tests.ha.topology import SERVICE, HaConfig, HaRig, settle_and_check
from tests.redis_server import poll

pytestmark = [pytest.mark.ha, pytest.mark.redis]

RigFactory = Callable[..., HaRig]
CONFIG = HaConfig()
def assert_quiet_period_opened(rig: HaRig, new: int, verdict: Verdict) -> None:
    """The promotion changed the server's run_id, and the lease script noticed it end to end.

    In the kill/freeze scenarios the holder's own deadline passed before the promotion
    (promotion > ttl), so its key on the new master had expired too. Without the quiet
    period a standby would acquire at its first call there (well under a second); with
    it, nobody starts workers until about one ttl after that first call.
    """
    client = rig.topology.client(new)
    run_id = client.info("server")["run_id"]
    epoch = client.hgetall(LeaseKeys(LEASE_NAME).epoch)
    assert epoch[b"run_id"].decode() == run_id, epoch
    assert epoch[b"replicated"] == b"1", epoch
    (fault,) = verdict.faults
    assert fault.recovery is not None
    # 0.5 s for our own observation of the promotion lagging the owners' first call.
    assert fault.recovery >= CONFIG.ttl - 0.5, fault


def demotion_time(rig: HaRig, port: int, since: float, timeout: float = 30.0) -> float:
    """Seconds from ``since`` until the old master on ``port`` reports role slave."""
    assert poll(lambda: rig.topology.role(port) == "slave", timeout, interval=0.05), (
        rig.topology.describe()
    )
    return time.monotonic() - since


def status_via_cli(url: str) -> dict[str, Any]:
    """``mutexowner status --json`` through the Sentinel URL, as a user would run it."""
    done = subprocess.run(
        [sys.executable, "-m", "mutexowner.cli", "status", "--redis", url, "--key", LEASE_NAME,
         "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_sentinel_failover_command(ha_rig: RigFactory, record_figures: Callable[..., None]) -> None:
    rig = ha_rig(CONFIG)
    rig.start(3)
    holder = rig.wait_for_holder(10.0)
    topology = rig.topology
    status = status_via_cli(topology.url)
    assert status["held"] and status["holder"] == holder.identity, status
    assert status["redis"].startswith("redis+sentinel://")
    old = topology.master_port()
    assert old is not None
    start = time.monotonic()
    topology.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", SERVICE)
    promoted_at, new = topology.wait_promotion(old)
    rig.promotion_fault("sentinel_failover", start, promoted_at)
    # The reproduction of issue 11: an owner that connects once every sentinel names the new
    # master, while the others are still connected to the old one, which stays writable
    # for seconds (without the replica check: two holders, the stale one with the
    # larger fencing token).
    ended = topology.wait_failover_end(new)
    rig.spawn()
    demoted = demotion_time(rig, old, promoted_at)
    settle_and_check(
        rig,
        promoted_at,
        record_figures,
        failover_end=ended - promoted_at,
        old_master_demoted=demoted,
    )
    # `mutexowner run` through the Sentinel URL after the promotion: it finds the new master.
    done = subprocess.run(
        [sys.executable, "-m", "mutexowner.cli", "run", "--redis", topology.url, "--key",
         "cli-once", "--ttl", "2", "--once", "--", sys.executable, "-c", "print('ran')"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ran" in done.stdout


def test_master_kill_9(ha_rig: RigFactory, record_figures: Callable[..., None]) -> None:
    rig = ha_rig(CONFIG)
    rig.start(3)
    topology = rig.topology
    old = topology.master_port()
    assert old is not None
    start = time.monotonic()
    topology.node(old).kill()
    rig.spawn()
    promoted_at, new = topology.wait_promotion(old)
    rig.promotion_fault("master_kill_9", start, promoted_at)
    verdict = settle_and_check(rig, promoted_at, record_figures)
    assert_quiet_period_opened(rig, new, verdict)


def test_master_frozen_past_down_after_then_resumed(
    ha_rig: RigFactory, record_figures: Callable[..., None]
) -> None:
    # The split brain of issue 11: the old master comes back after the promotion and stays
    # writable for seconds; owners whose connection to it survived renew there while others
    # acquire on the new master. Every write must now be confirmed by a replica, and the old
    # master has none left, so it can only make its holder step down.
    rig = ha_rig(CONFIG)
    rig.start(3)
    topology = rig.topology
    old = topology.master_port()
    assert old is not None
    node = topology.node(old)
    start = time.monotonic()
    node.freeze()
    promoted_at, new = topology.wait_promotion(old)
    rig.promotion_fault("master_freeze", start, promoted_at)
    rig.spawn()  # discovers the new master while the old one comes back
    node.thaw()
    resumed = time.monotonic()
    demoted = demotion_time(rig, old, resumed)
    verdict = settle_and_check(rig, promoted_at, record_figures, old_master_writable=demoted)
    assert_quiet_period_opened(rig, new, verdict)
