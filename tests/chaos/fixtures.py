"""Fixtures shared by ``tests/chaos`` and ``tests/integration`` (imported by their conftests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.chaos import figures
from tests.chaos.harness import ChaosRig
from tests.redis_server import RedisServer

__all__ = ["chaos_rig", "record_figures"]


@pytest.fixture
def chaos_rig(
    redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> Iterator[Callable[..., ChaosRig]]:
    """Factory of `ChaosRig`s; every owner process and proxy is gone after the test."""
    rigs: list[ChaosRig] = []

    def make(**options: Any) -> ChaosRig:
        rig = ChaosRig(redis_server_factory, tmp_path / f"rig{len(rigs)}", **options)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def record_figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record_figures(name=value, ...)``: shown in the summary at the end of the run."""
    suite = "chaos" if "chaos" in request.node.path.parts else "integration"

    def record(**values: Any) -> None:
        figures.record(suite, request.node.name, **values)

    return record
