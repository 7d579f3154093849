"""Renewal cost: Redis round trips and CPU of an idle holder and an idle standby, per contender.

Part A. Every contender runs one holder process and one standby process at once, each on
its own key, with a 10 s lease (mutexowner's default ttl; the peers are given the same, and
those without a renewal of their own renew every ttl/3 from a thread, as a user would).
After a warm-up, for ``--seconds`` (default 10): the commands each process sends are counted
with MONITOR (attributed per connection through CLIENT SETNAME / CLIENT LIST; commands run
inside Lua scripts are not round trips and are excluded), the server's INFO commandstats
deltas give the total work including commands inside scripts, and each process reports its
own CPU time (``resource.getrusage(RUSAGE_SELF)``: all its threads, user + system).

Part B. Server time of one renewal call: the coordinator renews a held lock of each
contender ``--calls`` times in a row and reads EVALSHA's ``usec_per_call`` from INFO
commandstats (every contender renews with a Lua script), plus the client-side round trip.

Part C. One mutexowner owner alone, holding, idle, no supervisor (the baseline of issue 12's
"one owner, idle: no worse than today"): in its own process, over a window of whole renew
intervals (about ``--seconds``, at least one), its CPU time and every command the server
executed (INFO commandstats deltas, commands inside scripts included, the benchmark's own
INFO excluded; nothing else runs meanwhile), both per renew interval.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import threading
import time
from collections import Counter
from functools import partial
from typing import Any, Callable

from _common import (
    CONTENDERS,
    LOOPBACK,
    Agent,
    RedisProc,
    base_parser,
    blocked_clients,
    chosen,
    log_dir,
    numsub,
    seed_epoch,
    standalone,
    summary,
    table,
    wait_until,
)

LEASE = 10.0
_MONITOR_LINE = re.compile(r'^\+\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]*)"')


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__.splitlines()[0] if __doc__ else "renewal cost")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring window (default 10)")
    p.add_argument("--warmup", type=float, default=1.5, help="settle time before the window")
    p.add_argument("--calls", type=int, default=300, help="renewals per contender in part B")
    return p


class Monitor:
    """MONITOR on its own socket, in a thread: counts top-level commands per client address."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=0.2)
        self.sock.sendall(b"MONITOR\r\n")
        self.counts: Counter[tuple[str, str]] = Counter()
        self.script_internal = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="monitor")
        self._ok = threading.Event()

    def start(self) -> Monitor:
        self._thread.start()
        if not self._ok.wait(5):
            raise RuntimeError("MONITOR did not answer +OK")
        return self

    def _run(self) -> None:
        buffer = b""
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if line == "+OK":
                    self._ok.set()
                    continue
                match = _MONITOR_LINE.match(line)
                if match is None:
                    continue
                addr, command = match.group(1), match.group(2).lower()
                if addr == "lua":
                    self.script_internal += 1
                else:
                    self.counts[(addr, command)] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _config(kind: str, server: RedisProc, role: str) -> dict[str, Any]:
    manual = kind in ("redis-py", "pottery", "sherlock")
    return {
        "kind": kind,
        "port": server.port,
        "name": f"cost-{kind}",
        "role": role,
        "client_name": f"cost-{kind}-{role}",
        "lease": LEASE,
        "renew_every": LEASE / 3 if manual else None,
    }


def _subscribed(client: Any, channel: str, count: int) -> bool:
    return numsub(client, channel) >= count


def _blocked(client: Any, name: str) -> bool:
    return blocked_clients(client, name) >= 1


def _commandstats(client: Any) -> dict[str, tuple[int, float]]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"]))
        for name, v in stats.items()
    }


def _idle_processes(
    server: RedisProc, args: argparse.Namespace, kinds: list[str]
) -> dict[str, Any]:
    logs = log_dir(args)
    coord = server.client(client_name="bench-coordinator")
    agents: dict[tuple[str, str], Agent] = {}
    try:
        for kind in kinds:
            if kind == "mutexowner":
                seed_epoch(coord, f"cost-{kind}")
            holder = Agent(_config(kind, server, "holder"), logs).ready()
            standby = Agent(_config(kind, server, "standby"), logs).ready()
            agents[(kind, "holder")], agents[(kind, "standby")] = holder, standby
            holder.send("acquire")
            holder.expect("acquired", 30)
            standby.send("acquire")
            standby.expect("waiting", 15)
            if kind == "mutexowner":
                standby.expect("standby_ready", 15)
                channel = standby.hello["channel"]
                wait_until(partial(_subscribed, coord, channel, 2), 5)
            elif kind == "python-redis-lock":
                name = standby.config["client_name"]
                wait_until(partial(_blocked, coord, name), 5)
        time.sleep(args.warmup)
        monitor = Monitor(server.port).start()
        names_before = {c["addr"]: c.get("name", "") for c in coord.client_list()}
        stats0 = _commandstats(coord)
        cpu0 = {key: agent.request("rusage", "rusage") for key, agent in agents.items()}
        t0 = time.monotonic()
        time.sleep(args.seconds)
        t1 = time.monotonic()
        cpu1 = {key: agent.request("rusage", "rusage") for key, agent in agents.items()}
        stats1 = _commandstats(coord)
        monitor.stop()
        names = dict(names_before)
        names.update({c["addr"]: c.get("name", "") for c in coord.client_list()})
    finally:
        for agent in agents.values():
            agent.close()
    window = t1 - t0
    per_name: dict[str, Counter[str]] = {}
    unattributed = 0
    for (addr, command), count in monitor.counts.items():
        name = names.get(addr, "")
        if not name:
            unattributed += count
            continue
        per_name.setdefault(name, Counter())[command] += count
    rows = []
    for (kind, role), agent in agents.items():
        name = agent.config["client_name"]
        commands = per_name.get(name, Counter())
        busy = cpu1[(kind, role)]["cpu"] - cpu0[(kind, role)]["cpu"]
        span = cpu1[(kind, role)]["t"] - cpu0[(kind, role)]["t"]
        rows.append(
            {
                "contender": kind,
                "role": role,
                "round_trips_per_s": sum(commands.values()) / window,
                "commands": dict(commands),
                "cpu_ms_per_10s": busy / span * 10_000 if span > 0 else None,
                "threads": cpu1[(kind, role)]["threads"],
            }
        )
    delta = {
        cmd: (calls - stats0.get(cmd, (0, 0.0))[0], usec - stats0.get(cmd, (0, 0.0))[1])
        for cmd, (calls, usec) in stats1.items()
    }
    server_calls = {cmd: c for cmd, (c, _u) in delta.items() if c > 0 and cmd not in OWN_COMMANDS}
    return {
        "window_s": window,
        "rows": rows,
        "monitor_top_level_total": sum(monitor.counts.values()),
        "monitor_script_internal_total": monitor.script_internal,
        "monitor_unattributed": unattributed,
        "commandstats_delta_calls": server_calls,
        "commandstats_calls_per_s": sum(server_calls.values()) / window,
    }


def _renewers(
    client: Any, kinds: list[str]
) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """For each contender: (renew once, release) on a lock held by ``client``."""
    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    for kind in kinds:
        name = f"micro-{kind}"
        if kind == "mutexowner":
            from mutexowner.lease import Lease, new_token

            seed_epoch(client, name)
            lease = Lease(client, name, ttl=LEASE, identity="micro")
            token = new_token()
            fence = lease.acquire(token).fencing_token
            out[kind] = (partial(lease.renew, token, fence), partial(lease.release, token))
        elif kind == "redis-py":
            lock = client.lock(name, timeout=LEASE, thread_local=False)
            lock.acquire()
            out[kind] = (lock.reacquire, lock.release)
        elif kind == "python-redis-lock":
            import redis_lock

            lock = redis_lock.Lock(client, name, expire=int(LEASE))
            lock.acquire()
            out[kind] = (lock.extend, lock.release)
        elif kind == "pottery":
            from pottery import Redlock

            lock = Redlock(
                key=name, masters={client}, auto_release_time=LEASE, num_extensions=10**9
            )
            lock.acquire()
            out[kind] = (lock.extend, lock.release)
        elif kind == "sherlock":
            from sherlock import RedisLock

            lock = RedisLock(name, client=client, expire=int(LEASE), timeout=10)
            lock.acquire()
            out[kind] = (lock.renew, lock.release)
    return out


def _renewal_calls(
    server: RedisProc, args: argparse.Namespace, kinds: list[str]
) -> list[dict[str, Any]]:
    coord = server.client(client_name="bench-coordinator")
    client = server.client(client_name="bench-micro")
    renewers = _renewers(client, kinds)
    rows = []
    for kind, (renew, release) in renewers.items():
        renew()  # the script is loaded and cached
        coord.config_resetstat()
        rtt = []
        for _ in range(args.calls):
            start = time.perf_counter()
            renew()
            rtt.append((time.perf_counter() - start) * 1e6)
        stats = _commandstats(coord)
        calls, usec = stats.get("evalsha", (0, 0.0))
        inside = sum(
            c
            for cmd, (c, _u) in stats.items()
            if cmd not in ("evalsha", "info", "config|resetstat")
        )
        release()
        rows.append(
            {
                "contender": kind,
                "calls": calls,
                "server_usec_per_call": usec / calls if calls else None,
                "commands_inside_script_per_call": inside / calls if calls else None,
                "client_round_trip_us": summary(rtt),
            }
        )
    return rows


#: The benchmark's own commands, never counted as a contender's work.
OWN_COMMANDS = {"info", "client|list", "monitor", "ping", "client|setname", "config|resetstat"}


def _one_owner_idle(server: RedisProc, args: argparse.Namespace) -> dict[str, Any]:
    """Part C: one idle holding mutexowner, alone: CPU and Redis commands per renew interval."""
    coord = server.client(client_name="bench-coordinator")
    config = _config("mutexowner", server, "alone")
    config["supervisor"] = False
    seed_epoch(coord, config["name"])
    agent = Agent(config, log_dir(args)).ready()
    try:
        agent.send("acquire")
        agent.expect("acquired", 30)
        interval = float(agent.request("status", "status")["renew_interval"])
        intervals = max(1, round(args.seconds / interval))
        time.sleep(args.warmup)
        stats0 = _commandstats(coord)
        cpu0 = agent.request("rusage", "rusage")
        time.sleep(intervals * interval)
        cpu1 = agent.request("rusage", "rusage")
        stats1 = _commandstats(coord)
        held = agent.request("status", "status")["believes_held"]
    finally:
        agent.close()
    window = cpu1["t"] - cpu0["t"]
    per = interval / window if window > 0 else float("nan")
    commands = {
        cmd: calls - stats0.get(cmd, (0, 0.0))[0]
        for cmd, (calls, _u) in stats1.items()
        if cmd not in OWN_COMMANDS and calls - stats0.get(cmd, (0, 0.0))[0] > 0
    }
    return {
        "renew_interval_s": interval,
        "window_s": window,
        "intervals": intervals,
        "held_throughout": bool(held),
        "cpu_ms_per_renew_interval": (cpu1["cpu"] - cpu0["cpu"]) * 1000 * per,
        "commands_per_renew_interval": sum(commands.values()) * per,
        "evalsha_per_renew_interval": commands.get("evalsha", 0) * per,
        "commands": commands,
        "threads": cpu1["threads"],
    }


def run(server: RedisProc, args: argparse.Namespace) -> dict[str, Any]:
    kinds = chosen(args, CONTENDERS)
    started = time.monotonic()
    idle = _idle_processes(server, args, kinds)
    calls = _renewal_calls(server, args, kinds)
    alone = _one_owner_idle(server, args) if "mutexowner" in kinds else None
    return {
        "benchmark": "renewal_cost",
        "lease_s": LEASE,
        "elapsed_s": time.monotonic() - started,
        "idle": idle,
        "renewal_call": calls,
        "one_owner_idle": alone,
    }


def render(result: dict[str, Any]) -> str:
    idle = result["idle"]
    rows = []
    for row in idle["rows"]:
        top = ", ".join(f"{c} {n}" for c, n in sorted(row["commands"].items(), key=lambda x: -x[1]))
        rows.append(
            [
                row["contender"],
                row["role"],
                row["round_trips_per_s"],
                row["cpu_ms_per_10s"],
                row["threads"],
                top or "none",
            ]
        )
    text = (
        f"3a. Idle cost, lease {result['lease_s']:g} s, all contenders at once for "
        f"{idle['window_s']:.1f} s (one holder + one standby process each)\n"
        + table(
            ["contender", "role", "round trips/s", "CPU ms per 10 s", "threads", "commands seen"],
            rows,
        )
        + f"\nserver: {idle['commandstats_calls_per_s']:.1f} commands/s executed in all (INFO "
        f"commandstats, incl. {idle['monitor_script_internal_total']} inside scripts); "
        f"MONITOR saw {idle['monitor_top_level_total']} round trips, "
        f"{idle['monitor_unattributed']} unattributed"
    )
    rows = []
    for row in result["renewal_call"]:
        rtt = row["client_round_trip_us"]
        rows.append(
            [
                row["contender"],
                row["calls"],
                row["server_usec_per_call"],
                row["commands_inside_script_per_call"],
                rtt["median"],
                rtt["p99"],
            ]
        )
    text += "\n\n3b. One renewal call (EVALSHA), back to back from one client\n" + table(
        [
            "contender",
            "calls",
            "server µs/call",
            "cmds inside script",
            "round trip µs p50",
            "p99",
        ],
        rows,
        digits=1,
    )
    alone = result.get("one_owner_idle")
    if alone:
        top = ", ".join(
            f"{c} {n}" for c, n in sorted(alone["commands"].items(), key=lambda x: -x[1])
        )
        text += (
            f"\n\n3c. One mutexowner owner alone, holding, idle, no supervisor, lease "
            f"{result['lease_s']:g} s: per renew interval ({alone['renew_interval_s']:.2f} s; "
            f"window {alone['intervals']} intervals, {alone['window_s']:.1f} s): "
            f"CPU {alone['cpu_ms_per_renew_interval']:.2f} ms, Redis commands "
            f"{alone['commands_per_renew_interval']:.2f} (EVALSHA "
            f"{alone['evalsha_per_renew_interval']:.2f}; all: {top or 'none'}); "
            f"{alone['threads']} threads in its process; held throughout: "
            f"{'yes' if alone['held_throughout'] else 'NO'}"
        )
    return text


if __name__ == "__main__":
    sys.exit(standalone(run, render, parser()))
