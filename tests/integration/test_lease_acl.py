"""The lease scripts under Redis 7 ACLs and server restarts (real redis-server)."""

from __future__ import annotations

import pytest
import redis

from mutexowner.lease import Acquired, Lease, LeaseKeys, Quiet, Renewed, Taken, new_token
from mutexowner.testing import mark_epoch
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


def acl_client(server: RedisServer, rules: list[str]) -> redis.Redis:
    admin = server.client()
    admin.acl_setuser("lease", enabled=True, passwords=["+pw"], keys=["*"], commands=rules)
    return redis.Redis(host=server.host, port=server.port, username="lease", password="pw")


def test_release_deletes_the_key_even_when_the_user_may_not_publish(
    redis_server: RedisServer,
) -> None:
    # Redis 7's default for new users is no channel access (acl-pubsub-default resetchannels):
    # the hand-off notice is refused, but the release itself must still happen.
    client = acl_client(redis_server, ["+@all"])
    mark_epoch(redis_server.client(), "job")
    lease = Lease(client, "job", ttl=10, identity="A")
    token = new_token()
    assert isinstance(lease.acquire(token), Acquired)
    assert lease.release(token) is True
    assert not redis_server.client().exists(LeaseKeys("job").lease)


def test_a_restart_from_persisted_data_opens_the_quiet_period_for_newcomers(
    redis_server_factory: object,
) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")  # type: ignore[operator]
    client = server.client()
    mark_epoch(client, "job")
    holder = Lease(client, "job", ttl=10, identity="A")
    token = new_token()
    first = holder.acquire(token)
    assert isinstance(first, Acquired) and first.lock_delay == 0
    run_id = client.info("server")["run_id"]
    server.restart(persist=True)  # same data, new server instance (new run_id)
    client = server.client()
    assert client.info("server")["run_id"] != run_id
    assert client.exists(LeaseKeys("job").lease)  # the key survived...
    # ...but a write may have been lost, so a newcomer may not take a free key for one ttl,
    newcomer = Lease(client, "other", ttl=10, identity="B")
    mark_epoch(client, "other")
    assert isinstance(newcomer.acquire(new_token()), Acquired)  # (other leases unaffected)
    # ...while A renews on. A renewal of a key that still holds A's token has no need to read
    # the run_id (nobody else can have been granted the key meanwhile: docs/safety.md,
    # point 5), so it neither notices the new instance nor opens the quiet period...
    again = Lease(client, "job", ttl=10, identity="A")
    renewed = again.renew(token, first.fencing_token)
    assert isinstance(renewed, Renewed) and renewed.lock_delay == 0
    # ...but every call that could hand the key to someone else reads it first: a newcomer's
    # acquire, even one that finds the key taken, opens the quiet period,
    standby = Lease(client, "job", ttl=10, identity="B").acquire(new_token())
    assert isinstance(standby, Taken) and standby.holder == "A"
    assert Lease(client, "job", ttl=10, identity="probe").inspect().lock_delay_remaining > 9.0
    client.delete(LeaseKeys("job").lease)
    late = Lease(client, "job", ttl=10, identity="C").acquire(new_token())
    assert isinstance(late, Quiet) and late.lock_delay > 9.0
