"""The guard process of ``mutexowner run`` (standard library only; runs with ``python -I -S``).

Command line (``ps`` shows it as is)::

    python -I -S .../mutexowner/_guard.py --fd N --deadline D --grace G --margin M -- COMMAND...

The guard is the leader of a new session and process group. It starts COMMAND in that group
and exits with COMMAND's status (dying from the same signal when COMMAND did). It ignores
SIGTERM, SIGINT and SIGHUP: ``mutexowner run`` signals the whole group, and those signals are
meant for the command. On Linux it is a child subreaper, so the command's orphaned children
are reaped here instead of lingering as zombies (as they would under a PID 1 that is not an
init).

It enforces the lease on its own clock (``now()``: ``CLOCK_BOOTTIME`` on Linux, which counts
a host suspend; elsewhere ``time.monotonic``), whatever ``mutexowner run`` is doing, frozen
included: SIGTERM to the group at ``deadline - grace``, SIGKILL at ``deadline - margin``.
``mutexowner run`` moves the deadline with one line per confirmed renewal on the pipe ``N``
(its only write end lives in ``mutexowner run``):

``D <deadline>``
    the lease now ends at ``<deadline>`` seconds of ``now()`` (the clock is system-wide);
``T``
    ``mutexowner run`` has sent SIGTERM itself: only the SIGKILL is left to the guard.

Unknown lines are ignored. A frozen ``mutexowner run`` simply stops writing; the deadline
then comes. End-of-file on the pipe means ``mutexowner run`` died: the guard SIGKILLs the
whole group at once (itself included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, NoReturn, Optional

__all__ = ["Schedule", "main", "now", "parse_line"]

#: Longest single wait of the timer (seconds): each wait re-reads the clock, so a wait that
#: follows another clock (or sleeps through a suspend) is corrected within this long.
MAX_WAIT = 0.05

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None) if sys.platform.startswith("linux") else None


def now() -> float:
    """The guard's clock: CLOCK_BOOTTIME on Linux (counts suspend), else time.monotonic()."""
    if _BOOTTIME is not None:
        return time.clock_gettime(_BOOTTIME)
    return time.monotonic()


def parse_line(line: bytes) -> Optional[tuple[str, Optional[float]]]:
    """One protocol line: ``("D", deadline)``, ``("T", None)``, or None (ignored)."""
    parts = line.split()
    if parts == [b"T"]:
        return ("T", None)
    if len(parts) == 2 and parts[0] == b"D":
        try:
            value = float(parts[1])
        except ValueError:
            return None
        if value == value and value not in (float("inf"), float("-inf")):
            return ("D", value)
    return None


class Schedule:
    """When the guard signals the command's group: pure logic, no clock, no I/O.

    ``due(t)`` returns the signal to send at time ``t`` (at most once each), ``next_at()`` when
    to look again.
    """

    def __init__(self, deadline: float, grace: float, margin: float) -> None:
        if not (grace >= 0 and margin >= 0):
            raise ValueError(f"need grace >= 0 and margin >= 0, got {grace!r}, {margin!r}")
        self.deadline = deadline
        self.grace = grace
        self.margin = margin
        self.term_sent = False
        self.kill_sent = False

    def update(self, deadline: float) -> None:
        """A confirmed renewal: the lease now ends at ``deadline``."""
        self.deadline = deadline

    def runner_terminated(self) -> None:
        """``mutexowner run`` sent SIGTERM itself: only SIGKILL is left to the guard."""
        self.term_sent = True

    @property
    def term_at(self) -> float:
        return self.deadline - self.grace

    @property
    def kill_at(self) -> float:
        return self.deadline - self.margin

    def due(self, t: float) -> Optional[int]:
        if not self.kill_sent and t >= self.kill_at:
            self.kill_sent = self.term_sent = True
            return int(signal.SIGKILL)
        if not self.term_sent and t >= self.term_at:
            self.term_sent = True
            return int(signal.SIGTERM)
        return None

    def next_at(self) -> Optional[float]:
        if self.kill_sent:
            return None
        return self.kill_at if self.term_sent else self.term_at


def _say(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"mutexowner guard[{os.getpid()}]: {message}\n".encode())


def _become_subreaper() -> None:
    """Linux: orphaned descendants of the command are re-parented to (and reaped by) us."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:  # no ctypes or no prctl: zombies are then the runner's concern
        pass


def _parse_argv(argv: list[str]) -> tuple[int, float, float, float, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: _guard.py --fd N --deadline D --grace G --margin M -- COMMAND")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    values = dict(zip(options[::2], options[1::2]))
    try:
        fd = int(values["--fd"])
        deadline, grace, margin = (float(values[k]) for k in ("--deadline", "--grace", "--margin"))
    except (KeyError, ValueError):
        raise SystemExit(f"mutexowner guard: bad arguments {options!r}") from None
    if not command:
        raise SystemExit("mutexowner guard: no command")
    return fd, deadline, grace, margin, command


def _watch_pipe(fd: int, on_line: Callable[[bytes], None]) -> None:
    """Read protocol lines until end-of-file, then SIGKILL the whole group (us included)."""
    buffer = b""
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                on_line(line)
    finally:
        os.killpg(0, signal.SIGKILL)


def _enforce(schedule: Schedule, cond: threading.Condition) -> None:
    """Signal the group when the schedule says so, on the guard's own clock."""
    while True:
        with cond:
            t = now()
            signum = schedule.due(t)
            if signum is None:
                at = schedule.next_at()
                if at is None:
                    return
                cond.wait(min(MAX_WAIT, max(0.0, at - t)))
                continue
            left = schedule.deadline - t
        name = "SIGKILL" if signum == signal.SIGKILL else "SIGTERM"
        if signum == signal.SIGKILL:
            _say(f"lease deadline in {left:.3f} s not renewed: {name} to the command's group")
            os.killpg(0, signum)  # the guard goes too
        else:
            os.killpg(0, signum)  # ignored by the guard
            _say(f"lease deadline in {left:.3f} s not renewed: sent {name} to the command's group")


def _reap_zombies() -> None:
    """Reap every child that has ended (the command's orphans come to us: subreaper)."""
    while True:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if reaped == 0:
            return


def group_members(pgid: int) -> Optional[list[tuple[int, str, int]]]:
    """(pid, state, ppid) of every process in group ``pgid``; None without a Linux /proc.

    Also used by the runner (this module cannot import the package: it runs as a script).
    """
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    if not os.path.exists("/proc/self/stat"):
        return None
    members = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid:
            members.append((int(name), fields[0].decode(), int(fields[1])))
    return members


def _leftovers() -> Optional[list[int]]:
    """Living processes of our group other than us; None without a Linux /proc."""
    members = group_members(os.getpgrp())
    if members is None:
        return None
    me = os.getpid()
    return [pid for pid, state, _ in members if pid != me and state not in ("Z", "X")]


def _stop_leftovers(grace: float) -> None:
    """The command has exited: SIGTERM what it left in the group, SIGKILL it after grace.

    Linux only (it needs /proc to tell us from the others); elsewhere the runner does it.
    """
    left = _leftovers()
    if not left:
        return
    os.killpg(0, signal.SIGTERM)  # ignored by the guard
    end = now() + grace
    while left and now() < end:
        time.sleep(0.02)
        _reap_zombies()
        left = _leftovers() or []
    for _ in range(50):  # SIGKILL each one (never ourselves); a killed one cannot fork
        if not left:
            return
        _say(f"SIGKILL to {len(left)} process(es) the command left in its group")
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
        _reap_zombies()
        left = _leftovers() or []


#: Signals whose default action ends or stops a process, which the command (or the runner's
#: group kill) may send to the whole group, the guard included. The guard ignores every one
#: of them: a guard killed by the command's ``kill -USR1 0`` would stop enforcing the lease.
#: (SIGKILL and SIGSTOP cannot be ignored; fault signals such as SIGSEGV are the guard's own.)
_GROUP_SIGNAL_NAMES = (
    "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
    "SIGPROF", "SIGIO", "SIGPOLL", "SIGPWR", "SIGXCPU", "SIGXFSZ", "SIGSTKFLT", "SIGTSTP",
    "SIGTTIN", "SIGTTOU", "SIGPIPE", "SIGXFZ",
)  # fmt: skip


def group_signals() -> list[int]:
    """The signals the guard ignores and gives back to the command at their defaults."""
    found = {int(getattr(signal, n)) for n in _GROUP_SIGNAL_NAMES if hasattr(signal, n)}
    if hasattr(signal, "SIGRTMIN") and hasattr(signal, "SIGRTMAX"):
        found.update(range(int(signal.SIGRTMIN), int(signal.SIGRTMAX) + 1))
    return sorted(found)


def main(argv: Optional[list[str]] = None) -> None:
    """Start the command in a new group, enforce the lease on it, and exit as it did."""
    fd, deadline, grace, margin, command = _parse_argv(sys.argv[1:] if argv is None else argv)
    ignored = _ignore_group_signals()
    if os.getpgrp() != os.getpid():  # every group signal below must hit only our group
        os.setsid()
    _become_subreaper()
    pid = os.fork()
    if pid == 0:
        _exec_command(fd, ignored, command)
    _start_enforcing(fd, Schedule(deadline, grace, margin))
    status = _wait_for(pid)
    _reap_zombies()
    # What the command left in the group is stopped here, where the lease is still enforced,
    # not after we exit (the runner may be frozen just then).
    _stop_leftovers(grace)
    _exit_as(status)


def _ignore_group_signals() -> list[int]:
    """Ignore every group signal this platform lets us ignore; return those ignored."""
    ignored = []
    for s in group_signals():
        with contextlib.suppress(OSError, ValueError):
            signal.signal(s, signal.SIG_IGN)
            ignored.append(s)
    return ignored


def _exec_command(fd: int, ignored: list[int], command: list[str]) -> NoReturn:
    """In the forked child: become the command (exit 127 not found, 126 not executable)."""
    code = 127
    try:
        os.close(fd)
        for s in ignored:  # an ignored signal stays ignored across exec: give them back
            signal.signal(s, signal.SIG_DFL)
        os.execvp(command[0], command)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        os.write(2, f"mutexowner run: cannot execute {command[0]!r}: {exc.strerror}\n".encode())
    finally:
        os._exit(code)


def _start_enforcing(fd: int, schedule: Schedule) -> None:
    """Threads that move ``schedule`` with the pipe's lines and signal the group on time."""
    cond = threading.Condition()

    def on_line(line: bytes) -> None:
        message = parse_line(line)
        if message is None:
            return
        with cond:
            if message[0] == "T":
                schedule.runner_terminated()
            elif message[1] is not None:
                schedule.update(message[1])
            cond.notify_all()

    threading.Thread(target=_watch_pipe, args=(fd, on_line), daemon=True).start()
    threading.Thread(target=_enforce, args=(schedule, cond), daemon=True).start()


def _wait_for(pid: int) -> int:
    """Reap children until ``pid`` exits (orphans come to us too: subreaper); its status."""
    status = 0
    while True:
        try:
            reaped, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        if reaped == pid:
            return status


def _exit_as(status: int) -> NoReturn:
    """Exit with the command's status, or die from the signal that killed it."""
    if os.WIFSIGNALED(status):
        n = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(n, signal.SIG_DFL)
        os.kill(os.getpid(), n)
        os._exit(128 + n)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


if __name__ == "__main__":
    main()
