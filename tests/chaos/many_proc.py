"""A chaos process with many leases on one engine: one MutexOwner per key, no supervisor.

Run from the repository root::

    python -m tests.chaos.many_proc --redis URL --identity p1 --ledger DIR --keys 1000

Every owner (key ``m<i>``, identity ``<identity>-<i>``) runs on the process's one engine. A
``tests.holdings.HoldingSampler`` reads every owner's ``fencing_token`` in turns and writes
``hold_start`` (``key``, ``token``, ``t``) when an owner begins to hold and ``hold_end``
(``key``, ``token``, ``start``, ``end``, ``samples``) when it stops (the interval bracketed
by clock reads, see tests/holdings.py). WARNING and worse library logs go to the ledger as
``log`` records, thread exceptions as ``thread_exception``. On SIGTERM: end the sampling,
stop every owner, write ``proc_exit`` and exit 0 (3 if a stop did not finish, a library
thread was left, or the engine's threads were already dead).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from mutexowner import BackoffPolicy, MutexOwner
from tests.chaos.ledger import LedgerWriter
from tests.chaos.owner_proc import _LedgerLogHandler
from tests.holdings import Hold, HoldingSampler

KEY_PREFIX = "m"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="URL of the Redis under test")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--ledger", required=True, type=Path, help="ledger directory")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--backoff-initial", type=float, default=0.05)
    parser.add_argument("--backoff-max", type=float, default=0.5)
    parser.add_argument("--interval", type=float, default=0.03, help="sampling pause")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # As in owner_proc: SIGTERM is taken by sigwait() in the main thread, no handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ledger = LedgerWriter(args.ledger, args.identity)
    ledger.write("proc_start")
    logging.getLogger("mutexowner").addHandler(_LedgerLogHandler(ledger))
    logging.getLogger("mutexowner").setLevel(logging.WARNING)

    def excepthook(hook_args: threading.ExceptHookArgs) -> None:
        thread = hook_args.thread.name if hook_args.thread is not None else "?"
        ledger.write("thread_exception", thread=thread, exc=repr(hook_args.exc_value))

    threading.excepthook = excepthook

    backoff = BackoffPolicy(initial=args.backoff_initial, max_delay=args.backoff_max)
    owners = [
        MutexOwner(
            args.redis,
            f"{KEY_PREFIX}{i}",
            ttl=args.ttl,
            backoff=backoff,
            identity=f"{args.identity}-{i}",
        )
        for i in range(args.keys)
    ]

    def started(hold: Hold) -> None:
        ledger.write("hold_start", t=hold.start, key=hold.key, token=hold.token)

    def ended(hold: Hold) -> None:
        ledger.write(
            "hold_end",
            key=hold.key,
            token=hold.token,
            start=hold.start,
            end=hold.end,
            samples=hold.samples,
        )

    pid = ledger.pid
    sampler = HoldingSampler(
        [(owner, pid) for owner in owners],
        clock=time.monotonic,
        interval=args.interval,
        on_start=started,
        on_end=ended,
    )
    began = time.monotonic()
    for owner in owners:
        owner.start()
    sampler.start()
    ledger.write("ready", start_seconds=time.monotonic() - began)
    signal.sigwait({signal.SIGTERM})

    owner_alive = all(
        any(t.name.startswith("mutexowner-engine-") for t in owner.threads) for owner in owners
    )
    sampler.finish()
    began = time.monotonic()
    stopped = all([owner.stop(timeout=10.0) for owner in owners])
    stop_seconds = time.monotonic() - began
    left = [t.name for t in threading.enumerate() if t.name.startswith("mutexowner")]
    code = 0 if owner_alive and stopped and not left else 3
    ledger.write(
        "proc_exit",
        code=code,
        owner_alive=owner_alive,
        stopped=stopped,
        threads_left=left,
        stop_seconds=stop_seconds,
        scans=sampler.scans,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
