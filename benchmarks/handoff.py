"""Hand-off latency: the holder releases at a random moment; how soon does a blocked waiter hold?

Each contender runs as two processes, A and B, on its own key of one shared redis-server.
A round: the waiter starts a blocking acquire (mutexowner: a new ``MutexOwner`` is started
and has been told the key is taken, and its release subscription is live; python-redis-lock:
its BLPOP is pending), then after a random pause of ``--phase`` seconds the holder releases
(mutexowner: ``stop()``, which stops the workers, releases and publishes the notice). The
figure is ``t(waiter's acquire returned / on_acquired called) - t(just before release)``,
both ``time.monotonic()`` in different processes. Roles then swap. Rounds of the contenders
are interleaved in a fresh random order each round, so machine noise hits all of them alike.

Each library runs with its own defaults (ttl 10 s for mutexowner, no expiry for redis-py and
python-redis-lock, 10 s for pottery, 60 s for sherlock); the hold between rounds is short.
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

#: How each contender's waiter learns that the lock is free, at its defaults.
WAITING = {
    "mutexowner": "pub/sub notice; else timer at the holder's ttl_left",
    "redis-py": "poll every 0.1 s (sleep)",
    "python-redis-lock": "BLPOP on a signal list",
    "pottery": "poll after uniform(0, 0.2) s",
    "sherlock": "poll every 0.1 s (retry_interval)",
}


#: The stages of a mutexowner hand-off, timed from its events.
PARTS = (
    "stop() -> released+published",
    "published -> waiter acquired",
    "acquired -> on_acquired callback",
)


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "hand-off latency")
    p.add_argument("--rounds", type=int, default=60, help="hand-offs per contender (default 60)")
    p.add_argument(
        "--phase",
        type=float,
        nargs=2,
        default=(0.0, 0.25),
        metavar=("MIN", "MAX"),
        help="the holder releases uniform(MIN, MAX) s after the waiter is waiting",
    )
    return p


def run(server: RedisProc, args: argparse.Namespace) -> dict[str, Any]:
    random = rng(args)
    kinds = chosen(args, CONTENDERS)
    logs = log_dir(args)
    coord = server.client(client_name="bench-coordinator")
    started = time.monotonic()
    pairs: dict[str, list[Agent]] = {}
    try:
        for kind in kinds:
            name = f"handoff-{kind}"
            if kind == "mutexowner":
                seed_epoch(coord, name)
            agents = [
                Agent(
                    {
                        "kind": kind,
                        "port": server.port,
                        "name": name,
                        "role": role,
                        "client_name": f"handoff-{kind}-{role}",
                        "lease": None,
                        "renew_every": None,
                    },
                    logs,
                )
                for role in ("a", "b")
            ]
            for agent in agents:
                agent.ready()
            agents[0].send("acquire")
            agents[0].expect("acquired", 30)
            pairs[kind] = agents
        latency: dict[str, list[float]] = {k: [] for k in kinds}
        release_call: dict[str, list[float]] = {k: [] for k in kinds}
        parts: dict[str, list[float]] = {name: [] for name in PARTS}
        for _round in range(args.rounds):
            order = list(kinds)
            random.shuffle(order)
            for kind in order:
                holder, waiter = pairs[kind]
                waiter.send("acquire")
                waiter.expect("waiting", 15)
                standby_ready(kind, waiter, coord)
                time.sleep(random.uniform(*args.phase))
                holder.send("release")
                released = holder.expect("released", 30)
                acquired = waiter.expect("acquired", 30)
                if released.get("error"):
                    raise RuntimeError(f"{holder.label} release failed: {released['error']}")
                t0 = released["t0"]
                latency[kind].append((acquired["t"] - t0) * 1000)
                if kind == "mutexowner":
                    # Where the time goes: holder's release published, waiter's owner thread
                    # saw "acquired", the events thread called on_acquired.
                    notice = holder.expect("mo.released", 10, after=t0)["t_event"]
                    held = waiter.expect("mo.acquired", 10, after=t0)["t_event"]
                    parts["stop() -> released+published"].append((notice - t0) * 1000)
                    parts["published -> waiter acquired"].append((held - notice) * 1000)
                    parts["acquired -> on_acquired callback"].append((acquired["t"] - held) * 1000)
                release_call[kind].append((released["t1"] - released["t0"]) * 1000)
                pairs[kind] = [waiter, holder]
    finally:
        for agents in pairs.values():
            for agent in agents:
                agent.close()
    base: Optional[dict[str, Any]] = None
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        stats = summary(latency[kind])
        if kind == "mutexowner":
            base = stats
        rows.append(
            {
                "contender": kind,
                "waiting": WAITING[kind],
                "latency_ms": stats,
                "release_call_ms": summary(release_call[kind]),
                "samples_ms": latency[kind],
            }
        )
    for row in rows:
        stats = row["latency_ms"]
        row["median_ratio"] = ratio(stats["median"], base["median"]) if base else None
        row["p99_ratio"] = ratio(stats["p99"], base["p99"]) if base else None
    return {
        "benchmark": "handoff",
        "rounds": args.rounds,
        "phase_s": list(args.phase),
        "processes": "two processes per contender (holder, waiter), roles swap each round",
        "elapsed_s": time.monotonic() - started,
        "results": rows,
        "mutexowner_breakdown_ms": {name: summary(values) for name, values in parts.items()},
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    for row in result["results"]:
        s = row["latency_ms"]
        rows.append(
            [
                row["contender"],
                s["n"],
                s["median"],
                s["p99"],
                s["min"],
                s["max"],
                row["median_ratio"],
                row["p99_ratio"],
                row["release_call_ms"]["median"],
                row["waiting"],
            ]
        )
    head = (
        f"1. Hand-off latency (ms): release at a random phase -> blocked waiter holds. "
        f"{result['rounds']} rounds, interleaved; {result['processes']}; "
        f"phase uniform{tuple(result['phase_s'])} s; took {result['elapsed_s']:.0f} s"
    )
    return (
        head
        + "\n"
        + table(
            [
                "contender",
                "n",
                "median",
                "p99",
                "min",
                "max",
                "x median",
                "x p99",
                "release() ms",
                "waiter learns by",
            ],
            rows,
        )
        + "\n(x = ratio to mutexowner; release() ms = duration of the holder's release/stop call)"
        + _render_breakdown(result)
    )


def _render_breakdown(result: dict[str, Any]) -> str:
    parts = result.get("mutexowner_breakdown_ms") or {}
    if not parts or not any(s["n"] for s in parts.values()):
        return ""
    rows = [[name, s["median"], s["p99"]] for name, s in parts.items()]
    return "\nmutexowner hand-off, stage by stage (ms):\n" + table(["stage", "median", "p99"], rows)


if __name__ == "__main__":
    sys.exit(standalone(run, render, parser()))
