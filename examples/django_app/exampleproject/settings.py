"""Settings of the example project: only what mutexowner needs.

Environment variables (for trying it out and for the tests): ``REDIS_URL``,
``MUTEXOWNER_TTL`` (seconds), ``MUTEXOWNER_AUTOSTART=1`` (start an owner in each web worker
process on its first request instead of running ``manage.py mutexowner``),
``EXAMPLE_HEARTBEAT_FILE`` (where the worker appends its heartbeats).
"""

from __future__ import annotations

import os

SECRET_KEY = "example-project-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["mutexowner.contrib.django"]
ROOT_URLCONF = "exampleproject.urls"
WSGI_APPLICATION = "exampleproject.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}  # the example needs no database
USE_TZ = True

MUTEXOWNER = {
    "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    "KEY": "exampleproject:heartbeat",
    "TTL": float(os.environ.get("MUTEXOWNER_TTL", "10")),
    # Dotted paths of callables taking a WorkerContext; they run only while this
    # process holds the lease.
    "WORKERS": ["exampleproject.workers.heartbeat"],
    "SUPERVISOR": {"MAX_RESTARTS": 3, "MAX_SECONDS": 5.0},
    "AUTOSTART": os.environ.get("MUTEXOWNER_AUTOSTART") == "1",
}
