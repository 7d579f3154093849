"""``mutexowner run``: run a command as a child process on exactly one host of a fleet.

A ``MutexOwner`` holds the lease; its supervisor has one worker, which starts the command
while the lease is held and stops it (SIGTERM, then SIGKILL after ``grace``) when the lease
is lost or the run is asked to stop. A command that exits on its own is restarted by the
supervisor (one_for_all), within ``max_restarts`` restarts in ``max_seconds``; with
``once``, a clean exit ends the whole run.

The command runs under a tiny guard process (``GUARD_SOURCE``): the guard is the leader of
a new session and process group, starts the command in that group, and kills the whole
group when ``mutexowner run`` dies without cleaning up (``kill -9``): it watches a pipe
whose only write end lives in this process. So a killed ``mutexowner run`` never leaves the
command running while another host takes the lease over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Optional, Union

from mutexowner._validate import finite_number
from mutexowner.connection import redact_text
from mutexowner.events import Event
from mutexowner.owner import STUCK_EXIT_STATUS, MutexOwner, StuckPolicy, drift_for
from mutexowner.supervisor import Supervisor, WorkerContext

__all__ = [
    "EXIT_GAVE_UP",
    "EXIT_INTERNAL",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_STATUS_FREE",
    "EXIT_STUCK",
    "EXIT_USAGE",
    "GUARD_SOURCE",
    "RunConfig",
    "Runner",
    "check_command",
    "exit_status",
    "kill_margin",
]

log = logging.getLogger("mutexowner.run")

#: Success.
EXIT_OK = 0
#: Unexpected internal error (a bug; the traceback is logged).
EXIT_INTERNAL = 1
#: Usage or configuration error (bad flags, no Redis URL, --grace too large for --ttl).
EXIT_USAGE = 2
#: ``mutexowner status``: the lease is free.
EXIT_STATUS_FREE = 3
#: ``mutexowner run`` gave up: the command exited more than --max-restarts times within
#: --max-seconds (EX_UNAVAILABLE).
EXIT_GAVE_UP = 69
#: The lease was lost while the command could not be stopped (stuck-worker policy "exit").
EXIT_STUCK = STUCK_EXIT_STATUS
#: The command exists but cannot be executed (as in the shell).
EXIT_NOT_EXECUTABLE = 126
#: The command was not found (as in the shell).
EXIT_NOT_FOUND = 127

#: Environment variables given to the command.
ENV_FENCING_TOKEN = "MUTEXOWNER_FENCING_TOKEN"
ENV_KEY = "MUTEXOWNER_KEY"
ENV_IDENTITY = "MUTEXOWNER_IDENTITY"

#: How often the worker looks at the running command (seconds).
POLL_SECONDS = 0.05

#: The guard process, run as ``python -I -S -c GUARD_SOURCE <pipe fd> <command...>``.
#: It ignores SIGTERM/SIGINT/SIGHUP (they are meant for the command, which gets them as a
#: member of the same process group), exits with the command's status (dying from the same
#: signal when the command did), and SIGKILLs its whole process group when the pipe from
#: ``mutexowner run`` reaches end-of-file, i.e. when ``mutexowner run`` has died.
GUARD_SOURCE = r"""
import os, signal, sys, threading
fd = int(sys.argv[1])
argv = sys.argv[2:]
def _ignore(signum, frame):
    pass
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Python ignores these at start-up; the command must get the default actions back.
RESTORED = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, n))
for s in FORWARDED:
    signal.signal(s, _ignore)
pid = os.fork()
if pid == 0:
    code = 127
    try:
        os.close(fd)
        for s in FORWARDED + RESTORED:
            signal.signal(s, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        os.write(2, ("mutexowner run: cannot execute %r: %s\n" % (argv[0], exc.strerror)).encode())
    finally:
        os._exit(code)
def _watch():
    try:
        while os.read(fd, 64):
            pass
    finally:
        os.killpg(0, signal.SIGKILL)
threading.Thread(target=_watch, daemon=True).start()
while True:
    try:
        _, status = os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
if os.WIFSIGNALED(status):
    n = os.WTERMSIG(status)
    try:
        signal.signal(n, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), n)
    os._exit(128 + n)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
"""


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell would report it: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def kill_margin(ttl: float) -> float:
    """Time allowed after SIGKILL for the command to be reaped: 5 % of ttl in [0.25, 1] s."""
    return min(1.0, max(0.25, ttl * 0.05))


@dataclass(frozen=True)
class RunConfig:
    """What ``mutexowner run`` was asked to do; validated when built (messages name the flag)."""

    key: str
    command: tuple[str, ...]
    ttl: float = 10.0
    #: Seconds between SIGTERM and SIGKILL; None: 30 % of ttl (3 s with the default ttl).
    grace: Optional[float] = None
    identity: Optional[str] = None
    max_restarts: int = 3
    max_seconds: float = 5.0
    once: bool = False
    prefix: str = "mutexowner"
    grace_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise ValueError("a COMMAND is required after '--' (e.g. -- /usr/bin/backup --all)")
        ttl = finite_number("--ttl", self.ttl)
        if ttl <= 0:
            raise ValueError(f"--ttl must be > 0 seconds, got {self.ttl!r}")
        grace = ttl * 0.3 if self.grace is None else finite_number("--grace", self.grace)
        if grace < 0:
            raise ValueError(f"--grace must be >= 0 seconds, got {self.grace!r}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int):
            raise TypeError(f"--max-restarts must be an integer, got {self.max_restarts!r}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if finite_number("--max-seconds", self.max_seconds) <= 0:
            raise ValueError(f"--max-seconds must be > 0, got {self.max_seconds!r}")
        object.__setattr__(self, "grace_seconds", grace)
        limit = self.max_grace(ttl)
        if grace >= limit:
            raise ValueError(
                f"--grace {grace:g} is too large for --ttl {ttl:g}: the command must be stopped "
                f"(SIGTERM, --grace, SIGKILL, {kill_margin(ttl):g} s to reap it) before the "
                f"lease can expire, so renew interval (ttl/3 = {ttl / 3:.3g}) + grace + "
                f"{kill_margin(ttl):g} must be < ttl - drift ({ttl - drift_for(ttl):.4g}). "
                + (
                    f"Use --grace below {limit:.3g} or a larger --ttl."
                    if limit > 0
                    else "Use a larger --ttl."
                )
            )

    @staticmethod
    def max_grace(ttl: float) -> float:
        """Exclusive upper bound of --grace for this ttl (may be <= 0 for a tiny ttl)."""
        return ttl - drift_for(ttl) - ttl / 3 - kill_margin(ttl)

    @property
    def shutdown_timeout(self) -> float:
        """The supervisor's budget to stop the command: grace plus time to reap it."""
        return self.grace_seconds + kill_margin(self.ttl)


def check_command(command: tuple[str, ...], env: Optional[dict[str, str]] = None) -> Optional[int]:
    """Can ``command[0]`` be executed? None if so, else 127 (not found) or 126 (not executable)."""
    program = command[0]
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if os.sep in program:
        if not os.path.exists(program):
            return EXIT_NOT_FOUND
        return None if os.access(program, os.X_OK) and not os.path.isdir(program) else 126
    return None if shutil.which(program, path=path) else EXIT_NOT_FOUND


class Runner:
    """Runs ``config.command`` while holding the lease; ``run()`` returns the exit status."""

    def __init__(
        self,
        config: RunConfig,
        redis: Any,
        *,
        stuck_worker_policy: StuckPolicy = "exit",
        env: Optional[dict[str, str]] = None,
        install_signal_handlers: bool = True,
    ) -> None:
        self.config = config
        self._env = dict(os.environ if env is None else env)
        self._install_signals = install_signal_handlers
        # The worker counts the command's exits itself and gives up (ending the run) before
        # the supervisor would: a supervisor that gives up makes the owner release the lease
        # and contend again, which is right for threads but not for `run` (see _child_exited).
        self._supervisor = Supervisor(
            max_restarts=config.max_restarts,
            max_seconds=config.max_seconds,
            shutdown_timeout=config.shutdown_timeout,
        )
        self._supervisor.add(self._work, name="command")
        self.owner = MutexOwner(
            redis,
            config.key,
            ttl=config.ttl,
            supervisor=self._supervisor,
            identity=config.identity,
            stuck_worker_policy=stuck_worker_policy,
            prefix=config.prefix,
        )
        self.owner.add_listener(self._on_event)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._exit_times: list[float] = []
        # Plain flags, also written from signal handlers (which must take no lock).
        self._signals = 0
        self._last_signal: Optional[int] = None
        self._closing = False
        self._force = False
        self._shutting_down = False
        self._finish_reason: Optional[str] = None
        self._finish_code = EXIT_OK
        self._final_status: Optional[int] = None
        self._by_signal = False
        #: Every status the command exited with, in order (for tests and the log).
        self.statuses: list[int] = []
        #: How many times the command was started.
        self.starts = 0

    # -- control --------------------------------------------------------------------------

    def run(self) -> int:
        """Contend for the lease and run the command until told to stop; the exit status."""
        previous = self._install_handlers()
        try:
            log.info(
                "key=%s identity=%s ttl=%g grace=%g: waiting for the lease to run %s",
                self.config.key,
                self.owner.identity,
                self.config.ttl,
                self.config.grace_seconds,
                redact_text(shlex.join(self.config.command)),
            )
            self.owner.start()
            while self._signals == 0 and self._finish_reason is None:
                self._wake.wait(0.1)
                self._wake.clear()
            self._by_signal = self._finish_reason is None
            self._closing = True
            self._shutting_down = True
            if self._by_signal:
                signum = self._last_signal
                log.info(
                    "key=%s: %s received, stopping the command",
                    self.config.key,
                    signal.Signals(signum).name if signum is not None else "stop request",
                )
            self.owner.stop()
        finally:
            self._restore_handlers(previous)
        return self._exit_code()

    def request_stop(self, signum: Optional[int] = None) -> None:
        """Stop as on SIGTERM: stop the command, release the lease, make ``run()`` return.

        Takes no lock (safe in a signal handler). A second request skips the rest of the
        grace period: the command's process group gets SIGKILL at once.
        """
        self._closing = True
        self._last_signal = signum
        self._signals += 1
        if self._signals > 1:
            self._force = True

    # -- internals ------------------------------------------------------------------------

    def _exit_code(self) -> int:
        if self._by_signal:
            status = self._final_status
            return EXIT_OK if status is None else status
        return self._finish_code

    def _finish(self, reason: str, code: int) -> None:
        """Ask the main loop to end the run with ``code`` (first reason wins)."""
        with self._lock:
            if self._finish_reason is None:
                self._finish_reason = reason
                self._finish_code = code
            self._closing = True
        self._wake.set()

    def _on_event(self, event: Event) -> None:
        if event.kind == "lost" and event.reason == "workers_failed":
            # The supervisor gave up before our own count did (exits processed with lag).
            self._finish("gave_up", EXIT_GAVE_UP)

    def _handle_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.request_stop(signum)

    def _install_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if not self._install_signals or threading.current_thread() is not threading.main_thread():
            return previous
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._handle_signal)
        return previous

    @staticmethod
    def _restore_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # -- the worker -----------------------------------------------------------------------

    def _work(self, ctx: WorkerContext) -> None:
        """One run of the command under the lease (the supervisor's only worker)."""
        if self._closing:
            ctx.stopping.wait()
            return
        ctx.ensure_held()
        env = dict(self._env)
        env[ENV_FENCING_TOKEN] = str(ctx.fencing_token)
        env[ENV_KEY] = self.config.key
        env[ENV_IDENTITY] = self.owner.identity
        read_end, write_end = os.pipe()
        try:
            try:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",
                        "-S",
                        "-c",
                        GUARD_SOURCE,
                        str(read_end),
                        *self.config.command,
                    ],
                    env=env,
                    pass_fds=(read_end,),
                    start_new_session=True,
                )
            except OSError as exc:
                log.error("key=%s: cannot start the command: %s", self.config.key, exc)
                self._finish("spawn_failed", EXIT_INTERNAL)
                ctx.stopping.wait()
                return
            finally:
                os.close(read_end)
            self.starts += 1
            log.info(
                "key=%s: started the command (pid %d, fencing token %s%s)",
                self.config.key,
                proc.pid,
                ctx.fencing_token,
                f", restart {ctx.restart_count}" if ctx.restart_count else "",
            )
            try:
                self._supervise(ctx, proc)
            finally:
                if proc.poll() is None:  # an exception on the way: leave nothing behind
                    self._signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
        finally:
            os.close(write_end)

    def _supervise(self, ctx: WorkerContext, proc: subprocess.Popen[bytes]) -> None:
        while proc.poll() is None:
            if ctx.sleep(POLL_SECONDS):
                status = self._terminate(proc)
                if self._shutting_down:
                    self._final_status = status
                self.statuses.append(status)
                log.info(
                    "key=%s: the command was stopped (%s); exit status %d",
                    self.config.key,
                    "run stopping" if self._shutting_down else "lease ending",
                    status,
                )
                return
        status = exit_status(proc.returncode)
        self.statuses.append(status)
        # Whatever the command left behind in its process group goes with it.
        self._reap_group(proc.pid, self.config.grace_seconds)
        self._child_exited(ctx, status)

    def _child_exited(self, ctx: WorkerContext, status: int) -> None:
        """The command ended on its own: restart it (return), or end the run."""
        if self._closing:
            if self._signals:  # it ended as we were told to stop: its status is the run's
                self._final_status = status
            ctx.stopping.wait()
            return
        if self.config.once and status == EXIT_OK:
            log.info("key=%s: the command exited with status 0 (--once): done", self.config.key)
            self._finish("once", EXIT_OK)
            ctx.stopping.wait()
            return
        now = time.monotonic()
        with self._lock:
            window = self.config.max_seconds
            self._exit_times = [t for t in self._exit_times if now - t < window]
            self._exit_times.append(now)
            too_many = len(self._exit_times) > self.config.max_restarts
        if too_many:
            log.error(
                "key=%s: the command exited with status %d, more than %d restart(s) within "
                "%g s: giving up (exit %d)",
                self.config.key,
                status,
                self.config.max_restarts,
                self.config.max_seconds,
                EXIT_GAVE_UP,
            )
            self._finish("gave_up", EXIT_GAVE_UP)
            ctx.stopping.wait()
            return
        log.warning(
            "key=%s: the command exited with status %d; restarting it", self.config.key, status
        )
        # Returning while not stopping: the supervisor restarts the worker (one_for_all).

    def _terminate(self, proc: subprocess.Popen[bytes]) -> int:
        """SIGTERM the command's process group; SIGKILL what is left after the grace period."""
        pgid = proc.pid
        self._signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds
        self._wait_until(lambda: proc.poll() is not None, deadline)
        self._reap_group(pgid, max(0.0, deadline - time.monotonic()), terminated=True)
        if proc.poll() is None:
            proc.wait()
        return exit_status(proc.returncode)

    def _reap_group(self, pgid: int, grace: float, *, terminated: bool = False) -> None:
        """Make sure no process is left in group ``pgid``: SIGTERM, wait ``grace``, SIGKILL."""
        if not self._group_alive(pgid):
            return
        if not terminated:
            self._signal_group(pgid, signal.SIGTERM)
        self._wait_until(lambda: not self._group_alive(pgid), time.monotonic() + grace)
        if self._group_alive(pgid):
            log.warning("key=%s: sending SIGKILL to the command's process group", self.config.key)
            self._signal_group(pgid, signal.SIGKILL)

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> None:
        while not done() and not self._force:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.02))

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @staticmethod
    def _signal_group(pgid: int, signum: Union[int, signal.Signals]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)
