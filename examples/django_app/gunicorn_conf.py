"""gunicorn settings that start the owner in every web worker as soon as it has booted.

    gunicorn -c gunicorn_conf.py --workers 4 exampleproject.wsgi

Use it instead of ``MUTEXOWNER["AUTOSTART"]`` (which waits for a worker's first request)
when the workers must run inside the web processes. Both are fork-safe: the hooks run in
each worker after ``fork()``, never in the master, with or without ``--preload``. A
dedicated ``python manage.py mutexowner`` process is still the recommended deployment.
Threaded workers only: ``sync`` or ``gthread``, not ``gevent``/``eventlet``.
"""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    """In the worker, after the app is loaded: start this process's owner."""
    from mutexowner.contrib.django import start

    start()


def worker_exit(server: Any, worker: Any) -> None:
    """In the worker, on its way out: stop the workers and release the lease now."""
    from mutexowner.contrib.django import stop

    stop()
