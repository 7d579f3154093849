"""A minimal Flask app that runs a singleton worker with mutexowner.

Run the worker in a dedicated process (recommended)::

    cd examples/flask_app
    REDIS_URL=redis://127.0.0.1:6379/0 flask --app exampleapp mutexowner run

and serve the app (``flask --app exampleapp run``); ``GET /mutexowner/status`` shows this
process's owner. ``MUTEXOWNER_AUTOSTART=1`` starts an owner in each web worker process on
its first request instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from flask import Flask

from mutexowner.contrib.flask import MutexOwnerExtension, status_blueprint

mutexowner = MutexOwnerExtension()


def create_app(config: Optional[Mapping[str, Any]] = None) -> Flask:
    """The application factory; ``config`` overrides the defaults read from the environment."""
    app = Flask(__name__)
    app.config.update(
        MUTEXOWNER_REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        MUTEXOWNER_KEY="exampleapp:heartbeat",
        MUTEXOWNER_TTL=float(os.environ.get("MUTEXOWNER_TTL", "10")),
        MUTEXOWNER_WORKERS=["exampleapp.workers.heartbeat"],
        MUTEXOWNER_AUTOSTART=os.environ.get("MUTEXOWNER_AUTOSTART") == "1",
        HEARTBEAT_FILE=os.environ.get("EXAMPLE_HEARTBEAT_FILE"),
        HEARTBEAT_INTERVAL=1.0,
    )
    if config:
        app.config.update(config)
    mutexowner.init_app(app)
    app.register_blueprint(status_blueprint)

    @app.get("/")
    def index() -> dict[str, Any]:
        owner = mutexowner.get_owner()
        return {"app": "exampleapp", "holding": bool(owner is not None and owner.holding)}

    return app
