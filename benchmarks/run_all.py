"""Run every benchmark against one loopback redis-server and print their tables and a summary.

``benchmarks/run.sh`` calls this inside the benchmark virtualenv. Round counts are moderate
so the whole run takes a few minutes on a 2-core machine; raise them for tighter figures.
The outage benchmark runs last: it kills and restarts the shared server.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

import failover
import handoff
import outage
import renewal_cost
from _common import (
    CONTENDERS,
    RedisProc,
    environment,
    fmt,
    render_environment,
    table,
    to_json,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-dir", default=None, help="contender processes' stderr (default: temp)")
    p.add_argument("--handoff-rounds", type=int, default=40)
    p.add_argument("--failover-rounds", type=int, default=5)
    p.add_argument("--cost-seconds", type=float, default=10.0)
    p.add_argument("--outage-rounds", type=int, default=2)
    p.add_argument(
        "--only",
        default="handoff,failover,renewal_cost,outage",
        help="comma-separated subset of handoff,failover,renewal_cost,outage",
    )
    return p


def _args(module: Any, extra: list[str], common: argparse.Namespace) -> argparse.Namespace:
    argv = list(extra)
    if common.seed is not None:
        argv += ["--seed", str(common.seed)]
    if common.log_dir:
        argv += ["--log-dir", common.log_dir]
    args: argparse.Namespace = module.parser().parse_args(argv)
    return args


def _find(rows: list[dict[str, Any]], kind: str) -> Optional[dict[str, Any]]:
    for row in rows:
        if row.get("contender") == kind:
            return row
    return None


def summarize(results: dict[str, Any]) -> str:
    """One line per contender with the headline figure of every benchmark."""
    rows = []
    for kind in CONTENDERS:
        cells: list[Any] = [kind]
        h = _find(results.get("handoff", {}).get("results", []), kind)
        cells.append(
            f"{fmt(h['latency_ms']['median'])} / {fmt(h['latency_ms']['p99'])}" if h else None
        )
        f = _find(results.get("failover", {}).get("results", []), kind)
        cells.append(
            f"{fmt(f['failover_s']['median'], 3)} / +{fmt(f['excess_ms']['median'], 0)}"
            if f
            else None
        )
        idle = results.get("renewal_cost", {}).get("idle", {}).get("rows", [])
        for role in ("holder", "standby"):
            r = next((x for x in idle if x["contender"] == kind and x["role"] == role), None)
            cells.append(
                f"{fmt(r['round_trips_per_s'])} / {fmt(r['cpu_ms_per_10s'], 1)}" if r else None
            )
        out = [r for r in results.get("outage", {}).get("results", []) if r["contender"] == kind]
        if out:
            told = all(r["a_told_of_loss_s"] is not None for r in out if r["scenario"] == "long")
            worst = max(out, key=lambda r: r["overlap_s"])
            ongoing = "+" if worst["overlap_ongoing"] else ""
            cells.append(f"{'yes' if told else 'never'} / {fmt(worst['overlap_s'])}{ongoing} s")
        else:
            cells.append(None)
        if any(c is not None for c in cells[1:]):
            rows.append(cells)
    return "Summary\n" + table(
        [
            "contender",
            "hand-off ms p50 / p99",
            "failover s p50 / excess ms",
            "idle holder rt/s / CPU ms/10s",
            "idle standby rt/s / CPU ms/10s",
            "outage: A told / max overlap",
        ],
        rows,
    )


def main(argv: Optional[list[str]] = None) -> int:
    common = parser().parse_args(argv)
    only = {s.strip() for s in common.only.split(",") if s.strip()}
    plan = [
        ("handoff", handoff, ["--rounds", str(common.handoff_rounds)]),
        ("failover", failover, ["--rounds", str(common.failover_rounds)]),
        ("renewal_cost", renewal_cost, ["--seconds", str(common.cost_seconds)]),
        ("outage", outage, ["--rounds", str(common.outage_rounds)]),
    ]
    started = time.monotonic()
    results: dict[str, Any] = {}
    with RedisProc() as server:
        env = environment(server)
        if not common.json:
            print(render_environment(env), flush=True)
        for name, module, extra in plan:
            if name not in only:
                continue
            result = module.run(server, _args(module, extra, common))
            results[name] = result
            if not common.json:
                print("\n" + module.render(result), flush=True)
    total = time.monotonic() - started
    if common.json:
        print(to_json({"environment": env, "elapsed_s": total, **results}))
    else:
        print("\n" + summarize(results))
        print(f"\nall benchmarks took {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
