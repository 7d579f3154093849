"""The singleton worker: a heartbeat that only the lease holder writes."""

from __future__ import annotations

import logging
import os

from mutexowner import WorkerContext

log = logging.getLogger(__name__)


def heartbeat(ctx: WorkerContext) -> None:
    """Every second, append ``pid fencing_token`` to ``$EXAMPLE_HEARTBEAT_FILE`` (if set)."""
    path = os.environ.get("EXAMPLE_HEARTBEAT_FILE")
    interval = float(os.environ.get("EXAMPLE_HEARTBEAT_INTERVAL", "1.0"))
    while not ctx.stopping.is_set():
        ctx.ensure_held()  # never write once the lease may have passed to another node
        log.info("heartbeat fencing_token=%s", ctx.fencing_token)
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(f"{os.getpid()} {ctx.fencing_token}\n")
        ctx.sleep(interval)
