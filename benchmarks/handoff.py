"""Hand-off latency: the holder releases at a random moment; how soon does a blocked waiter hold?

Each contender runs as two processes, A and B, on its own key of one shared redis-server.
A round: the waiter starts a blocking acquire (mutexowner: a new ``MutexOwner`` is started
and has been told the key is taken, and its release subscription is live; python-redis-lock:
its BLPOP is pending), then after a random pause of ``--phase`` seconds the holder releases
(mutexowner: ``stop()``, which stops the workers if any, releases and publishes the notice).
The figure is ``t(waiter's acquire returned) - t(just before release)``, both
``time.monotonic()`` in different processes. Roles then swap. Rounds of the contenders are
interleaved in a fresh random order each round, so machine noise hits all of them alike.

mutexowner runs twice, as two contenders: ``mutexowner`` without a supervisor, whose waiter
"holds" when its ``on_acquired`` callback runs, and ``mutexowner+supervisor`` with a
``Supervisor`` and one worker, whose waiter "holds" at the first line of its worker (the
holder's ``stop()`` then also stops its worker first). These are the two hand-off rows of
issue 12's targets, both compared with python-redis-lock's median in the same run.

Each library runs with its own defaults (ttl 10 s for mutexowner, no expiry for redis-py and
python-redis-lock, 10 s for pottery, 60 s for sherlock); the hold between rounds is short.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from _common import (
    CONTENDERS,
    Agent,
    RedisProc,
    base_parser,
    chosen,
    fmt,
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


#: mutexowner's two variants: label -> (supervisor?, the waiter's event that ends a hand-off).
MO_VARIANTS = {
    "mutexowner": (False, "acquired"),
    "mutexowner+supervisor": (True, "worker_start"),
}
WAITING["mutexowner+supervisor"] = WAITING["mutexowner"] + " (to its worker's first line)"
#: The contender the targets compare with, and issue 12's targets (largest p50 ratio to it).
REFERENCE = "python-redis-lock"
TARGETS = {"mutexowner": 1.0, "mutexowner+supervisor": 1.5}


def _parts(label: str) -> tuple[str, str, str]:
    """The stages of a mutexowner hand-off, timed from its events."""
    last = "on_acquired callback" if label == "mutexowner" else "worker's first line"
    return (
        "stop() -> released+published",
        "published -> waiter acquired",
        f"acquired -> {last}",
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
    p.add_argument(
        "--mutexowner-variants",
        default=",".join(MO_VARIANTS),
        help=f"comma-separated subset of {','.join(MO_VARIANTS)}",
    )
    p.add_argument("--no-targets", action="store_true", help="print figures only (quick mode)")
    return p


def _labels(args: argparse.Namespace) -> list[str]:
    """The contenders as rows: mutexowner as its chosen variants, then the peers."""
    labels: list[str] = []
    for kind in chosen(args, CONTENDERS):
        if kind == "mutexowner":
            wanted = {v.strip() for v in str(args.mutexowner_variants).split(",")}
            unknown = wanted - set(MO_VARIANTS) - {""}
            if unknown:
                raise SystemExit(f"unknown mutexowner variant(s): {', '.join(sorted(unknown))}")
            labels += [v for v in MO_VARIANTS if v in wanted]
        else:
            labels.append(kind)
    return labels


def _kind(label: str) -> str:
    return "mutexowner" if label in MO_VARIANTS else label


def run(server: RedisProc, args: argparse.Namespace) -> dict[str, Any]:
    random = rng(args)
    labels = _labels(args)
    logs = log_dir(args)
    coord = server.client(client_name="bench-coordinator")
    started = time.monotonic()
    pairs: dict[str, list[Agent]] = {}
    try:
        for label in labels:
            kind = _kind(label)
            name = f"handoff-{label}"
            config: dict[str, Any] = {
                "kind": kind,
                "port": server.port,
                "name": name,
                "lease": None,
                "renew_every": None,
            }
            if kind == "mutexowner":
                seed_epoch(coord, name)
                config["supervisor"] = MO_VARIANTS[label][0]
            agents = [
                Agent({**config, "role": role, "client_name": f"handoff-{label}-{role}"}, logs)
                for role in ("a", "b")
            ]
            for agent in agents:
                agent.ready()
            agents[0].send("acquire")
            agents[0].expect("acquired", 30)
            pairs[label] = agents
        latency: dict[str, list[float]] = {k: [] for k in labels}
        release_call: dict[str, list[float]] = {k: [] for k in labels}
        parts: dict[str, dict[str, list[float]]] = {
            label: {stage: [] for stage in _parts(label)}
            for label in labels
            if label in MO_VARIANTS
        }
        for _round in range(args.rounds):
            order = list(labels)
            random.shuffle(order)
            for label in order:
                kind = _kind(label)
                holder, waiter = pairs[label]
                waiter.send("acquire")
                waiter.expect("waiting", 15)
                standby_ready(kind, waiter, coord)
                time.sleep(random.uniform(*args.phase))
                holder.send("release")
                released = holder.expect("released", 30)
                if released.get("error"):
                    raise RuntimeError(f"{holder.label} release failed: {released['error']}")
                t0 = released["t0"]
                end_event = MO_VARIANTS[label][1] if label in MO_VARIANTS else "acquired"
                done = waiter.expect(end_event, 30, after=t0)
                latency[label].append((done["t"] - t0) * 1000)
                if label in MO_VARIANTS:
                    # Where the time goes: holder's release published, waiter's owner thread
                    # saw "acquired", then on_acquired ran / the worker's first line ran.
                    notice = holder.expect("mo.released", 10, after=t0)["t_event"]
                    held = waiter.expect("mo.acquired", 10, after=t0)["t_event"]
                    if end_event != "acquired":
                        waiter.expect("acquired", 10, after=t0)  # keep that cursor in step
                    stages = parts[label]
                    first, second, third = _parts(label)
                    stages[first].append((notice - t0) * 1000)
                    stages[second].append((held - notice) * 1000)
                    stages[third].append((done["t"] - held) * 1000)
                release_call[label].append((released["t1"] - released["t0"]) * 1000)
                pairs[label] = [waiter, holder]
    finally:
        for agents in pairs.values():
            for agent in agents:
                agent.close()
    rows: list[dict[str, Any]] = []
    for label in labels:
        rows.append(
            {
                "contender": label,
                "waiting": WAITING[label],
                "latency_ms": summary(latency[label]),
                "release_call_ms": summary(release_call[label]),
                "samples_ms": latency[label],
            }
        )
    base = next((r["latency_ms"] for r in rows if r["contender"] == "mutexowner"), None)
    ref = next((r["latency_ms"] for r in rows if r["contender"] == REFERENCE), None)
    for row in rows:
        stats = row["latency_ms"]
        row["median_ratio"] = ratio(stats["median"], base["median"]) if base else None
        row["p99_ratio"] = ratio(stats["p99"], base["p99"]) if base else None
        row["median_ratio_to_reference"] = ratio(stats["median"], ref["median"]) if ref else None
    return {
        "benchmark": "handoff",
        "rounds": args.rounds,
        "phase_s": list(args.phase),
        "processes": "two processes per contender (holder, waiter), roles swap each round",
        "elapsed_s": time.monotonic() - started,
        "results": rows,
        "reference": REFERENCE,
        "targets": not args.no_targets,
        "mutexowner_breakdown_ms": {
            label: {stage: summary(values) for stage, values in stages.items()}
            for label, stages in parts.items()
        },
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
                s["p90"],
                s["p99"],
                s["min"],
                s["max"],
                row["median_ratio"],
                row["p99_ratio"],
                row.get("median_ratio_to_reference"),
                row["release_call_ms"]["median"],
                row["waiting"],
            ]
        )
    head = (
        f"1. Hand-off latency (ms): release at a random phase -> blocked waiter holds. "
        f"{result['rounds']} rounds, interleaved; {result['processes']}; "
        f"phase uniform{tuple(result['phase_s'])} s; took {result['elapsed_s']:.0f} s"
    )
    text = (
        head
        + "\n"
        + table(
            [
                "contender",
                "n",
                "median",
                "p90",
                "p99",
                "min",
                "max",
                "x median",
                "x p99",
                "x prl p50",
                "release() ms",
                "waiter learns by",
            ],
            rows,
        )
        + "\n(x = ratio to mutexowner; x prl p50 = median's ratio to python-redis-lock's median; "
        "release() ms = duration of the holder's release/stop call)" + _render_breakdown(result)
    )
    if result.get("targets"):
        text += "".join("\n" + line for line in target_lines(result))
    return text


def target_lines(result: dict[str, Any]) -> list[str]:
    """Issue 12's hand-off targets: mutexowner's median over the reference's, same run."""
    by_label = {row["contender"]: row for row in result["results"]}
    ref = by_label.get(result.get("reference", REFERENCE))
    lines = []
    for label, limit in TARGETS.items():
        row = by_label.get(label)
        if row is None or ref is None:
            continue
        value = row["median_ratio_to_reference"]
        verdict = "met" if value is not None and value <= limit else "MISSED"
        what = (
            "no supervisor, to on_acquired"
            if label == "mutexowner"
            else "to the worker's first line"
        )
        lines.append(
            f"Targets hand-off p50 {label} ({what}): {row['latency_ms']['median']:.2f} ms vs "
            f"{ref['contender']} {ref['latency_ms']['median']:.2f} ms = {fmt(value)}x "
            f"(target <= {limit:g}x: {verdict})"
        )
    return lines


def _render_breakdown(result: dict[str, Any]) -> str:
    out = ""
    for label, parts in (result.get("mutexowner_breakdown_ms") or {}).items():
        if not parts or not any(s["n"] for s in parts.values()):
            continue
        rows = [[name, s["median"], s["p90"], s["p99"]] for name, s in parts.items()]
        out += f"\n{label} hand-off, stage by stage (ms):\n" + table(
            ["stage", "median", "p90", "p99"], rows
        )
    return out


if __name__ == "__main__":
    sys.exit(standalone(run, render, parser()))
