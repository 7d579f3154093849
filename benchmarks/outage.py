"""Redis outage: kill -9 the redis-server while A holds and B waits, restart it empty.

Two scenarios, each with a fresh A and B process per round and a 2 s lease (``--ttl``):

* ``long``: Redis stays down ``--down`` seconds (default 3, longer than the lease), then
  restarts without persistence (all keys gone). A cannot renew: does it learn that its
  lease is over, and do its workers stop by the lease's local deadline? Who holds next,
  when, and do the two holding intervals overlap?
* ``blip``: Redis restarts at once (down for ~0.1 s), empty. A's lease is still valid on
  A's clock; the key is gone from Redis.

mutexowner: A and B each run a ``MutexOwner`` with one worker (``shutdown_timeout`` 0.5 s);
a holding interval is the worker's run, from its start to its return. python-redis-lock:
``Lock(expire=2, auto_renewal=True)``; a holding interval runs from ``acquire()`` returning
until the end of the round (nothing ever tells the holder otherwise); B's ``acquire()`` is
retried by the benchmark when it raises (Redis down), as a caller would have to.

Times are seconds after the kill of redis-server, ``time.monotonic()`` in every process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from _common import (
    Agent,
    RedisProc,
    base_parser,
    blocked_clients,
    chosen,
    log_dir,
    numsub,
    rng,
    seed_epoch,
    standalone,
    table,
    wait_until,
)

CONTENDERS = ("mutexowner", "python-redis-lock")
SCENARIOS = ("long", "blip")


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "outage")
    p.set_defaults(contenders=",".join(CONTENDERS))
    p.add_argument("--rounds", type=int, default=3, help="rounds per contender and scenario")
    p.add_argument("--ttl", type=float, default=2.0, help="lease length, s (default 2)")
    p.add_argument("--down", type=float, default=3.0, help="outage of the long scenario, s")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: long,blip")
    return p


def _config(kind: str, server: RedisProc, ttl: float, name: str, role: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "port": server.port,
        "name": name,
        "role": role,
        "client_name": f"{name}-{role}",
        "lease": ttl,
        "renew_every": None,
        "shutdown_timeout": min(0.5, ttl / 4),
    }


def _first(
    agent: Agent,
    ev: str,
    after: float = float("-inf"),
    pred: Callable[[dict[str, Any]], bool] = lambda e: True,
) -> Optional[dict[str, Any]]:
    for event in agent.all(ev):
        if event["t"] >= after and pred(event):
            return event
    return None


def _intervals(
    agent: Agent, start_ev: str, end_ev: Optional[str], t_end: float
) -> list[list[float]]:
    """Holding intervals of an agent from its start/end events (open ones end at t_end)."""
    starts = [e["t"] for e in agent.all(start_ev)]
    ends = [e["t"] for e in agent.all(end_ev)] if end_ev else []
    out = []
    for i, start in enumerate(starts):
        end = ends[i] if i < len(ends) else t_end
        out.append([start, end])
    return out


def _overlap(
    first: list[list[float]], second: list[list[float]], t_end: float
) -> tuple[float, bool]:
    """Longest time both held, and whether that overlap was still going on at ``t_end``."""
    worst, still = 0.0, False
    for a0, a1 in first:
        for b0, b1 in second:
            both = min(a1, b1) - max(a0, b0)
            if both > worst:
                worst, still = both, min(a1, b1) >= t_end
    return worst, still


def _new_holder_after(agents: dict[str, Agent], ev: str, t_up: float) -> bool:
    return any(_first(agent, ev, after=t_up) is not None for agent in agents.values())


def _round(
    server: RedisProc,
    kind: str,
    scenario: str,
    args: argparse.Namespace,
    index: int,
    random: Any,
    logs: Path,
) -> dict[str, Any]:
    ttl = float(args.ttl)
    coord = server.client(client_name="bench-coordinator")
    name = f"outage-{kind}-{scenario}-{index}"
    if kind == "mutexowner":
        seed_epoch(coord, name)
    agents = {role: Agent(_config(kind, server, ttl, name, role), logs) for role in ("A", "B")}
    a, b = agents["A"], agents["B"]
    try:
        for agent in agents.values():
            agent.ready()
        a.send("acquire")
        a.expect("acquired", 30)
        b.send("acquire")
        b.expect("waiting", 15)
        if kind == "mutexowner":
            a.expect("worker_start", 10)
            b.expect("standby_ready", 15)
            channel = b.hello["channel"]
            wait_until(lambda: numsub(coord, channel) >= 2, 5)
        else:
            wait_until(lambda: blocked_clients(coord, f"{name}-B") >= 1, 5)
        time.sleep(random.uniform(0.0, ttl / 3))
        coord.close()
        t_kill = time.monotonic()
        server.kill()
        if scenario == "long":
            time.sleep(args.down)
        server.start()
        t_up = time.monotonic()
        coord = server.client(client_name="bench-coordinator")
        if scenario == "long":
            start_ev = "worker_start" if kind == "mutexowner" else "acquired"
            wait_until(lambda: _new_holder_after(agents, start_ev, t_up), ttl * 2 + 12, 0.01)
            time.sleep(1.0)  # watch a little longer for a late overlap
        else:
            time.sleep(ttl + 2.5)
        t_end = time.monotonic()
        status = {role: agent.request("status", "status") for role, agent in agents.items()}
    finally:
        for agent in agents.values():
            agent.close()

    def rel(t: Optional[float]) -> Optional[float]:
        return None if t is None else t - t_kill

    row: dict[str, Any] = {
        "contender": kind,
        "scenario": scenario,
        "round": index,
        "redis_down_s": t_up - t_kill,
        "a_believes_held_at_end": status["A"].get("believes_held"),
        "b_believes_held_at_end": status["B"].get("believes_held"),
    }
    if kind == "mutexowner":
        drift = ttl * 0.01 + 0.002
        confirms = [
            e["t_event"]
            for ev in ("mo.acquired", "mo.renewed")
            for e in a.all(ev)
            if e["t_event"] < t_kill
        ]
        lost = _first(a, "mo.lost", after=t_kill)
        a_end = _first(a, "worker_end", after=t_kill)
        holders = {
            role: _first(agent, "worker_start", after=t_kill) for role, agent in agents.items()
        }
        kept = lost is None and _first(a, "mo.renewed", after=t_up) is not None
        intervals = {
            r: _intervals(ag, "worker_start", "worker_end", t_end) for r, ag in agents.items()
        }
        row.update(
            {
                "a_told_of_loss_s": rel(lost["t"]) if lost else None,
                "a_loss_reason": lost["reason"] if lost else None,
                "a_workers_stopped_s": rel(a_end["t"]) if a_end else None,
                "a_deadline_bound_s": rel(max(confirms) + ttl - drift) if confirms else None,
                "a_suspended_s": rel((_first(a, "mo.suspended", after=t_kill) or {}).get("t")),
                # After the restart nobody new may take the key for one ttl (the quiet
                # period opened by the first script call): B starts about that long after.
                "b_lock_delay_s": holders["B"]["t"] - t_up if holders["B"] else None,
            }
        )
    else:
        died = _first(a, "thread_died", after=t_kill)
        holders = {"A": None, "B": _first(b, "acquired", after=t_kill)}
        kept = False
        intervals = {r: _intervals(ag, "acquired", None, t_end) for r, ag in agents.items()}
        row.update(
            {
                "a_told_of_loss_s": None,
                "a_loss_reason": "never told",
                "a_workers_stopped_s": None,
                "a_renewal_thread_died_s": rel(died["t"]) if died else None,
                "a_renewal_thread_error": died["error"] if died else None,
                "b_acquire_errors": len(b.all("acquire_error")),
            }
        )
    candidates = [(ev["t"], role) for role, ev in holders.items() if ev is not None]
    if kept:
        row["next_holder"] = "A kept it"
        row["next_holder_s"] = None
    elif candidates:
        t_next, who = min(candidates)
        row["next_holder"] = who
        row["next_holder_s"] = rel(t_next)
        row["next_holder_after_up_s"] = t_next - t_up
    else:
        row["next_holder"] = "nobody"
        row["next_holder_s"] = None
    row["overlap_s"], row["overlap_ongoing"] = _overlap(intervals["A"], intervals["B"], t_end)
    row["intervals_rel_s"] = {
        r: [[x - t_kill for x in iv] for iv in ivs] for r, ivs in intervals.items()
    }
    return row


def run(server: RedisProc, args: argparse.Namespace) -> dict[str, Any]:
    random = rng(args)
    kinds = chosen(args, CONTENDERS)
    scenarios = [s.strip() for s in str(args.scenarios).split(",") if s.strip()]
    logs = log_dir(args)
    started = time.monotonic()
    plan = [(k, s, i) for i in range(args.rounds) for s in scenarios for k in kinds]
    rows = []
    # Interleave: round i of every (contender, scenario) before round i + 1 of any.
    for index in range(args.rounds):
        batch = [p for p in plan if p[2] == index]
        random.shuffle(batch)
        for kind, scenario, i in batch:
            rows.append(_round(server, kind, scenario, args, i, random, logs))
    return {
        "benchmark": "outage",
        "ttl_s": args.ttl,
        "down_s": args.down,
        "rounds": args.rounds,
        "elapsed_s": time.monotonic() - started,
        "results": rows,
    }


def render(result: dict[str, Any]) -> str:
    rows = []
    order = {k: i for i, k in enumerate(CONTENDERS)}
    for row in sorted(
        result["results"], key=lambda r: (order[r["contender"]], r["scenario"], r["round"])
    ):
        if row["contender"] == "mutexowner":
            told = (
                f"{row['a_told_of_loss_s']:.2f} ({row['a_loss_reason']})"
                if row["a_told_of_loss_s"] is not None
                else "not lost"
            )
            stopped = row["a_workers_stopped_s"]
            bound = row["a_deadline_bound_s"]
            delay = row.get("b_lock_delay_s")
        else:
            died = row.get("a_renewal_thread_died_s")
            told = "never" + (f" (renewer died {died:.2f})" if died is not None else "")
            stopped, bound, delay = None, None, None
        rows.append(
            [
                row["contender"],
                row["scenario"],
                row["redis_down_s"],
                told,
                stopped,
                bound,
                row["next_holder"],
                row.get("next_holder_s"),
                row.get("next_holder_after_up_s"),
                delay,
                f"{row['overlap_s']:.2f}" + ("+" if row["overlap_ongoing"] else ""),
                row["a_believes_held_at_end"],
            ]
        )
    text = (
        f"4. Redis kill -9 + restart without data while A holds and B waits; ttl "
        f"{result['ttl_s']:g} s; long outage {result['down_s']:g} s; {result['rounds']} "
        f"round(s) each; took {result['elapsed_s']:.0f} s. Seconds after the kill.\n"
        + table(
            [
                "contender",
                "scenario",
                "down",
                "A told of loss at",
                "A workers off",
                "A deadline <=",
                "next",
                "next at",
                "after up",
                "lock-delay",
                "overlap s",
                "A thinks held",
            ],
            rows,
        )
        + "\n(A deadline <= = A's last confirmed renewal + ttl - drift; overlap = longest time"
        " both A and B held, + = still both holding when the round ended; 'A thinks held' = A's own"
        " belief at the end of the round)"
    )
    return text


if __name__ == "__main__":
    sys.exit(standalone(run, render, parser()))
