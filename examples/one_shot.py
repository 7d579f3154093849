"""Run a job once, on one node of a fleet: ``mutexowner.run_once``.

Schedule it on every node at the same time (cron, a Kubernetes CronJob per zone…): the
node that gets the lease runs the job, the others skip it (exit 0 too), they do not run it
after the first one::

    python examples/one_shot.py --redis redis://127.0.0.1:6379/0

``--wait 0`` (the default) makes one attempt, like ``flock -n``; ``--hold-at-least`` keeps
the lease after a quick job so that a node whose trigger fires a little later still skips.
On a Redis that has no record of the lease (first use) every node first waits one ttl
(lock-delay); that wait is not part of ``--wait``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Optional

from mutexowner import run_once
from mutexowner.connection import redact_url


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--redis",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--name", default="examples:one-shot", help="lease name")
    parser.add_argument("--ttl", type=float, default=10.0, help="lease ttl, seconds")
    parser.add_argument(
        "--wait",
        "--timeout",
        dest="wait",
        type=float,
        default=0.0,
        help="seconds to try for the lease before skipping (default: 0, one attempt)",
    )
    parser.add_argument(
        "--hold-at-least",
        type=float,
        default=1.0,
        help="keep the lease this long after the job started (default: 1)",
    )
    parser.add_argument("--steps", type=int, default=3, help="steps of the job")
    return parser.parse_args(argv)


def run_job(steps: int) -> int:
    """The job: a few steps (real work would write with the lease's fencing token)."""
    for step in range(1, steps + 1):
        time.sleep(0.05)  # stands for real work
        print(f"step {step}/{steps} done", flush=True)
    return steps


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"trying {args.name!r} on {redact_url(args.redis)} (wait {args.wait:g} s)", flush=True)

    def job() -> int:
        print("got the lease: running the job", flush=True)
        return run_job(args.steps)

    result = run_once(
        args.redis, args.name, job, wait=args.wait, hold_at_least=args.hold_at_least, ttl=args.ttl
    )
    if result.reason == "held_elsewhere":
        print("another node holds the lease: not running the job", flush=True)
        return 0
    if not result.ran:
        print(f"not running the job: {result.reason.replace('_', ' ')}", flush=True)
        return 1
    print(f"fencing_token was {result.fencing_token}", flush=True)
    if result.lost:
        print("job done, but the lease was lost while it ran; lease released", flush=True)
        return 1
    print("job done; lease released", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
