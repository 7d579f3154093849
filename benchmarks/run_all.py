"""Run every benchmark against one loopback redis-server and print their tables and a summary.

``benchmarks/run.sh`` calls this inside the benchmark virtualenv. Round counts are moderate
so the whole run takes a few minutes on a 2-core machine; raise them for tighter figures.
The outage benchmark runs last: it kills and restarts the shared server.

``--quick`` runs every benchmark tiny (a few rounds, 50 leases, short windows) to prove they
all still work: figures are printed, no target is checked, and the exit status is non-zero
when any benchmark failed. CI runs it (``.ci/run``).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any, Optional

import failover
import handoff
import many_leases
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
    p.add_argument(
        "--contenders",
        default=None,
        help=f"comma-separated subset of {','.join(CONTENDERS)} (default: all installed)",
    )
    p.add_argument("--handoff-rounds", type=int, default=40)
    p.add_argument("--failover-rounds", type=int, default=5)
    p.add_argument("--cost-seconds", type=float, default=10.0)
    p.add_argument("--outage-rounds", type=int, default=2)
    p.add_argument(
        "--many-n",
        type=int,
        action="append",
        default=None,
        help="many_leases: number of owners (repeatable; default 1000 and 10000; a run that "
        "would need more than 4000 threads is skipped with a note)",
    )
    p.add_argument("--many-idle", type=float, default=10.0, help="many_leases: idle window, s")
    p.add_argument(
        "--quick",
        action="store_true",
        help="every benchmark tiny (CI: proves they work; no targets checked; < 60 s)",
    )
    p.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)}",
    )
    return p


BENCHMARKS = ("handoff", "failover", "renewal_cost", "many_leases", "outage")


def _plan(common: argparse.Namespace) -> list[tuple[str, Any, list[str]]]:
    """(name, module, its command-line arguments) for each benchmark, in running order."""
    many_ns = common.many_n or [1000, 10000]
    if common.quick:
        return [
            ("handoff", handoff, ["--rounds", "3", "--no-targets"]),
            ("failover", failover, ["--rounds", "1", "--ttl", "1"]),
            ("renewal_cost", renewal_cost, ["--seconds", "1", "--warmup", "0.3", "--calls", "30"]),
            (
                "many_leases",
                many_leases,
                ["--n", "50", "--idle", "1", "--budget", "60", "--no-targets", "--strict"],
            ),
            ("outage", outage, ["--rounds", "1", "--ttl", "1", "--down", "1.5"]),
        ]
    return [
        ("handoff", handoff, ["--rounds", str(common.handoff_rounds)]),
        ("failover", failover, ["--rounds", str(common.failover_rounds)]),
        ("renewal_cost", renewal_cost, ["--seconds", str(common.cost_seconds)]),
        (
            "many_leases",
            many_leases,
            [a for n in many_ns for a in ("--n", str(n))] + ["--idle", str(common.many_idle)],
        ),
        ("outage", outage, ["--rounds", str(common.outage_rounds)]),
    ]


def _args(module: Any, extra: list[str], common: argparse.Namespace) -> argparse.Namespace:
    argv = list(extra)
    if common.seed is not None:
        argv += ["--seed", str(common.seed)]
    if common.log_dir:
        argv += ["--log-dir", common.log_dir]
    if common.contenders:
        argv += ["--contenders", common.contenders]
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
    for kind in (CONTENDERS[0], "mutexowner+supervisor", *CONTENDERS[1:]):
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
    text = "Summary\n" + table(
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
    if _find(results.get("handoff", {}).get("results", []), "mutexowner"):
        text += (
            "\n(mutexowner's hand-off: no supervisor, to on_acquired; mutexowner+supervisor: "
            "to its worker's first line; the other benchmarks run mutexowner with a supervisor "
            "and one worker)"
        )
    many = results.get("many_leases", {}).get("results", [])
    for r in many:
        text += (
            f"\nmutexowner, {r['n']} leases in one process: all holding "
            f"{fmt(r['all_holding_s'])} s, idle CPU {fmt(r['idle_cpu_s_per_10s'])} s per 10 s, "
            f"RSS +{fmt(r['rss_delta_mb'], 1)} MB, "
            f"{r['threads']} threads, {r['connections']} connections, "
            f"stop all {fmt(r['stop_all_s'])} s ({r['keys_left_after_stop']} keys left)"
        )
    alone = results.get("renewal_cost", {}).get("one_owner_idle")
    if alone:
        text += (
            f"\nmutexowner, one owner idle: {fmt(alone['cpu_ms_per_renew_interval'])} ms CPU and "
            f"{fmt(alone['commands_per_renew_interval'], 1)} Redis commands per renew interval"
        )
    return text


def main(argv: Optional[list[str]] = None) -> int:
    common = parser().parse_args(argv)
    only = {s.strip() for s in common.only.split(",") if s.strip()}
    unknown = only - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    results: dict[str, Any] = {}
    failed: list[str] = []
    with RedisProc() as server:
        env = environment(server)
        if not common.json:
            print(render_environment(env), flush=True)
        for name, module, extra in _plan(common):
            if name not in only:
                continue
            t0 = time.monotonic()
            try:
                result = module.run(server, _args(module, extra, common))
            except Exception:  # report it, run the others, and fail the run at the end
                failed.append(name)
                print(f"\n!!! benchmark {name} FAILED:", file=sys.stderr)
                traceback.print_exc()
                if not server.ping():  # e.g. the outage benchmark died with it down
                    server.start()
                continue
            results[name] = result
            if not common.json:
                print("\n" + module.render(result), flush=True)
                if common.quick:
                    print(f"({name}: {time.monotonic() - t0:.1f} s)", flush=True)
    total = time.monotonic() - started
    if common.json:
        print(to_json({"environment": env, "elapsed_s": total, "failed": failed, **results}))
    else:
        print("\n" + summarize(results))
        mode = "quick mode: no target checked; " if common.quick else ""
        print(f"\n{mode}all benchmarks took {total:.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
