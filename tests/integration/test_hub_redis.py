"""ReleaseHub against a real redis-server: one connection and one thread for 1,000 channels,
reconnection after CLIENT KILL and after a server restart, a stop that does not poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import redis

from mutexowner.backoff import BackoffPolicy
from mutexowner.connection import derive_lease_client
from mutexowner.hub import ReleaseHub
from tests.helpers import wait_for
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

FAST = BackoffPolicy(initial=0.01, max_delay=0.1)
N = 1000
#: A notice (or a reconnection) must arrive within this; generous for a loaded 2-core host,
#: and far below the seconds an owner would wait without a notice.
BOUND = 2.0


class Counter:
    """Per-channel callback counts, and a way to wait for a condition on them."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._cond = threading.Condition()

    def callback(self, channel: str) -> Callable[[], None]:
        self.counts[channel] = 0

        def call() -> None:
            with self._cond:
                self.counts[channel] += 1
                self._cond.notify_all()

        return call

    def wait(self, condition: Callable[[dict[str, int]], bool], timeout: float = BOUND) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: condition(self.counts), timeout)

    def reset(self) -> None:
        with self._cond:
            for channel in self.counts:
                self.counts[channel] = 0


def pubsub_clients(admin: redis.Redis) -> list[dict[str, Any]]:
    return list(admin.client_list(_type="pubsub"))


@pytest.fixture
def admin(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client()


@pytest.fixture
def hub(redis_server: RedisServer) -> Iterator[ReleaseHub]:
    client = derive_lease_client(redis_server.client(), timeout=1.0)
    hub = ReleaseHub(client, name="it", backoff=FAST)
    yield hub
    assert hub.stop(timeout=10)


def subscribe_all(hub: ReleaseHub, counter: Counter, n: int = N) -> list[str]:
    channels = [f"{{lease{i}}}:released" for i in range(n)]
    for channel in channels:
        hub.subscribe(channel, counter.callback(channel), ignore_from=f"owner-{channel}")
    assert counter.wait(lambda c: all(v >= 1 for v in c.values()), 10), "not all subscribed"
    return channels


def flush(hub: ReleaseHub, admin: redis.Redis) -> None:
    """Return once the hub handled every notice published before: one connection delivers
    in order, so a notice on a fresh marker channel arrives after all of them."""
    marker = threading.Semaphore(0)
    subscription = hub.subscribe("flush-marker", marker.release)
    assert marker.acquire(timeout=BOUND)  # subscribed
    admin.publish("flush-marker", "x")
    assert marker.acquire(timeout=BOUND)
    hub.unsubscribe(subscription)
    assert wait_for(lambda: "flush-marker" not in hub.subscribed_channels)


def test_a_thousand_channels_share_one_connection_and_one_thread(
    hub: ReleaseHub, admin: redis.Redis, record_figures: Callable[..., None]
) -> None:
    before = {t.ident for t in threading.enumerate()}
    counter = Counter()
    t0 = time.monotonic()
    channels = subscribe_all(hub, counter)
    subscribed = time.monotonic() - t0
    assert hub.subscribed_channels == frozenset(channels)
    assert wait_for(lambda: [int(c["sub"]) for c in pubsub_clients(admin)] == [N])
    new_threads = [t.name for t in threading.enumerate() if t.ident not in before]
    assert new_threads == ["mutexowner-it-hub"]
    # Every subscriber was called exactly once (its first call once subscribed).
    flush(hub, admin)
    assert set(counter.counts.values()) == {1}
    record_figures(channels=N, subscribe_all_s=subscribed)


def test_a_publish_wakes_only_its_own_channels_subscribers_quickly(
    hub: ReleaseHub, admin: redis.Redis, record_figures: Callable[..., None]
) -> None:
    counter = Counter()
    channels = subscribe_all(hub, counter)
    second = Counter()  # a second subscriber of one channel (two owners of one key)
    target = channels[500]
    hub.subscribe(target, second.callback("again"), ignore_from="owner-B")
    assert second.wait(lambda c: c["again"] == 1)
    counter.reset()
    second.reset()
    latencies = []
    for _ in range(20):
        before = counter.counts[target]
        t0 = time.monotonic()
        admin.publish(target, "someone-else")
        assert counter.wait(lambda c, want=before + 1: c[target] == want), "not delivered"
        latencies.append(time.monotonic() - t0)
    flush(hub, admin)
    woken = {channel: n for channel, n in counter.counts.items() if n}
    assert woken == {target: 20}
    assert second.counts["again"] == 20
    # ignore_from: each subscriber skips its own owner's releases, not the other's.
    admin.publish(target, f"owner-{target}")
    admin.publish(target, "owner-B")
    flush(hub, admin)
    assert counter.counts[target] == 21 and second.counts["again"] == 21
    latencies.sort()
    assert latencies[-1] < BOUND
    record_figures(notice_p50_s=latencies[10], notice_max_s=latencies[-1])


def test_after_client_kill_it_resubscribes_and_calls_every_subscriber_once(
    hub: ReleaseHub, admin: redis.Redis
) -> None:
    counter = Counter()
    channels = subscribe_all(hub, counter)
    first_id = pubsub_clients(admin)[0]["id"]
    counter.reset()
    assert admin.client_kill_filter(_type="pubsub") == 1
    assert counter.wait(lambda c: all(v >= 1 for v in c.values()), 10)
    assert wait_for(lambda: hub.subscribed_channels == frozenset(channels))
    flush(hub, admin)
    assert set(counter.counts.values()) == {1}  # once each, not once per reconnection try
    assert wait_for(lambda: [int(c["sub"]) for c in pubsub_clients(admin)] == [N])
    assert pubsub_clients(admin)[0]["id"] != first_id
    assert hub.failures_seen == 1
    admin.publish(channels[7], "x")
    assert counter.wait(lambda c: c[channels[7]] == 2)


def test_after_a_server_restart_it_reconnects_and_calls_every_subscriber_once(
    redis_server: RedisServer, hub: ReleaseHub, caplog: pytest.LogCaptureFixture
) -> None:
    counter = Counter()
    channels = subscribe_all(hub, counter, n=200)
    counter.reset()
    with caplog.at_level(logging.DEBUG, logger="mutexowner.hub"):
        redis_server.restart()
        assert counter.wait(lambda c: all(v >= 1 for v in c.values()), 15)
        assert wait_for(lambda: len(hub.subscribed_channels) == 200)
        admin = redis_server.client()
        flush(hub, admin)
    assert set(counter.counts.values()) == {1}
    assert hub.failures_seen >= 1
    admin.publish(channels[3], "x")
    assert counter.wait(lambda c: c[channels[3]] == 2)
    interrupted = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert len(interrupted) == 1, interrupted  # said once per outage, not per retry
    assert f"127.0.0.1:{redis_server.port}" in interrupted[0]


@pytest.mark.parametrize("frozen", [False, True], ids=["answering", "frozen"])
def test_stop_is_prompt_and_leaves_no_thread_or_connection(
    redis_server: RedisServer,
    admin: redis.Redis,
    frozen: bool,
    record_figures: Callable[..., None],
) -> None:
    hub = ReleaseHub(
        derive_lease_client(redis_server.client(), timeout=1.0), name="it", backoff=FAST
    )
    counter = Counter()
    subscribe_all(hub, counter, n=100)
    thread = next(t for t in threading.enumerate() if t.name == "mutexowner-it-hub")
    if frozen:
        redis_server.freeze()
    try:
        t0 = time.monotonic()
        stopped = hub.stop(timeout=5)
        took = time.monotonic() - t0
    finally:
        if frozen:
            redis_server.thaw()
    assert stopped and not thread.is_alive() and not hub.alive
    # Woken through its own socket pair, not by a poll interval running out (a 1 s poll, as
    # ReleaseListener had, would fail this on average; that it does not poll at all is
    # test_an_idle_hub_blocks_without_waking_up). Generous: the machine may be loaded.
    assert took < 0.5, f"stop() took {took:.3f} s"
    assert wait_for(lambda: not pubsub_clients(admin))
    record_figures(stop_s=took)


def context_switches(thread: threading.Thread) -> int:
    """How many times ``thread`` gave up the CPU voluntarily (each wake-up from a wait)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(
        next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches")).split()[1]
    )


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_an_idle_hub_blocks_without_waking_up(hub: ReleaseHub, admin: redis.Redis) -> None:
    counter = Counter()
    channels = subscribe_all(hub, counter, n=10)
    thread = next(t for t in threading.enumerate() if t.name == "mutexowner-it-hub")

    def settled() -> bool:  # it may still be on its way to its wait (a loaded machine)
        before = context_switches(thread)
        time.sleep(0.2)
        return context_switches(thread) == before

    assert wait_for(settled)
    before = context_switches(thread)
    time.sleep(1.0)  # measuring idleness, not synchronising: nothing happens meanwhile
    assert context_switches(thread) == before  # any poll (ReleaseListener's: 1 s) wakes it
    # ...and a notice still wakes it at once.
    admin.publish(channels[0], "x")
    assert counter.wait(lambda c: c[channels[0]] == 2)
    assert context_switches(thread) > before


@pytest.mark.parametrize(
    "options", [{"protocol": 2}, {"protocol": 3, "decode_responses": True}], ids=["resp2", "resp3"]
)
def test_both_protocols_and_decoded_replies(
    redis_server: RedisServer, admin: redis.Redis, options: dict[str, Any]
) -> None:
    client = derive_lease_client(redis_server.client(**options), timeout=1.0)
    hub = ReleaseHub(client, name="it", backoff=FAST)
    try:
        counter = Counter()
        hub.subscribe("lease", counter.callback("lease"), ignore_from="me")
        assert counter.wait(lambda c: c["lease"] == 1)
        admin.publish("lease", "me")
        admin.publish("lease", "other")
        assert counter.wait(lambda c: c["lease"] == 2)
        flush(hub, admin)
        assert counter.counts["lease"] == 2
    finally:
        assert hub.stop(timeout=10)


def test_a_channel_the_acl_refuses_is_reported_once_and_does_not_disturb_the_others(
    redis_server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute_command(
        "ACL", "SETUSER", "hubuser", "on", ">pw", "+@all", "~*", "resetchannels", "&ok:*"
    )
    client = derive_lease_client(
        redis_server.client(username="hubuser", password="pw"), timeout=1.0
    )
    hub = ReleaseHub(client, name="it", backoff=FAST)
    counter = Counter()
    try:
        with caplog.at_level(logging.WARNING, logger="mutexowner.hub"):
            hub.subscribe("ok:a", counter.callback("ok:a"))
            hub.subscribe("no:b", counter.callback("no:b"))
            hub.subscribe("ok:c", counter.callback("ok:c"))
            assert counter.wait(lambda c: c["ok:a"] == 1 and c["ok:c"] == 1)
            # Refused and retried with backoff (at most every 0.1 s here), on the same
            # connection: the others keep working, and the warning is not repeated.
            assert wait_for(lambda: denials(admin, "no:b") >= 3)
            admin.publish("ok:c", "x")
            assert counter.wait(lambda c: c["ok:c"] == 2)
            flush_ok(hub, admin)
            assert counter.counts["no:b"] == 0
            assert wait_for(lambda: hub.subscribed_channels == {"ok:a", "ok:c"})
            assert hub.failures_seen == 0 and len(pubsub_clients(admin)) == 1
            # Granted later: the next retry subscribes it, and it is called once.
            admin.execute_command("ACL", "SETUSER", "hubuser", "&no:*")
            assert counter.wait(lambda c: c["no:b"] == 1, 5)
            admin.publish("no:b", "x")
            assert counter.wait(lambda c: c["no:b"] == 2)
        refused = [r for r in caplog.records if "refuses SUBSCRIBE" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in refused]
        assert "no:b" in refused[0].getMessage() and "&no:*" in refused[0].getMessage()
        assert "pw" not in refused[0].getMessage()
    finally:
        assert hub.stop(timeout=10)


def denials(admin: redis.Redis, channel: str) -> int:
    """How many times the server refused ``channel`` (its ACL LOG)."""
    log = admin.acl_log()
    return sum(int(e["count"]) for e in log if e["reason"] == "channel" and e["object"] == channel)


def flush_ok(hub: ReleaseHub, admin: redis.Redis) -> None:
    """`flush` on a channel the test user may subscribe to."""
    marker = threading.Semaphore(0)
    subscription = hub.subscribe("ok:flush", marker.release)
    assert marker.acquire(timeout=BOUND)
    admin.publish("ok:flush", "x")
    assert marker.acquire(timeout=BOUND)
    hub.unsubscribe(subscription)
