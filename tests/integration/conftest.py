"""Fixtures of the real-Redis integration tests and their end-of-run figures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mutexowner import MutexOwner
from tests.chaos import figures
from tests.chaos.fixtures import chaos_rig, record_figures

__all__ = ["chaos_rig", "owners", "record_figures"]


@pytest.fixture
def owners() -> Iterator[list[MutexOwner]]:
    """Owners registered here are stopped at teardown, whatever happened in the test."""
    started: list[MutexOwner] = []
    yield started
    for owner in started:
        owner.stop(timeout=10)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not figures.recorded("integration"):
        return
    terminalreporter.write_sep("=", "integration figures (times in seconds)")
    for line in figures.lines("integration"):
        terminalreporter.write_line(line)
