"""ReleaseHub on fakeredis: one thread carries every channel's release notices.

fakeredis has no socket to wait on, so the hub polls it every FAKE_POLL_SECONDS; the
blocking (no-poll) path, CLIENT KILL and server restarts are covered against a real
redis-server in tests/integration/test_hub_redis.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from mutexowner.backoff import BackoffPolicy
from mutexowner.errors import ForkedOwnerError, MutexOwnerError
from mutexowner.hub import ReleaseHub, Subscription
from mutexowner.testing import fake_redis
from tests.helpers import REAL_TIMEOUT, wait_for

FAST = BackoffPolicy(initial=0.01, max_delay=0.05)


class Calls:
    """A callback that counts its calls and lets a test wait for the n-th one."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = REAL_TIMEOUT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= count, timeout)


@pytest.fixture
def client() -> Any:
    return fake_redis()


@pytest.fixture
def hub(client: Any) -> Iterator[ReleaseHub]:
    hub = ReleaseHub(client, name="t", backoff=FAST)
    yield hub
    assert hub.stop(timeout=REAL_TIMEOUT)


def flush(hub: ReleaseHub, client: Any) -> None:
    """Return once the hub has handled everything published before this call: messages on
    one connection arrive in order, so a notice on a fresh channel comes after them all."""
    marker = Calls()
    subscription = hub.subscribe("flush-marker", marker)
    assert marker.wait(1)  # subscribed
    client.publish("flush-marker", "x")
    assert marker.wait(2)
    hub.unsubscribe(subscription)


def test_the_thread_starts_with_the_first_subscription_and_carries_every_channel(
    hub: ReleaseHub, client: Any
) -> None:
    def hub_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "mutexowner-t-hub"]

    assert not hub_threads() and not hub.alive
    calls = [Calls() for _ in range(50)]
    for i, call in enumerate(calls):
        hub.subscribe(f"ch{i}", call)
    assert len(hub_threads()) == 1 and hub.alive
    # Each subscriber is called once as soon as its channel is live (a release may have
    # come just before it subscribed).
    assert all(call.wait(1) for call in calls)
    assert hub.subscribed_channels == {f"ch{i}" for i in range(50)}
    client.publish("ch7", "someone")
    assert calls[7].wait(2)
    flush(hub, client)
    assert [c.count for c in calls] == [2 if i == 7 else 1 for i in range(50)]
    assert len(hub_threads()) == 1


def test_ignore_from_skips_only_that_subscribers_own_releases(hub: ReleaseHub, client: Any) -> None:
    mine, theirs, anyone = Calls(), Calls(), Calls()
    hub.subscribe("lease", mine, ignore_from="me")
    hub.subscribe("lease", theirs, ignore_from="them")
    hub.subscribe("lease", anyone)
    assert mine.wait(1) and theirs.wait(1) and anyone.wait(1)
    client.publish("lease", "me")
    flush(hub, client)
    assert (mine.count, theirs.count, anyone.count) == (1, 2, 2)
    client.publish("lease", "them")
    flush(hub, client)
    assert (mine.count, theirs.count, anyone.count) == (2, 2, 3)


def test_a_late_subscriber_on_a_live_channel_is_called_once_and_alone(
    hub: ReleaseHub, client: Any
) -> None:
    first, second = Calls(), Calls()
    hub.subscribe("lease", first)
    assert first.wait(1)
    hub.subscribe("lease", second)
    assert second.wait(1)
    flush(hub, client)
    assert (first.count, second.count) == (1, 1)


def test_unsubscribe_stops_calls_and_the_last_one_unsubscribes_the_channel(
    hub: ReleaseHub, client: Any
) -> None:
    a, b = Calls(), Calls()
    sub_a = hub.subscribe("lease", a)
    sub_b = hub.subscribe("lease", b)
    assert a.wait(1) and b.wait(1)
    hub.unsubscribe(sub_a)
    hub.unsubscribe(sub_a)  # idempotent
    assert not sub_a.active and sub_b.active
    client.publish("lease", "x")
    flush(hub, client)
    assert (a.count, b.count) == (1, 2)
    assert client.pubsub_numsub("lease") == [(b"lease", 1)]
    hub.unsubscribe(sub_b)
    assert hub.channels == frozenset()
    assert wait_for(lambda: "lease" not in hub.subscribed_channels)
    assert wait_for(lambda: client.pubsub_numsub("lease") == [(b"lease", 0)])
    client.publish("lease", "x")
    flush(hub, client)
    assert (a.count, b.count) == (1, 2)
    # Subscribing again works: a fresh SUBSCRIBE and a fresh first call.
    c = Calls()
    hub.subscribe("lease", c)
    assert c.wait(1)
    client.publish("lease", "x")
    assert c.wait(2)


@pytest.mark.parametrize("error", [RuntimeError("boom"), SystemExit(3), KeyboardInterrupt()])
def test_the_hub_survives_whatever_a_callback_raises(
    hub: ReleaseHub, client: Any, caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    raised = Calls()

    def bad() -> None:
        raised()
        raise error

    good = Calls()
    with caplog.at_level(logging.ERROR, logger="mutexowner.hub"):
        hub.subscribe("lease", bad)
        hub.subscribe("lease", good)
        assert raised.wait(1) and good.wait(1)
        client.publish("lease", "x")
        assert raised.wait(2) and good.wait(2)  # both still called: neither the hub nor
        assert hub.alive  # the other subscriber suffered
    failed = [r for r in caplog.records if "callback for lease failed" in r.getMessage()]
    assert len(failed) == 2 and all(r.exc_info for r in failed)


def test_callbacks_may_subscribe_and_unsubscribe(hub: ReleaseHub, client: Any) -> None:
    inner = Calls()
    holder: list[Subscription] = []

    def outer() -> None:
        if not holder:
            holder.append(hub.subscribe("inner", inner))
        else:
            hub.unsubscribe(holder[0])

    hub.subscribe("outer", outer)
    assert inner.wait(1)  # subscribed from the hub thread itself
    client.publish("outer", "x")  # the second call unsubscribes it
    assert wait_for(lambda: "inner" not in hub.subscribed_channels)


def test_after_an_outage_every_subscriber_is_called_once_again(
    hub: ReleaseHub, client: Any
) -> None:
    server = client.connection_pool.connection_kwargs["server"]
    calls = [Calls() for _ in range(5)]
    for i, call in enumerate(calls):
        hub.subscribe(f"ch{i}", call)
    assert all(call.wait(1) for call in calls)
    server.connected = False  # outage: the subscription breaks...
    assert wait_for(lambda: hub.failures_seen > 0)
    assert hub.subscribed_channels == frozenset()
    server.connected = True
    # ...and when it is back, each subscriber is called once: a release may have been missed.
    assert all(call.wait(2) for call in calls)
    flush(hub, client)
    assert [c.count for c in calls] == [2] * 5
    client.publish("ch3", "x")
    assert calls[3].wait(3)


def test_stop_ends_the_thread_is_final_and_idempotent(client: Any) -> None:
    hub = ReleaseHub(client, name="t", backoff=FAST)
    call = Calls()
    subscription = hub.subscribe("lease", call)
    assert call.wait(1)
    assert hub.stop(timeout=REAL_TIMEOUT)
    assert not hub.alive and not subscription.active
    assert not any(t.name == "mutexowner-t-hub" for t in threading.enumerate())
    assert hub.stop(timeout=0)  # idempotent
    with pytest.raises(MutexOwnerError, match="stopped"):
        hub.subscribe("lease", call)
    hub.unsubscribe(subscription)  # harmless after stop
    assert wait_for(lambda: client.pubsub_numsub("lease") == [(b"lease", 0)])


def test_stop_without_a_subscription_and_stop_from_a_callback() -> None:
    assert ReleaseHub(fake_redis(), name="never", backoff=FAST).stop(timeout=0)
    hub = ReleaseHub(fake_redis(), name="t", backoff=FAST)
    results: list[bool] = []
    done = threading.Event()

    def stop_from_inside() -> None:
        results.append(hub.stop(timeout=1))  # cannot join itself: requests, returns False
        done.set()

    hub.subscribe("lease", stop_from_inside)
    assert done.wait(REAL_TIMEOUT)
    assert results == [False]
    assert hub.stop(timeout=REAL_TIMEOUT) and not hub.alive


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="backoff"):
        ReleaseHub(fake_redis(), name="t", backoff=1.0)  # type: ignore[arg-type]
    hub = ReleaseHub(fake_redis(), name="t", backoff=FAST)
    with pytest.raises(ValueError, match="channel"):
        hub.subscribe("", Calls())
    bad: Callable[[], None] = "x"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="callback"):
        hub.subscribe("lease", bad)
    assert not hub.alive  # nothing was started by the refused calls
    assert hub.stop(timeout=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_cannot_use_the_parents_hub(hub: ReleaseHub, client: Any) -> None:
    call = Calls()
    subscription = hub.subscribe("lease", call)
    assert call.wait(1)
    with hub._lock:  # as if the hub thread held its lock at the moment of the fork
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 0
            try:
                try:
                    hub.subscribe("other", Calls())
                    code = 1
                except ForkedOwnerError:
                    pass
                hub.unsubscribe(subscription)  # must not wake, touch or wait for the parent's
                if not hub.stop(timeout=0) or hub.alive or hub.channels:
                    code = 2
            except BaseException:
                code = 3
            os._exit(code)
    statuses: list[int] = []

    def child_ended() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        statuses.extend([status] if done else [])
        return bool(done)

    try:
        assert wait_for(child_ended), "the child hung (on a lock copied while held?)"
    finally:
        if not statuses:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(statuses[0]) == 0
    # The parent's hub still carries the subscription the child "dropped".
    client.publish("lease", "x")
    assert call.wait(2)
    assert "lease" in hub.subscribed_channels


def test_unsubscribing_another_hubs_subscription_changes_nothing(
    hub: ReleaseHub, client: Any
) -> None:
    other = ReleaseHub(fake_redis(), name="other", backoff=FAST)
    call = Calls()
    subscription = hub.subscribe("lease", call)
    assert call.wait(1)
    other.unsubscribe(subscription)
    assert subscription.active and hub.channels == {"lease"}
    client.publish("lease", "x")
    assert call.wait(2)
    assert other.stop(timeout=0)
