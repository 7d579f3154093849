"""The smallest complete program: one owner, one supervisor, one worker.

Run it on several machines (or in several terminals): one process holds the lease and
ticks, the others wait on standby; stop the holder (Ctrl-C) and a standby takes over
within milliseconds::

    python examples/minimal.py --redis redis://127.0.0.1:6379/0

On a fresh (or restarted) Redis the first holder waits one ttl before starting its
workers (the lock-delay that protects against leases granted before Redis lost its data).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Optional

from mutexowner import MutexOwner, Supervisor, WorkerContext
from mutexowner.connection import redact_url


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--redis",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--name", default="examples:minimal", help="lease name")
    parser.add_argument("--ttl", type=float, default=10.0, help="lease ttl, seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks")
    parser.add_argument("--seconds", type=float, help="stop after this long (default: never)")
    parser.add_argument("--ticks", type=int, help="stop after this many ticks (default: never)")
    return parser.parse_args(argv)


_PRINT_LOCK = threading.Lock()


def say(line: str) -> None:
    """Print one whole line: the worker and the owner's callbacks print from two threads."""
    with _PRINT_LOCK:
        print(line, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    done = threading.Event()  # set by a signal, --seconds or --ticks

    # Workers are told to stop shutdown_timeout before the lease's local deadline; the
    # timing rule renew_interval (ttl/3) + shutdown_timeout < ttl - drift must hold.
    sup = Supervisor(max_restarts=3, max_seconds=5.0, shutdown_timeout=min(2.0, args.ttl / 4))

    @sup.worker(name="ticker")
    def tick(ctx: WorkerContext) -> None:
        count = 0
        while not ctx.stopping.is_set():
            ctx.ensure_held()  # a local deadline check before each side effect
            count += 1
            say(f"tick {count} fencing_token={ctx.fencing_token}")
            if args.ticks is not None and count >= args.ticks:
                done.set()
            ctx.sleep(args.interval)  # returns early when told to stop

    owner = MutexOwner(
        args.redis,
        args.name,
        ttl=args.ttl,
        supervisor=sup,
        on_acquired=lambda token: say(f"holding the lease, fencing_token={token}"),
        on_lost=lambda reason: say(f"not holding any more ({reason})"),
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    say(f"contending for {args.name!r} on {redact_url(args.redis)} as {owner.identity}")
    with owner:  # start(); on exit stop(): workers stop, the lease is released
        if args.seconds is not None:
            done.wait(args.seconds)
        else:
            while not done.wait(1.0):  # a timeout keeps Ctrl-C responsive everywhere
                pass
    say("stopped; lease released")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
