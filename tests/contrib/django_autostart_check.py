"""Run by test_django.py in a subprocess: gunicorn ``--preload`` semantics with AUTOSTART.

The "master" loads Django (``django.setup()``, as ``--preload`` does) and must not start an
owner; it forks a "worker" that serves requests through Django's test client: the first
request starts the worker's own owner, which takes the lease; when the worker exits, the
lease is released (atexit). The master checks it never owned anything. Prints one JSON
line of observations per process; exits 0 when the master's checks passed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleproject.settings")
django.setup()

import mutexowner.contrib.django as integration  # noqa: E402
from mutexowner.lease import Lease  # noqa: E402


def library_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("mutexowner"))


def lease_holder() -> object:
    from django.conf import settings

    from mutexowner.connection import client_from

    client = client_from(settings.MUTEXOWNER["REDIS_URL"])
    return Lease(client, settings.MUTEXOWNER["KEY"], ttl=1, identity="check").inspect().holder


def worker() -> int:
    from django.test import Client

    client = Client()
    seen: dict[str, object] = {"process": "worker", "owner_before": integration.get_owner()}
    first = client.get("/mutexowner/status", {"require": "holding"})
    owner = integration.get_owner()
    seen["first_status"] = first.status_code
    seen["first_state"] = first.json()["state"]
    seen["started"] = client.get("/mutexowner/status", {"require": "started"}).status_code
    seen["holding"] = owner is not None and owner.wait_until_holding(15)
    response = client.get("/mutexowner/status", {"require": "holding"})
    seen["holding_status"] = response.status_code
    seen["body"] = response.json()
    seen["identity"] = owner.identity if owner is not None else None
    seen["holder"] = lease_holder()
    seen["same_owner_on_next_request"] = (
        client.get("/mutexowner/status").status_code == 200 and integration.get_owner() is owner
    )
    print(json.dumps(seen, default=repr), flush=True)
    ok = seen["holding"] and seen["holder"] == seen["identity"]
    return 0 if ok else 1  # sys.exit: atexit stops the owner and releases the lease


def master() -> int:
    before = {"owner": integration.get_owner(), "threads": library_threads()}
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = worker()
        finally:
            sys.stdout.flush()
            sys.exit(code)
    _, status = os.waitpid(pid, 0)
    seen = {
        "process": "master",
        "owner_before_fork": before["owner"],
        "threads_before_fork": before["threads"],
        "worker_exit": os.waitstatus_to_exitcode(status),
        "owner_after": integration.get_owner(),
        "threads_after": library_threads(),
        "holder_after_worker_exit": lease_holder(),
        "at": time.monotonic(),
    }
    print(json.dumps(seen, default=repr), flush=True)
    clean = (
        seen["owner_before_fork"] is None
        and seen["owner_after"] is None
        and not seen["threads_before_fork"]
        and not seen["threads_after"]
    )
    return 0 if clean and seen["worker_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(master())
