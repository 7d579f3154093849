"""Acquire/renew are confirmed by WAIT when the master has (or had) replicas (invariant 10).

Real redis-servers: a master and one replica on loopback ports. Detaching the replica
(``REPLICAOF NO ONE``) turns the master into "an old master cut off from its replicas",
the state an isolated master is in after a Sentinel fail-over.
"""

from __future__ import annotations

from typing import Callable

import pytest
import redis

from mutexowner.errors import RedisTransientError
from mutexowner.lease import (
    ACQUIRE_LUA,
    Acquired,
    Lease,
    LeaseKeys,
    Renewed,
    ReplicaPolicy,
    new_token,
)
from mutexowner.testing import mark_epoch
from tests.redis_server import RedisServer, poll

pytestmark = pytest.mark.redis

Factory = Callable[..., RedisServer]


def wait_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


def replicated_pair(factory: Factory) -> tuple[RedisServer, RedisServer]:
    master = factory(config={"repl-diskless-sync-delay": 0})
    replica = factory(config={"replicaof": [master.host, str(master.port)]})
    admin = master.client()
    assert poll(lambda: admin.info("replication")["connected_slaves"] == 1, 10.0)
    assert poll(lambda: replica.client().info("replication")["master_link_status"] == "up", 10.0)
    mark_epoch(admin, "job")
    return master, replica


def test_a_standalone_server_never_sees_a_wait(redis_server: RedisServer) -> None:
    mark_epoch(redis_server.client(), "job")
    lease = Lease(redis_server.client(), "job", ttl=10, identity="A", call_timeout=1.0)
    token = new_token()
    acquired = lease.acquire(token)
    assert isinstance(acquired, Acquired)
    assert isinstance(lease.renew(token, acquired.fencing_token), Renewed)
    assert wait_calls(redis_server.client()) == 0
    lease.close()  # closes the connections; the next call reconnects
    assert isinstance(lease.renew(token, acquired.fencing_token), Renewed)


def test_writes_are_confirmed_by_a_replica_and_the_replica_has_them(
    redis_server_factory: Factory,
) -> None:
    master, replica = replicated_pair(redis_server_factory)
    # A generous WAIT timeout: a confirmed call returns as soon as the replica acknowledges,
    # and a loaded CI machine must not turn a slow acknowledgement into a failure here.
    lease = Lease(master.client(), "job", ttl=10, identity="A", call_timeout=5.0)
    token = new_token()
    acquired = lease.acquire(token)
    assert isinstance(acquired, Acquired)
    # The first call learnt that replicas exist and ran the (idempotent) script again with WAIT;
    # the renewal pipelines its WAIT at once.
    assert wait_calls(master.client()) == 1
    assert isinstance(lease.renew(token, acquired.fencing_token), Renewed)
    assert wait_calls(master.client()) == 2
    fence = replica.client().hget(LeaseKeys("job").lease, "fence")
    assert fence == str(acquired.fencing_token).encode()


def test_a_master_that_lost_its_replicas_confirms_nothing_even_to_a_fresh_client(
    redis_server_factory: Factory,
) -> None:
    master, replica = replicated_pair(redis_server_factory)
    lease = Lease(master.client(), "job", ttl=10, identity="A", call_timeout=0.5)
    token = new_token()
    acquired = lease.acquire(token)
    assert isinstance(acquired, Acquired)
    replica.client().replicaof("NO", "ONE")
    assert poll(lambda: master.client().info("replication")["connected_slaves"] == 0, 10.0)

    with pytest.raises(RedisTransientError) as renew_error:
        lease.renew(token, acquired.fencing_token)
    assert renew_error.value.kind == "noreplicas"
    assert "0 of the 1 replica(s)" in str(renew_error.value)

    # A client that never saw a replica (a standby that connects to the old master after the
    # fail-over): the sticky mark in the epoch still asks for one, so it cannot acquire there.
    master.client().delete(LeaseKeys("job").lease)
    newcomer = Lease(master.client(), "job", ttl=10, identity="B", call_timeout=0.5)
    with pytest.raises(RedisTransientError) as acquire_error:
        newcomer.acquire(new_token())
    assert acquire_error.value.kind == "noreplicas"


def test_a_replica_that_attaches_while_holding_is_waited_for_from_the_next_renewal(
    redis_server_factory: Factory,
) -> None:
    # A renewal of our own key skips reading the run_id (docs/safety.md, point 5), but not
    # the replica count while the dataset is not marked replicated: the first renewal after
    # a replica attached must already be confirmed by it, as before that shortcut existed.
    master = redis_server_factory(config={"repl-diskless-sync-delay": 0})
    admin = master.client()
    mark_epoch(admin, "job")
    lease = Lease(master.client(), "job", ttl=10, identity="A", call_timeout=5.0)
    token = new_token()
    acquired = lease.acquire(token)
    assert isinstance(acquired, Acquired)
    fence = acquired.fencing_token
    assert isinstance(lease.renew(token, fence), Renewed)
    assert wait_calls(admin) == 0  # standalone so far: no WAIT

    replica = redis_server_factory(config={"replicaof": [master.host, str(master.port)]})
    assert poll(lambda: admin.info("replication")["connected_slaves"] == 1, 10.0)
    assert poll(lambda: replica.client().info("replication")["master_link_status"] == "up", 10.0)
    keys = LeaseKeys("job")
    checked = admin.hget(keys.epoch, "checked_ms")
    assert isinstance(lease.renew(token, fence), Renewed)
    assert admin.hget(keys.epoch, "checked_ms") == checked  # the shortcut was taken...
    assert wait_calls(admin) == 1  # ...and the renewal was confirmed by the new replica
    assert admin.hget(keys.epoch, "replicated") == b"1"
    assert replica.client().hget(keys.lease, "fence") == str(fence).encode()
    # Marked: every later renewal WAITs, without counting replicas again.
    assert isinstance(lease.renew(token, fence), Renewed)
    assert wait_calls(admin) == 2


def test_min_replicas_zero_turns_the_check_off(redis_server_factory: Factory) -> None:
    master, replica = replicated_pair(redis_server_factory)
    lease = Lease(master.client(), "job", ttl=10, identity="A", min_replicas=0)
    token = new_token()
    acquired = lease.acquire(token)
    assert isinstance(acquired, Acquired)
    replica.client().replicaof("NO", "ONE")
    assert poll(lambda: master.client().info("replication")["connected_slaves"] == 0, 10.0)
    assert isinstance(lease.renew(token, acquired.fencing_token), Renewed)
    assert wait_calls(master.client()) == 0


def test_min_replicas_above_the_replica_count_is_never_confirmed(
    redis_server_factory: Factory,
) -> None:
    master, _replica = replicated_pair(redis_server_factory)
    master.client().script_load(ACQUIRE_LUA)  # no NOSCRIPT pass: count only our WAITs
    lease = Lease(
        master.client(), "job", ttl=10, identity="A", min_replicas=2, min_replicas_timeout=0.05
    )
    with pytest.raises(RedisTransientError) as error:
        lease.acquire(new_token())
    assert error.value.kind == "noreplicas"
    assert "1 of the 2 replica(s)" in str(error.value)
    assert "reports 1 connected" in str(error.value)
    # An explicit count is known before the first reply: one pass, one WAIT.
    assert wait_calls(master.client()) == 1


def test_redis_min_replicas_to_write_refusal_is_transient(redis_server: RedisServer) -> None:
    mark_epoch(redis_server.client(), "job")
    redis_server.client().config_set("min-replicas-to-write", 1)
    lease = Lease(redis_server.client(), "job", ttl=10, identity="A")
    with pytest.raises(RedisTransientError) as error:
        lease.acquire(new_token())
    assert error.value.kind == "noreplicas"


@pytest.mark.parametrize(
    ("min_replicas", "timeout", "call_timeout", "message"),
    [
        (-1, None, 1.0, "min_replicas must be None"),
        (True, None, 1.0, "min_replicas must be None"),
        (1.5, None, 1.0, "min_replicas must be None"),
        (None, 0.0, 1.0, "min_replicas_timeout must be > 0"),
        (None, float("nan"), 1.0, "min_replicas_timeout must be a finite number"),
        (None, 1.0, 1.0, "min_replicas_timeout must be < call_timeout"),
    ],
)
def test_replica_policy_is_validated(
    min_replicas: object, timeout: object, call_timeout: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ReplicaPolicy.build(min_replicas, timeout, call_timeout)  # type: ignore[arg-type]


def test_replica_policy_defaults() -> None:
    assert ReplicaPolicy.build(None, None, 1.0) == ReplicaPolicy(None, 0.75)
    assert ReplicaPolicy.build(None, None, None).timeout == 0.5
    assert ReplicaPolicy(None, 0.0001).timeout_ms == 1  # WAIT 0 would block forever
