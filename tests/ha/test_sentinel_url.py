"""The Sentinel URL form of ``client_from`` and the bounded discovery of the lease client."""

from __future__ import annotations

import time

import pytest
import redis
from redis import exceptions as rex
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from mutexowner import MutexOwner
from mutexowner.connection import (
    client_from,
    derive_lease_client,
    describe_client,
    parse_cluster_url,
    parse_sentinel_url,
    redact_text,
    redact_url,
)
from mutexowner.errors import RedisTransientError
from mutexowner.lease import Lease, new_token
from mutexowner.testing import fake_redis
from tests.redis_server import free_port


def test_parse_hosts_service_db_and_credentials() -> None:
    hosts, service, kwargs = parse_sentinel_url(
        "redis+sentinel://:pw@10.0.0.1:26380,sentinel-b,[::1]:26381/mymaster/2"
        "?sentinel_password=spw&sentinel_username=watch"
    )
    assert hosts == [("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)]
    assert service == "mymaster"
    assert kwargs["password"] == "pw" and kwargs["db"] == 2
    assert kwargs["sentinel_kwargs"] == {"password": "spw", "username": "watch"}
    assert "ssl" not in kwargs


def test_parse_tls_applies_to_master_and_sentinels() -> None:
    _, service, kwargs = parse_sentinel_url(
        "rediss+sentinel://app:p%40ss@h1/svc?ssl_cert_reqs=none"
    )
    assert service == "svc" and kwargs["db"] == 0
    assert kwargs["username"] == "app" and kwargs["password"] == "p@ss"
    assert kwargs["ssl"] is True and kwargs["ssl_cert_reqs"] == "none"
    assert kwargs["sentinel_kwargs"] == {"ssl": True, "ssl_cert_reqs": "none"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:pw@h1:26379", "needs a service name"),
        ("redis+sentinel://:pw@h1:26379/", "needs a service name"),
        ("redis+sentinel://:pw@h1/svc/0/extra", "needs a service name"),
        ("redis+sentinel://:pw@/svc", "at least one host"),
        ("redis+sentinel://:pw@h1:port/svc", "bad address"),
        ("redis+sentinel://:pw@h1/svc/zero", "db of a Sentinel URL must be an integer"),
    ],
)
def test_bad_urls_are_refused_without_showing_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        client_from(url, parameter="REDIS_URL")
    assert str(error.value).startswith("REDIS_URL: ")
    assert "pw" not in str(error.value).replace("password", "")


def test_client_from_builds_a_master_client_and_describe_hides_passwords() -> None:
    url = "rediss+sentinel://app:s3cret@h1:26380,h2/mymaster/3?sentinel_password=t0p"
    client = client_from(url)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.is_master
    assert pool.service_name == "mymaster"
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["password"] == "s3cret"
    text = describe_client(client)
    assert text == "rediss+sentinel://app:***@h1:26380,h2:26379/mymaster/3"
    lease_client = derive_lease_client(client, timeout=0.5)
    assert describe_client(lease_client) == text
    for shown in (redact_url(url), redact_text(f"cannot reach {url}: refused"), text):
        assert "s3cret" not in shown and "t0p" not in shown


def test_discovery_is_bounded_by_the_call_timeout_and_leaves_the_user_manager_alone() -> None:
    url = "redis+sentinel://127.0.0.1:1,127.0.0.1:2,127.0.0.1:3/mymaster"
    user = client_from(url)
    user_kw = user.connection_pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    before = dict(user_kw)
    lease_client = derive_lease_client(user, timeout=0.6)
    manager = lease_client.connection_pool.sentinel_manager
    assert manager is not user.connection_pool.sentinel_manager
    assert len(manager.sentinels) == 3
    for sentinel in manager.sentinels:
        kw = sentinel.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == pytest.approx(0.2)
        assert kw["socket_connect_timeout"] == pytest.approx(0.2)
        assert kw["retry"].get_retries() == 0
    assert user_kw == before


def test_dead_sentinels_give_a_transient_error_within_the_call_timeout() -> None:
    # Three ports nobody listens on: every sentinel refuses; the lease call reports a
    # transient error (no master found) quickly instead of hanging or raising a fatal one.
    ports = ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    client = derive_lease_client(client_from(f"redis+sentinel://{ports}/svc"), timeout=0.3)
    lease = Lease(client, "job", ttl=3, identity="A", call_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(RedisTransientError) as error:
        lease.acquire(new_token())
    assert time.monotonic() - started < 0.3 * 3
    assert error.value.kind == "connection"


def test_mutex_owner_accepts_the_sentinel_url() -> None:
    owner = MutexOwner("redis+sentinel://:pw@127.0.0.1:1/mymaster/1", "job", ttl=3)
    assert isinstance(owner._base_client, redis.Redis)
    assert "pw" not in repr(owner._redis_description)


def test_parse_cluster_url() -> None:
    nodes, kwargs = parse_cluster_url("redis+cluster://:pw@10.0.0.1:7000,node-b,[::1]:7002")
    assert nodes == [("10.0.0.1", 7000), ("node-b", 6379), ("::1", 7002)]
    assert kwargs == {"password": "pw"}
    nodes, kwargs = parse_cluster_url("rediss+cluster://u:p@h:7000/?ssl_cert_reqs=none")
    assert nodes == [("h", 7000)]
    assert kwargs == {"username": "u", "password": "p", "ssl": True, "ssl_cert_reqs": "none"}
    _, kwargs = parse_cluster_url("redis+cluster://h:7000?socket_timeout=3")
    assert kwargs == {"socket_timeout": 3.0}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://:pw@h:7000/1", "only database 0"),
        ("redis+cluster://:pw@", "at least one host"),
        ("redis+cluster://:pw@h:port", "bad address"),
    ],
)
def test_bad_cluster_urls_are_refused_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        client_from(url)
    assert "pw" not in str(error.value).replace("password", "")


def test_cluster_url_passwords_are_redacted() -> None:
    url = "redis+cluster://app:s3cret@h1:7000,h2:7001"
    assert redact_url(url) == "redis+cluster://app:***@h1:7000,h2:7001"
    assert "s3cret" not in redact_text(f"cannot reach {url}")


def test_cluster_client_exceptions_are_transient() -> None:
    # redis-py's RedisClusterException is not a RedisError; a slot not covered (a cluster
    # being failed over) must not be reported as an unexpected, fatal error.
    lease = Lease(fake_redis(), "job", ttl=1, identity="A")

    def uncovered() -> None:
        raise rex.SlotNotCoveredError("slot 866 is not covered by the cluster")

    with pytest.raises(RedisTransientError) as error:
        lease._run(uncovered)
    assert error.value.kind == "cluster"
