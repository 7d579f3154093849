"""A status query from a process that does not hold the lease shows the holder (real Redis).

One child process holds the lease with a ``MutexOwner`` (default identity
``<hostname>:<pid>:<random>``); ``mutexowner status`` runs as another process and must show
that child as the holder, on this host, with its fencing token; after the child stops
cleanly the lease is free (exit 3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from mutexowner.inspection import STATUS_FREE, STATUS_HELD
from mutexowner.lease import Lease
from mutexowner.testing import mark_epoch
from tests.helpers import wait_for
from tests.redis_server import RedisServer

HOLDER = textwrap.dedent(
    """
    import signal, sys
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait, in every thread
    from mutexowner import MutexOwner
    owner = MutexOwner(sys.argv[1], "report", ttl=5.0)
    owner.start()
    assert owner.wait_until_holding(20)
    print(owner.identity, owner.fencing_token, flush=True)
    signal.sigwait({signal.SIGTERM})
    sys.exit(0 if owner.stop(10) else 1)
    """
)


def status(url: str) -> tuple[int, dict[str, object]]:
    env = {**os.environ, "REDIS_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "mutexowner.cli", "status", "--key", "report", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, json.loads(done.stdout)


def test_status_from_another_process_shows_the_holder_on_this_host(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    mark_epoch(redis_server.client(), "report")  # no lock-delay on this fresh server
    code, seen = status(redis_server.url)
    assert code == STATUS_FREE and seen["held"] is False

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server.url],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None
        identity, fence = holder.stdout.readline().split()
        code, seen = status(redis_server.url)
        assert code == STATUS_HELD, seen
        assert seen["holder"] == identity and seen["fencing_token"] == int(fence)
        assert seen["holder_pid"] == holder.pid and seen["held_by_this_host"] is True
        assert isinstance(seen["ttl_left"], float) and 0 < seen["ttl_left"] <= 5.0
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)
    assert wait_for(
        lambda: not Lease(redis_server.client(), "report", ttl=1, identity="t").inspect().held, 5
    )
    code, seen = status(redis_server.url)
    assert code == STATUS_FREE and seen["holder"] is None
