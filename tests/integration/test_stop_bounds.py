"""stop(timeout) against a real redis-server that does not answer (issue 10, item 6).

Before the fix, with Redis paused (``CLIENT PAUSE``), ``stop(timeout=0.3)`` returned after
1.30 s: the release listener's wake-up PUBLISH used a fresh connection with its own 1 s
socket timeout, ran twice, and its join result was ignored.
"""

from __future__ import annotations

import time

import pytest
import redis

from mutexowner import MutexOwner
from mutexowner.lease import LeaseKeys
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

#: What stop() may take beyond its timeout: thread scheduling on a loaded 2-core machine.
SLACK = 0.15


@pytest.mark.parametrize("pause", ["ALL", "WRITE"])
def test_stop_honours_its_timeout_while_redis_is_paused(
    redis_server: RedisServer, pause: str
) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    owner = MutexOwner(redis_server.url, "bounded", ttl=2.0, identity="A")
    try:
        owner.start()
        assert owner.wait_until_holding(10)
        admin.execute_command("CLIENT", "PAUSE", 5000, pause)
        t0 = time.monotonic()
        stopped = owner.stop(timeout=0.3)
        elapsed = time.monotonic() - t0
        assert elapsed < 0.3 + SLACK, f"stop(timeout=0.3) took {elapsed:.3f} s"
        # The engine thread may still be in its (bounded) release call: stop() says so.
        assert stopped is not any(t.name.startswith("mutexowner-engine-") for t in owner.threads)
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        assert owner.stop(timeout=10)
        admin.close()


def test_a_stop_while_redis_is_paused_releases_the_key_once_it_answers(
    redis_server: RedisServer,
) -> None:
    # The release has its own call timeout; a key it could not release expires by itself,
    # and stop() still completes within its timeout.
    admin = redis.Redis.from_url(redis_server.url)
    owner = MutexOwner(redis_server.url, "paused", ttl=2.0, identity="A")
    try:
        owner.start()
        assert owner.wait_until_holding(10)
        admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        t0 = time.monotonic()
        assert owner.stop(timeout=5)
        assert time.monotonic() - t0 < owner.call_timeout + 1.0
        admin.execute_command("CLIENT", "UNPAUSE")
        ttl_ms = admin.pttl(LeaseKeys("paused").lease)
        assert ttl_ms <= 2000  # released, or left to expire within its ttl: never renewed
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        owner.stop(timeout=10)
        admin.close()
