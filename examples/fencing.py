"""Fencing tokens: a store that rejects a stale writer the lease alone cannot stop.

A lease cannot stop a write that is already on its way: a process pauses (GC, SIGSTOP,
a VM migration) or a request sits in a slow network right after ``ctx.ensure_held()``
said yes, and lands after another node took over. Every acquisition gets a fencing token
larger than any before it; a store that remembers the highest token it has seen rejects
the late write. Here the store is a toy in memory; with SQL it is
``UPDATE jobs SET ..., fencing_token = :token WHERE id = :id AND fencing_token <= :token``.

The script runs two owners of one lease, A then B, in this process::

    python examples/fencing.py --redis redis://127.0.0.1:6379/0

A writes, sends a second write that is delayed, and hands over to B; B writes; then A's
delayed write arrives and is rejected. Exit status 0 when the store rejected it.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Optional

from mutexowner import MutexOwner, Supervisor, WorkerContext
from mutexowner.connection import redact_url


class StaleWriteRejected(Exception):
    """The write carried a fencing token lower than one the store has already seen."""


class FencedStore:
    """A toy key-value store that rejects writes with a token below the highest seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.highest_token = 0
        self.data: dict[str, str] = {}

    def write(self, key: str, value: str, fencing_token: int) -> None:
        with self._lock:
            if fencing_token < self.highest_token:
                raise StaleWriteRejected(
                    f"token {fencing_token} < highest seen {self.highest_token}"
                )
            self.highest_token = fencing_token
            self.data[key] = value


class Node:
    """One owner ("node") whose single worker writes to the store once it holds the lease."""

    def __init__(self, name: str, args: argparse.Namespace, store: FencedStore) -> None:
        self.name = name
        self.store = store
        self.token: Optional[int] = None
        self.wrote = threading.Event()
        #: A write sent but not yet delivered: (value, token).
        self.in_flight: list[tuple[str, int]] = []
        sup = Supervisor(shutdown_timeout=min(1.0, args.ttl / 4))
        sup.add(self.work, name=f"writer-{name}")
        self.owner = MutexOwner(args.redis, args.name, ttl=args.ttl, supervisor=sup, identity=name)

    def work(self, ctx: WorkerContext) -> None:
        assert ctx.fencing_token is not None
        self.token = ctx.fencing_token
        ctx.ensure_held()
        self.store.write("report", f"written by {self.name}", ctx.fencing_token)
        print(
            f"{self.name}: store accepted write #1 (fencing_token={ctx.fencing_token})", flush=True
        )
        ctx.ensure_held()  # still ours… but the next write will travel slowly
        self.in_flight.append((f"late write by {self.name}", ctx.fencing_token))
        self.wrote.set()
        ctx.stopping.wait()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--redis",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--name", default="examples:fencing", help="lease name")
    parser.add_argument("--ttl", type=float, default=5.0, help="lease ttl, seconds")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this long")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"lease {args.name!r} on {redact_url(args.redis)}", flush=True)
    store = FencedStore()
    a, b = Node("A", args, store), Node("B", args, store)

    a.owner.start()
    if not a.wrote.wait(args.timeout):  # includes the lock-delay on a fresh Redis
        print("A never got the lease", flush=True)
        a.owner.stop()
        return 1
    b.owner.start()  # B waits on standby while A holds the lease
    a.owner.stop()  # A hands over: its worker stops, the lease is released, B is told
    if not b.wrote.wait(args.timeout):
        print("B never got the lease", flush=True)
        b.owner.stop()
        return 1
    print(f"B took over with fencing_token={b.token} > A's {a.token}", flush=True)

    rejected = False
    for value, token in a.in_flight:  # A's delayed write finally arrives
        try:
            store.write("report", value, token)
            print(f"A: store ACCEPTED the late write (token {token}): fencing failed!")
        except StaleWriteRejected as exc:
            rejected = True
            print(f"A: store rejected the late write: {exc}", flush=True)
    b.owner.stop()
    print(f"store holds {store.data['report']!r} (highest token {store.highest_token})")
    return 0 if rejected else 1


if __name__ == "__main__":
    raise SystemExit(main())
