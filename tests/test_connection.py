"""The lease's own connection (bounded, no retries) and password redaction."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from mutexowner.connection import (
    client_from,
    derive_lease_client,
    describe_client,
    redact_text,
    redact_url,
)
from mutexowner.testing import fake_redis


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://u:p%40ss@h/1", "rediss://u:***@h/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("unix://:pw@/tmp/redis.sock?db=2", "unix://:***@/tmp/redis.sock?db=2"),
        ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=1"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "pw" not in redact_url(url).replace("password", "")


def test_redact_text_finds_urls_inside_messages() -> None:
    message = "Error connecting to redis://admin:hunter2@db:6379/0: refused"
    assert redact_text(message) == "Error connecting to redis://admin:***@db:6379/0: refused"
    tricky = "at redis://u:p@ss/w@db:6379/0 now"  # '@' and '/' inside the password
    assert redact_text(tricky) == "at redis://u:***@db:6379/0 now"


def test_client_from_accepts_clients_and_urls_and_names_the_parameter() -> None:
    client = fake_redis()
    assert client_from(client) is client
    made = client_from("redis://:pw@127.0.0.1:6390/3")
    kwargs = made.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "127.0.0.1",
        6390,
        3,
        "pw",
    )
    with pytest.raises(ValueError, match="redis") as info:
        client_from("http://:secret@host")
    assert "secret" not in str(info.value)
    with pytest.raises(TypeError, match="redis"):
        client_from(3.5)


def test_a_cluster_client_is_accepted_as_it_is() -> None:
    # RedisCluster() connects on construction; an unconnected instance is enough here.
    # The real-cluster tests are in tests/ha/test_cluster.py.
    cluster = RedisCluster.__new__(RedisCluster)
    assert client_from(cluster) is cluster


def test_lease_client_keeps_address_and_credentials_but_bounds_time_and_drops_retries() -> None:
    user = redis.Redis(
        host="10.1.2.3",
        port=6380,
        db=4,
        username="app",
        password="pw",
        socket_timeout=None,
        retry=Retry(redis.backoff.ExponentialBackoff(), 10),
    )
    lease = derive_lease_client(user, timeout=0.25)
    got = lease.connection_pool.connection_kwargs
    for key in ("host", "port", "db", "username", "password"):
        assert got[key] == user.connection_pool.connection_kwargs[key]
    assert got["socket_timeout"] == got["socket_connect_timeout"] == 0.25
    assert got["retry"].get_retries() == 0
    assert not got["retry_on_timeout"] and got["retry_on_error"] == []
    # The user's own client is untouched.
    assert user.connection_pool.connection_kwargs["retry"].get_retries() == 10
    assert user.connection_pool.connection_kwargs["socket_timeout"] is None
    assert lease.connection_pool is not user.connection_pool


def test_lease_client_keeps_tls_and_unix_sockets() -> None:
    tls = derive_lease_client(redis.Redis.from_url("rediss://h:6379/0"), timeout=0.5)
    assert tls.connection_pool.connection_class is redis.SSLConnection
    unix = derive_lease_client(redis.Redis.from_url("unix:///tmp/r.sock?db=2"), timeout=0.5)
    assert unix.connection_pool.connection_kwargs["path"] == "/tmp/r.sock"
    assert unix.connection_pool.connection_kwargs["db"] == 2


def test_lease_client_follows_a_sentinel_master() -> None:
    sentinel = Sentinel([("127.0.0.1", 26379)], socket_timeout=0.1)
    master = sentinel.master_for("mymaster", password="pw", db=1)
    lease = derive_lease_client(master, timeout=0.5)
    pool = lease.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster" and pool.is_master
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["socket_timeout"] == 0.5
    assert describe_client(master) == "redis+sentinel://:***@127.0.0.1:26379/mymaster/1"


def test_lease_client_shares_the_fake_server() -> None:
    user = fake_redis()
    lease = derive_lease_client(user, timeout=0.5)
    lease.set("k", "v")
    assert user.get("k") == b"v"


def test_describe_client_never_shows_the_password() -> None:
    text = describe_client(redis.Redis.from_url("redis://app:s3cret@db.local:6381/2"))
    assert text == "redis://app:***@db.local:6381/2"
    assert describe_client(redis.Redis.from_url("redis://db.local")) == "redis://db.local:6379/0"
    assert "s3cret" not in describe_client(redis.Redis.from_url("rediss://:s3cret@h/0"))
    assert describe_client(redis.Redis.from_url("unix:///tmp/x.sock")) == "unix:///tmp/x.sock?db=0"
