"""``mutexowner run``: run a command as a child process on exactly one host of a fleet.

A ``MutexOwner`` holds the lease; its supervisor has one worker, which starts the command
while the lease is held and stops it (SIGTERM, then SIGKILL after ``grace``) when the lease
is lost or the run is asked to stop. What happens when the command exits on its own is the
``restart`` policy (systemd's words: ``on-failure``, ``always``, ``never``); with ``once``
the run ends after the command's first run and exits with its status.

The command runs under a guard process (``mutexowner/_guard.py``, run as a script so that
``ps`` shows a readable command line): the guard is the leader of a new session and process
group and starts the command in that group. It enforces the lease by itself, on its own
clock: this process tells it the lease deadline after every confirmed renewal, and the guard
sends SIGTERM to the group at ``deadline - grace`` and SIGKILL at ``deadline - margin``
unless told of a later deadline, so a frozen ``mutexowner run`` (SIGSTOP, a stuck machine)
never leaves the command running past its lease. When ``mutexowner run`` dies (``kill -9``)
the guard's pipe closes and it kills the whole group at once.
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
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, Union

from mutexowner import _guard
from mutexowner._validate import finite_number
from mutexowner.connection import redact_text
from mutexowner.events import Event
from mutexowner.inspection import STATUS_FREE
from mutexowner.once import wait_for_lease
from mutexowner.owner import STUCK_EXIT_STATUS, MutexOwner, StuckPolicy
from mutexowner.supervisor import Supervisor, WorkerContext
from mutexowner.timing import LeaseTiming, TimingError, TimingNames

__all__ = [
    "CLEAN_RESTART_DELAY",
    "EXIT_GAVE_UP",
    "EXIT_INTERNAL",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_SKIPPED",
    "EXIT_STATUS_FREE",
    "EXIT_STUCK",
    "EXIT_USAGE",
    "RESTART_POLICIES",
    "RunConfig",
    "Runner",
    "check_command",
    "exit_status",
    "guard_command",
    "kill_margin",
]

log = logging.getLogger("mutexowner.run")

#: Success.
EXIT_OK = 0
#: Unexpected internal error (a bug; the traceback is logged).
EXIT_INTERNAL = 1
#: Usage or configuration error (bad flags, no Redis URL, --grace too large for --ttl); also
#: ``run --wait``: Redis never answered within --wait.
EXIT_USAGE = 2
#: ``mutexowner status``: the lease is free (every status command's code, defined once).
EXIT_STATUS_FREE = STATUS_FREE
#: ``mutexowner run`` gave up: the command failed more than --max-restarts times within
#: --max-seconds (EX_UNAVAILABLE).
EXIT_GAVE_UP = 69
#: The lease was lost while the command could not be stopped (stuck-worker policy "exit").
EXIT_STUCK = STUCK_EXIT_STATUS
#: ``run --wait``: another host held the lease for the whole wait; skipped (EX_TEMPFAIL).
#: ``--skip-ok`` turns it into 0.
EXIT_SKIPPED = 75
#: The command exists but cannot be executed (as in the shell).
EXIT_NOT_EXECUTABLE = 126
#: The command was not found (as in the shell).
EXIT_NOT_FOUND = 127

#: Environment variables given to the command.
ENV_FENCING_TOKEN = "MUTEXOWNER_FENCING_TOKEN"
ENV_KEY = "MUTEXOWNER_KEY"
ENV_IDENTITY = "MUTEXOWNER_IDENTITY"

#: What to do when the command exits on its own (systemd's ``Restart=`` words).
RESTART_POLICIES = ("on-failure", "always", "never")
#: ``--restart always``: seconds before a command that exited 0 is started again (such
#: restarts are not counted against --max-restarts; a tight loop is impossible).
CLEAN_RESTART_DELAY = 1.0

#: How often the worker looks at the running command and at the lease (seconds).
POLL_SECONDS = 0.05
#: A deadline later by at least this much (seconds) is sent to the guard: a renewal moves
#: it by about ttl/3; reading it twice without a renewal moves it by microseconds.
RELAY_STEP = 0.005

_SIGTERM_STATUS = 128 + int(signal.SIGTERM)


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell would report it: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def kill_margin(ttl: float) -> float:
    """Time allowed after SIGKILL for the command to be reaped: 5 % of ttl in [0.25, 1] s."""
    return min(1.0, max(0.25, ttl * 0.05))


def guard_command(fd: int, deadline: float, grace: float, margin: float) -> list[str]:
    """The guard's command line, up to (not including) the command itself.

    The guard runs as a script (``python -I -S .../mutexowner/_guard.py --fd N ...``): it needs
    only the standard library, and ``ps`` shows what it is. ``deadline`` is on the guard's
    clock (``mutexowner._guard.now``).
    """
    options = [
        "--fd",
        str(fd),
        "--deadline",
        f"{deadline:.6f}",
        "--grace",
        f"{grace:g}",
        "--margin",
        f"{margin:g}",
        "--",
    ]
    path = Path(_guard.__file__)
    if path.is_file():
        return [sys.executable, "-I", "-S", str(path), *options]
    # Imported from a zip: run its source (``ps`` then shows it, but it works).
    loader = getattr(_guard, "__loader__", None)
    source = loader.get_source(_guard.__name__) if loader is not None else None
    if source is None:  # pragma: no cover - no way to start a guard
        raise RuntimeError("cannot find the source of mutexowner._guard")
    return [sys.executable, "-I", "-S", "-c", source, *options]


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
    #: Run the command once: no restart (unless ``restart`` says so), and the run exits with
    #: the command's status.
    once: bool = False
    prefix: str = "mutexowner"
    #: on-failure, always or never; None: "never" with ``once``, else "on-failure".
    restart: Optional[str] = None
    #: Seconds to wait for the lease before skipping (None: wait for ever; 0: one attempt).
    wait: Optional[float] = None
    #: A skip (``wait`` ran out) exits 0 instead of EXIT_SKIPPED.
    skip_ok: bool = False
    #: After the command ended on its own, keep the lease (running nothing) until this many
    #: seconds after it started, then release.
    hold_at_least: float = 0.0
    grace_seconds: float = field(init=False)
    restart_policy: str = field(init=False)
    #: The lease's numbers (the shutdown budget is grace plus time to reap the command).
    timing: LeaseTiming = field(init=False)

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
        if self.restart is not None and self.restart not in RESTART_POLICIES:
            raise ValueError(
                f"--restart must be one of {', '.join(RESTART_POLICIES)}, got {self.restart!r}"
            )
        if self.wait is not None and finite_number("--wait", self.wait) < 0:
            raise ValueError(f"--wait must be >= 0 seconds, got {self.wait!r}")
        if finite_number("--hold-at-least", self.hold_at_least) < 0:
            raise ValueError(f"--hold-at-least must be >= 0 seconds, got {self.hold_at_least!r}")
        object.__setattr__(self, "grace_seconds", grace)
        policy = self.restart or ("never" if self.once else "on-failure")
        object.__setattr__(self, "restart_policy", policy)
        margin = kill_margin(ttl)
        names = TimingNames(
            ttl="--ttl",
            renew_interval="the renew interval (ttl/3)",
            shutdown=f"--grace + {margin:g} s to reap the command",
        )
        try:
            timing = LeaseTiming.of(ttl, shutdown_budget=grace + margin, names=names)
        except TimingError as exc:
            limit = self.max_grace(ttl)
            raise ValueError(
                f"--grace {grace:g} is too large for --ttl {ttl:g}: the command must be stopped "
                f"(SIGTERM, --grace, SIGKILL, reaped) before the lease can expire: {exc} "
                + (
                    f"Use --grace below {limit:.3g} or a larger --ttl."
                    if limit > 0
                    else "Use a larger --ttl."
                )
            ) from None
        object.__setattr__(self, "timing", timing)

    @staticmethod
    def max_grace(ttl: float) -> float:
        """Exclusive upper bound of --grace for this ttl (<= 0: no grace fits this ttl)."""
        try:
            slack = LeaseTiming.of(ttl).slack
        except TimingError:
            return 0.0
        return slack - kill_margin(ttl)

    @property
    def shutdown_timeout(self) -> float:
        """The supervisor's budget to stop the command: grace plus time to reap it."""
        return self.timing.shutdown_budget


def check_command(command: tuple[str, ...], env: Optional[dict[str, str]] = None) -> Optional[int]:
    """Can ``command[0]`` be executed? None if so, else 127 (not found) or 126 (not executable)."""
    program = command[0]
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if os.sep in program:
        if not os.path.exists(program):
            return EXIT_NOT_FOUND
        return None if os.access(program, os.X_OK) and not os.path.isdir(program) else 126
    return None if shutil.which(program, path=path) else EXIT_NOT_FOUND


class _Outcome:
    """How one run of the command ended (see ``Runner._run_command``)."""

    EXITED = "exited"  # on its own
    STOPPED = "stopped"  # by us: the lease is ending or the run is stopping
    GUARD = "guard"  # by the guard, at the lease deadline we had told it
    NOT_STARTED = "not_started"


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
        self._supervisor = self._make_supervisor()
        self.owner = self._make_owner(redis, stuck_worker_policy)
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
        self._terminated_by_us = False
        self._by_signal = False
        # The lease deadline last sent to the guard, on its clock.
        self._guard_deadline = -float("inf")
        self._job_started: Optional[float] = None
        #: Every status the command exited with, in order (for tests and the log).
        self.statuses: list[int] = []
        #: How many times the command was started.
        self.starts = 0
        #: How the wait for the lease ended with ``wait`` set: ours, taken, unavailable...
        self.wait_outcome: Optional[str] = None

    def _make_supervisor(self) -> Supervisor:
        """The supervisor of the one worker that runs the command.

        The worker restarts the command itself (a loop, not a supervisor restart); the
        supervisor's own restarts only follow a bug in the worker.
        """
        supervisor = Supervisor(
            max_restarts=self.config.max_restarts,
            max_seconds=self.config.max_seconds,
            shutdown_timeout=self.config.shutdown_timeout,
        )
        supervisor.add(self._work, name="command")
        return supervisor

    def _make_owner(self, redis: Any, stuck_worker_policy: StuckPolicy) -> MutexOwner:
        """The lease's owner, running the supervisor, with the run's event listener."""
        owner = MutexOwner(
            redis,
            self.config.key,
            ttl=self.config.ttl,
            supervisor=self._supervisor,
            identity=self.config.identity,
            stuck_worker_policy=stuck_worker_policy,
            prefix=self.config.prefix,
        )
        owner.add_listener(self._on_event)
        return owner

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
            if self.config.wait is not None:
                self._wait_or_skip(self.config.wait)
            while self._signals == 0 and self._finish_reason is None:
                self._wake.wait(0.1)
                self._wake.clear()
            self._by_signal = self._finish_reason is None
            self._closing = True
            self._shutting_down = True
            if self._by_signal:
                signum = self._last_signal
                log.info(
                    "key=%s: %s received, stopping the command and releasing the lease",
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

    def _wait_or_skip(self, wait: float) -> None:
        outcome = wait_for_lease(self.owner, wait, cancelled=lambda: self._signals > 0)
        self.wait_outcome = outcome
        if outcome == "taken":
            code = EXIT_OK if self.config.skip_ok else EXIT_SKIPPED
            log.info(
                "key=%s: the lease is held elsewhere (waited %g s): not running the command; "
                "exit %d",
                self.config.key,
                wait,
                code,
            )
            self._finish("skipped", code)
        elif outcome == "unavailable":
            log.error(
                "key=%s: no answer from Redis within --wait %g s (%s): not running the "
                "command; exit %d",
                self.config.key,
                wait,
                self.owner.status().last_error,
                EXIT_USAGE,
            )
            self._finish("unavailable", EXIT_USAGE)

    def _exit_code(self) -> int:
        if self._by_signal:
            status = self._final_status
            if status is None or status == EXIT_OK:
                return EXIT_OK
            if status == _SIGTERM_STATUS and self._terminated_by_us:
                return EXIT_OK  # it ended on the SIGTERM we sent: a clean stop
            return status
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
            # The supervisor gave up: the worker itself kept failing (a bug).
            self._finish("gave_up", EXIT_GAVE_UP)

    def _handle_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.request_stop(signum)

    def _install_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if not self._install_signals or threading.current_thread() is not threading.main_thread():
            return previous
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[signum] = signal.signal(signum, self._handle_signal)
        # Job control from a terminal reaches only our process group, not the command's
        # (its own session): being stopped would freeze the lease's renewals while the
        # command runs on. The guard enforces the deadline anyway; we do not stop.
        for name in ("SIGTSTP", "SIGTTIN", "SIGTTOU"):
            stop_signal: Optional[int] = getattr(signal, name, None)
            if stop_signal is not None:
                previous[stop_signal] = signal.signal(stop_signal, signal.SIG_IGN)
        return previous

    @staticmethod
    def _restore_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    # -- the worker -----------------------------------------------------------------------

    def _work(self, ctx: WorkerContext) -> None:
        """The command under the lease, restarted by policy (the supervisor's only worker)."""
        while True:
            if self._closing or ctx.stopping.is_set() or not self.owner.holding:
                ctx.stopping.wait()
                return
            status, outcome = self._run_command(ctx)
            if outcome == _Outcome.NOT_STARTED:
                ctx.stopping.wait()
                return
            if outcome in (_Outcome.STOPPED, _Outcome.GUARD):
                if self.config.once and not self._shutting_down:
                    # The job was interrupted by the end of the lease: the run ends with it.
                    self._finish("lease_lost", status)
                if outcome == _Outcome.STOPPED or self._closing:
                    ctx.stopping.wait()
                    return
                if not self._after_guard_stop(ctx):
                    return
                continue
            if not self._restart_after_exit(ctx, status):
                return

    def _after_guard_stop(self, ctx: WorkerContext) -> bool:
        """The guard stopped the command at the deadline: True to start it again (renewed)."""
        log.warning(
            "key=%s: the guard stopped the command at the lease deadline (no renewal "
            "confirmed in time)",
            self.config.key,
        )
        while not ctx.stopping.is_set():
            status = self.owner.status()
            left = status.lease_remaining
            if status.holding and left is not None and left > self.config.shutdown_timeout:
                log.warning(
                    "key=%s: the lease was renewed: starting the command again", self.config.key
                )
                return True
            ctx.sleep(POLL_SECONDS)
        return False

    def _restart_after_exit(self, ctx: WorkerContext, status: int) -> bool:
        """The command exited on its own: True to start it again, else end the run."""
        if self._closing:
            if self._signals:  # it ended as we were told to stop: its status is the run's
                self._final_status = status
            ctx.stopping.wait()
            return False
        policy = self.config.restart_policy
        if status != EXIT_OK and policy in ("always", "on-failure"):
            return self._restart_after_failure(ctx, status)
        if policy == "always":
            log.info(
                "key=%s: the command exited with status 0; starting it again in %g s "
                "(--restart always)",
                self.config.key,
                CLEAN_RESTART_DELAY,
            )
            return not ctx.sleep(CLEAN_RESTART_DELAY)
        log.info(
            "key=%s: the command exited with status %d: done (%s)",
            self.config.key,
            status,
            "--once" if self.config.once else f"--restart {policy}",
        )
        self._final_status = status  # also the run's status if a signal cuts the hold short
        self._hold_at_least(ctx)
        self._finish("done", status)
        ctx.stopping.wait()
        return False

    def _restart_after_failure(self, ctx: WorkerContext, status: int) -> bool:
        """The command failed: True to restart it, False (run given up) after too many."""
        if not self._too_many_failures():
            log.warning(
                "key=%s: the command exited with status %d; restarting it (--restart %s)",
                self.config.key,
                status,
                self.config.restart_policy,
            )
            return True
        code = status if self.config.once else EXIT_GAVE_UP
        log.error(
            "key=%s: the command exited with status %d, more than %d restart(s) "
            "within %g s: giving up (exit %d)",
            self.config.key,
            status,
            self.config.max_restarts,
            self.config.max_seconds,
            code,
        )
        self._finish("gave_up", code)
        ctx.stopping.wait()
        return False

    def _too_many_failures(self) -> bool:
        """Count a failure now; True when more than --max-restarts fell in --max-seconds."""
        now = time.monotonic()
        with self._lock:
            window = self.config.max_seconds
            self._exit_times = [t for t in self._exit_times if now - t < window]
            self._exit_times.append(now)
            return len(self._exit_times) > self.config.max_restarts

    def _hold_at_least(self, ctx: WorkerContext) -> None:
        """Keep the lease, running nothing, until --hold-at-least after the job started."""
        started = self._job_started
        if started is None or self.config.hold_at_least <= 0:
            return
        left = started + self.config.hold_at_least - time.monotonic()
        if left <= 0:
            return
        log.info(
            "key=%s: keeping the lease %.3g s more (--hold-at-least %g), then releasing it",
            self.config.key,
            left,
            self.config.hold_at_least,
        )
        ctx.sleep(left)

    def _run_command(self, ctx: WorkerContext) -> tuple[int, str]:
        """Start the command under a guard and watch it: (exit status, outcome)."""
        stamp = _guard.now()  # before status(): the deadline sent errs early, never late
        remaining = self.owner.status().lease_remaining
        if remaining is None or not self.owner.holding:
            return 0, _Outcome.NOT_STARTED
        deadline = stamp + remaining
        env = dict(self._env)
        env[ENV_FENCING_TOKEN] = str(ctx.fencing_token)
        env[ENV_KEY] = self.config.key
        env[ENV_IDENTITY] = self.owner.identity
        margin = kill_margin(self.config.ttl)
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # a stuck guard must never block this thread
        try:
            try:
                proc = subprocess.Popen(
                    [
                        *guard_command(read_end, deadline, self.config.grace_seconds, margin),
                        *self.config.command,
                    ],
                    env=env,
                    pass_fds=(read_end,),
                    start_new_session=True,
                )
            except OSError as exc:
                log.error("key=%s: cannot start the command: %s", self.config.key, exc)
                self._finish("spawn_failed", EXIT_INTERNAL)
                return EXIT_INTERNAL, _Outcome.NOT_STARTED
            finally:
                os.close(read_end)
            self._guard_deadline = deadline
            self.starts += 1
            if self._job_started is None:
                self._job_started = time.monotonic()
            log.info(
                "key=%s: started the command (pid %d, fencing token %s%s)",
                self.config.key,
                proc.pid,
                ctx.fencing_token,
                f", start {self.starts}" if self.starts > 1 else "",
            )
            try:
                return self._supervise(ctx, proc, write_end)
            finally:
                if proc.poll() is None:  # an exception on the way: leave nothing behind
                    self._signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
        finally:
            os.close(write_end)

    def _tell_guard(self, write_end: int, message: bytes) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
            os.write(write_end, message)

    def _relay_renewal(self, write_end: int) -> None:
        """Tell the guard the lease's deadline if a renewal moved it (on the guard's clock).

        Read from ``status()`` at every poll, not from the ``renewed`` events: their thread
        can be held up (a slow listener or log handler) while the lease itself is fine. The
        clock is read *before* the lease, so the deadline sent can only be early.
        """
        stamp = _guard.now()
        remaining = self.owner.status().lease_remaining
        if remaining is None:
            return  # not holding: the supervisor is stopping us; the guard keeps its deadline
        deadline = stamp + remaining
        if deadline < self._guard_deadline + RELAY_STEP:
            return  # no renewal since the last line (only the read's jitter)
        self._guard_deadline = deadline
        self._tell_guard(write_end, b"D %.6f\n" % deadline)

    def _supervise(
        self, ctx: WorkerContext, proc: subprocess.Popen[bytes], write_end: int
    ) -> tuple[int, str]:
        while proc.poll() is None:
            self._relay_renewal(write_end)
            if ctx.sleep(POLL_SECONDS):
                status = self._terminate(proc, write_end)
                if self._shutting_down:
                    self._final_status = status
                self.statuses.append(status)
                log.info(
                    "key=%s: the command was stopped (%s); exit status %d",
                    self.config.key,
                    "run stopping" if self._shutting_down else "lease ending",
                    status,
                )
                return status, _Outcome.STOPPED
        status = exit_status(proc.returncode)
        self.statuses.append(status)
        guard_acted = _guard.now() >= self._guard_deadline - self.config.grace_seconds
        # Whatever the command left behind in its process group goes with it.
        self._reap_group(proc.pid, self.config.grace_seconds, proc.pid)
        if ctx.stopping.is_set() and not self._closing:
            log.warning(
                "key=%s: the command ended with status %d as the lease ended%s",
                self.config.key,
                status,
                " (the guard stopped it at the lease deadline)" if guard_acted else "",
            )
            return status, _Outcome.STOPPED
        if guard_acted and not self._closing:
            return status, _Outcome.GUARD
        return status, _Outcome.EXITED

    def _terminate(self, proc: subprocess.Popen[bytes], write_end: int) -> int:
        """SIGTERM the command's process group; SIGKILL what is left after the grace period."""
        pgid = proc.pid
        self._tell_guard(write_end, b"T\n")  # the guard now only keeps its SIGKILL
        self._terminated_by_us = True
        self._signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds
        self._wait_until(lambda: proc.poll() is not None, deadline)
        self._reap_group(pgid, max(0.0, deadline - time.monotonic()), pgid, terminated=True)
        if proc.poll() is None:
            proc.wait()
        return exit_status(proc.returncode)

    def _reap_group(self, pgid: int, grace: float, guard: int, *, terminated: bool = False) -> None:
        """Make sure no process is left in group ``pgid``: SIGTERM, wait ``grace``, SIGKILL."""
        if not self._group_alive(pgid, guard):
            return
        if not terminated:
            self._signal_group(pgid, signal.SIGTERM)
        self._wait_until(lambda: not self._group_alive(pgid, guard), time.monotonic() + grace)
        if self._group_alive(pgid, guard):
            log.warning("key=%s: sending SIGKILL to the command's process group", self.config.key)
            self._signal_group(pgid, signal.SIGKILL)

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> None:
        while not done() and not self._force:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.02))

    @staticmethod
    def _group_alive(pgid: int, guard: int) -> bool:
        """Does group ``pgid`` have a living process? Zombies do not count (reaped if ours)."""
        members = _guard.group_members(pgid)
        if members is None:  # no /proc: ask the kernel (a zombie counts as alive there)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        alive = False
        me = os.getpid()
        for pid, state, ppid in members:
            if state in ("Z", "X"):
                if ppid == me and pid != guard:  # orphans re-parented to us (PID 1, say)
                    with contextlib.suppress(ChildProcessError, OSError):
                        os.waitpid(pid, os.WNOHANG)
            else:
                alive = True
        return alive

    @staticmethod
    def _signal_group(pgid: int, signum: Union[int, signal.Signals]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)
