"""Fixtures of the real-Redis integration tests and their end-of-run figures."""

from __future__ import annotations

from typing import Any

from tests.chaos import figures
from tests.chaos.fixtures import chaos_rig, record_figures

__all__ = ["chaos_rig", "record_figures"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not figures.recorded("integration"):
        return
    terminalreporter.write_sep("=", "integration figures (times in seconds)")
    for line in figures.lines("integration"):
        terminalreporter.write_line(line)
