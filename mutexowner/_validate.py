"""Argument checks shared by the policy and config objects: one wording for every message."""

from __future__ import annotations

import math
import numbers

__all__ = ["finite_number"]


def finite_number(name: str, value: object, requirement: str = "") -> float:
    """Return ``value`` as a float, or raise naming ``name`` and what it must be.

    ``TypeError`` for anything but an int or float (``bool`` included: ``True`` is not a
    duration); ``ValueError`` for NaN, infinities and ints too large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number (int or float), got {type(value).__name__} {value!r}"
        )
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        must = f"a finite number {requirement}" if requirement else "a finite number"
        raise ValueError(f"{name} must be {must}, got {value!r}")
    return result
