"""Fixtures of the high-availability suites: real Sentinel topologies on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tests.chaos import figures
from tests.conftest import REQUIRE_REDIS_ENV, redis_required
from tests.ha.cluster_topology import ClusterTopology
from tests.ha.topology import HaConfig, HaRig, SentinelTopology, find_redis_sentinel
from tests.redis_server import RedisServer


def _sentinel_or_skip() -> str:
    path = find_redis_sentinel()
    if path is not None:
        return path
    if redis_required():
        pytest.fail(
            f"redis-sentinel not found on PATH but {REQUIRE_REDIS_ENV}=1: the HA suite must "
            "run here; install it (apt-get install redis-sentinel)",
            pytrace=False,
        )
    pytest.skip("redis-sentinel not found on PATH (apt-get install redis-sentinel)")


@pytest.fixture
def ha_rig(
    redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> Iterator[Callable[..., HaRig]]:
    """``ha_rig(config=HaConfig(...))``: a Sentinel topology, a fencing store and a rig.

    Owner processes, sentinels and servers are all gone after the test.
    """
    sentinel = _sentinel_or_skip()
    made: list[tuple[HaRig, SentinelTopology]] = []

    def make(config: Optional[HaConfig] = None) -> HaRig:
        config = config or HaConfig()
        topology = SentinelTopology(
            redis_server_factory,
            tmp_path / f"topology{len(made)}",
            sentinel_executable=sentinel,
            down_after_ms=config.down_after_ms,
            failover_timeout_ms=config.failover_timeout_ms,
        )
        rig = HaRig(topology, redis_server_factory(), tmp_path / f"rig{len(made)}", config)
        made.append((rig, topology))
        return rig

    yield make
    for rig, topology in made:
        rig.close()
        topology.close()


@pytest.fixture
def cluster_rig(
    redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> Iterator[Callable[..., HaRig]]:
    """``cluster_rig(config=HaConfig(...))``: a 3+3 Redis Cluster, a fencing store, a rig."""
    made: list[HaRig] = []

    def make(config: Optional[HaConfig] = None) -> HaRig:
        config = config or HaConfig()
        topology = ClusterTopology(redis_server_factory)
        rig = HaRig(topology, redis_server_factory(), tmp_path / f"rig{len(made)}", config)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def record_figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record_figures(name=value, ...)``: shown in the summary at the end of the run."""

    def record(**values: Any) -> None:
        figures.record("ha", request.node.name, **values)

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not figures.recorded("ha"):
        return
    terminalreporter.write_sep("=", "high-availability figures (times in seconds)")
    for line in figures.lines("ha"):
        terminalreporter.write_line(line)
