"""``LeaseTiming``: the lease's numbers, their defaults, and the one timing rule."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mutexowner import MutexOwner, Supervisor
from mutexowner.testing import fake_redis
from mutexowner.timing import LeaseTiming, TimingError, TimingNames, drift_for


def test_defaults_derive_from_ttl() -> None:
    timing = LeaseTiming.of(9.0)
    assert timing.renew_interval == pytest.approx(3.0)
    assert timing.call_timeout == pytest.approx(1.0)  # a third of the renew interval, <= 1 s
    assert timing.drift == pytest.approx(9.0 * 0.01 + 0.002) == drift_for(9.0)
    assert timing.deadline(100.0) == pytest.approx(100.0 + 9.0 - timing.drift)
    assert timing.slack == pytest.approx(9.0 - timing.drift - 3.0)
    assert LeaseTiming.of(1.5).call_timeout == pytest.approx(1.5 / 9)


def test_it_is_immutable() -> None:
    timing = LeaseTiming.of()
    with pytest.raises(dataclasses.FrozenInstanceError):
        timing.ttl = 5.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "parameter", "message"),
    [
        ({"ttl": 0}, TimingError, "ttl", "ttl must be a finite number > 0 (seconds), got 0"),
        ({"ttl": math.nan}, ValueError, None, "ttl"),
        ({"ttl": "10"}, TypeError, None, "ttl"),
        (
            {"renew_interval": 10},
            TimingError,
            "renew_interval",
            "renew_interval must be > 0 and < ttl (10), got 10",
        ),
        (
            {"call_timeout": 4},
            TimingError,
            "call_timeout",
            "call_timeout must be > 0 and <= renew_interval",
        ),
        ({"shutdown_budget": -1}, TimingError, "shutdown", "must be >= 0"),
        (
            {"renew_interval": 9.95},
            TimingError,
            "shutdown",
            "renew_interval (9.95) + supervisor shutdown_timeout (0) must be < ttl - drift (9.898)",
        ),
        (
            {"shutdown_budget": 7},
            TimingError,
            "shutdown",
            "supervisor shutdown_timeout (7) must be < ttl - drift (9.898)",
        ),
    ],
)
def test_bad_numbers_name_the_parameter(
    kwargs: dict[str, object], error: type, parameter: object, message: str
) -> None:
    with pytest.raises(error) as info:
        LeaseTiming.of(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
    if parameter is not None:
        assert isinstance(info.value, TimingError) and info.value.parameter == parameter


def test_errors_use_the_callers_names() -> None:
    names = TimingNames(ttl="--ttl", renew_interval="renew every", shutdown="--grace")
    with pytest.raises(
        TimingError,
        match=r"renew every \(0.666667\) \+ --grace \(2\) must be < --ttl - drift \(1.978\)",
    ):
        LeaseTiming.of(2.0, shutdown_budget=2.0, names=names)


def test_the_owner_takes_its_numbers_from_one_lease_timing() -> None:
    sup = Supervisor(shutdown_timeout=2.0)
    sup.add(lambda ctx: None, name="w")
    owner = MutexOwner(fake_redis(), "job", ttl=12.0, supervisor=sup)
    assert owner.timing == LeaseTiming.of(12.0, shutdown_budget=2.0)
    assert (owner.ttl, owner.renew_interval, owner.call_timeout, owner.drift) == (
        owner.timing.ttl,
        owner.timing.renew_interval,
        owner.timing.call_timeout,
        owner.timing.drift,
    )
    with pytest.raises(ValueError, match="supervisor shutdown_timeout"):
        big = Supervisor(shutdown_timeout=9.0)
        big.add(lambda ctx: None, name="w")
        MutexOwner(fake_redis(), "job", ttl=12.0, supervisor=big)
