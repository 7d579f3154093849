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

Gauges describe this process only; in a prometheus_client multiprocess setup (gunicorn with
``PROMETHEUS_MULTIPROC_DIR``) expose them from the process that runs the owner.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mutexowner import machine
from mutexowner.errors import MutexOwnerError
from mutexowner.events import Event
from mutexowner.owner import MutexOwner

__all__ = ["LOSS_REASONS", "MutexOwnerMetrics", "instrument"]

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

    def __call__(self, event: Event) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics._count(event)


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
        }

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for key, owner in self._metrics._snapshot():
            try:
                status = owner.status()
            except MutexOwnerError:  # an owner inherited through fork(): not ours to report
                continue
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
        self, registry: Optional[CollectorRegistry] = None, *, namespace: str = "mutexowner"
    ) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self.namespace = namespace
        self._lock = threading.Lock()
        self._attached: dict[str, _Attached] = {}
        reg = self.registry
        self.acquisitions = Counter(
            f"{namespace}_acquisitions", "Holding periods begun", ["key"], registry=reg
        )
        self.losses = Counter(
            f"{namespace}_losses",
            "Holding periods ended, by reason",
            ["key", "reason"],
            registry=reg,
        )
        self.worker_restarts = Counter(
            f"{namespace}_worker_restarts", "one_for_all worker restarts", ["key"], registry=reg
        )
        self.workers_stuck = Counter(
            f"{namespace}_workers_stuck",
            "Times workers ignored stopping past shutdown_timeout",
            ["key"],
            registry=reg,
        )
        self.redis_errors = Counter(
            f"{namespace}_redis_errors",
            "Failed lease calls, by error kind",
            ["key", "kind"],
            registry=reg,
        )
        self._gauges = _Gauges(self)
        reg.register(self._gauges)

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
        with contextlib.suppress(ValueError):  # removed behind our back
            attached.owner.remove_listener(attached)

    def _snapshot(self) -> Iterator[tuple[str, MutexOwner]]:
        with self._lock:
            items = [(key, a.owner) for key, a in self._attached.items()]
        return iter(items)

    def _count(self, event: Event) -> None:
        key = event.key
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
    owner: MutexOwner, registry: Optional[CollectorRegistry] = None
) -> MutexOwnerMetrics:
    """Attach ``owner`` to the (one) ``MutexOwnerMetrics`` of ``registry`` (default: the
    default ``REGISTRY``), creating it on first use; returns it."""
    reg = registry if registry is not None else REGISTRY
    with _BY_REGISTRY_LOCK:
        metrics = _BY_REGISTRY.get(reg)
        if metrics is None:
            metrics = MutexOwnerMetrics(reg)
            _BY_REGISTRY[reg] = metrics
    metrics.attach(owner)
    return metrics
