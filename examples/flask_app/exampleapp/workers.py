"""The singleton worker. It runs inside an app context, so ``current_app`` works."""

from __future__ import annotations

import os

from flask import current_app

from mutexowner import WorkerContext


def heartbeat(ctx: WorkerContext) -> None:
    """Append ``pid fencing_token`` to ``HEARTBEAT_FILE`` every ``HEARTBEAT_INTERVAL`` s."""
    path = current_app.config.get("HEARTBEAT_FILE")
    interval = float(current_app.config.get("HEARTBEAT_INTERVAL", 1.0))
    while not ctx.stopping.is_set():
        ctx.ensure_held()  # never write once the lease may have passed to another node
        current_app.logger.info("heartbeat fencing_token=%s", ctx.fencing_token)
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(f"{os.getpid()} {ctx.fencing_token}\n")
        ctx.sleep(interval)
