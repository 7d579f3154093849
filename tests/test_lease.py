"""The lease protocol over fakeredis (with Lua): replies, fencing, quiet period, errors."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import redis
from redis import exceptions as rex
from redis.crc import key_slot

from mutexowner.errors import RedisFatalError, RedisTransientError
from mutexowner.lease import (
    TOKEN_BYTES,
    Acquired,
    Lease,
    LeaseKeys,
    Quiet,
    Renewed,
    Retaken,
    Taken,
    classify_error,
    new_token,
    validate_name,
)
from mutexowner.testing import fake_redis, mark_epoch


def fresh() -> Any:
    """A fake Redis that has kept its state for long (no quiet period)."""
    client = fake_redis()
    mark_epoch(client, "job")
    return client


def lease(client: Any, identity: str = "A", ttl: float = 10.0, name: str = "job") -> Lease:
    return Lease(client, name, ttl=ttl, identity=identity)


def test_tokens_are_fresh_and_128_bits() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert TOKEN_BYTES * 8 >= 128
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)


def test_an_empty_redis_opens_a_quiet_period_in_which_no_newcomer_takes_the_key() -> None:
    client = fake_redis()
    result = lease(client).acquire(new_token())
    assert isinstance(result, Quiet)
    assert result.lock_delay == pytest.approx(10.0, abs=0.05)
    assert not client.exists(LeaseKeys("job").lease)
    epoch = client.hgetall(LeaseKeys("job").epoch)
    assert epoch[b"id"] and int(epoch[b"quiet_until"]) > 0
    # Shared: a second newcomer is told the same (shrinking) period, not a new one.
    again = lease(client, "B").acquire(new_token())
    assert isinstance(again, Quiet) and again.lock_delay <= result.lock_delay
    client.hset(LeaseKeys("job").epoch, "quiet_until", "0")  # the period has passed
    assert isinstance(lease(client, "B").acquire(new_token()), Acquired)


def test_acquire_is_idempotent_for_the_same_token() -> None:
    client = fresh()
    a = lease(client)
    token = new_token()
    first = a.acquire(token)
    again = a.acquire(token)
    assert isinstance(again, Renewed)
    assert again.fencing_token == first.fencing_token


def test_another_token_is_told_who_holds_and_for_how_long() -> None:
    client = fresh()
    first = lease(client, "A").acquire(new_token())
    result = lease(client, "B").acquire(new_token())
    assert isinstance(result, Taken)
    assert result.holder == "A"
    assert 9.9 <= result.ttl_left <= 10.0
    assert result.fencing_token == first.fencing_token


def test_renew_extends_the_key_and_keeps_the_fencing_token() -> None:
    client = fresh()
    a = lease(client)
    token = new_token()
    first = a.acquire(token)
    client.pexpire(LeaseKeys("job").lease, 1000)
    result = a.renew(token, first.fencing_token)
    assert isinstance(result, Renewed) and result.fencing_token == first.fencing_token
    assert client.pttl(LeaseKeys("job").lease) > 9000


def test_renew_of_a_vanished_key_retakes_it_with_the_same_fencing_token() -> None:
    client = fresh()
    a = lease(client)
    token = new_token()
    first = a.acquire(token)
    client.delete(LeaseKeys("job").lease)
    result = a.renew(token, first.fencing_token)
    assert isinstance(result, Retaken) and result.fencing_token == first.fencing_token
    stored = client.hgetall(LeaseKeys("job").lease)
    assert stored[b"token"] == token.encode()
    assert int(client.get(LeaseKeys("job").fence)) >= first.fencing_token


def test_renew_after_another_token_took_the_key_reports_taken() -> None:
    client = fresh()
    a, b = lease(client, "A"), lease(client, "B")
    token_a = new_token()
    first = a.acquire(token_a)
    client.delete(LeaseKeys("job").lease)
    b.acquire(new_token())
    result = a.renew(token_a, first.fencing_token)
    assert isinstance(result, Taken) and result.holder == "B"


def test_fencing_tokens_strictly_increase_even_after_redis_lost_everything() -> None:
    client = fresh()
    seen = []
    for i in range(20):
        owner = lease(client, f"O{i}")
        token = new_token()
        result = owner.acquire(token)
        assert isinstance(result, Acquired)
        seen.append(result.fencing_token)
        if i % 5 == 4:
            client.flushall()  # restart without persistence: the counter is gone too
            mark_epoch(client, "job")  # ...and the quiet period has passed
        else:
            assert owner.release(token)
    assert all(b > a for a, b in zip(seen, seen[1:]))


def test_fencing_counter_beats_a_clock_that_went_backwards() -> None:
    client = fresh()
    far_future = 9_000_000_000_000_000  # above any TIME in microseconds for centuries
    client.set(LeaseKeys("job").fence, str(far_future))
    result = lease(client).acquire(new_token())
    assert isinstance(result, Acquired) and result.fencing_token == far_future + 1


def test_after_data_loss_only_the_still_valid_holder_may_retake_the_key() -> None:
    client = fresh()
    a = lease(client, "A")
    token = new_token()
    held = a.acquire(token)
    assert isinstance(held, Acquired) and held.lock_delay == 0
    client.flushall()  # Redis restarted without persistence
    standby = lease(client, "B").acquire(new_token())
    assert isinstance(standby, Quiet) and 9.0 < standby.lock_delay <= 10.0
    retaken = a.renew(token, held.fencing_token)
    assert isinstance(retaken, Retaken) and retaken.fencing_token == held.fencing_token
    assert isinstance(lease(client, "B").acquire(new_token()), Taken)
    assert lease(client, "C").inspect().lock_delay_remaining > 9.0


def test_release_only_deletes_our_own_token_and_notifies_standbys() -> None:
    client = fresh()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(LeaseKeys("job").channel)
    a = lease(client)
    token = new_token()
    a.acquire(token)
    assert a.release(new_token()) is False
    assert client.exists(LeaseKeys("job").lease)
    assert a.release(token) is True
    assert not client.exists(LeaseKeys("job").lease)
    messages = [pubsub.get_message(timeout=1.0) for _ in range(2)]  # subscribe ack, notice
    assert [m["data"] for m in messages if m is not None] == [b"A"]
    assert a.release(token) is False
    pubsub.close()


def test_inspect_shows_holder_ttl_and_counter_but_never_the_token() -> None:
    client = fresh()
    assert not lease(fake_redis()).inspect().epoch_present
    free = lease(client).inspect()
    assert not free.held and free.holder is None and free.ttl_left is None
    assert free.epoch_present
    token = new_token()
    result = lease(client, "host-1:42").acquire(token)
    info = lease(client, "other").inspect()
    assert info.held and info.holder == "host-1:42"
    assert info.fencing_token == info.fencing_counter == result.fencing_token
    assert info.ttl_left is not None and 9.0 < info.ttl_left <= 10.0
    assert info.epoch_present
    assert token not in repr(info)


def test_all_keys_of_a_lease_share_one_cluster_slot() -> None:
    for name in ("job", "myapp:scheduler", "a b c", "ünï"):
        keys = LeaseKeys(name)
        slots = {key_slot(k.encode()) for k in (*keys.all(), keys.channel)}
        assert len(slots) == 1, name


@pytest.mark.parametrize(("name", "error"), [("", ValueError), ("a{b", ValueError), (3, TypeError)])
def test_bad_names_are_refused(name: Any, error: type) -> None:
    with pytest.raises(error, match="name"):
        validate_name(name)


def test_a_lease_key_of_the_wrong_type_is_a_fatal_error() -> None:
    client = fresh()
    client.set(LeaseKeys("job").lease, "oops")
    with pytest.raises(RedisFatalError) as info:
        lease(client).acquire(new_token())
    assert info.value.kind == "wrongtype"
    assert not info.value.transient


def test_an_outage_is_a_transient_error() -> None:
    client = fresh()
    client.connection_pool.connection_kwargs["server"].connected = False
    with pytest.raises(RedisTransientError) as info:
        lease(client).acquire(new_token())
    assert info.value.kind == "connection" and info.value.transient


def test_a_garbled_reply_is_reported_not_crashed_on() -> None:
    a = lease(fresh())
    for reply in ([], [b"acquired", b"not-a-number", 0, 0], [b"weird", b"1", 0, 0], None):
        with pytest.raises(RedisFatalError, match=r"unexpected reply|fencing token"):
            a._parse(reply)


@pytest.mark.parametrize(
    ("exc", "transient", "kind"),
    [
        (rex.ConnectionError("Connection refused"), True, "connection"),
        (rex.TimeoutError("Timeout reading from socket"), True, "timeout"),
        (socket.timeout("timed out"), True, "timeout"),
        (ConnectionResetError("reset by peer"), True, "connection"),
        (rex.BusyLoadingError("LOADING Redis is loading"), True, "loading"),
        (
            rex.ReadOnlyError("READONLY You can't write against a read only replica."),
            True,
            "readonly",
        ),
        (rex.ResponseError("TRYAGAIN Multiple keys request during rehashing"), True, "tryagain"),
        (rex.ResponseError("CLUSTERDOWN The cluster is down"), True, "clusterdown"),
        (rex.ResponseError("MASTERDOWN Link with MASTER is down"), True, "masterdown"),
        (rex.ResponseError("BUSY Redis is busy running a script."), True, "busy"),
        (rex.ResponseError("OOM command not allowed"), True, "oom"),
        (rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True, "oom"),
        (rex.ResponseError("MOVED 3999 127.0.0.1:6381"), False, "script"),
        (rex.ResponseError("MISCONF Redis is configured to save RDB snapshots"), True, "misconf"),
        (rex.ClusterDownError("The cluster is down"), True, "cluster"),
        (rex.AuthenticationError("invalid username-password pair"), False, "auth"),
        (rex.ResponseError("WRONGPASS invalid username-password pair"), False, "auth"),
        (rex.ResponseError("NOAUTH Authentication required."), False, "auth"),
        (rex.NoPermissionError("NOPERM this user has no permissions"), False, "noperm"),
        (rex.ResponseError("WRONGTYPE Operation against a key"), False, "wrongtype"),
        (rex.ResponseError("ERR Error running script (call to f_x): oops"), False, "script"),
        (rex.DataError("bad data"), False, "client"),
        (ValueError("surprise"), False, "unexpected"),
    ],
)
def test_every_error_is_classified_once(exc: BaseException, transient: bool, kind: str) -> None:
    error = classify_error(exc)
    assert error.transient is transient
    assert error.kind == kind
    assert classify_error(error) is error


def test_scripts_run_through_evalsha_and_survive_script_flush() -> None:
    client = fresh()
    a = lease(client)
    token = new_token()
    a.acquire(token)
    client.script_flush()  # as after a Redis restart: NOSCRIPT, reloaded transparently
    result = a.renew(token, int(client.hget(LeaseKeys("job").lease, "fence")))
    assert isinstance(result, Renewed)


def test_decoded_clients_work_too() -> None:
    client = fake_redis(decode_responses=True)
    mark_epoch(client, "job")
    result = lease(client).acquire(new_token())
    assert isinstance(result, Acquired)
    assert isinstance(lease(client, "B").acquire(new_token()), Taken)
    assert lease(client, "B").inspect().holder == "A"


def test_redis_client_type_is_plain_redis() -> None:
    assert isinstance(fake_redis(), redis.Redis)


def test_a_holder_whose_lease_was_superseded_never_retakes_with_its_older_token() -> None:
    client = fresh()
    a, b = lease(client, "A"), lease(client, "B")
    token_a = new_token()
    first = a.acquire(token_a)
    assert isinstance(first, Acquired)
    client.delete(LeaseKeys("job").lease)  # deleted by hand (no data loss: no quiet period)
    token_b = new_token()
    assert isinstance(b.acquire(token_b), Acquired)
    assert b.release(token_b)
    result = a.renew(token_a, first.fencing_token)
    assert isinstance(result, Taken)  # B held a later lease meanwhile: A's has ended
    assert not client.exists(LeaseKeys("job").lease)
