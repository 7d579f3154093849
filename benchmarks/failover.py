"""Failover after holder death: SIGKILL the holder process; how soon does the standby hold?

Each contender holds a lease of ``--ttl`` seconds (default 2) in one process while a standby
process waits. After a random pause the coordinator reads the key's remaining ttl (PTTL)
and SIGKILLs the holder: nothing is released, so the standby can only take over once the
key expires. The figure is ``t(standby holds) - t(kill)``; the expected value is the ttl
left at the kill plus however late the standby notices the key is free.

Renewal: mutexowner renews every ttl/3 by itself; python-redis-lock's ``auto_renewal``
thread renews every 2/3 ttl; redis-py ``Lock`` (``reacquire``), pottery ``Redlock``
(``extend``, ``num_extensions`` raised) and sherlock (``renew``) have no renewal of their
own, so the benchmark's holder calls it every ttl/3, as a user would. The standby
processes are spawned one round ahead, so their start-up is not timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

from _common import (
    CONTENDERS,
    Agent,
    RedisProc,
    base_parser,
    chosen,
    log_dir,
    ratio,
    rng,
    seed_epoch,
    standalone,
    standby_ready,
    summary,
    table,
)

#: Why each contender's standby is late after the key expired, at its defaults.
EXPECTED = {
    "mutexowner": "ttl left + ~1 ms (timer set from the holder's ttl_left)",
    "redis-py": "ttl left + U(0, 0.1 s) poll",
    "python-redis-lock": "ttl left + up to expire (BLPOP timeout = expire)",
    "pottery": "ttl left + U(0, 0.2 s) poll",
    "sherlock": "ttl left + up to 0.1 s poll",
}


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "failover")
    p.add_argument("--rounds", type=int, default=10, help="kills per contender (default 10)")
    p.add_argument("--ttl", type=float, default=2.0, help="lease length, s (default 2)")
    return p


def _config(kind: str, server: RedisProc, ttl: float, role: str) -> dict[str, Any]:
    manual = kind in ("redis-py", "pottery", "sherlock")
    return {
        "kind": kind,
        "port": server.port,
        "name": f"failover-{kind}",
        "role": role,
        "client_name": f"failover-{kind}-{role}",
        "lease": ttl,
        "renew_every": ttl / 3 if manual else None,
        "shutdown_timeout": min(0.5, ttl / 4),
    }


def run(server: RedisProc, args: argparse.Namespace) -> dict[str, Any]:
    random = rng(args)
    kinds = chosen(args, CONTENDERS)
    logs = log_dir(args)
    ttl = float(args.ttl)
    coord = server.client(client_name="bench-coordinator")
    started = time.monotonic()
    holders: dict[str, Agent] = {}
    spares: dict[str, Agent] = {}
    counter = 0

    def spawn(kind: str) -> Agent:
        nonlocal counter
        counter += 1
        return Agent(_config(kind, server, ttl, f"p{counter}"), logs)

    failover: dict[str, list[float]] = {k: [] for k in kinds}
    left: dict[str, list[float]] = {k: [] for k in kinds}
    excess: dict[str, list[float]] = {k: [] for k in kinds}
    anomalies: list[str] = []
    try:
        for kind in kinds:
            if kind == "mutexowner":
                seed_epoch(coord, f"failover-{kind}")
            holder = spawn(kind).ready()
            holder.send("acquire")
            holder.expect("acquired", 30)
            holders[kind] = holder
            spares[kind] = spawn(kind)
        for _round in range(args.rounds):
            order = list(kinds)
            random.shuffle(order)
            for kind in order:
                holder, waiter = holders[kind], spares[kind].ready()
                key = holder.hello["key"]
                waiter.send("acquire")
                waiter.expect("waiting", 15)
                standby_ready(kind, waiter, coord)
                # A random phase of the holder's renewal cycle (the slowest renews every 2/3 ttl).
                time.sleep(random.uniform(0.0, ttl * 2 / 3))
                pttl_ms = coord.pttl(key)
                t_read = time.monotonic()
                holder.kill()
                t_kill = time.monotonic()
                acquired = waiter.expect("acquired", ttl * 4 + 15)
                remaining = pttl_ms / 1000.0 - (t_kill - t_read)
                took = acquired["t"] - t_kill
                if took < 0 or pttl_ms < 0:
                    anomalies.append(
                        f"{kind}: standby held {-took:.3f} s before the kill (pttl {pttl_ms})"
                    )
                failover[kind].append(took)
                left[kind].append(remaining)
                excess[kind].append((took - remaining) * 1000)
                holders[kind] = waiter
                spares[kind] = spawn(kind)
    finally:
        for agent in list(holders.values()) + list(spares.values()):
            agent.close()
    base: Optional[dict[str, Any]] = None
    base_excess: Optional[dict[str, Any]] = None
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        stats = summary(failover[kind])
        if kind == "mutexowner":
            base, base_excess = stats, summary(excess[kind])
        rows.append(
            {
                "contender": kind,
                "failover_s": stats,
                "ttl_left_at_kill_s": summary(left[kind]),
                "excess_ms": summary(excess[kind]),
                "expected": EXPECTED[kind],
                "samples_s": failover[kind],
                "excess_samples_ms": excess[kind],
            }
        )
    for row in rows:
        row["median_ratio"] = ratio(row["failover_s"]["median"], base["median"]) if base else None
        row["excess_ratio"] = (
            ratio(row["excess_ms"]["median"], base_excess["median"]) if base_excess else None
        )
    return {
        "benchmark": "failover",
        "rounds": args.rounds,
        "ttl_s": ttl,
        "processes": "holder and standby in separate processes; holder SIGKILLed",
        "elapsed_s": time.monotonic() - started,
        "results": rows,
        "anomalies": anomalies,
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for row in result["results"]:
        f, e = row["failover_s"], row["excess_ms"]
        rows.append(
            [
                row["contender"],
                f["n"],
                f["median"],
                f["p99"],
                row["ttl_left_at_kill_s"]["median"],
                e["median"],
                e["p99"],
                e["max"],
                row["median_ratio"],
                row["excess_ratio"],
                row["expected"],
            ]
        )
    text = (
        f"2. Failover after SIGKILL of the holder, ttl={result['ttl_s']:g} s: kill -> standby "
        f"holds. {result['rounds']} rounds, interleaved; {result['processes']}; took "
        f"{result['elapsed_s']:.0f} s\n"
        + table(
            [
                "contender",
                "n",
                "median s",
                "p99 s",
                "ttl left s",
                "excess ms",
                "excess p99",
                "excess max",
                "x median",
                "x excess",
                "expected",
            ],
            rows,
            digits=3,
        )
        + "\n(ttl left = the key's remaining ttl at the kill, median; excess = failover - ttl left,"
        " i.e. how late the standby noticed the free key)"
    )
    if result["anomalies"]:
        text += "\nANOMALIES: " + "; ".join(result["anomalies"])
    return text


if __name__ == "__main__":
    sys.exit(standalone(run, render, parser()))
