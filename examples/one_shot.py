"""Run a job once, on whichever node gets the lease: ``with owner:`` and no workers.

Schedule it on every node (cron, a Kubernetes CronJob per zone…): the node that gets the
lease within ``--timeout`` runs the job, the others skip it (exit 0 too). The job checks
``owner.holding`` between steps and stops if the lease was lost::

    python examples/one_shot.py --redis redis://127.0.0.1:6379/0 --timeout 15

On a fresh Redis the first acquisition waits one ttl (lock-delay): keep --timeout > --ttl.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Optional

from mutexowner import MutexOwner
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
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the lease")
    parser.add_argument("--steps", type=int, default=3, help="steps of the job")
    return parser.parse_args(argv)


def run_job(owner: MutexOwner, steps: int) -> bool:
    """The job: a few steps, each only while the lease is still ours."""
    token = owner.fencing_token
    for step in range(1, steps + 1):
        if not owner.holding:  # local check: the lease may have been lost meanwhile
            print(f"lease lost before step {step}: stopping the job", flush=True)
            return False
        time.sleep(0.05)  # stands for real work, written with fencing token `token`
        print(f"step {step}/{steps} done (fencing_token={token})", flush=True)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    owner = MutexOwner(args.redis, args.name, ttl=args.ttl)
    print(f"waiting up to {args.timeout:g} s for {args.name!r} on {redact_url(args.redis)}")
    with owner:  # start(); on exit stop(), which releases the lease at once
        if not owner.wait_until_holding(args.timeout):
            print("another node holds the lease: not running the job", flush=True)
            return 0
        print(f"got the lease (fencing_token={owner.fencing_token}): running the job")
        ok = run_job(owner, args.steps)
    print("job done; lease released" if ok else "job aborted; lease released", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
