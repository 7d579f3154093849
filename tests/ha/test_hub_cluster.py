"""ReleaseHub on a Redis Cluster: one connection, on whichever node, carries every channel
(classic PUBLISH is broadcast to every node); when that node dies it moves to another."""

from __future__ import annotations

import threading
from typing import Callable

import pytest

from mutexowner.backoff import BackoffPolicy
from mutexowner.connection import client_from, derive_lease_client
from mutexowner.hub import ReleaseHub
from tests.ha.cluster_topology import ClusterTopology
from tests.redis_server import RedisServer, poll

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def test_the_hub_serves_every_slot_from_one_node_and_moves_when_it_dies(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    topology = ClusterTopology(redis_server_factory)
    client = derive_lease_client(client_from(topology.url), timeout=1.0)
    hub = ReleaseHub(client, name="cl", backoff=BackoffPolicy(initial=0.01, max_delay=0.2))
    channels = [f"{{lease{i}}}:released" for i in range(30)]  # spread over the 3 shards
    calls = {channel: threading.Semaphore(0) for channel in channels}
    try:
        for channel in channels:
            hub.subscribe(channel, calls[channel].release)
        assert all(calls[c].acquire(timeout=10) for c in channels)  # first call: subscribed

        def hub_nodes() -> list[int]:
            return [
                node.port
                for node in topology.nodes
                if node.running
                and any(
                    int(c["sub"]) for c in topology.client(node.port).client_list(_type="pubsub")
                )
            ]

        assert poll(lambda: len(hub_nodes()) == 1, 5)
        (port,) = hub_nodes()
        publisher = topology.any_live(exclude=port)  # any node: the bus broadcasts it
        for channel in channels:
            publisher.publish(channel, "x")
        assert all(calls[c].acquire(timeout=5) for c in channels)
        topology.node(port).kill()
        # Reconnected on another node: every subscriber is called once again.
        assert all(calls[c].acquire(timeout=20) for c in channels)
        assert poll(lambda: len(hub_nodes()) == 1 and hub_nodes()[0] != port, 5)
        publisher = topology.any_live(exclude=port)
        publisher.publish(channels[0], "x")
        assert calls[channels[0]].acquire(timeout=5)
    finally:
        assert hub.stop(timeout=10)
