"""What the Django and Flask integrations share at run time.

- ``ProcessOwner``: this process's owner, built lazily and never shared across ``fork()``:
  a child sees no owner until it builds its own, so a pre-fork server's master (gunicorn
  ``--preload``) that never serves a request never holds a lease.
- ``run_foreground``: run an owner until SIGTERM or SIGINT, then stop it cleanly (the
  management command and ``flask mutexowner run``).
- ``status_response``: the JSON status document and its HTTP code for health checks.
- ``lease_report``: who holds the lease in Redis, for ``--status`` commands.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterable
from types import FrameType
from typing import Any, Callable, Optional, TextIO

from mutexowner.connection import client_from, derive_lease_client, redact_text
from mutexowner.contrib._settings import OwnerSettings
from mutexowner.lease import Lease
from mutexowner.owner import MutexOwner

__all__ = [
    "REQUIRE_CHOICES",
    "ProcessOwner",
    "configure_logging",
    "lease_report",
    "run_foreground",
    "status_response",
]

log = logging.getLogger("mutexowner.contrib")

#: Values of the status endpoint's ``?require=`` parameter.
REQUIRE_CHOICES = ("holding", "started")

_HOLDERS: weakref.WeakSet[ProcessOwner] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for holder in list(_HOLDERS):
        holder._reset_after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def stop_timeout_for(owner: MutexOwner) -> float:
    """Real seconds a clean stop may take: workers' shutdown budget plus one lease."""
    sup = owner.supervisor
    return owner.ttl + (sup.shutdown_timeout if sup is not None else 0.0) + 1.0


class ProcessOwner:
    """The owner of *this* process, built by ``factory`` on first use.

    An owner belongs to the process that built it: after ``fork()`` the child starts with
    none (the parent's stays the parent's; ``MutexOwner`` itself refuses to act in a child).
    ``start()`` also registers a stop at interpreter exit, so a web worker that exits
    normally (gunicorn's graceful restart, ``max_requests``) releases the lease at once.
    """

    def __init__(self, factory: Callable[[], MutexOwner], *, label: str) -> None:
        self._factory = factory
        self.label = label
        self._lock = threading.Lock()
        self._owner: Optional[MutexOwner] = None
        self._pid = os.getpid()
        self._start_failed = False
        _HOLDERS.add(self)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._owner = None
        self._pid = os.getpid()
        self._start_failed = False

    def _mine(self) -> Optional[MutexOwner]:
        if self._pid != os.getpid():  # no at-fork hook ran (e.g. a non-POSIX fork emulation)
            self._reset_after_fork()
        return self._owner

    def get(self) -> Optional[MutexOwner]:
        """The owner built in this process, or None (none yet, or stopped)."""
        return self._mine()

    def start(self) -> MutexOwner:
        """Build (once per process) and start the owner; idempotent."""
        with self._lock:
            owner = self._mine()
            if owner is None:
                owner = self._factory()
                self._owner = owner
                _register_exit_stop()
            owner.start()
            return owner

    def start_quietly(self) -> Optional[MutexOwner]:
        """``start()`` for autostart hooks: never raises; a failure is logged once per process."""
        owner = self._mine()
        if owner is not None or self._start_failed:
            return owner
        try:
            return self.start()
        except Exception:
            self._start_failed = True
            log.exception("%s: could not start the owner in process %d", self.label, os.getpid())
            return None

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop this process's owner (releasing the lease) and forget it; True when done.

        ``timeout`` defaults to the owner's ttl plus its workers' shutdown budget.
        """
        with self._lock:
            owner = self._mine()
            if owner is None:
                return True
            done = owner.stop(stop_timeout_for(owner) if timeout is None else timeout)
            if done:
                self._owner = None
            return done


_exit_stop_registered = False


def _register_exit_stop() -> None:
    global _exit_stop_registered
    if not _exit_stop_registered:
        _exit_stop_registered = True
        atexit.register(_stop_all_at_exit)


def _stop_all_at_exit() -> None:
    """Interpreter exit: release every lease this process holds (never a parent's)."""
    for holder in list(_HOLDERS):
        if holder._pid != os.getpid() or holder._owner is None:
            continue
        try:
            if not holder.stop():
                log.warning("%s: owner did not stop cleanly at exit", holder.label)
        except Exception:
            log.exception("%s: stopping the owner at exit failed", holder.label)


def configure_logging(verbosity: int) -> None:
    """Show the library's log lines on stderr when the application configured none.

    verbosity 0: warnings, 1: INFO (one line per state change), 2+: DEBUG.
    """
    logger = logging.getLogger("mutexowner")
    if logger.hasHandlers():
        return
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def run_foreground(
    holder: ProcessOwner,
    out: TextIO,
    *,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Start ``holder``'s owner and run it until one of ``signals``; then stop it; return 0.

    The first signal stops the owner cleanly (workers stop, the lease is released, standbys
    are told). A second signal during that stop exits at once with status 128 + signum:
    like ``kill -9``, safe (the process and its workers are gone) but standbys wait out the
    ttl. Returns 1 when the owner could not be stopped within its stop timeout.
    """
    requested = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)
        if requested.is_set():
            log.warning("second signal %d while stopping: exiting now without release", signum)
            logging.shutdown()
            os._exit(128 + signum)
        requested.set()

    previous: dict[int, Any] = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, on_signal)
        owner = holder.start()
        status = owner.status()
        out.write(
            f"mutexowner: running key={status.key} identity={status.identity} "
            f"redis={status.redis} pid={os.getpid()}; SIGTERM or Ctrl-C stops\n"
        )
        out.flush()
        # Wake up now and then: the owner may also be stopped by someone else.
        while not requested.wait(1.0):
            if owner.state == "stopped":
                break
        if received:
            out.write(f"mutexowner: signal {received[0]} received, stopping\n")
            out.flush()
        if not holder.stop():
            out.write("mutexowner: the owner did not stop in time (stuck worker?)\n")
            return 1
        out.write("mutexowner: stopped (lease released)\n")
        out.flush()
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def status_response(
    owner: Optional[MutexOwner], key: str, require: Optional[str]
) -> tuple[dict[str, Any], int]:
    """The status document of this process's owner and the HTTP code to serve it with.

    ``require=None``: always 200. ``"holding"``: 503 unless this process holds the lease
    (a load balancer check that finds the active node). ``"started"``: 503 unless this
    process runs an owner (liveness of the integration). Anything else: 400.
    """
    if owner is None:
        body: dict[str, Any] = {"key": key, "state": "not_started", "holding": False}
    else:
        body = {k: _jsonable(v) for k, v in dataclasses.asdict(owner.status()).items()}
    body["pid"] = os.getpid()
    if require is None:
        return body, 200
    if require not in REQUIRE_CHOICES:
        error = f"require must be one of {', '.join(REQUIRE_CHOICES)}, got {require!r}"
        return {"error": error}, 400
    if require == "holding":
        return body, 200 if body["holding"] else 503
    return body, 200 if body["state"] not in ("not_started", "stopped") else 503


def lease_report(settings: OwnerSettings, out: TextIO, *, timeout: float = 2.0) -> int:
    """Write who holds the lease in Redis (no token shown); 0, or 1 when Redis failed."""
    out.write(f"key: {settings.key}\nredis: {settings.redis_description}\n")
    try:
        client = derive_lease_client(client_from(settings.redis), timeout=timeout)
        lease = Lease(
            client, settings.key, ttl=settings.ttl, identity="status", prefix=settings.prefix
        )
        info = lease.inspect()
    except Exception as exc:
        out.write(f"error: {redact_text(str(exc)) or type(exc).__name__}\n")
        return 1
    if info.held:
        ttl_left = "none" if info.ttl_left is None else f"{info.ttl_left:.3f} s"
        out.write(
            f"holder: {info.holder}\nfencing_token: {info.fencing_token}\nttl_left: {ttl_left}\n"
        )
    else:
        out.write("holder: (none)\n")
    if info.lock_delay_remaining > 0:
        out.write(f"lock_delay_remaining: {info.lock_delay_remaining:.3f} s\n")
    out.flush()
    return 0
