"""Replica confirmation cost: one renewal with and without WAIT (mutexowner's min_replicas).

Starts its own loopback servers: a standalone redis-server, and a master with 1 and with 2
replicas (``repl-diskless-sync-delay 0``). On each setup one ``Lease`` (the library's
protocol object, the exact call the owner thread makes) holds a key and renews it
``--calls`` times in a row; the client-side round trip of each renewal is timed with
``time.perf_counter``. Setups:

* ``standalone, auto``: no replicas, so no WAIT is sent (the default on a single server);
* ``1 replica, auto`` / ``2 replicas, auto``: the default on a replicated master: EVALSHA
  and ``WAIT 1`` pipelined in one round trip;
* ``2 replicas, min_replicas=2``: stricter, every replica must acknowledge;
* ``2 replicas, min_replicas=0``: the check turned off.

The machine is assumed noisy: the setups' renewals are interleaved in rounds of 50 in a
fresh random order. Prints a table (milliseconds), or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import redis
from _common import LOOPBACK, free_port, seed_epoch, summary, table, to_json

from mutexowner.lease import Lease, new_token

ROUND = 50


class Server:
    """A throw-away redis-server on a free loopback port, optionally a replica."""

    def __init__(self, replica_of: Optional[int] = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mutexowner-bench-wait-"))
        self.port = free_port()
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--bind", LOOPBACK, "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if replica_of is not None:
            cmd += ["--replicaof", LOOPBACK, str(replica_of)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        self.client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5.0)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_replicas(master: Server, n: int) -> None:
    deadline = time.monotonic() + 15
    while master.client.info("replication")["connected_slaves"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not connect to port {master.port}")
        time.sleep(0.02)
    time.sleep(0.2)  # let the initial syncs finish


class Setup:
    def __init__(self, name: str, master: Server, min_replicas: Optional[int]) -> None:
        self.name = name
        key = f"bench-{len(name)}-{random.getrandbits(32)}"
        seed_epoch(master.client, key)
        client = redis.Redis(host=LOOPBACK, port=master.port, socket_timeout=1.0)
        self.lease = Lease(
            client, key, ttl=10.0, identity="bench", min_replicas=min_replicas, call_timeout=1.0
        )
        self.token = new_token()
        acquired = self.lease.acquire(self.token)
        self.fence = acquired.fencing_token  # type: ignore[union-attr]
        self.times: list[float] = []
        self.master = master

    def renew(self) -> None:
        started = time.perf_counter()
        self.lease.renew(self.token, self.fence)
        self.times.append((time.perf_counter() - started) * 1000.0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--calls", type=int, default=2000, help="renewals per setup")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    servers: list[Server] = []
    try:
        alone = Server()
        one = Server()
        two = Server()
        servers += [alone, one, two]
        servers.append(Server(replica_of=one.port))
        servers += [Server(replica_of=two.port), Server(replica_of=two.port)]
        wait_replicas(one, 1)
        wait_replicas(two, 2)
        setups = [
            Setup("standalone, auto", alone, None),
            Setup("1 replica, auto", one, None),
            Setup("2 replicas, auto", two, None),
            Setup("2 replicas, min_replicas=2", two, 2),
            Setup("2 replicas, min_replicas=0", two, 0),
        ]
        done = 0
        while done < args.calls:
            order = setups[:]
            random.shuffle(order)
            for setup in order:
                for _ in range(min(ROUND, args.calls - done)):
                    setup.renew()
            done += ROUND
        waits = {
            server.port: int(server.client.info("commandstats").get("cmdstat_wait", {}).get(
                "calls", 0
            ))
            for server in (alone, one, two)
        }
        results: dict[str, Any] = {}
        for setup in setups:
            stats = summary(setup.times)
            results[setup.name] = stats
        results["_wait_calls_by_master"] = {
            "standalone": waits[alone.port],
            "1 replica": waits[one.port],
            "2 replicas": waits[two.port],
        }
        if args.json:
            print(to_json(results))
            return 0
        base = results["standalone, auto"]["median"]
        rows = [
            [
                setup.name,
                results[setup.name]["median"],
                results[setup.name]["p99"],
                results[setup.name]["median"] - base,
            ]
            for setup in setups
        ]
        print(f"renewal round trip, {args.calls} calls per setup, loopback (ms)")
        print(table(["setup", "median", "p99", "median - standalone"], rows, digits=3))
        print(f"WAIT calls seen by each master: {results['_wait_calls_by_master']}")
        return 0
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
