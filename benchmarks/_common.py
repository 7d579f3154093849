"""Shared pieces of the benchmarks: a loopback redis-server, contender processes, statistics.

Nothing here is part of the library. Every benchmark talks to one ``redis-server`` on a free
127.0.0.1 port, started without persistence (``--save "" --appendonly no``), and runs each
contender (mutexowner or a peer lock library) in its own process, ``_agent.py``, driven by
JSON lines on stdin/stdout. Times are ``time.monotonic()`` readings, which on Linux are one
system-wide clock (CLOCK_MONOTONIC), so stamps taken in different processes compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AGENT = HERE / "_agent.py"
LOOPBACK = "127.0.0.1"

#: Contenders in the order tables list them; mutexowner first (ratios are relative to it).
CONTENDERS = ("mutexowner", "redis-py", "python-redis-lock", "pottery", "sherlock")
#: The distribution (PyPI) name of each contender, for version reporting.
DISTRIBUTIONS = {
    "mutexowner": "mutexowner",
    "redis-py": "redis",
    "python-redis-lock": "python-redis-lock",
    "pottery": "pottery",
    "sherlock": "sherlock",
}


# -- redis-server --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class RedisProc:
    """One ``redis-server`` on 127.0.0.1 without persistence, that can be killed and restarted.

    ``restart`` reuses the same port, so clients reconnect to a server that lost all data,
    exactly as after ``kill -9`` of a server that does not persist.
    """

    def __init__(self, executable: Optional[str] = None) -> None:
        found = executable or os.environ.get("MUTEXOWNER_REDIS_SERVER") or "redis-server"
        path = shutil.which(found)
        if path is None:
            raise SystemExit(
                f"{found} not found: install it (Debian: apt-get install redis-server)"
            )
        self.executable = path
        self.dir = Path(tempfile.mkdtemp(prefix="mutexowner-bench-redis-"))
        self.port = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(host=LOOPBACK, port=self.port, **kwargs)

    def start(self) -> RedisProc:
        """Start on a free port (first time) or on the same port again (restart)."""
        first = not self.port
        for _attempt in range(5):
            if not self.port:
                self.port = free_port()
            self._spawn()
            if self._wait_ready(10.0):
                return self
            self._reap()
            if first:
                self.port = 0  # the port was taken meanwhile: pick another
            else:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server would not start; log:\n{self.log_tail()}")

    def _spawn(self) -> None:
        if not self.port:
            self.port = free_port()
        cmd = [
            self.executable,
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "redis.log"),
            "--protected-mode",
            "yes",
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.005)
        return False

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _reap(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, nothing saved) and reap it."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self._reap()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def version(self) -> str:
        out = subprocess.run(
            [self.executable, "--version"], capture_output=True, text=True, check=False
        ).stdout
        for part in out.split():
            if part.startswith("v="):
                return part[2:]
        return out.strip()

    def __enter__(self) -> RedisProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def seed_epoch(client: redis.Redis, name: str) -> None:
    """Create mutexowner's epoch marker for ``name`` with a 10 ms quiet period.

    On an empty Redis the first acquisition of a lease waits one ttl (lock-delay): an empty
    server looks like one that lost its data. A benchmark of hand-off or failover times is
    not about that wait, so it takes and releases the lease once with a 10 ms ttl first.
    """
    seed_epochs(client, [name])


def seed_epochs(client: redis.Redis, names: Iterable[str]) -> None:
    """`seed_epoch` for many names, with one wait for the quiet periods at the end."""
    from mutexowner.lease import Lease, new_token

    for name in names:
        lease = Lease(client, name, ttl=0.01, identity="benchmark-seed")
        token = new_token()
        lease.acquire(token)
        lease.release(token)
    time.sleep(0.03)


# -- contender processes -------------------------------------------------------------------


class AgentError(RuntimeError):
    """A contender process did not do what was asked in time."""


class Agent:
    """A contender in its own process (``_agent.py``), driven by JSON lines.

    Every line the agent writes is an event dict with at least ``ev``; the reader thread
    keeps all of them, and ``expect`` hands them out in order, one consumer cursor per name.
    """

    def __init__(self, config: dict[str, Any], log_dir: Path) -> None:
        self.config = config
        self.label = f"{config['kind']}:{config['role']}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{config['client_name']}-{os.getpid()}-{id(self)}.log"
        self._log = self.log_path.open("w")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=env,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._cursor: dict[str, int] = {}
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"agent-{self.label}")
        self._reader.start()
        self.hello: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def ready(self, timeout: float = 30.0) -> Agent:
        self.hello = self.expect("hello", timeout)
        return self

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise AgentError(f"{self.label} is gone ({exc}); log {self.log_path}") from exc

    def expect(self, ev: str, timeout: float, after: Optional[float] = None) -> dict[str, Any]:
        """The next unconsumed event named ``ev`` (stamped at or after ``after``, if given).

        Raises AgentError after ``timeout`` seconds, or when the process has exited.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = self._cursor.get(ev, 0)
                for index in range(start, len(self.events)):
                    event = self.events[index]
                    if event.get("ev") == ev and (after is None or event["t"] >= after):
                        self._cursor[ev] = index + 1
                        return self.events[index]
                self._cursor[ev] = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AgentError(
                        f"{self.label}: no {ev!r} event within {timeout:g} s "
                        f"(exit={self.proc.poll()}); log {self.log_path}:\n{self.log_tail()}"
                    )
                self._cond.wait(left)

    def all(self, ev: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("ev") == ev]

    def request(self, cmd: str, reply: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self.expect(reply, timeout)

    def kill(self) -> None:
        """SIGKILL the process (a crash: nothing released) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._close()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the agent to exit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout)
            except (AgentError, subprocess.TimeoutExpired):
                self.kill()
        self._close()

    def _close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._log.close()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.002) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds passed (set-up only, never timed)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def blocked_clients(client: redis.Redis, name: str) -> int:
    """Connections named ``name`` blocked in a command (BLPOP), per CLIENT LIST."""
    count = 0
    for entry in client.client_list():
        if entry.get("name") == name and "b" in entry.get("flags", ""):
            count += 1
    return count


def numsub(client: redis.Redis, channel: str) -> int:
    reply = client.pubsub_numsub(channel)
    return int(reply[0][1]) if reply else 0


def standby_ready(kind: str, waiter: Agent, coord: redis.Redis) -> None:
    """Wait (set-up, not timed) until ``waiter`` is really waiting: mutexowner's release
    subscription is live, python-redis-lock's BLPOP is pending; pollers need nothing."""
    if kind == "mutexowner":
        waiter.expect("standby_ready", 15)
        channel = waiter.hello["channel"]
        if not wait_until(lambda: numsub(coord, channel) >= 2, 5):
            raise RuntimeError(f"{waiter.label}: release subscription never appeared")
    elif kind == "python-redis-lock":
        name = waiter.config["client_name"]
        if not wait_until(lambda: blocked_clients(coord, name) >= 1, 5):
            raise RuntimeError(f"{waiter.label}: never blocked in BLPOP")


# -- statistics and tables -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return math.nan
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """n, median, p90, p99, mean, min, max of ``values`` (NaN when empty)."""
    return {
        "n": len(values),
        "median": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else math.nan,
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
    }


def ratio(value: float, base: float) -> float:
    if not base or math.isnan(base) or math.isnan(value):
        return math.nan
    return value / base


def fmt(value: Any, digits: int = 2) -> str:
    """Compact human formatting: numbers to ``digits`` places, NaN/None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "—"
        if isinstance(value, int):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A plain-text table with right-aligned numbers."""
    rows_list = [list(row) for row in rows]
    cells = [[fmt(v, digits) for v in row] for row in rows_list]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows_list)
        for i in range(len(headers))
    ]
    for row in cells:
        lines.append(
            "  ".join(
                cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ).rstrip()
        )
    return "\n".join(lines)


def to_json(data: Any) -> str:
    """JSON with NaN written as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, sort_keys=False)


# -- environment ---------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(server: RedisProc) -> dict[str, Any]:
    """Versions of everything measured, and the machine they ran on."""
    info = server.client().info("server")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "redis_server": str(info.get("redis_version", server.version())),
        "mutexowner_git": _git_revision(),
        "versions": {name: _version(dist) for name, dist in DISTRIBUTIONS.items()},
    }


def render_environment(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    load = " ".join(f"{x:.2f}" for x in env["loadavg_at_start"])
    return (
        f"environment: Python {env['python']} on {env['platform']}, {env['cpus']} CPUs, "
        f"load {load}\n"
        f"redis-server {env['redis_server']} (loopback, --save '' --appendonly no); "
        f"mutexowner git {env['mutexowner_git']}\n"
        f"versions: {versions}"
    )


def available(contenders: Iterable[str]) -> list[str]:
    """The contenders whose package is importable here (a missing peer is skipped, not fatal)."""
    modules = {
        "mutexowner": "mutexowner",
        "redis-py": "redis",
        "python-redis-lock": "redis_lock",
        "pottery": "pottery",
        "sherlock": "sherlock",
    }
    out = []
    for name in contenders:
        try:
            __import__(modules[name])
        except ImportError:
            print(f"note: {name} is not installed; skipping it", file=sys.stderr)
            continue
        out.append(name)
    return out


# -- command line --------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--seed", type=int, default=None, help="random seed for phases/order")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="where contender processes write their stderr (default: a temp directory)",
    )
    return parser


def chosen(args: argparse.Namespace, allowed: Sequence[str]) -> list[str]:
    names = [n.strip() for n in str(args.contenders).split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(unknown)}")
    return available(n for n in allowed if n in names)


def log_dir(args: argparse.Namespace) -> Path:
    if args.log_dir:
        return Path(args.log_dir)
    return Path(tempfile.mkdtemp(prefix="mutexowner-bench-logs-"))


def rng(args: argparse.Namespace) -> random.Random:
    return random.Random(args.seed)


def standalone(
    run: Callable[[RedisProc, argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]] = None,
) -> int:
    """Run one benchmark on its own redis-server and print its table (or JSON)."""
    args = parser.parse_args(argv)
    with RedisProc() as server:
        env = environment(server)
        result = run(server, args)
        result["environment"] = env
    if args.json:
        print(to_json(result))
    else:
        print(render_environment(env))
        print()
        print(render(result))
    return 0
