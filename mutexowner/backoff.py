"""Retry delays: exponential, capped and jittered, reproducible from a seed.

`BackoffPolicy` only computes numbers; it never sleeps and does no I/O, so the
owner's state machine can be stepped in tests without real time passing. The
un-jittered sequence comes from the ``backoff`` package's ``expo`` wait
generator (``initial * factor**n``, then ``max_delay`` forever); jitter follows
the definitions in the AWS Architecture Blog post "Exponential Backoff and
Jitter" and draws from an injected ``random.Random`` so that the same seed
always gives the same delays.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Optional

import backoff as _backoff_pkg

from mutexowner._validate import finite_number

__all__ = ["JITTER_MODES", "BackoffPolicy", "Jitter"]

Jitter = Literal["full", "equal", "none"]
"""Jitter modes: ``full`` = uniform(0, v); ``equal`` = v/2 + uniform(0, v/2); ``none`` = v."""

JITTER_MODES: tuple[str, ...] = ("full", "equal", "none")

# Module-private generator used when no rng is injected. It is reseeded in a
# forked child so that forked processes do not retry in lock-step (which is
# exactly the thundering herd that jitter exists to prevent).
_RNG = random.Random()
if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX only
    os.register_at_fork(after_in_child=_RNG.seed)


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait before each retry: ``min(max_delay, initial * factor**(attempt-1))``,
    then jittered.

    All three numbers are in seconds (``factor`` is unitless) and are stored as
    floats. Invalid values raise ``TypeError`` (not a number; ``bool`` is
    rejected) or ``ValueError`` naming the parameter and its allowed range:
    ``initial > 0``, ``factor >= 1``, ``max_delay >= initial``, all finite.

    Example: the Elixir design's ``min(5 s * 2**n, 1 h)`` (counting the first
    retry as n = 1) is ``BackoffPolicy(initial=10, factor=2, max_delay=3600,
    jitter="none")``: 10, 20, 40, ..., 2560, 3600, 3600, ...
    """

    initial: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        initial = finite_number("initial", self.initial, "> 0")
        if not initial > 0:
            raise ValueError(f"initial must be a finite number > 0, got {self.initial!r}")
        factor = finite_number("factor", self.factor, ">= 1")
        if not factor >= 1:
            raise ValueError(f"factor must be a finite number >= 1, got {self.factor!r}")
        max_delay = finite_number("max_delay", self.max_delay, f">= initial ({initial!r})")
        if not max_delay >= initial:
            raise ValueError(
                f"max_delay must be a finite number >= initial ({initial!r}), "
                f"got {self.max_delay!r}"
            )
        jitter: object = self.jitter
        if not isinstance(jitter, str) or jitter not in JITTER_MODES:
            allowed = ", ".join(repr(mode) for mode in JITTER_MODES)
            raise ValueError(f"jitter must be one of {allowed}, got {jitter!r}")
        # Normalise to float so delays are always floats and equal policies compare equal.
        object.__setattr__(self, "initial", initial)
        object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "max_delay", max_delay)

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before retry ``attempt`` (1-based), which is also the
        upper bound of any jittered delay: ``min(max_delay, initial * factor**(attempt-1))``.

        Computed in closed form (no loop, no overflow) so that ``attempt=10**6``
        is as cheap as ``attempt=1``; it agrees exactly with the ``backoff.expo``
        generator that `delays` uses.
        """
        n = _check_attempt(attempt) - 1
        if n == 0 or self.factor == 1.0:
            return self.initial if self.initial < self.max_delay else self.max_delay
        # Clearly past the cap: skip the power, which could overflow or be slow.
        if n * math.log(self.factor) > math.log(self.max_delay) - math.log(self.initial) + 1.0:
            return self.max_delay
        try:
            value = self.initial * self.factor**n
        except OverflowError:
            return self.max_delay
        # Same comparison as backoff.expo: yield the value while it is below the cap.
        return value if value < self.max_delay else self.max_delay

    def delay(self, attempt: int, rng: Optional[random.Random] = None) -> float:
        """The wait in seconds before retry number ``attempt`` (1-based: the first
        retry after the first failure is ``attempt=1``, whose ceiling is ``initial``).

        ``rng`` supplies the jitter (``None`` uses a module-private generator);
        ``jitter="none"`` draws nothing from it. Never sleeps.
        """
        return self._jittered(self.ceiling(attempt), rng)

    def delays(self, rng: Optional[random.Random] = None) -> Iterator[float]:
        """The infinite sequence ``delay(1), delay(2), ...``, drawing jitter from ``rng``
        in order, so a generator seeded like the one passed to `delay` gives the same values.
        """
        for ceiling in self._ceilings():
            yield self._jittered(ceiling, rng)

    def _ceilings(self) -> Iterator[float]:
        """Un-jittered delays from ``backoff.expo``, then ``max_delay`` forever."""
        wait_gen = _backoff_pkg.expo(
            base=self.factor, factor=self.initial, max_value=self.max_delay
        )
        first = next(wait_gen)  # backoff >= 2 yields None first (it is primed with send()).
        if first is not None:  # pragma: no cover - backoff < 2 behaviour
            yield float(first)
        while True:
            try:
                value = next(wait_gen)
            except OverflowError:
                # factor**n left the float range before reaching the cap, so the
                # true value is above the cap: the cap holds forever from here.
                break
            yield float(value)
        yield from itertools.repeat(self.max_delay)

    def _jittered(self, ceiling: float, rng: Optional[random.Random]) -> float:
        """Apply this policy's jitter to ``ceiling``."""
        if self.jitter == "none":
            return ceiling
        source = _RNG if rng is None else rng
        if self.jitter == "full":
            return source.uniform(0.0, ceiling)
        half = ceiling / 2.0
        return half + source.uniform(0.0, half)


def _check_attempt(attempt: object) -> int:
    """Return ``attempt`` if it is an int >= 1, else raise TypeError/ValueError."""
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise TypeError(f"attempt must be an int >= 1, got {type(attempt).__name__} {attempt!r}")
    if attempt < 1:
        raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
    return attempt
