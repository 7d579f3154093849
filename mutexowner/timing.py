"""``LeaseTiming``: the lease's numbers and the one rule that ties them, in one place.

Every entry point (``MutexOwner``, the Django/Flask settings, ``mutexowner run``) builds a
``LeaseTiming``; nothing else derives the renew interval, the call timeout or the drift, and
the timing rule and its error message exist only here. The arithmetic is docs/safety.md's
points 2 and 3: a lease confirmed by a reply to a request sent at ``t_sent`` is trusted
until ``t_sent + ttl - drift``; workers are told to stop ``shutdown_budget`` before that,
which must come after the first renewal had its chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mutexowner._validate import finite_number

__all__ = ["LeaseTiming", "TimingError", "TimingNames", "drift_for"]

#: Longest socket timeout of a lease call with default settings (seconds).
MAX_DEFAULT_CALL_TIMEOUT = 1.0


def drift_for(ttl: float) -> float:
    """Clock-drift allowance subtracted from every lease: 1 % of ttl plus 2 ms
    (docs/safety.md, point 2)."""
    return ttl * 0.01 + 0.002


@dataclass(frozen=True)
class TimingNames:
    """How the caller spells each number, so errors name what the user wrote
    (``ttl`` for ``MutexOwner``, ``--ttl`` for the CLI, ``MUTEXOWNER_TTL`` for Flask)."""

    ttl: str = "ttl"
    renew_interval: str = "renew_interval"
    call_timeout: str = "call_timeout"
    shutdown: str = "supervisor shutdown_timeout"


class TimingError(ValueError):
    """A lease number out of range; ``parameter`` is the field at fault (a ``TimingNames``
    attribute name: "ttl", "renew_interval", "call_timeout" or "shutdown")."""

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class LeaseTiming:
    """The lease's numbers, validated at construction (build one with ``LeaseTiming.of``)."""

    ttl: float
    renew_interval: float
    call_timeout: float
    #: How long before the deadline workers are told to stop (a supervisor's
    #: shutdown_timeout; ``mutexowner run``: grace plus time to reap the command).
    shutdown_budget: float = 0.0
    names: TimingNames = field(default_factory=TimingNames, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        ttl: float = 10.0,
        renew_interval: Optional[float] = None,
        call_timeout: Optional[float] = None,
        shutdown_budget: float = 0.0,
        names: Optional[TimingNames] = None,
    ) -> LeaseTiming:
        """Fill in the defaults (renew every ttl/3; calls time out after a third of that,
        at most 1 s) and validate."""
        names = names if names is not None else TimingNames()
        ttl = finite_number(names.ttl, ttl)
        if ttl <= 0:
            raise TimingError(
                f"{names.ttl} must be a finite number > 0 (seconds), got {ttl!r}", "ttl"
            )
        renew = (
            ttl / 3
            if renew_interval is None
            else finite_number(names.renew_interval, renew_interval)
        )
        if call_timeout is None:
            call = min(MAX_DEFAULT_CALL_TIMEOUT, renew / 3)
        else:
            call = finite_number(names.call_timeout, call_timeout)
        budget = finite_number(names.shutdown, shutdown_budget)
        return cls(ttl, renew, call, budget, names)

    def __post_init__(self) -> None:
        n = self.names
        if not 0 < self.renew_interval < self.ttl:
            raise TimingError(
                f"{n.renew_interval} must be > 0 and < {n.ttl} ({self.ttl:g}), "
                f"got {self.renew_interval!r}",
                "renew_interval",
            )
        if not 0 < self.call_timeout <= self.renew_interval:
            raise TimingError(
                f"{n.call_timeout} must be > 0 and <= {n.renew_interval} "
                f"({self.renew_interval:g}), got {self.call_timeout!r}",
                "call_timeout",
            )
        if self.shutdown_budget < 0:
            raise TimingError(
                f"{n.shutdown} must be >= 0, got {self.shutdown_budget!r}", "shutdown"
            )
        if not self.shutdown_budget < self.slack:
            raise TimingError(
                f"{n.renew_interval} ({self.renew_interval:g}) + {n.shutdown} "
                f"({self.shutdown_budget:g}) must be < {n.ttl} - drift "
                f"({self.ttl - self.drift:g}): workers are told to stop {n.shutdown} before "
                f"the lease deadline, which must come after the first renewal. Lower "
                f"{n.shutdown} or {n.renew_interval}, or raise {n.ttl}.",
                "shutdown",
            )

    @property
    def drift(self) -> float:
        """Clock-drift allowance: the lease is trusted this much less than Redis keeps it."""
        return drift_for(self.ttl)

    @property
    def slack(self) -> float:
        """Time between the first renewal and the lease deadline: the room a shutdown budget
        must fit in (strictly)."""
        return self.ttl - self.drift - self.renew_interval

    def deadline(self, t_sent: float) -> float:
        """The local deadline of a lease confirmed by a reply to a request sent at ``t_sent``."""
        return t_sent + self.ttl - self.drift

    def with_shutdown_budget(self, budget: float) -> LeaseTiming:
        """The same numbers with another shutdown budget (validated)."""
        return LeaseTiming(self.ttl, self.renew_interval, self.call_timeout, budget, self.names)
