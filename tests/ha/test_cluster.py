"""A real Redis Cluster (3 masters + 3 replicas) under owner processes and one process's
many leases.

Owners connect with ``redis+cluster://`` and run the chaos suite's ledger worker; the
chaos checker judges each scenario (no overlapping runs, fencing tokens increasing between
holders, a worker running again within the bound, no process dying or logging an error).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from typing import Callable

import pytest

from mutexowner import MutexOwner
from mutexowner.connection import client_from, derive_lease_client, describe_client
from mutexowner.lease import Acquired, Lease, LeaseKeys, Renewed, new_token
from mutexowner.testing import mark_epoch
from tests.chaos import checker
from tests.chaos.harness import REPO
from tests.chaos.owner_proc import LEASE_NAME
from tests.ha.cluster_topology import ClusterTopology, key_slot
from tests.ha.topology import HaConfig, HaRig, settle_and_check
from tests.redis_server import RedisServer, poll

pytestmark = [pytest.mark.ha, pytest.mark.redis]

RigFactory = Callable[..., HaRig]
CONFIG = HaConfig()
LEASE_KEY = LeaseKeys(LEASE_NAME).lease


def test_cluster_master_kill_9(
    cluster_rig: RigFactory, record_figures: Callable[..., None]
) -> None:
    rig = cluster_rig(CONFIG)
    rig.start(3)
    topology: ClusterTopology = rig.topology
    slot = key_slot(topology.any_live(), LEASE_KEY)
    old = int(topology.owner_of(slot)["port"])
    start = time.monotonic()
    topology.node(old).kill()
    rig.spawn()  # joins during the fail-over
    promoted_at, new = topology.wait_promotion(slot, old)
    # The promoted replica has no replica of its own until the old master rejoins as one,
    # and the lease's data set was replicated, so nothing is confirmed until then (see
    # docs/ha.md, "Consequences"): bring the old node back, as an operator would.
    topology.node(old).start()
    assert poll(
        lambda: int(topology.client(new).info("replication")["connected_slaves"]) >= 1,
        30.0,
        interval=0.05,
    ), topology.describe()
    rejoined_at = time.monotonic()
    rig.faults.append(
        checker.Fault(
            "cluster_master_kill_9",
            start=start,
            clear=rejoined_at,
            bound=CONFIG.promotion_bound,
            detail=f"promoted {promoted_at - start:.3f} s after the kill",
        )
    )
    settle_and_check(
        rig,
        rejoined_at,
        record_figures,
        promotion_after_kill=promoted_at - start,
        rejoined_after_promotion=rejoined_at - promoted_at,
    )


def test_cluster_slot_migration(
    cluster_rig: RigFactory, record_figures: Callable[..., None]
) -> None:
    rig = cluster_rig(CONFIG)
    rig.start(3)
    topology: ClusterTopology = rig.topology
    slot = key_slot(topology.any_live(), LEASE_KEY)
    source = int(topology.owner_of(slot)["port"])
    target = next(int(s["port"]) for s in topology.shards() if s["port"] != source)
    start = time.monotonic()
    topology.migrate_slot(slot, target)
    cleared = time.monotonic()
    rig.faults.append(
        checker.Fault(
            "cluster_slot_migration", start=start, clear=cleared, bound=CONFIG.promotion_bound
        )
    )
    rig.spawn()
    settle_and_check(rig, cleared, record_figures, migration=cleared - start)
    assert int(topology.owner_of(slot)["port"]) == target
    assert topology.client(target).exists(LeaseKeys(LEASE_NAME).fence) == 1


def test_fifty_leases_over_the_slots_from_one_process(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    topology = ClusterTopology(redis_server_factory)
    client = derive_lease_client(client_from(topology.url), timeout=5.0)
    assert describe_client(client).startswith("redis+cluster://127.0.0.1:")
    names = [f"job-{i}" for i in range(50)]
    for name in names:
        mark_epoch(client, name)
    leases = [Lease(client, name, ttl=10, identity="one", call_timeout=5.0) for name in names]
    tokens = [new_token() for _ in names]
    results = [lease.acquire(token) for lease, token in zip(leases, tokens)]
    assert all(isinstance(r, Acquired) for r in results), results
    masters = {
        int(topology.owner_of(key_slot(topology.any_live(), LeaseKeys(n).lease))["port"])
        for n in names
    }
    assert len(masters) == 3  # spread over every shard
    for lease, token, result in zip(leases, tokens, results):
        assert isinstance(lease.renew(token, result.fencing_token), Renewed)  # type: ignore[union-attr]
        assert lease.inspect().holder == "one"
        assert lease.release(token)
    # The CLI through the Cluster URL, as a user runs it: a one-shot command, then status.
    cli = [sys.executable, "-m", "mutexowner.cli"]
    done = subprocess.run(
        [*cli, "run", "--redis", topology.url, "--key", "job-0", "--ttl", "3", "--identity",
         "cli-host", "--once", "--", sys.executable, "-c", "print('ran')"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ran" in done.stdout
    status = subprocess.run(
        [*cli, "status", "--redis", topology.url, "--key", "job-0", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert status.returncode == 3, status.stderr  # free again: the run released it
    assert '"held": false' in status.stdout, status.stdout


def told_taken(owner: MutexOwner) -> bool:
    return (owner.status().next_attempt_in or 0.0) > 5.0


def test_release_notice_hands_off_on_a_cluster(
    redis_server_factory: Callable[..., RedisServer], record_figures: Callable[..., None]
) -> None:
    # Classic PUBLISH (in the release script) is broadcast to every node, so the standby's
    # subscription works on whatever node it landed. With ttl 10 s a standby that missed the
    # notice would sleep until the holder's key expired (seconds); the notice wakes it.
    topology = ClusterTopology(redis_server_factory)
    mark_epoch(client_from(topology.url), "handoff")
    channel = LeaseKeys("handoff").channel

    def subscribers() -> int:  # PUBSUB NUMSUB counts a node's own subscribers only
        total = 0
        for node in topology.nodes:
            reply = topology.client(node.port).pubsub_numsub(channel)
            total += int(reply[0][1]) if reply else 0
        return total

    gaps = []
    for round_ in range(5):
        first = MutexOwner(topology.url, "handoff", ttl=10, identity=f"a{round_}")
        second = MutexOwner(topology.url, "handoff", ttl=10, identity=f"b{round_}")
        try:
            first.start()
            assert first.wait_until_holding(15)
            second.start()
            # Really waiting: the release subscription is live (one, on the engine's hub:
            # both owners share the URL, so one engine and one pub/sub connection), and the
            # standby was told "taken" (its next attempt is about one ttl away, not a poll).
            assert poll(lambda: subscribers() >= 1, 5.0)
            assert poll(functools.partial(told_taken, second), 5.0)
            started = time.monotonic()
            assert first.stop(10)
            assert second.wait_until_holding(5)
            gaps.append(time.monotonic() - started)
        finally:
            first.stop(10)
            second.stop(10)
    assert max(gaps) < 2.0, gaps
    record_figures(handoff_median=sorted(gaps)[2], handoff_max=max(gaps))
