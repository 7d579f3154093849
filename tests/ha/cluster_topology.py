"""A real Redis Cluster on loopback ports: 3 masters + 3 replicas (``redis-cli --cluster``).

Every node is a ``tests.redis_server.RedisServer`` started with ``cluster-enabled yes`` and
``cluster-node-timeout`` 1000 ms, so a master's fail-over takes about two seconds; the
cluster is formed by ``redis-cli --cluster create --cluster-replicas 1``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any, Callable, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis_server import LOOPBACK, RedisServer, free_port, poll

__all__ = ["ClusterTopology", "key_slot"]


def key_slot(client: redis.Redis, key: str) -> int:
    return int(client.execute_command("CLUSTER", "KEYSLOT", key))


class ClusterTopology:
    """3 masters + 3 replicas; the servers are stopped by the factory's teardown."""

    def __init__(self, make_server: Callable[..., RedisServer], *, node_timeout_ms: int = 1000):
        config: dict[str, Any] = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": node_timeout_ms,
            "repl-diskless-sync-delay": 0,
        }
        # The bus port defaults to port + 10000, impossible above 55535: pick one.
        self.nodes = [
            make_server(config={**config, "cluster-port": free_port()}) for _ in range(6)
        ]
        cli = shutil.which("redis-cli") or "redis-cli"
        addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
        done = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        self.wait_healthy()

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{node.port}" for node in self.nodes[:3])
        return f"redis+cluster://{hosts}"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK,
            port=port,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def any_live(self, exclude: Optional[int] = None) -> redis.Redis:
        for node in self.nodes:
            if node.running and not node.frozen and node.port != exclude:
                return self.client(node.port)
        raise RuntimeError("no live cluster node")

    def shards(self, via: Optional[redis.Redis] = None) -> list[dict[str, Any]]:
        """[{master port, master id, replica ports, slots}] from CLUSTER NODES of one node."""
        text = str((via or self.any_live()).execute_command("CLUSTER", "NODES"))
        masters: dict[str, dict[str, Any]] = {}
        replicas: list[tuple[str, int]] = []
        for line in text.splitlines():
            parts = line.split()
            node_id, address, flags = parts[0], parts[1], parts[2]
            port = int(address.split("@")[0].rsplit(":", 1)[1])
            if "fail" in flags.split(","):
                continue
            if "master" in flags:
                slots = []
                for spec in parts[8:]:
                    if spec.startswith("["):
                        continue
                    lo, _, hi = spec.partition("-")
                    slots.append((int(lo), int(hi or lo)))
                masters[node_id] = {"port": port, "id": node_id, "slots": slots, "replicas": []}
            else:
                replicas.append((parts[3], port))
        for master_id, port in replicas:
            if master_id in masters:
                masters[master_id]["replicas"].append(port)
        return list(masters.values())

    def owner_of(self, slot: int, via: Optional[redis.Redis] = None) -> dict[str, Any]:
        for shard in self.shards(via):
            if any(lo <= slot <= hi for lo, hi in shard["slots"]):
                return shard
        raise LookupError(f"no master serves slot {slot}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """cluster_state:ok on every live node, 3 masters each with a linked replica."""

        def healthy() -> bool:
            try:
                for node in self.nodes:
                    if not node.running:
                        continue
                    info = self.client(node.port).execute_command("CLUSTER", "INFO")
                    if "cluster_state:ok" not in str(info):
                        return False
                shards = self.shards()
                if len(shards) != 3 or any(not s["slots"] for s in shards):
                    return False
                for shard in shards:
                    repl = self.client(shard["port"]).info("replication")
                    if int(repl["connected_slaves"]) < 1:
                        return False
                return True
            except (redis.RedisError, LookupError, ValueError):
                return False

        if not poll(healthy, timeout, interval=0.1):
            raise RuntimeError("cluster not healthy:\n" + self.describe())

    def wait_promotion(self, slot: int, old_port: int, timeout: float = 20.0) -> tuple[float, int]:
        """(monotonic time, new port) once a live node says another master serves ``slot``."""
        found: list[int] = []

        def promoted() -> bool:
            try:
                port = int(self.owner_of(slot, self.any_live(exclude=old_port))["port"])
            except (redis.RedisError, LookupError):
                return False
            if port != old_port:
                found.append(port)
                return True
            return False

        if not poll(promoted, timeout, interval=0.02):
            raise RuntimeError(f"slot {slot} not failed over in {timeout} s:\n" + self.describe())
        return time.monotonic(), found[-1]

    def migrate_slot(self, slot: int, target_port: int) -> None:
        """Move ``slot`` with its keys to the master on ``target_port`` (as ``reshard`` does)."""
        source = self.owner_of(slot)
        target = next(s for s in self.shards() if s["port"] == target_port)
        src, dst = self.client(source["port"]), self.client(target_port)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source["id"])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target["id"])
        while True:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            src.execute_command(
                "MIGRATE", LOOPBACK, target_port, "", 0, 5000, "REPLACE", "KEYS", *keys
            )
        for shard in self.shards():
            self.client(shard["port"]).execute_command(
                "CLUSTER", "SETSLOT", slot, "NODE", target["id"]
            )

    def describe(self) -> str:
        parts = [repr(node) for node in self.nodes]
        try:
            parts.append(str(self.any_live().execute_command("CLUSTER", "NODES")))
        except (redis.RedisError, RuntimeError) as exc:
            parts.append(f"(CLUSTER NODES failed: {exc!r})")
        return "\n".join(parts)
