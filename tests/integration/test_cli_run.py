"""``mutexowner run`` and ``mutexowner status`` as processes, against a real redis-server.

The command under test is a small Python program that records its start, a heartbeat every
20 ms and its end (monotonic clock, shared by every process on the machine) together with
its MUTEXOWNER_FENCING_TOKEN, and takes an exclusive ``flock`` on a shared file for its
whole life: a second copy running at the same time cannot get the lock and records
``overlap``. The kernel drops the lock when a copy dies, even by SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from mutexowner import cli
from mutexowner.lease import LeaseKeys
from mutexowner.runner import EXIT_GAVE_UP, EXIT_SKIPPED, EXIT_STATUS_FREE, EXIT_USAGE
from tests.helpers import alive, wait_for
from tests.redis_server import RedisServer

TTL = 2.0
GRACE = 0.5
PASSWORD = "s3cret-pw"

CHILD = r"""
import fcntl, os, signal, sys, time
log_path, lock_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
ident = os.environ["MUTEXOWNER_IDENTITY"]
token = os.environ["MUTEXOWNER_FENCING_TOKEN"]
key = os.environ["MUTEXOWNER_KEY"]
def record(kind):
    with open(log_path, "a") as f:
        f.write("%s %s %s %d %.6f %s\n" % (kind, ident, token, os.getpid(), time.monotonic(), key))
lock = open(lock_path, "a")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    record("overlap")
    sys.exit(99)
record("start")
if mode == "once":
    record("end")
    sys.exit(0)
stop = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore" else lambda *a: stop.append(1))
while not stop:
    record("beat")
    time.sleep(0.02)
record("end")
sys.exit(int(os.environ.get("CHILD_EXIT_ON_TERM", "0")))
"""


class Record:
    """One line the command wrote."""

    def __init__(self, line: str) -> None:
        kind, identity, token, pid, at, key = line.split()
        self.kind, self.identity, self.key = kind, identity, key
        self.token, self.pid, self.at = int(token), int(pid), float(at)


class Fleet:
    """``mutexowner run`` processes sharing one lease, and what their commands recorded."""

    def __init__(self, server: RedisServer, tmp_path: Path, key: str = "job") -> None:
        self.server = server
        self.url = server.url
        self.key = key
        self.tmp = tmp_path
        self.log = tmp_path / "records.log"
        self.lock = tmp_path / "command.lock"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # A Redis that has "always" held our state: no lock-delay on the first acquisition.
        server.client().hset(
            LeaseKeys(key).epoch, mapping={"id": "seeded", "run_id": "", "quiet_until": "0"}
        )

    def start(
        self,
        identity: str,
        *extra: str,
        mode: str = "loop",
        env: Optional[dict[str, str]] = None,
        url: Optional[str] = None,
    ) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "mutexowner.cli", "run",
            "--redis", url or self.url, "--key", self.key, "--identity", identity,
            "--ttl", str(TTL), "--grace", str(GRACE), *extra,
            "--", sys.executable, "-c", CHILD, str(self.log), str(self.lock), mode,
        ]  # fmt: skip
        with open(self.tmp / f"{identity}.stderr", "wb") as stderr:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        self.procs[identity] = proc
        return proc

    def records(self, kind: Optional[str] = None) -> list[Record]:
        if not self.log.exists():
            return []
        # A read can see the end of a line that is still being appended: complete lines only.
        complete = self.log.read_text().split("\n")[:-1]
        lines = [Record(line) for line in complete if line.strip()]
        return [r for r in lines if kind is None or r.kind == kind]

    def starts_by(self, identity: str) -> list[Record]:
        return [r for r in self.records("start") if r.identity == identity]

    def stderr(self, identity: str) -> str:
        return (self.tmp / f"{identity}.stderr").read_text(errors="replace")

    def assert_never_two_at_once(self) -> None:
        records = self.records()
        assert not [r for r in records if r.kind == "overlap"], "two commands ran at once"
        runs: dict[int, list[float]] = {}
        for r in records:
            runs.setdefault(r.pid, []).append(r.at)
        intervals = sorted((min(times), max(times), pid) for pid, times in runs.items())
        for (_, end, pid), (start, _, next_pid) in zip(intervals, intervals[1:]):
            assert start > end, f"command {next_pid} started before {pid} ended"

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        for record in self.records("start"):  # the guard should have done this already
            if alive(record.pid):
                os.kill(record.pid, signal.SIGKILL)


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_server, tmp_path)
    yield f
    f.close()


def _status(url: str, key: str = "job") -> tuple[int, dict[str, object]]:
    import io

    out = io.StringIO()
    code = cli.status(url, key, as_json=True, out=out, err=io.StringIO())
    return code, json.loads(out.getvalue())


@pytest.mark.timeout(90)
def test_two_runs_never_run_the_command_at_once_and_one_takes_over_after_kill_9(
    fleet: Fleet,
) -> None:
    fleet.start("A")
    fleet.start("B")
    assert wait_for(lambda: bool(fleet.records("start")), 30), fleet.stderr("A") + fleet.stderr("B")
    first = fleet.records("start")[0]
    other = "B" if first.identity == "A" else "A"
    assert wait_for(lambda: len(fleet.records("beat")) >= 5, 10)
    assert fleet.starts_by(other) == []  # the standby waits
    code, info = _status(fleet.url)
    assert code == 0 and info["holder"] == first.identity and info["fencing_token"] == first.token

    holder = fleet.procs[first.identity]
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    killed_at = time.monotonic()
    # The guard saw its pipe close and killed the command's process group.
    assert wait_for(lambda: not alive(first.pid), 5), "the command outlived mutexowner run"

    assert wait_for(lambda: bool(fleet.starts_by(other)), TTL + 15), fleet.stderr(other)
    (taken_over,) = fleet.starts_by(other)
    assert taken_over.token > first.token
    # Nobody released the lease: the standby waited for it to expire (about one ttl).
    assert taken_over.at - killed_at < TTL + 5
    assert wait_for(lambda: len(fleet.records("beat")) > 10, 10)
    fleet.assert_never_two_at_once()
    assert len(fleet.starts_by(first.identity)) == 1

    survivor = fleet.procs[other]
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(20) == 0  # the command exits 0 on SIGTERM
    assert fleet.records("end")[-1].identity == other
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE  # released on the way out
    fleet.assert_never_two_at_once()


@pytest.mark.timeout(60)
def test_clean_stop_hands_over_at_once(fleet: Fleet) -> None:
    fleet.start("A")
    assert wait_for(lambda: bool(fleet.starts_by("A")), 30), fleet.stderr("A")
    fleet.start("B")
    # Both runs listen for release notices (a standby that subscribes after the release
    # would only learn of it when the lease's ttl runs out).
    channel = LeaseKeys(fleet.key).channel
    client = fleet.server.client()
    assert wait_for(lambda: client.execute_command("PUBSUB", "NUMSUB", channel)[1] >= 2, 30)
    fleet.procs["A"].send_signal(signal.SIGINT)
    assert fleet.procs["A"].wait(20) == 0
    stopped_at = time.monotonic()
    assert wait_for(lambda: bool(fleet.starts_by("B")), 20), fleet.stderr("B")
    # A release notice, not the ttl: B starts well before A's lease would have expired.
    assert fleet.starts_by("B")[0].at - stopped_at < TTL / 2
    fleet.procs["B"].send_signal(signal.SIGTERM)
    assert fleet.procs["B"].wait(20) == 0
    fleet.assert_never_two_at_once()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        ("loop", {"CHILD_EXIT_ON_TERM": "7"}, 7),  # the command's own status
        ("ignore", {}, 128 + signal.SIGKILL),  # ignored SIGTERM: SIGKILL after --grace
    ],
)
def test_sigterm_stops_the_command_releases_and_exits_with_its_status(
    fleet: Fleet, mode: str, env: dict[str, str], expected: int
) -> None:
    proc = fleet.start("A", mode=mode, env=env)
    assert wait_for(lambda: len(fleet.records("beat")) >= 3, 30), fleet.stderr("A")
    (start,) = fleet.records("start")
    assert start.key == "job"
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == expected
    if mode == "ignore":
        assert time.monotonic() - signalled >= GRACE
        assert "sending SIGKILL" in fleet.stderr("A")
    assert not alive(start.pid)
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE


@pytest.mark.timeout(60)
def test_a_second_signal_skips_the_rest_of_the_grace_period(fleet: Fleet) -> None:
    proc = fleet.start("A", "--ttl", "30", "--grace", "15", mode="ignore")
    assert wait_for(lambda: len(fleet.records("beat")) >= 3, 30), fleet.stderr("A")
    (start,) = fleet.records("start")
    proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "SIGTERM received" in fleet.stderr("A"), 10)
    assert proc.poll() is None  # waiting out --grace for a command that ignores SIGTERM
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 128 + signal.SIGKILL  # well before the 15 s grace
    assert not alive(start.pid)
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE


@pytest.mark.timeout(60)
def test_once_ends_the_run_after_a_clean_exit(fleet: Fleet) -> None:
    proc = fleet.start("A", "--once", mode="once")
    assert proc.wait(30) == 0, fleet.stderr("A")
    assert [r.kind for r in fleet.records()] == ["start", "end"]
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE


@pytest.mark.timeout(60)
def test_a_command_that_keeps_failing_makes_the_run_give_up(fleet: Fleet) -> None:
    proc = fleet.start(
        "A", "--max-restarts", "2", "--max-seconds", "30", env={"CHILD_EXIT_ON_TERM": "0"}
    )
    assert wait_for(lambda: bool(fleet.records("start")), 30)
    # Kill the command from outside three times: each death is an unexpected exit.
    for n in range(3):
        assert wait_for(lambda n=n: len(fleet.records("start")) == n + 1, 20), fleet.stderr("A")
        os.kill(fleet.records("start")[n].pid, signal.SIGKILL)
    assert proc.wait(30) == EXIT_GAVE_UP
    assert "giving up" in fleet.stderr("A")
    assert len(fleet.records("start")) == 3
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE


# -- status against a password-protected user --------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mutexowner.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(90)
def test_status_command_with_a_password_never_prints_it(fleet: Fleet) -> None:
    fleet.server.client().execute_command(
        "ACL", "SETUSER", "alice", "on", f">{PASSWORD}", "~*", "&*", "+@all"
    )
    url = f"redis://alice:{PASSWORD}@127.0.0.1:{fleet.server.port}/0"
    shown = f"redis://alice:***@127.0.0.1:{fleet.server.port}/0"

    free = _cli("status", "--redis", url, "--key", "job", "--json")
    assert free.returncode == EXIT_STATUS_FREE, free.stderr
    assert json.loads(free.stdout)["redis"] == shown

    proc = fleet.start("A", "--log-level", "debug", url=url)
    assert wait_for(lambda: bool(fleet.records("start")), 30), fleet.stderr("A")
    held = _cli("status", "--redis", url, "--key", "job")
    assert held.returncode == 0, held.stderr
    assert f"on {shown}): held" in held.stdout
    assert "holder           A" in held.stdout

    wrong = _cli("status", "--redis", url.replace(PASSWORD, "wrong-pw"), "--key", "job")
    assert wrong.returncode == EXIT_USAGE
    assert "alice:***@" in wrong.stderr
    for result in (free, held, wrong):
        assert PASSWORD not in result.stdout + result.stderr
        assert "wrong-pw" not in result.stdout + result.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "started the command" in fleet.stderr("A")
    assert PASSWORD not in fleet.stderr("A")


# -- a frozen `mutexowner run` (issue 10, item 1) ------------------------------------------


def _runner_state(pid: int) -> Optional[str]:
    from tests.redis_server import proc_state

    return proc_state(pid)


@pytest.mark.timeout(90)
def test_a_frozen_run_never_lets_two_commands_run_and_the_standby_takes_over(
    fleet: Fleet,
) -> None:
    """SIGSTOP the holder's `mutexowner run` for 3 ttl: its guard stops the command by the
    lease deadline on its own clock, the standby takes over, and nothing ever overlaps."""
    fleet.start("A")
    assert wait_for(lambda: bool(fleet.records("start")), 30), fleet.stderr("A")
    fleet.start("B")
    assert wait_for(lambda: len(fleet.records("beat")) >= 5, 10)
    first = fleet.records("start")[0]
    holder, standby = first.identity, "B" if first.identity == "A" else "A"
    frozen = fleet.procs[holder]
    frozen.send_signal(signal.SIGSTOP)
    assert wait_for(lambda: _runner_state(frozen.pid) == "T", 5)
    frozen_at = time.monotonic()
    try:
        # The command of the frozen run ends before its lease could have expired in Redis.
        assert wait_for(lambda: not alive(first.pid), TTL + 2), "the command outlived its lease"
        assert time.monotonic() - frozen_at < TTL
        assert wait_for(lambda: bool(fleet.starts_by(standby)), 3 * TTL), fleet.stderr(standby)
        remaining = 3 * TTL - (time.monotonic() - frozen_at)
        if remaining > 0:
            assert not wait_for(lambda: bool(fleet.records("overlap")), remaining)
    finally:
        frozen.send_signal(signal.SIGCONT)
    fleet.assert_never_two_at_once()
    # Thawed, the old holder finds its lease gone and waits as a standby; nothing restarts.
    assert wait_for(lambda: "lost" in fleet.stderr(holder) or "expired" in fleet.stderr(holder), 10)
    assert frozen.poll() is None
    assert len(fleet.starts_by(holder)) == 1
    for identity in (holder, standby):
        fleet.procs[identity].send_signal(signal.SIGTERM)
    assert frozen.wait(20) == 0, fleet.stderr(holder)
    assert fleet.procs[standby].wait(20) == 0, fleet.stderr(standby)
    assert len(fleet.starts_by(holder)) == 1
    fleet.assert_never_two_at_once()
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE


# -- signals and exit codes (issue 14, item 2) ---------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_requested_stop_is_clean_and_releases_at_once(fleet: Fleet, signum: int) -> None:
    proc = fleet.start("A")  # the command exits 0 on SIGTERM
    assert wait_for(lambda: len(fleet.records("beat")) >= 3, 30), fleet.stderr("A")
    (start,) = fleet.records("start")
    proc.send_signal(signum)
    assert proc.wait(20) == 0, fleet.stderr("A")
    assert f"{signal.Signals(signum).name} received" in fleet.stderr("A")
    assert fleet.records("end")  # it got SIGTERM and ended cleanly, not SIGKILL
    assert not alive(start.pid)
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE  # released, not left to expire


@pytest.mark.timeout(60)
def test_terminal_stop_signals_do_not_freeze_the_run(fleet: Fleet) -> None:
    proc = fleet.start("A")
    assert wait_for(lambda: len(fleet.records("beat")) >= 3, 30), fleet.stderr("A")
    for signum in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        proc.send_signal(signum)
    # A stopped process would not act on SIGTERM: a clean exit proves it kept running.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, fleet.stderr("A")
    assert len(fleet.records("start")) == 1
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE


# -- run once, on one host (issue 14, item 1) ----------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("seeded", "skip_ok"),
    [(True, False), (False, True)],
    ids=["redis-knows-the-lease", "fresh-redis-lock-delay"],
)
def test_three_hosts_with_once_and_wait_0_run_the_job_exactly_once(
    redis_server: RedisServer, tmp_path: Path, seeded: bool, skip_ok: bool
) -> None:
    fleet = Fleet(redis_server, tmp_path, key="nightly")
    if not seeded:  # a Redis with no record of the lease: the first holder waits one ttl
        redis_server.client().delete(LeaseKeys("nightly").epoch)
    hold = 3.0
    extra = ["--once", "--wait", "0", "--hold-at-least", str(hold)]
    if skip_ok:
        extra.append("--skip-ok")
    try:
        procs = [fleet.start(name, *extra, mode="once") for name in ("A", "B", "C")]
        codes = {name: proc.wait(30) for name, proc in zip("ABC", procs)}
        done_at = time.monotonic()
        logs = "".join(fleet.stderr(n) for n in "ABC")
        (start,) = fleet.records("start")  # the job ran exactly once
        ran = start.identity
        assert codes[ran] == 0, logs
        skipped = [n for n in "ABC" if n != ran]
        assert [codes[n] for n in skipped] == [0 if skip_ok else EXIT_SKIPPED] * 2, logs
        for name in skipped:
            assert "held elsewhere" in fleet.stderr(name)
        # The holder kept the lease --hold-at-least after the job started, then released it.
        assert done_at - start.at >= hold * 0.9
        assert "keeping the lease" in fleet.stderr(ran)
        assert _status(fleet.url, "nightly")[0] == EXIT_STATUS_FREE
    finally:
        fleet.close()


@pytest.mark.timeout(60)
def test_once_exits_with_the_commands_own_status(fleet: Fleet) -> None:
    proc = fleet.start("A", "--once", env={"CHILD_EXIT_ON_TERM": "5"}, mode="loop")
    assert wait_for(lambda: len(fleet.records("beat")) >= 3, 30), fleet.stderr("A")
    os.kill(fleet.records("start")[0].pid, signal.SIGTERM)  # from outside: its own exit 5
    assert proc.wait(20) == 5, fleet.stderr("A")
    assert len(fleet.records("start")) == 1
    assert _status(fleet.url)[0] == EXIT_STATUS_FREE
