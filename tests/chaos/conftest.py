"""Fixtures of the fault-injection suite and the end-of-run figures summary."""

from __future__ import annotations

from typing import Any

from tests.chaos import figures
from tests.chaos.fixtures import chaos_rig, record_figures

__all__ = ["chaos_rig", "record_figures"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    recorded = figures.recorded("chaos")
    if not recorded:
        return
    terminalreporter.write_sep("=", "chaos figures (times in seconds)")
    for line in figures.lines("chaos"):
        terminalreporter.write_line(line)
    faults = sum(int(f.values.get("faults") or 0) for f in recorded)
    handoffs = sum(int(f.values.get("handoffs") or 0) for f in recorded)
    overlap = max(float(f.values.get("max_overlap") or 0.0) for f in recorded)
    recoveries = [f.values["recovery_max"] for f in recorded if f.values.get("recovery_max")]
    bounds = [f.values["bound"] for f in recorded if f.values.get("bound")]
    worst = f"{max(recoveries):.3f}" if recoveries else "n/a"
    bound = f"{max(bounds):.3f}" if bounds else "n/a"
    terminalreporter.write_line(
        f"chaos summary: {len(recorded)} tests, {faults} faults, {handoffs} hand-offs, "
        f"max overlap {overlap:.3f} s, worst recovery {worst} s (bound {bound} s)"
    )
