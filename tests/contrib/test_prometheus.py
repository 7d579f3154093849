"""mutexowner.contrib.prometheus: deterministic with FakeClock + OwnerDriver (events inline).

Every test uses a fresh CollectorRegistry, so nothing leaks into prometheus_client's default
registry.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mutexowner import MutexOwner, Supervisor, WorkerContext
from mutexowner.backoff import BackoffPolicy
from mutexowner.contrib.prometheus import MutexOwnerMetrics, instrument
from mutexowner.events import Event
from mutexowner.testing import FakeClock, OwnerDriver, expire_lease, fake_redis
from tests.contrib.helpers import seeded_fake_redis

pytestmark = pytest.mark.timeout(60)

NO_JITTER = BackoffPolicy(initial=0.5, factor=2.0, max_delay=30.0, jitter="none")


def make(
    client: Any = None,
    *,
    name: str = "job",
    identity: str = "A",
    clock: Optional[FakeClock] = None,
    supervisor: Optional[Supervisor] = None,
) -> tuple[MutexOwner, OwnerDriver]:
    clock = clock if clock is not None else FakeClock()
    owner = MutexOwner(
        client if client is not None else fake_redis(name),
        name,
        ttl=10.0,
        identity=identity,
        clock=clock,
        supervisor=supervisor,
        backoff=NO_JITTER,
        stuck_worker_policy="abandon",  # never the default "exit" in a test process
    )
    return owner, OwnerDriver(owner, clock)


def value(registry: CollectorRegistry, name: str, **labels: str) -> Optional[float]:
    return registry.get_sample_value(name, labels)


def test_gauges_follow_the_owner_at_scrape_time() -> None:
    registry = CollectorRegistry()
    owner, driver = make()
    metrics = instrument(owner, registry)
    assert metrics.keys == ("job",)
    assert value(registry, "mutexowner_holding", key="job") == 0.0
    assert value(registry, "mutexowner_state", key="job", state="acquiring") == 1.0
    assert value(registry, "mutexowner_fencing_token", key="job") == 0.0

    assert driver.run_until(lambda: owner.holding)

    assert value(registry, "mutexowner_holding", key="job") == 1.0
    assert value(registry, "mutexowner_state", key="job", state="holding") == 1.0
    assert value(registry, "mutexowner_state", key="job", state="acquiring") == 0.0
    assert value(registry, "mutexowner_fencing_token", key="job") == float(owner.fencing_token or 0)
    remaining = value(registry, "mutexowner_lease_remaining_seconds", key="job")
    assert remaining == owner.status().lease_remaining and remaining is not None
    assert 0 < remaining <= 10.0
    driver.clock.advance(1.0)  # no step: the gauge reads the clock when scraped
    assert value(registry, "mutexowner_lease_remaining_seconds", key="job") == pytest.approx(
        remaining - 1.0
    )
    assert value(registry, "mutexowner_acquisitions_total", key="job") == 1.0
    assert value(registry, "mutexowner_consecutive_errors", key="job") == 0.0
    driver.stop()
    assert value(registry, "mutexowner_holding", key="job") == 0.0
    assert value(registry, "mutexowner_state", key="job", state="stopped") == 1.0
    assert value(registry, "mutexowner_losses_total", key="job", reason="stopped") == 1.0


def test_loss_to_another_owner_is_counted_by_reason() -> None:
    registry = CollectorRegistry()
    client = seeded_fake_redis("job")  # no lock-delay (Redis time does not follow FakeClock)
    a, da = make(client, identity="A")
    instrument(a, registry)
    assert da.run_until(lambda: a.holding)
    expire_lease(client, "job")  # A's key vanishes (ttl ran out, say) and B takes it
    b, db = make(client, identity="B", clock=da.clock)
    db.step()
    assert b.holding
    assert da.run_until(lambda: a.state == "acquiring", max_seconds=20)
    assert value(registry, "mutexowner_losses_total", key="job", reason="taken") == 1.0
    for reason in ("expired", "stopped", "workers_failed"):  # exist from the start, at 0
        assert value(registry, "mutexowner_losses_total", key="job", reason=reason) == 0.0
    assert value(registry, "mutexowner_holding", key="job") == 0.0
    assert value(registry, "mutexowner_fencing_token", key="job") == 0.0
    assert value(registry, "mutexowner_lease_remaining_seconds", key="job") == 0.0
    text = generate_latest(registry).decode()
    assert 'mutexowner_losses_total{key="job",reason="taken"} 1.0' in text
    db.stop()
    da.stop()


def test_redis_errors_are_counted_by_kind() -> None:
    registry = CollectorRegistry()
    client = fake_redis("job")
    owner, driver = make(client)
    instrument(owner, registry)
    assert driver.run_until(lambda: owner.holding)
    server = client.connection_pool.connection_kwargs["server"]
    server.connected = False
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "suspended"
    driver.advance(owner.status().next_attempt_in or 0)
    errors = owner.status().consecutive_errors
    assert errors == 2
    assert value(registry, "mutexowner_consecutive_errors", key="job") == 2.0
    assert value(registry, "mutexowner_redis_errors_total", key="job", kind="connection") == 2.0
    server.connected = True
    driver.advance(owner.status().next_attempt_in or 0)
    assert owner.state == "holding"
    assert value(registry, "mutexowner_consecutive_errors", key="job") == 0.0
    assert value(registry, "mutexowner_redis_errors_total", key="job", kind="connection") == 2.0
    assert value(registry, "mutexowner_losses_total", key="job", reason="expired") == 0.0
    driver.stop()


def test_worker_restarts_are_counted() -> None:
    registry = CollectorRegistry()
    restarted = threading.Event()
    sup = Supervisor(max_restarts=3, max_seconds=5.0, shutdown_timeout=1.0)

    @sup.worker(name="flaky")
    def flaky(ctx: WorkerContext) -> None:
        if ctx.restart_count == 0:
            raise RuntimeError("first run fails")
        ctx.stopping.wait()

    owner, driver = make(supervisor=sup)
    instrument(owner, registry)

    def on_event(event: Event) -> None:  # added after the metrics' listener: runs after it
        if event.kind == "workers_restarted":
            restarted.set()

    owner.add_listener(on_event)
    assert driver.run_until(lambda: owner.holding)
    assert restarted.wait(10)
    assert value(registry, "mutexowner_worker_restarts_total", key="job") == 1.0
    assert value(registry, "mutexowner_workers_stuck_total", key="job") == 0.0
    driver.stop()


def test_several_owners_share_one_registry_by_key() -> None:
    registry = CollectorRegistry()
    clock = FakeClock()
    a, da = make(name="alpha", clock=clock)
    b, db = make(name="beta", clock=clock)
    metrics = instrument(a, registry)
    assert instrument(b, registry) is metrics
    assert metrics.keys == ("alpha", "beta")
    assert da.run_until(lambda: a.holding)
    assert value(registry, "mutexowner_holding", key="alpha") == 1.0
    assert value(registry, "mutexowner_holding", key="beta") == 0.0
    assert value(registry, "mutexowner_acquisitions_total", key="alpha") == 1.0
    assert value(registry, "mutexowner_acquisitions_total", key="beta") == 0.0
    assert instrument(a, CollectorRegistry()) is not metrics  # one per registry
    da.stop()
    db.stop()


def test_one_running_owner_per_key_and_registry() -> None:
    registry = CollectorRegistry()
    client = fake_redis("job")
    first, d1 = make(client, identity="first")
    metrics = instrument(first, registry)
    metrics.attach(first)  # the same owner again: nothing happens
    second, d2 = make(client, identity="second", clock=d1.clock)
    with pytest.raises(ValueError, match=r"an owner of key 'job' is already attached"):
        metrics.attach(second)
    d1.stop()
    assert d1.run_until(lambda: first.state == "stopped")
    metrics.attach(second)  # a stopped owner is replaced (a new owner after stop)
    assert metrics.keys == ("job",)
    assert d2.run_until(lambda: second.holding)
    assert value(registry, "mutexowner_acquisitions_total", key="job") == 1.0  # second's
    d2.stop()


def test_detach_removes_gauges_and_keeps_counters() -> None:
    registry = CollectorRegistry()
    owner, driver = make()
    metrics = instrument(owner, registry)
    assert driver.run_until(lambda: owner.holding)
    metrics.detach(owner)
    assert metrics.keys == ()
    assert value(registry, "mutexowner_holding", key="job") is None
    assert value(registry, "mutexowner_acquisitions_total", key="job") == 1.0
    driver.stop()  # no listener any more: the loss is not counted
    assert value(registry, "mutexowner_losses_total", key="job", reason="stopped") == 0.0
    with pytest.raises(ValueError, match="is not attached"):
        metrics.detach(owner)


def test_a_second_metrics_object_in_one_registry_is_refused() -> None:
    registry = CollectorRegistry()
    MutexOwnerMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        MutexOwnerMetrics(registry)


def test_attach_needs_an_owner() -> None:
    with pytest.raises(TypeError, match="owner must be a MutexOwner"):
        MutexOwnerMetrics(CollectorRegistry()).attach("job")  # type: ignore[arg-type]


def test_namespace_prefixes_every_metric() -> None:
    registry = CollectorRegistry()
    owner, driver = make()
    MutexOwnerMetrics(registry, namespace="acme_lease").attach(owner)
    driver.step()
    names = {m.name for m in registry.collect()}
    assert {"acme_lease_holding", "acme_lease_acquisitions", "acme_lease_state"} <= names
    assert not any(name.startswith("mutexowner_") for name in names)
    driver.stop()


def test_prometheus_setting_instruments_owners_built_from_settings() -> None:
    """``"PROMETHEUS": True`` (Django) / ``MUTEXOWNER_PROMETHEUS`` (Flask): the default
    registry reports every owner the integration builds."""
    from prometheus_client import REGISTRY

    from mutexowner.contrib.django.conf import read_settings

    settings = read_settings(
        {"REDIS_URL": fake_redis(), "KEY": "from-settings", "PROMETHEUS": True}
    )
    owner = settings.build_owner()
    try:
        assert REGISTRY.get_sample_value("mutexowner_holding", {"key": "from-settings"}) == 0.0
        assert (
            REGISTRY.get_sample_value(
                "mutexowner_state", {"key": "from-settings", "state": "stopped"}
            )
            == 1.0
        )
    finally:
        instrument(owner).detach(owner)  # the same metrics object: attach is idempotent
    assert REGISTRY.get_sample_value("mutexowner_holding", {"key": "from-settings"}) is None


# -- the fleet as Redis sees it, renewals ------------------------------------------------------


def test_a_standby_reports_the_holder_from_redis_with_an_exact_fencing_token() -> None:
    registry = CollectorRegistry()
    client = seeded_fake_redis("job")
    holder, dh = make(client, identity="web-1:101:aa")
    standby, ds = make(client, identity="web-2:202:bb", clock=dh.clock)
    instrument(standby, registry)  # only the standby is instrumented here
    assert value(registry, "mutexowner_lease_held", key="job") == 0.0
    assert value(registry, "mutexowner_lease_read_ok", key="job") == 1.0
    assert "mutexowner_holder_info{" not in generate_latest(registry).decode()

    assert dh.run_until(lambda: holder.holding)
    ds.step()
    assert standby.state == "acquiring"
    token = holder.fencing_token
    assert token is not None and token > 2**50  # a microsecond timestamp
    labels = {"key": "job", "holder": "web-1:101:aa", "holder_host": "web-1"}
    assert value(registry, "mutexowner_holder_info", **labels, fencing_token=str(token)) == 1.0
    assert value(registry, "mutexowner_lease_held", key="job") == 1.0
    assert value(registry, "mutexowner_holding", key="job") == 0.0  # this process: no
    text = generate_latest(registry).decode()
    assert f'fencing_token="{token}"' in text  # the exact integer, not 1.7e+15

    server = client.connection_pool.connection_kwargs["server"]
    server.connected = False
    assert value(registry, "mutexowner_lease_read_ok", key="job") == 0.0
    assert value(registry, "mutexowner_lease_held", key="job") is None  # unknown: absent
    server.connected = True
    ds.stop()
    dh.stop()


def test_lease_view_can_be_turned_off() -> None:
    registry = CollectorRegistry()
    owner, driver = make()
    MutexOwnerMetrics(registry, lease_view=False).attach(owner)
    assert driver.run_until(lambda: owner.holding)
    text = generate_latest(registry).decode()
    assert "mutexowner_lease_read_ok{" not in text and "mutexowner_holder_info{" not in text
    driver.stop()


def test_last_renewal_time_and_renewal_latency() -> None:
    registry = CollectorRegistry()
    owner, driver = make()
    metrics = instrument(owner, registry, lease_view=False)
    assert value(registry, "mutexowner_last_renewal_timestamp_seconds", key="job") is None
    before = time.time()
    assert driver.run_until(lambda: owner.holding)
    confirmed = value(registry, "mutexowner_last_renewal_timestamp_seconds", key="job")
    assert confirmed is not None and before <= confirmed <= time.time()
    assert value(registry, "mutexowner_renewal_latency_seconds_count", key="job") == 0.0

    # The owner reports each renewal's round trip: make the next reply take 3 ms.
    real_renew = owner._lease.renew

    def slow_renew(token: str, fence: int) -> Any:
        result = real_renew(token, fence)
        driver.clock.advance(0.003)
        return result

    owner._lease.renew = slow_renew  # type: ignore[method-assign]
    assert driver.run_until(
        lambda: value(registry, "mutexowner_renewal_latency_seconds_count", key="job") == 1.0
    )
    owner._lease.renew = real_renew  # type: ignore[method-assign]
    base = dict(key="job", identity="A", state="holding", time=0.0)
    for latency in (0.0004, 0.2):
        metrics._count(Event(kind="renewed", latency=latency, **base))  # type: ignore[arg-type]
    metrics._count(Event(kind="renewed", **base))  # type: ignore[arg-type]  # no latency: not observed
    assert value(registry, "mutexowner_renewal_latency_seconds_count", key="job") == 3.0
    assert (
        value(registry, "mutexowner_renewal_latency_seconds_bucket", key="job", le="0.005") == 2.0
    )
    assert value(registry, "mutexowner_renewal_latency_seconds_sum", key="job") == pytest.approx(
        0.2034
    )
    driver.stop()
