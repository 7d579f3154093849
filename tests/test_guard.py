"""The guard of ``mutexowner run`` (mutexowner/_guard.py): its deadline logic, its protocol,
and the process itself enforcing a lease deadline nobody renews (issue 10, item 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from mutexowner import _guard
from mutexowner._guard import Schedule, parse_line
from mutexowner.runner import guard_command
from tests.helpers import alive, wait_for

# -- the schedule: pure logic, no clock ----------------------------------------------------


def test_sigterm_at_deadline_minus_grace_then_sigkill_at_deadline_minus_margin() -> None:
    s = Schedule(deadline=100.0, grace=3.0, margin=0.5)
    assert s.next_at() == 97.0
    assert s.due(96.999) is None
    assert s.due(97.0) == signal.SIGTERM
    assert s.due(97.0) is None  # once
    assert s.next_at() == 99.5
    assert s.due(99.499) is None
    assert s.due(99.5) == signal.SIGKILL
    assert s.due(1e9) is None and s.next_at() is None


def test_a_renewal_moves_both_points() -> None:
    s = Schedule(deadline=100.0, grace=3.0, margin=0.5)
    s.update(110.0)
    assert s.due(99.9) is None
    assert s.next_at() == 107.0
    assert s.due(107.0) == signal.SIGTERM


def test_after_the_runner_sent_sigterm_only_sigkill_is_left() -> None:
    s = Schedule(deadline=100.0, grace=3.0, margin=0.5)
    s.runner_terminated()
    assert s.due(98.0) is None
    assert s.next_at() == 99.5
    assert s.due(99.5) == signal.SIGKILL


def test_a_late_look_sends_sigkill_first_and_no_sigterm_after() -> None:
    s = Schedule(deadline=100.0, grace=3.0, margin=0.5)
    assert s.due(100.0) == signal.SIGKILL  # e.g. the guard itself was delayed
    assert s.due(100.0) is None


def test_grace_below_margin_means_sigkill_only() -> None:
    s = Schedule(deadline=100.0, grace=0.0, margin=0.25)
    assert s.next_at() == 100.0 and s.due(99.0) is None
    assert s.due(99.75) == signal.SIGKILL


def test_negative_times_are_refused() -> None:
    with pytest.raises(ValueError, match="grace"):
        Schedule(deadline=1.0, grace=-1.0, margin=0.1)


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (b"D 123.5", ("D", 123.5)),
        (b"D  7 ", ("D", 7.0)),
        (b"T", ("T", None)),
        (b"D nan", None),
        (b"D inf", None),
        (b"D", None),
        (b"X 1", None),
        (b"", None),
        (b"D 1 2", None),
    ],
)
def test_protocol_lines(line: bytes, parsed: object) -> None:
    assert parse_line(line) == parsed


def test_the_guard_clock_counts_suspend_on_linux() -> None:
    if sys.platform.startswith("linux"):
        assert abs(_guard.now() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
    assert _guard.now() <= _guard.now()


# -- the guard process ---------------------------------------------------------------------

CHILD = r"""
import os, signal, sys, time
out, on_term = sys.argv[1], sys.argv[2]
def record(what):
    with open(out, "a") as f:
        f.write("%s %d %.6f\n" % (what, os.getpid(), time.monotonic()))
def term(*a):
    record("term")
    if on_term == "exit":
        sys.exit(0)
signal.signal(signal.SIGTERM, term)
record("ready")
while True:
    signal.pause()
"""


def _guard_process(
    tmp_path: Path, deadline_in: float, grace: float, on_term: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    out = tmp_path / "child.log"
    read_end, write_end = os.pipe()
    argv = guard_command(read_end, _guard.now() + deadline_in, grace, 0.25)
    guard = subprocess.Popen(
        [*argv, sys.executable, "-c", CHILD, str(out), on_term],
        pass_fds=(read_end,),
        start_new_session=True,
        stderr=subprocess.PIPE,
    )
    os.close(read_end)
    return guard, write_end, out


def _cleanup(guard: subprocess.Popen[bytes], write_end: int) -> None:
    if guard.poll() is None:
        os.killpg(guard.pid, signal.SIGKILL)
        guard.wait()
    os.close(write_end)
    if guard.stderr is not None:
        guard.stderr.close()


@pytest.mark.timeout(30)
def test_unrenewed_deadline_sigterm_stops_the_command(tmp_path: Path) -> None:
    """Nobody writes to the pipe (a frozen runner): SIGTERM comes by deadline - grace."""
    guard, write_end, out = _guard_process(tmp_path, deadline_in=1.5, grace=1.0, on_term="exit")
    try:
        assert guard.wait(15) == 0  # the command exited 0 on SIGTERM; the guard with it
        lines = [ln.split() for ln in out.read_text().splitlines()]
        assert [ln[0] for ln in lines] == ["ready", "term"]
        assert guard.stderr is not None
        assert b"not renewed: sent SIGTERM" in guard.stderr.read()
    finally:
        _cleanup(guard, write_end)


@pytest.mark.timeout(30)
def test_unrenewed_deadline_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    guard, write_end, out = _guard_process(tmp_path, deadline_in=1.0, grace=0.5, on_term="stay")
    try:
        assert wait_for(lambda: out.exists() and "ready" in out.read_text(), 15)
        child = int(out.read_text().split()[1])
        before = _guard.now()
        assert guard.wait(15) == -signal.SIGKILL  # the whole group, the guard included
        assert _guard.now() - before < 5
        assert wait_for(lambda: not alive(child), 5)
        assert "term" in out.read_text()  # SIGTERM came first
    finally:
        _cleanup(guard, write_end)


@pytest.mark.timeout(30)
def test_a_renewed_deadline_keeps_the_command_and_t_skips_sigterm(tmp_path: Path) -> None:
    guard, write_end, out = _guard_process(tmp_path, deadline_in=2.0, grace=1.0, on_term="stay")
    try:
        assert wait_for(lambda: out.exists() and "ready" in out.read_text(), 15)
        # The runner says: renewed far ahead, then "I have sent SIGTERM myself", then a
        # deadline that is about to pass: the guard sends only SIGKILL.
        os.write(write_end, b"D %.6f\n" % (_guard.now() + 3600))
        os.write(write_end, b"T\n")
        os.write(write_end, b"garbage line\nD %.6f\n" % (_guard.now() + 0.5))
        assert guard.wait(15) == -signal.SIGKILL
        assert "term" not in out.read_text()  # the guard did not send SIGTERM
    finally:
        _cleanup(guard, write_end)


@pytest.mark.timeout(30)
def test_the_guard_shows_a_readable_command_line(tmp_path: Path) -> None:
    guard, write_end, out = _guard_process(tmp_path, deadline_in=3600, grace=1.0, on_term="exit")
    try:
        assert wait_for(lambda: out.exists() and "ready" in out.read_text(), 15)
        cmdline = Path(f"/proc/{guard.pid}/cmdline")
        if cmdline.exists():
            args = cmdline.read_bytes().split(b"\0")
            assert args[3].endswith(b"mutexowner/_guard.py")
            assert b"--deadline" in args and b"--" in args
            assert all(b"\n" not in a for a in args[:13])  # no source code in `ps`
        os.killpg(guard.pid, signal.SIGTERM)  # for the command: the guard ignores it
        assert guard.wait(15) == 0
    finally:
        _cleanup(guard, write_end)


# -- what the runner tells the guard -------------------------------------------------------


class _Status:
    def __init__(self, remaining: Optional[float]) -> None:
        self.lease_remaining = remaining


def test_the_runner_relays_a_moved_deadline_stamped_before_reading_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mutexowner import runner as runner_module
    from mutexowner.runner import RunConfig, Runner
    from mutexowner.testing import fake_redis

    run = Runner(
        RunConfig(key="job", command=("true",), ttl=3.0),
        fake_redis("job"),
        install_signal_handlers=False,
    )
    clock = iter([100.0, 100.0, 101.0, 102.0])  # the guard's clock, read once per relay
    remaining = iter([_Status(2.0), _Status(2.0 - 1e-6), _Status(1.5), _Status(None)])
    # The guard's clock is read first, the lease second: time passing in between shortens
    # what is left, so the deadline sent can only err early.
    monkeypatch.setattr(runner_module._guard, "now", lambda: next(clock))
    monkeypatch.setattr(run.owner, "status", lambda: next(remaining))
    read_end, write_end = os.pipe()
    try:
        for _ in range(4):
            run._relay_renewal(write_end)
        os.close(write_end)
        write_end = -1
        lines = os.read(read_end, 4096).decode().splitlines()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    # 100+2; then the same deadline read again (jitter: not sent); then a renewal: 101+1.5
    # is 102.5; then not holding: nothing (the guard keeps its deadline).
    assert lines == ["D 102.000000", "D 102.500000"]
    assert run._guard_deadline == 102.5


@pytest.mark.timeout(30)
def test_the_guard_stops_what_the_command_left_in_its_group(tmp_path: Path) -> None:
    """The command exits leaving a child that ignores SIGTERM: the guard (not only the
    runner, which may be frozen just then) SIGKILLs it after grace, then exits with the
    command's own status."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc")
    pid_file = tmp_path / "leftover.pid"
    read_end, write_end = os.pipe()
    argv = guard_command(read_end, _guard.now() + 3600, 0.3, 0.25)
    script = f'trap "" TERM; sleep 60 & echo $! > {pid_file}; exit 3'
    guard = subprocess.Popen(
        [*argv, "sh", "-c", script], pass_fds=(read_end,), start_new_session=True
    )
    os.close(read_end)
    try:
        assert guard.wait(15) == 3
        leftover = int(pid_file.read_text())
        assert wait_for(lambda: not alive(leftover), 5), "the leftover survived the guard"
    finally:
        _cleanup(guard, write_end)
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
