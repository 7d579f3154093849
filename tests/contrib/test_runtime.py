"""What the integrations share at run time: the per-process owner, the foreground runner,
the status document."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from mutexowner import MutexOwner, Supervisor
from mutexowner.contrib._runtime import ProcessOwner, run_foreground, status_response
from mutexowner.inspection import LeaseReader
from mutexowner.lease import Lease, new_token
from tests.contrib.helpers import PYTHON, REPO, child_env, running, seeded_fake_redis

pytestmark = pytest.mark.timeout(60)


class Factory:
    """Builds owners on a private fakeredis with a 1 s ttl and counts them."""

    def __init__(self, *, fail: bool = False) -> None:
        self.client = seeded_fake_redis("shared")
        self.built: list[MutexOwner] = []
        self.fail = fail

    def __call__(self) -> MutexOwner:
        if self.fail:
            raise RuntimeError("cannot build")
        owner = MutexOwner(self.client, "shared", ttl=1.0, stuck_worker_policy="abandon")
        self.built.append(owner)
        return owner


@pytest.fixture
def factory() -> Iterator[Factory]:
    made = Factory()
    yield made
    for owner in made.built:
        owner.stop(5)


def test_process_owner_builds_once_and_rebuilds_after_stop(factory: Factory) -> None:
    holder = ProcessOwner(factory, label="test")
    assert holder.get() is None
    first = holder.start()
    assert holder.start() is first and holder.get() is first
    assert factory.built == [first] and first.state != "stopped"
    assert holder.stop(5) is True
    assert holder.get() is None and first.state == "stopped"
    assert holder.stop() is True  # nothing to stop
    second = holder.start()
    assert second is not first and len(factory.built) == 2
    assert holder.stop(5)


def test_an_owner_built_by_another_process_is_never_used(factory: Factory) -> None:
    """The pid check behind the at-fork reset: an owner from another pid is not ours."""
    holder = ProcessOwner(factory, label="test")
    parents = holder.start()
    holder._pid = -1  # as if this process were a fork of the one that built it
    assert holder.get() is None
    assert holder.stop() is True  # the parent's owner is not stopped from a child
    assert parents.state != "stopped"
    parents.stop(5)


def test_start_quietly_logs_a_failure_once(caplog: pytest.LogCaptureFixture) -> None:
    failing = Factory(fail=True)
    holder = ProcessOwner(failing, label="quiet")
    with caplog.at_level(logging.ERROR, logger="mutexowner.contrib"):
        assert holder.start_quietly() is None
        assert holder.start_quietly() is None
    errors = [r for r in caplog.records if "quiet: could not start the owner" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_start_quietly_starts_once(factory: Factory) -> None:
    holder = ProcessOwner(factory, label="test")
    owner = holder.start_quietly()
    assert owner is not None and holder.start_quietly() is owner
    assert holder.stop(5)


def test_status_response_without_owner() -> None:
    body, code = status_response(None, "jobs", None)
    assert (body, code) == ({"key": "jobs", "state": "not_started", "holding": False,
                             "pid": os.getpid()}, 200)  # fmt: skip
    assert status_response(None, "jobs", "holding")[1] == 503
    assert status_response(None, "jobs", "started")[1] == 503
    body, code = status_response(None, "jobs", "leader")
    assert code == 400 and body == {
        "error": "require must be one of host, held, holding, started, got 'leader'"
    }
    # Without a lease reader nobody can tell who holds the lease: the Redis checks fail.
    assert status_response(None, "jobs", "host")[1] == 503
    assert status_response(None, "jobs", "held")[1] == 503


def test_status_response_reads_redis_except_for_the_local_checks() -> None:
    """?require=holding/started (liveness) never wait for Redis; the others show the lease
    as Redis sees it and answer 503 while Redis cannot be read."""
    import fakeredis

    server = fakeredis.FakeServer()
    client = seeded_fake_redis("jobs")
    reader = LeaseReader(fakeredis.FakeRedis(server=server), "jobs")
    server.connected = False
    for require in ("holding", "started"):
        body, code = status_response(None, "jobs", require, reader)
        assert code == 503 and "lease" not in body
    body, code = status_response(None, "jobs", None, reader)
    assert code == 200 and body["lease"]["error_kind"] == "connection"
    assert status_response(None, "jobs", "held", reader)[1] == 503
    assert status_response(None, "jobs", "host", reader)[1] == 503

    reader = LeaseReader(client, "jobs")
    body, code = status_response(None, "jobs", None, reader)
    assert code == 200 and body["lease"]["held"] is False
    here = f"{socket.gethostname()}:1:x"
    Lease(client, "jobs", ttl=30.0, identity=here).acquire(new_token())
    body, code = status_response(None, "jobs", "host", reader)
    assert code == 200 and body["lease"]["holder"] == here
    assert status_response(None, "jobs", "held", reader)[1] == 200


def test_status_response_of_a_holding_owner(factory: Factory) -> None:
    sup = Supervisor(shutdown_timeout=0.2)
    sup.add(lambda ctx: ctx.stopping.wait(), name="w")
    owner = MutexOwner(
        factory.client, "shared", ttl=1.0, supervisor=sup, stuck_worker_policy="abandon"
    )
    factory.built.append(owner)
    assert status_response(owner, "shared", "started")[1] == 503  # built, not started
    owner.start()
    assert status_response(owner, "shared", "started")[1] == 200
    assert owner.wait_until_holding(10)
    body, code = status_response(owner, "shared", "holding")
    assert code == 200
    assert body["holding"] is True and body["state"] == "holding"
    assert body["fencing_token"] == owner.fencing_token and body["key"] == "shared"
    assert isinstance(body["stuck_workers"], list) and body["pid"] == os.getpid()
    assert 0 < body["lease_remaining"] <= 1.0
    owner.stop(5)
    body, code = status_response(owner, "shared", "holding")
    assert code == 503 and body["state"] == "stopped"


def test_run_foreground_stops_on_a_signal_and_restores_handlers(factory: Factory) -> None:
    holder = ProcessOwner(factory, label="fg")
    out = io.StringIO()
    previous = signal.getsignal(signal.SIGUSR1)
    seen: list[Optional[str]] = []

    def signal_once_holding() -> None:
        deadline = threading.Event()
        while not deadline.wait(0.02):  # poll (with the test's timeout) until holding
            owner = holder.get()
            if owner is not None and owner.holding:
                info = Lease(factory.client, "shared", ttl=1, identity="t").inspect()
                seen.append(info.holder)
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    signaller = threading.Thread(target=signal_once_holding, name="test-signaller", daemon=True)
    signaller.start()
    assert run_foreground(holder, out, signals=(signal.SIGUSR1,)) == 0
    signaller.join(5)
    assert signal.getsignal(signal.SIGUSR1) == previous
    owner = factory.built[0]
    assert seen == [owner.identity]
    assert owner.state == "stopped" and holder.get() is None
    assert not Lease(factory.client, "shared", ttl=1, identity="t").inspect().held
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"mutexowner: running key=shared identity={owner.identity} ")
    assert lines[1:] == [
        f"mutexowner: signal {int(signal.SIGUSR1)} received, stopping",
        "mutexowner: stopped (lease released)",
    ]


def test_run_foreground_returns_when_the_owner_is_stopped_elsewhere(factory: Factory) -> None:
    holder = ProcessOwner(factory, label="fg")

    def stop_once_started() -> None:
        waiter = threading.Event()
        while holder.get() is None and not waiter.wait(0.02):
            pass
        owner = holder.get()
        assert owner is not None
        owner.stop(5)

    stopper = threading.Thread(target=stop_once_started, name="test-stopper", daemon=True)
    stopper.start()
    out = io.StringIO()
    assert run_foreground(holder, out, signals=(signal.SIGUSR2,)) == 0
    stopper.join(5)
    assert "signal" not in out.getvalue()
    assert out.getvalue().endswith("mutexowner: stopped (lease released)\n")


SECOND_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from mutexowner import MutexOwner, Supervisor
    from mutexowner.contrib._runtime import ProcessOwner, run_foreground
    from tests.contrib.helpers import seeded_fake_redis

    def stubborn(ctx):
        print("worker running", flush=True)
        threading.Event().wait()  # ignores ctx.stopping

    def build():
        sup = Supervisor(shutdown_timeout=0.5)
        sup.add(stubborn, name="stubborn")
        # ttl 5: the first stop waits up to ttl + 1.5 s for the stuck worker.
        return MutexOwner(seeded_fake_redis("stuck"), "stuck", ttl=5.0, supervisor=sup,
                          stuck_worker_policy="abandon")

    sys.exit(run_foreground(ProcessOwner(build, label="script"), sys.stdout))
    """
)


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """A stop that hangs on a stuck worker can be cut short: the second SIGTERM exits 143."""
    script = tmp_path / "stuck.py"
    script.write_text(SECOND_SIGNAL_SCRIPT, encoding="utf-8")
    with running(
        [PYTHON, str(script)],
        cwd=tmp_path,
        env=child_env(PYTHONPATH=str(REPO)),
        log_dir=tmp_path,
        name="stuck",
    ) as proc:
        proc.wait_for_output("worker running")
        proc.send(signal.SIGTERM)
        proc.wait_for_output(f"signal {int(signal.SIGTERM)} received, stopping")
        proc.send(signal.SIGTERM)
        assert proc.finish() == 128 + signal.SIGTERM, proc.describe()
    assert "second signal 15 while stopping: exiting now without release" in proc.stderr
    assert "stopped (lease released)" not in proc.stdout
