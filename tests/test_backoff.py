"""BackoffPolicy: sequence, cap, jitter bounds, reproducibility, validation."""

from __future__ import annotations

import dataclasses
import math
import random
from itertools import islice
from typing import Any

import backoff
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mutexowner import BackoffPolicy
from mutexowner.backoff import JITTER_MODES

SEED = 20240611


def rng(seed: int = SEED) -> random.Random:
    return random.Random(seed)


# -- the un-jittered sequence ------------------------------------------------------------


def test_elixir_formula_sequence() -> None:
    """The Elixir design's min(5 s * 2^n, 1 h), counting the first retry as n = 1."""
    policy = BackoffPolicy(initial=10, factor=2, max_delay=3600, jitter="none")
    expected = [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600, 3600]
    assert [policy.delay(attempt) for attempt in range(1, 13)] == expected
    assert list(islice(policy.delays(), 12)) == expected
    assert policy.delay(1000) == 3600
    assert policy.delay(10**6) == 3600


def test_defaults() -> None:
    policy = BackoffPolicy()
    assert (policy.initial, policy.factor, policy.max_delay, policy.jitter) == (
        0.5,
        2.0,
        30.0,
        "full",
    )
    assert [policy.ceiling(a) for a in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_first_retry_is_initial_before_jitter() -> None:
    assert BackoffPolicy(initial=0.25, jitter="none").delay(1) == 0.25
    assert BackoffPolicy(initial=0.25).ceiling(1) == 0.25


def test_cap_reached_exactly_when_power_equals_cap() -> None:
    policy = BackoffPolicy(initial=1, factor=2, max_delay=8, jitter="none")
    assert [policy.delay(a) for a in range(1, 7)] == [1, 2, 4, 8, 8, 8]


def test_factor_one_is_constant() -> None:
    policy = BackoffPolicy(initial=3, factor=1, max_delay=100, jitter="none")
    assert [policy.delay(a) for a in (1, 2, 50, 10**6)] == [3, 3, 3, 3]
    assert list(islice(policy.delays(), 5)) == [3, 3, 3, 3, 3]


def test_initial_equal_to_cap_is_constant() -> None:
    policy = BackoffPolicy(initial=5, factor=3, max_delay=5, jitter="none")
    assert [policy.delay(a) for a in (1, 2, 10**6)] == [5, 5, 5]
    assert list(islice(policy.delays(), 3)) == [5, 5, 5]


def test_huge_attempt_does_not_overflow() -> None:
    for policy in (
        BackoffPolicy(),
        BackoffPolicy(initial=1e-300, factor=1e300, max_delay=1e308, jitter="none"),
        BackoffPolicy(initial=1.0, factor=1.0000001, max_delay=1e300, jitter="equal"),
    ):
        for attempt in (10**6, 10**12, 2**80):
            value = policy.delay(attempt, rng())
            assert math.isfinite(value)
            assert 0 <= value <= policy.max_delay


def test_generator_survives_overflow_before_cap() -> None:
    # factor**n leaves the float range before initial * factor**n reaches the cap.
    policy = BackoffPolicy(initial=5e-324, factor=1.7e308, max_delay=1.7e308, jitter="none")
    values = list(islice(policy.delays(), 6))
    assert values == [policy.delay(a) for a in range(1, 7)]
    assert values[-3:] == [1.7e308] * 3


def test_values_are_floats() -> None:
    policy = BackoffPolicy(initial=10, factor=2, max_delay=3600, jitter="none")
    assert all(type(v) is float for v in islice(policy.delays(), 12))
    assert type(policy.delay(3)) is float
    assert policy == BackoffPolicy(initial=10.0, factor=2.0, max_delay=3600.0, jitter="none")


def test_uses_backoff_expo_sequence() -> None:
    """The un-jittered values are exactly backoff.expo's (after its priming yield)."""
    policy = BackoffPolicy(initial=0.3, factor=1.7, max_delay=50, jitter="none")
    gen = backoff.expo(base=1.7, factor=0.3, max_value=50)
    next(gen)
    assert list(islice(policy.delays(), 30)) == list(islice(gen, 30))


def test_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    def forbidden(_seconds: float) -> None:
        raise AssertionError("BackoffPolicy must not sleep")

    monkeypatch.setattr(time, "sleep", forbidden)
    policy = BackoffPolicy(initial=100, max_delay=1000)
    policy.delay(5)
    list(islice(policy.delays(), 10))


# -- jitter ------------------------------------------------------------------------------


def test_full_jitter_bounds() -> None:
    policy = BackoffPolicy(initial=1, factor=2, max_delay=20, jitter="full")
    r = rng()
    for attempt in range(1, 12):
        ceiling = min(20.0, 2.0 ** (attempt - 1))
        samples = [policy.delay(attempt, r) for _ in range(300)]
        assert all(0 <= s <= ceiling for s in samples)
        # Full jitter spreads over the whole range, not just the top half.
        assert min(samples) < ceiling * 0.1
        assert max(samples) > ceiling * 0.9


def test_equal_jitter_bounds() -> None:
    policy = BackoffPolicy(initial=1, factor=2, max_delay=20, jitter="equal")
    r = rng()
    for attempt in range(1, 12):
        ceiling = min(20.0, 2.0 ** (attempt - 1))
        samples = [policy.delay(attempt, r) for _ in range(300)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert min(samples) < ceiling * 0.55
        assert max(samples) > ceiling * 0.95


def test_no_jitter_ignores_rng() -> None:
    policy = BackoffPolicy(initial=1, jitter="none")
    r = rng()
    state = r.getstate()
    assert policy.delay(4, r) == 8
    assert r.getstate() == state


def test_same_seed_same_sequence() -> None:
    for jitter in ("full", "equal"):
        policy = BackoffPolicy(initial=0.5, factor=2, max_delay=30, jitter=jitter)
        first = list(islice(policy.delays(rng(7)), 50))
        second = list(islice(policy.delays(rng(7)), 50))
        other = list(islice(policy.delays(rng(8)), 50))
        assert first == second
        assert first != other
        r1, r2 = rng(7), rng(7)
        assert [policy.delay(a, r1) for a in range(1, 20)] == [
            policy.delay(a, r2) for a in range(1, 20)
        ]


@pytest.mark.parametrize("jitter", JITTER_MODES)
def test_delays_agree_with_delay(jitter: str) -> None:
    """delays(rng) and delay(i, rng2) with the same seed give the same numbers."""
    policy = BackoffPolicy(initial=0.2, factor=3, max_delay=1000, jitter=jitter)  # type: ignore[arg-type]
    n = 40
    r2 = rng()
    assert list(islice(policy.delays(rng()), n)) == [policy.delay(i, r2) for i in range(1, n + 1)]


def test_default_rng_is_used_when_none_given() -> None:
    policy = BackoffPolicy(initial=1, max_delay=1)
    samples = {policy.delay(1) for _ in range(50)}
    assert len(samples) > 1
    assert all(0 <= s <= 1 for s in samples)
    assert all(0 <= s <= 1 for s in islice(policy.delays(), 50))


# -- properties for any valid policy ---------------------------------------------------

positive = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)


@st.composite
def policies(draw: st.DrawFn) -> BackoffPolicy:
    initial = draw(positive)
    factor = draw(st.floats(min_value=1, max_value=1e6) | st.floats(min_value=1, max_value=1e308))
    ratio = draw(st.floats(min_value=1, max_value=1e12))
    max_delay = initial * ratio
    if not math.isfinite(max_delay) or max_delay < initial:
        max_delay = initial
    jitter = draw(st.sampled_from(JITTER_MODES))
    return BackoffPolicy(initial, factor, max_delay, jitter)  # type: ignore[arg-type]


attempts = st.integers(min_value=1, max_value=60) | st.integers(min_value=1, max_value=10**9)


@given(policy=policies(), attempt=attempts, seed=st.integers(0, 2**32))
def test_property_bounds_and_cap(policy: BackoffPolicy, attempt: int, seed: int) -> None:
    ceiling = policy.ceiling(attempt)
    assert 0 < ceiling <= policy.max_delay
    assert ceiling == min(policy.max_delay, _exact_ceiling(policy, attempt))
    value = policy.delay(attempt, random.Random(seed))
    assert math.isfinite(value)
    if policy.jitter == "none":
        assert value == ceiling
    elif policy.jitter == "full":
        assert 0 <= value <= ceiling
    else:
        assert ceiling / 2 <= value <= ceiling


@given(policy=policies(), seed=st.integers(0, 2**32))
def test_property_sequence_monotone_capped_and_consistent(policy: BackoffPolicy, seed: int) -> None:
    ceilings = [policy.ceiling(a) for a in range(1, 40)]
    assert ceilings == sorted(ceilings)
    assert all(c <= policy.max_delay for c in ceilings)
    r2 = random.Random(seed)
    assert list(islice(policy.delays(random.Random(seed)), 39)) == [
        policy.delay(a, r2) for a in range(1, 40)
    ]


def _exact_ceiling(policy: BackoffPolicy, attempt: int) -> float:
    """initial * factor**(attempt-1) without rounding surprises for huge exponents."""
    if policy.factor == 1:
        return policy.initial
    log_value = math.log(policy.initial) + (attempt - 1) * math.log(policy.factor)
    if log_value > math.log(policy.max_delay) + 1:
        return math.inf
    try:
        return policy.initial * policy.factor ** (attempt - 1)
    except OverflowError:
        return math.inf


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": 0}, "initial must be a finite number > 0, got 0"),
        ({"initial": -1}, "initial must be a finite number > 0, got -1"),
        ({"initial": math.nan}, "initial must be a finite number > 0, got nan"),
        ({"initial": math.inf}, "initial must be a finite number > 0, got inf"),
        ({"initial": -math.inf}, "initial must be a finite number > 0, got -inf"),
        ({"factor": 0.5}, "factor must be a finite number >= 1, got 0.5"),
        ({"factor": 0}, "factor must be a finite number >= 1, got 0"),
        ({"factor": -2}, "factor must be a finite number >= 1, got -2"),
        ({"factor": math.nan}, "factor must be a finite number >= 1, got nan"),
        ({"factor": math.inf}, "factor must be a finite number >= 1, got inf"),
        ({"max_delay": 0.1}, "max_delay must be a finite number >= initial (0.5), got 0.1"),
        ({"max_delay": -1}, "max_delay must be a finite number >= initial (0.5), got -1"),
        ({"max_delay": math.nan}, "max_delay must be a finite number >= initial (0.5), got nan"),
        ({"max_delay": math.inf}, "max_delay must be a finite number >= initial (0.5), got inf"),
        ({"initial": 10, "max_delay": 9.99}, "max_delay must be a finite number >= initial"),
        ({"jitter": "fullx"}, "jitter must be one of 'full', 'equal', 'none', got 'fullx'"),
        ({"jitter": "FULL"}, "jitter must be one of 'full', 'equal', 'none', got 'FULL'"),
        ({"jitter": None}, "jitter must be one of 'full', 'equal', 'none', got None"),
        ({"jitter": True}, "jitter must be one of 'full', 'equal', 'none', got True"),
    ],
)
def test_bad_values_raise_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        BackoffPolicy(**kwargs)
    assert message in str(info.value)


def test_huge_int_is_not_finite() -> None:
    with pytest.raises(ValueError, match="max_delay must be a finite number"):
        BackoffPolicy(max_delay=10**400)


@pytest.mark.parametrize("name", ["initial", "factor", "max_delay"])
@pytest.mark.parametrize("value", ["1", None, True, False, [1], 1j])
def test_non_numbers_raise_type_error(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{name} must be a number"):
        BackoffPolicy(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("attempt", [0, -1, -(10**6)])
def test_attempt_below_one_raises_value_error(attempt: int) -> None:
    policy = BackoffPolicy()
    with pytest.raises(ValueError, match="attempt must be an int >= 1"):
        policy.delay(attempt)
    with pytest.raises(ValueError, match="attempt must be an int >= 1"):
        policy.ceiling(attempt)


@pytest.mark.parametrize("attempt", [1.0, 2.5, "1", None, True])
def test_attempt_non_int_raises_type_error(attempt: object) -> None:
    policy = BackoffPolicy()
    with pytest.raises(TypeError, match="attempt must be an int >= 1"):
        policy.delay(attempt)  # type: ignore[arg-type]


def test_frozen_and_hashable() -> None:
    policy = BackoffPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.initial = 1.0  # type: ignore[misc]
    assert hash(policy) == hash(BackoffPolicy(0.5, 2, 30, "full"))
