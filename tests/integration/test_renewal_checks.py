"""What a renewal still checks, and what it may skip (real redis-server).

The acquire script reads the server's ``run_id`` (``INFO server``) to notice a restart from
older data or a fail-over, and the master's replica count (``INFO replication``) for the
replica check. A renewal of the key that still holds our token skips the ``run_id`` while the
last reading is younger than ``Lease.check_ms`` (one ttl), and skips the replica count once
the dataset is marked replicated. These tests pin down both halves: the skipping (so that
the server time per renewal stays low), and that every call that could hand the key to
someone else still reads the ``run_id`` first (so that skipping cannot let anyone in).

A changed ``run_id`` is simulated by writing another one into the epoch hash: to the script
that is exactly "this epoch was written by another server instance". One real restart from
persisted data is in ``test_lease_acl.py``.
"""

from __future__ import annotations

import pytest
import redis

from mutexowner.lease import Acquired, Lease, LeaseKeys, Quiet, Renewed, Taken, new_token
from mutexowner.testing import mark_epoch
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

KEYS = LeaseKeys("job")
OTHER_INSTANCE = "f" * 40


def info_calls(admin: redis.Redis) -> int:
    """``INFO`` calls so far, those made inside scripts included, not counting the ones this
    function makes (each call's own ``INFO commandstats`` shows up in the next call)."""
    calls = int(admin.info("commandstats").get("cmdstat_info", {}).get("calls", 0))
    admin.config_resetstat()
    return calls


def holding(server: RedisServer, ttl: float = 10) -> tuple[Lease, str, int]:
    mark_epoch(server.client(), "job")
    lease = Lease(server.client(), "job", ttl=ttl, identity="A")
    token = new_token()
    acquired = lease.acquire(token)
    assert isinstance(acquired, Acquired) and acquired.lock_delay == 0
    return lease, token, acquired.fencing_token


def test_a_renewal_of_our_own_key_reads_the_run_id_once_per_check_period(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    lease, token, fence = holding(redis_server)
    assert lease.check_ms == 10_000
    checked = admin.hget(KEYS.epoch, "checked_ms")
    assert checked is not None  # the acquire read the run_id and said when

    info_calls(admin)
    for _ in range(3):
        assert isinstance(lease.renew(token, fence), Renewed)
    # Not marked replicated: each renewal still counts replicas (one INFO), never INFO server.
    assert info_calls(admin) == 3
    assert admin.hget(KEYS.epoch, "checked_ms") == checked

    # The last reading is a period old: this renewal reads the run_id again (two INFOs).
    admin.hset(KEYS.epoch, "checked_ms", int(checked) - lease.check_ms)
    info_calls(admin)
    assert isinstance(lease.renew(token, fence), Renewed)
    assert info_calls(admin) == 2
    assert int(admin.hget(KEYS.epoch, "checked_ms") or 0) >= int(checked)

    # The server's clock went back past the last reading: read again rather than trust it.
    admin.hset(KEYS.epoch, "checked_ms", int(checked) + 10**9)
    info_calls(admin)
    assert isinstance(lease.renew(token, fence), Renewed)
    assert info_calls(admin) == 2

    # Marked replicated: the count changes nothing (auto mode requires one replica either
    # way), so a renewal reads neither. (min_replicas=0 only so that this lone server is not
    # asked for a WAIT it cannot satisfy.)
    admin.hset(KEYS.epoch, "replicated", "1")
    unwaited = Lease(redis_server.client(), "job", ttl=10, identity="A", min_replicas=0)
    info_calls(admin)
    assert isinstance(unwaited.renew(token, fence), Renewed)
    assert info_calls(admin) == 0
    # Its periodic check reads the run_id only.
    admin.hset(KEYS.epoch, "checked_ms", 0)
    assert isinstance(unwaited.renew(token, fence), Renewed)
    assert info_calls(admin) == 1


def test_a_changed_server_is_noticed_by_a_newcomer_even_while_the_holder_renews(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    holder, token, fence = holding(redis_server)
    admin.hset(KEYS.epoch, "run_id", OTHER_INSTANCE)  # as after a restart from a snapshot

    # The holder's renewal has no need to look: the key still holds its token.
    renewed = holder.renew(token, fence)
    assert isinstance(renewed, Renewed) and renewed.lock_delay == 0
    assert admin.hget(KEYS.epoch, "run_id") == OTHER_INSTANCE.encode()

    # A standby's acquire looks even though the key is taken, and opens the quiet period.
    standby = Lease(redis_server.client(), "job", ttl=10, identity="B")
    assert isinstance(standby.acquire(new_token()), Taken)
    assert admin.hget(KEYS.epoch, "run_id") != OTHER_INSTANCE.encode()
    assert standby.inspect().lock_delay_remaining > 9.0
    # So when the key becomes free, no newcomer takes it before the quiet period is over,
    admin.delete(KEYS.lease)
    late = standby.acquire(new_token())
    assert isinstance(late, Quiet) and late.lock_delay > 9.0
    # while the holder, whose own lease is still valid, may re-take its vanished key.
    assert holder.renew(token, fence).fencing_token == fence


def test_a_free_key_is_never_handed_out_without_reading_the_run_id(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    holder, token, fence = holding(redis_server)
    assert holder.release(token)
    admin.hset(KEYS.epoch, "run_id", OTHER_INSTANCE)
    late = Lease(redis_server.client(), "job", ttl=10, identity="B").acquire(new_token())
    assert isinstance(late, Quiet) and late.lock_delay > 9.0


def test_a_retried_acquire_of_our_own_key_reads_the_run_id(redis_server: RedisServer) -> None:
    # An acquire whose reply was lost is retried with the same token and finds the key ours.
    # It is no renewal of a lease we know we hold, so it takes the full path: after a restart
    # from older data it reports the quiet period, and the owner waits it out.
    admin = redis_server.client()
    lease, token, _fence = holding(redis_server)
    admin.hset(KEYS.epoch, "run_id", OTHER_INSTANCE)
    retried = lease.acquire(token)
    assert isinstance(retried, Renewed) and retried.lock_delay > 9.0


def test_a_lost_epoch_is_noticed_by_the_holders_next_renewal(redis_server: RedisServer) -> None:
    # Without the epoch there is no record of when the run_id was read: the full path runs
    # and re-creates the epoch with a quiet period, as before.
    admin = redis_server.client()
    lease, token, fence = holding(redis_server)
    admin.delete(KEYS.epoch)
    renewed = lease.renew(token, fence)
    assert isinstance(renewed, Renewed) and renewed.lock_delay > 9.0
    assert admin.hget(KEYS.epoch, "checked_ms") is not None
