"""Prometheus metrics for owners (``pip install 'mutexowner[prometheus]'``).

::

    from mutexowner.contrib.prometheus import instrument

    instrument(owner)  # default registry; instrument(owner, registry) for another one

Counters are updated by an event listener (``owner.add_listener``); gauges are read from
``owner.status()`` at scrape time, so they are never stale. Every series is labelled by the
lease ``key``; any number of owners with different keys can share one registry.

| metric | type | labels |
|---|---|---|
| ``mutexowner_holding`` | gauge (1 while this process holds the lease) | key |
| ``mutexowner_lease_remaining_seconds`` | gauge (to the local deadline; 0: no lease) | key |
| ``mutexowner_fencing_token`` | gauge (0 when not holding) | key |
| ``mutexowner_consecutive_errors`` | gauge (Redis errors in a row) | key |
| ``mutexowner_state`` | gauge (1 for the current state) | key, state |
| ``mutexowner_acquisitions_total`` | counter (holding periods begun) | key |
| ``mutexowner_losses_total`` | counter (holding periods ended) | key, reason |
| ``mutexowner_worker_restarts_total`` | counter (one_for_all restarts) | key |
| ``mutexowner_workers_stuck_total`` | counter (workers that ignored stopping) | key |
| ``mutexowner_redis_errors_total`` | counter (failed lease calls) | key, kind |
| ``mutexowner_last_renewal_timestamp_seconds`` | gauge (Unix time, last confirmation) | key |
| ``mutexowner_renewal_latency_seconds`` | histogram (round trip of confirmed renewals) | key |
| ``mutexowner_lease_held`` | gauge (Redis: 1 while any owner holds the lease) | key |
| ``mutexowner_holder_info`` | gauge, 1 (Redis: the holder) | key, holder, holder_host, |
| | | fencing_token |
| ``mutexowner_lease_read_ok`` | gauge (1 when the scrape could read the lease from Redis) | key |

The ``mutexowner_holder_info``, ``mutexowner_lease_held`` and ``mutexowner_lease_read_ok``
series describe the *fleet*: at scrape time they read the lease as Redis sees it (one
read-only round trip per key, at most ``lease_timeout`` seconds; ``lease_view=False``
turns them off). ``holder_info`` is present only while some owner holds the lease; its
``fencing_token`` label is the exact integer (the ``mutexowner_fencing_token`` gauge is a
float: exact up to 2**53, which fencing tokens of microsecond timestamps reach in 2255).

The other gauges describe this process only; in a prometheus_client multiprocess setup
(gunicorn with ``PROMETHEUS_MULTIPROC_DIR``) expose them from the process that runs the
owner.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mutexowner import machine
from mutexowner.errors import MutexOwnerError
from mutexowner.events import Event
from mutexowner.inspection import LeaseReader
from mutexowner.owner import MutexOwner

__all__ = ["LATENCY_BUCKETS", "LOSS_REASONS", "MutexOwnerMetrics", "instrument"]

#: Buckets of ``mutexowner_renewal_latency_seconds``: a loopback renewal takes well under
#: 1 ms, a lease call times out after ``call_timeout`` (at most 1 s by default).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: ``reason`` label values that exist (at 0) as soon as an owner is attached.
LOSS_REASONS = ("taken", "expired", "stopped", "workers_failed")

_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, MutexOwnerMetrics] = (
    weakref.WeakKeyDictionary()
)
_BY_REGISTRY_LOCK = threading.Lock()


class _Attached:
    """One owner and the listener that feeds its counters."""

    def __init__(self, owner: MutexOwner, metrics: MutexOwnerMetrics) -> None:
        self.owner = owner
        self.key = owner.key
        self._metrics = weakref.ref(metrics)
        self.reader: Optional[LeaseReader] = (
            _reader_for(owner, metrics.lease_timeout) if metrics.lease_view else None
        )

    def __call__(self, event: Event) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics._count(event)


def _reader_for(owner: MutexOwner, timeout: float) -> LeaseReader:
    """A ``LeaseReader`` on the owner's Redis server and key prefix."""
    return LeaseReader(owner.redis_client, owner.key, prefix=owner.prefix, timeout=timeout)


class _Gauges(Collector):
    """Reads every attached owner's ``status()`` at scrape time."""

    def __init__(self, metrics: MutexOwnerMetrics) -> None:
        self._metrics = metrics

    def _families(self) -> dict[str, GaugeMetricFamily]:
        ns = self._metrics.namespace
        return {
            "holding": GaugeMetricFamily(
                f"{ns}_holding",
                "1 while this process holds the lease and may run workers",
                labels=["key"],
            ),
            "lease_remaining": GaugeMetricFamily(
                f"{ns}_lease_remaining_seconds",
                "Seconds to the lease's local deadline (0 when not holding the key)",
                labels=["key"],
            ),
            "fencing_token": GaugeMetricFamily(
                f"{ns}_fencing_token",
                "Fencing token of the current holding period (0: none)",
                labels=["key"],
            ),
            "errors": GaugeMetricFamily(
                f"{ns}_consecutive_errors",
                "Redis errors in a row (0 after a success)",
                labels=["key"],
            ),
            "state": GaugeMetricFamily(
                f"{ns}_state", "1 for the owner's current state", labels=["key", "state"]
            ),
            "lease_held": GaugeMetricFamily(
                f"{ns}_lease_held",
                "Redis: 1 while any owner of the fleet holds the lease",
                labels=["key"],
            ),
            "holder_info": GaugeMetricFamily(
                f"{ns}_holder_info",
                "Redis: the owner holding the lease (present only while one does)",
                labels=["key", "holder", "holder_host", "fencing_token"],
            ),
            "read_ok": GaugeMetricFamily(
                f"{ns}_lease_read_ok",
                "1 when this scrape could read the lease from Redis",
                labels=["key"],
            ),
        }

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for key, owner, reader in self._metrics._snapshot():
            try:
                status = owner.status()
            except MutexOwnerError:  # an owner inherited through fork(): not ours to report
                continue
            if reader is not None:
                view = reader.read()
                families["read_ok"].add_metric([key], 0.0 if view.error else 1.0)
                if view.error is None:
                    families["lease_held"].add_metric([key], 1.0 if view.held else 0.0)
                if view.held:
                    token = "" if view.fencing_token is None else str(view.fencing_token)
                    families["holder_info"].add_metric(
                        [key, str(view.holder), view.holder_host or "", token], 1.0
                    )
            families["holding"].add_metric([key], 1.0 if status.holding else 0.0)
            families["lease_remaining"].add_metric([key], status.lease_remaining or 0.0)
            families["fencing_token"].add_metric([key], float(status.fencing_token or 0))
            families["errors"].add_metric([key], float(status.consecutive_errors))
            for state in machine.STATES:
                families["state"].add_metric([key, state], 1.0 if status.state == state else 0.0)
        return list(families.values())


class MutexOwnerMetrics:
    """The metrics of any number of owners (one per key) in one registry.

    ``registry=None`` means prometheus_client's default ``REGISTRY``. Create one per registry
    (``instrument()`` does that for you); a second one in the same registry fails with
    prometheus_client's "Duplicated timeseries" error.
    """

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        *,
        namespace: str = "mutexowner",
        lease_view: bool = True,
        lease_timeout: float = 0.5,
    ) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.namespace = namespace
        #: Read the lease from Redis at scrape time (``holder_info``, ``lease_held``).
        self.lease_view = lease_view
        #: Socket timeout of that read, seconds.
        self.lease_timeout = lease_timeout
        self._lock = threading.Lock()
        self._attached: dict[str, _Attached] = {}
        self.acquisitions = self._counter("acquisitions", "Holding periods begun")
        self.losses = self._counter("losses", "Holding periods ended, by reason", "reason")
        self.worker_restarts = self._counter("worker_restarts", "one_for_all worker restarts")
        self.workers_stuck = self._counter(
            "workers_stuck", "Times workers ignored stopping past shutdown_timeout"
        )
        self.redis_errors = self._counter(
            "redis_errors", "Failed lease calls, by error kind", "kind"
        )
        self.last_renewal = Gauge(
            f"{namespace}_last_renewal_timestamp_seconds",
            "Unix time of the last confirmed acquisition or renewal of the lease",
            ["key"],
            registry=self.registry,
        )
        self.renewal_latency = Histogram(
            f"{namespace}_renewal_latency_seconds",
            "Round trip of confirmed renewals, seconds",
            ["key"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._gauges = _Gauges(self)
        self.registry.register(self._gauges)

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        """A counter ``<namespace>_<name>`` in the registry, labelled by key and ``labels``."""
        return Counter(
            f"{self.namespace}_{name}", documentation, ["key", *labels], registry=self.registry
        )

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys of the attached owners."""
        with self._lock:
            return tuple(self._attached)

    def attach(self, owner: MutexOwner) -> None:
        """Report ``owner`` (labelled by its key). Idempotent for the same owner.

        An owner of the same key that was stopped (or inherited through fork) is replaced;
        one that still runs makes this fail with ValueError: one key, one owner per registry.
        """
        if not isinstance(owner, MutexOwner):
            raise TypeError(f"owner must be a MutexOwner, got {type(owner).__name__}")
        with self._lock:
            current = self._attached.get(owner.key)
            if current is not None and current.owner is owner:
                return
            if current is not None:
                if current.owner.state != machine.STOPPED:
                    raise ValueError(
                        f"an owner of key {owner.key!r} is already attached to these metrics "
                        f"({current.owner.identity}); detach it or use another registry"
                    )
                self._remove(current)
            attached = _Attached(owner, self)
            self._attached[owner.key] = attached
        key = owner.key
        self.acquisitions.labels(key)
        self.worker_restarts.labels(key)
        self.workers_stuck.labels(key)
        self.renewal_latency.labels(key)
        for reason in LOSS_REASONS:
            self.losses.labels(key, reason)
        owner.add_listener(attached)

    def detach(self, owner: MutexOwner) -> None:
        """Stop reporting ``owner``: its gauges disappear, its counters keep their values."""
        with self._lock:
            current = self._attached.get(owner.key)
            if current is None or current.owner is not owner:
                raise ValueError(f"owner {owner!r} is not attached to these metrics")
            self._remove(current)

    def _remove(self, attached: _Attached) -> None:
        del self._attached[attached.key]
        if attached.reader is not None:
            attached.reader.close()
        with contextlib.suppress(ValueError):  # removed behind our back
            attached.owner.remove_listener(attached)

    def _snapshot(self) -> Iterator[tuple[str, MutexOwner, Optional[LeaseReader]]]:
        with self._lock:
            items = [(key, a.owner, a.reader) for key, a in self._attached.items()]
        return iter(items)

    def _count(self, event: Event) -> None:
        key = event.key
        if event.kind in ("acquired", "renewed"):
            self.last_renewal.labels(key).set(time.time())
            latency = getattr(event, "latency", None)  # the renewal's round trip, if reported
            if event.kind == "renewed" and isinstance(latency, (int, float)) and latency >= 0:
                self.renewal_latency.labels(key).observe(float(latency))
        if event.kind == "acquired":
            self.acquisitions.labels(key).inc()
        elif event.kind == "lost":
            self.losses.labels(key, event.reason or "unknown").inc()
        elif event.kind == "workers_restarted":
            self.worker_restarts.labels(key).inc()
        elif event.kind == "workers_stuck":
            self.workers_stuck.labels(key).inc()
        elif event.kind == "error":
            self.redis_errors.labels(key, event.error_kind or "unknown").inc()


def instrument(
    owner: MutexOwner, registry: Optional[CollectorRegistry] = None, *, lease_view: bool = True
) -> MutexOwnerMetrics:
    """Attach ``owner`` to the (one) ``MutexOwnerMetrics`` of ``registry`` (default: the
    default ``REGISTRY``), creating it on first use; returns it. ``lease_view`` applies
    when this call creates the metrics (see ``MutexOwnerMetrics``)."""
    reg = registry if registry is not None else REGISTRY
    with _BY_REGISTRY_LOCK:
        metrics = _BY_REGISTRY.get(reg)
        if metrics is None:
            metrics = MutexOwnerMetrics(reg, lease_view=lease_view)
            _BY_REGISTRY[reg] = metrics
    metrics.attach(owner)
    return metrics
