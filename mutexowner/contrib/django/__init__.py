"""Django integration: ``settings.MUTEXOWNER``, ``python manage.py mutexowner``, autostart.

Add ``"mutexowner.contrib.django"`` to ``INSTALLED_APPS`` and configure::

    MUTEXOWNER = {
        "REDIS_URL": "redis://localhost:6379/0",
        "KEY": "myapp:scheduler",
        "WORKERS": ["myapp.workers.schedule"],  # callables taking a WorkerContext
    }

The recommended deployment runs the workers in a dedicated process,
``python manage.py mutexowner``, next to the web servers. ``"AUTOSTART": True`` instead
starts an owner inside each web worker process on its first request (fork-safe: a
pre-fork master never starts one). ``get_owner()`` returns this process's owner.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from mutexowner.contrib._runtime import ProcessOwner
from mutexowner.contrib._settings import WorkerTarget
from mutexowner.contrib.django.conf import get_settings, read_settings
from mutexowner.owner import MutexOwner

__all__ = ["get_owner", "get_settings", "read_settings", "start", "stop"]


def close_db_connections(target: WorkerTarget) -> WorkerTarget:
    """Wrap a worker so that the database connections its thread opened are closed when it
    ends (Django closes them only for request threads)."""

    @functools.wraps(target)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return target(*args, **kwargs)
        finally:
            from django.db import connections

            connections.close_all()

    return run


def _build_owner() -> MutexOwner:
    return get_settings().build_owner(wrap=close_db_connections)


_holder = ProcessOwner(_build_owner, label="mutexowner.contrib.django")


def get_owner() -> Optional[MutexOwner]:
    """This process's owner, or None when none was started here (e.g. in a web process
    when the workers run under ``manage.py mutexowner``)."""
    return _holder.get()


def start() -> MutexOwner:
    """Start this process's owner (built once per process from ``settings.MUTEXOWNER``).

    Idempotent. Call it where the process will not fork afterwards, e.g. gunicorn's
    ``post_worker_init`` hook; never in a gunicorn ``--preload`` master.
    """
    return _holder.start()


def stop(timeout: Optional[float] = None) -> bool:
    """Stop this process's owner: workers stop, the lease is released; True when done."""
    return _holder.stop(timeout)
