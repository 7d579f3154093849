"""A real Sentinel topology on loopback ports: 1 master, 2 replicas, 3 ``redis-sentinel``s.

Built on ``tests.redis_server.RedisServer`` (a sentinel is a ``RedisServer`` whose command
line is ``redis-sentinel <conf>``), so start/readiness/kill/freeze and teardown are the
same code the chaos suite uses. Timings are short on purpose (``down-after-milliseconds``
1000 by default) to keep a fail-over around two seconds.

``HaRig`` is the chaos suite's ``ChaosRig`` (owner processes, ledgers, fencing store,
faults, checker) with owners that connect through a ``redis+sentinel://`` URL, no proxies.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.chaos import checker
from tests.chaos.harness import ChaosConfig, ChaosRig, OwnerProcess
from tests.redis_server import LOOPBACK, RedisServer, poll

__all__ = [
    "SERVICE",
    "HaConfig",
    "HaRig",
    "SentinelProcess",
    "SentinelTopology",
    "settle_and_check",
]

SERVICE = "mymaster"


def find_redis_sentinel() -> Optional[str]:
    return shutil.which("redis-sentinel")


class SentinelProcess(RedisServer):
    """One ``redis-sentinel`` watching ``SERVICE`` (its config file lives in its dir)."""

    def __init__(
        self,
        dir: Path,
        *,
        master_port: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        executable: str,
    ) -> None:
        super().__init__(dir, executable=executable)
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def command(self) -> list[str]:
        conf = self.dir / "sentinel.conf"
        # Sentinel rewrites its config file (what it learnt): write ours until it started.
        if not self._started_once:
            conf.write_text(
                "\n".join(
                    [
                        f"port {self.port}",
                        f"bind {self.host}",
                        f"dir {self.dir}",
                        f"logfile {self.log_path}",
                        "daemonize no",
                        f"sentinel monitor {SERVICE} {LOOPBACK} {self.master_port} 2",
                        f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
                        f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {SERVICE} 2",
                        "",
                    ]
                )
            )
        return [self.executable, str(conf)]

    def client(self, **kwargs: Any) -> redis.Redis:
        options: dict[str, Any] = {"decode_responses": True}
        options.update(kwargs)
        return super().client(**options)

    def master_port_now(self) -> Optional[int]:
        """The master port this sentinel names right now (None if it does not answer)."""
        try:
            reply = self.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        except redis.RedisError:
            return None
        return int(reply[1]) if reply else None


@dataclass(frozen=True)
class HaConfig(ChaosConfig):
    """Chaos timings plus the Sentinel ones."""

    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    #: Seconds, after the promotion, for Sentinel to point the other replica at the new
    #: master and for it to sync: until then the new master cannot confirm a write.
    reconfigure: float = 1.5

    @property
    def promotion_bound(self) -> float:
        """Seconds from the promotion until some worker runs again.

        ``ttl + drift`` (the quiet period the new master's changed run_id opens, or the
        old holder's key expiring there) ``+ call_timeout + backoff_max`` (the first call
        to reach the new master: one timed-out call, one capped backoff) ``+ reconfigure``
        (a WAIT can succeed only once a replica follows the new master) ``+ slack``.
        """
        return (
            self.ttl
            + self.drift
            + self.call_timeout
            + self.backoff_max
            + self.reconfigure
            + self.slack
        )


class SentinelTopology:
    """1 master + 2 replicas + 3 sentinels; `close` stops them all."""

    def __init__(
        self,
        make_server: Callable[..., RedisServer],
        base: Path,
        *,
        sentinel_executable: str,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        fast_sync = {"repl-diskless-sync-delay": 0}
        self.nodes: list[RedisServer] = [make_server(config=fast_sync)]
        master = self.nodes[0]
        for _ in range(2):
            self.nodes.append(
                make_server(config={**fast_sync, "replicaof": [LOOPBACK, str(master.port)]})
            )
        self.sentinels: list[SentinelProcess] = []
        self._base = base
        admin = master.client()
        if not poll(lambda: admin.info("replication")["connected_slaves"] == 2, 15.0):
            raise RuntimeError(f"replicas did not connect: {admin.info('replication')}")
        try:
            for i in range(3):
                sentinel = SentinelProcess(
                    base / f"sentinel{i}",
                    master_port=master.port,
                    down_after_ms=down_after_ms,
                    failover_timeout_ms=failover_timeout_ms,
                    executable=sentinel_executable,
                )
                self.sentinels.append(sentinel)
                sentinel.start()
            self.wait_settled(master.port)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def master_port(self) -> Optional[int]:
        """The master port a majority of sentinels names, else None."""
        ports = [s.master_port_now() for s in self.sentinels]
        for port in set(ports):
            if port is not None and ports.count(port) >= 2:
                return port
        return None

    def master(self) -> RedisServer:
        port = self.master_port()
        assert port is not None, "no master agreed by the sentinels"
        return self.node(port)

    def wait_settled(self, master_port: int, timeout: float = 30.0) -> None:
        """Every sentinel names ``master_port``, knows 2 replicas and the 2 other sentinels."""

        def settled() -> bool:
            for sentinel in self.sentinels:
                try:
                    state = sentinel.client().execute_command("SENTINEL", "MASTER", SERVICE)
                except redis.RedisError:
                    return False
                info = state
                if (
                    int(info["port"]) != master_port
                    or int(info["num-slaves"]) < 2
                    or int(info["num-other-sentinels"]) < 2
                    or "o_down" in info["flags"]
                    or "s_down" in info["flags"]
                ):
                    return False
            return True

        if not poll(settled, timeout, interval=0.1):
            raise RuntimeError("sentinels did not settle:\n" + self.describe())

    def wait_promotion(self, old_port: int, timeout: float = 20.0) -> tuple[float, int]:
        """(monotonic time first seen, new port) of the promotion away from ``old_port``."""
        found: list[int] = []

        def promoted() -> bool:
            port = self.master_port()
            if port is not None and port != old_port:
                found.append(port)
                return True
            return False

        if not poll(promoted, timeout, interval=0.02):
            raise RuntimeError(f"no promotion within {timeout} s:\n" + self.describe())
        return time.monotonic(), found[-1]

    def wait_failover_end(self, new_port: int, timeout: float = 20.0) -> float:
        """Wait until every sentinel's ``SENTINEL MASTER`` names ``new_port`` with no fail-over
        in progress; return the monotonic time. Until then the leader still reports the old
        master there (only GET-MASTER-ADDR-BY-NAME names the promoted replica), and redis-py's
        discovery, which reads SENTINEL MASTERS, connects newcomers to the old master."""

        def ended() -> bool:
            for sentinel in self.sentinels:
                try:
                    state = sentinel.client().execute_command("SENTINEL", "MASTER", SERVICE)
                except redis.RedisError:
                    return False
                if int(state["port"]) != new_port or "failover_in_progress" in state["flags"]:
                    return False
            return True

        if not poll(ended, timeout, interval=0.02):
            raise RuntimeError(f"the fail-over did not end within {timeout} s:\n" + self.describe())
        return time.monotonic()

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK,
            port=port,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )

    def role(self, port: int) -> Optional[str]:
        try:
            return str(self.client(port).info("replication")["role"])
        except redis.RedisError:
            return None

    def describe(self) -> str:
        parts = []
        for node in self.nodes:
            parts.append(f"{node!r} role={self.role(node.port) if node.running else '-'}")
        for sentinel in self.sentinels:
            parts.append(f"sentinel {sentinel.port}: master port {sentinel.master_port_now()}")
            parts.append(sentinel.log_tail(15))
        return "\n".join(parts)

    def close(self) -> None:
        for sentinel in self.sentinels:
            with contextlib.suppress(Exception):
                sentinel.close()


class HaRig(ChaosRig):
    """`ChaosRig` on a replicated topology: owners use the topology's URL, no proxies."""

    def __init__(
        self,
        topology: Any,
        store_server: RedisServer,
        tmp_path: Path,
        config: HaConfig,
    ) -> None:
        # Not ChaosRig.__init__: the Redis under test is a topology, not one server.
        self._setup(config, topology.nodes[0], store_server, tmp_path, proxied=False)
        self.config: HaConfig = config
        self.topology = topology
        self.url: str = topology.url

    def spawn(self, identity: Optional[str] = None) -> OwnerProcess:
        self._serial += 1
        identity = identity or f"o{self._serial}"
        owner = OwnerProcess(
            identity, self.url, self.store_server.url, self.ledger_dir, self.config
        )
        self.owners[identity] = owner
        return owner.start()

    def promotion_fault(self, kind: str, start: float, promoted_at: float) -> checker.Fault:
        """Record a fail-over: recovery is measured from the promotion Sentinel reported."""
        fault = checker.Fault(
            kind,
            start=start,
            clear=promoted_at,
            measure_from="clear",
            bound=self.config.promotion_bound,
            detail=f"promoted {promoted_at - start:.3f} s after the fault began",
        )
        self.faults.append(fault)
        return fault


def settle_and_check(
    rig: HaRig, since: float, record: Callable[..., None], **figures: Any
) -> checker.Verdict:
    """Wait for a worker check after ``since``, let the topology run ``2 ttl + 1`` seconds
    more (stale holders, late replies, demotions happen there), stop every owner, assert the
    chaos checker's verdict and record the figures of the (single) fault."""
    config = rig.config
    assert isinstance(config, HaConfig)
    rig.wait_for_check(since, config.promotion_bound + 10.0)
    rig.pause(2 * config.ttl + 1.0)
    verdict = rig.finish()
    rig.assert_ok(verdict)
    (fault,) = verdict.faults
    assert fault.clear is not None
    record(
        recovery=fault.recovery,
        bound=fault.bound,
        promotion=fault.clear - fault.start,
        handoffs=verdict.figures["handoffs"],
        runs=verdict.figures["runs"],
        fence_rejected=verdict.figures["fence_rejected"],
        **figures,
    )
    return verdict
