"""What the Django and Flask integrations share at run time.

- ``ProcessOwner``: this process's owner, built lazily and never shared across ``fork()``:
  a child sees no owner until it builds its own, so a pre-fork server's master (gunicorn
  ``--preload``) that never serves a request never holds a lease.
- ``run_foreground``: run an owner until SIGTERM or SIGINT, then stop it cleanly (the
  management command and ``flask mutexowner run``).
- ``status_response``: the JSON status document and its HTTP code for health checks: this
  process's owner and the lease as Redis sees it (``lease_reader``).
- ``check_report``: the settings and a test that Redis answers and runs the lease scripts.
- ``lease_report``: the lease as Redis sees it, for the ``status`` commands, with the exit
  codes of ``mutexowner status``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterable
from types import FrameType
from typing import Any, Callable, Optional, TextIO

from mutexowner.contrib._settings import OwnerSettings
from mutexowner.inspection import (
    STATUS_ERROR,
    LeaseReader,
    LeaseView,
    check_redis,
    format_view,
)
from mutexowner.owner import MutexOwner

__all__ = [
    "REQUIRE_CHOICES",
    "ProcessOwner",
    "check_report",
    "configure_logging",
    "lease_reader",
    "lease_report",
    "run_foreground",
    "status_response",
]

log = logging.getLogger("mutexowner.contrib")

#: Values of the status endpoint's ``?require=`` parameter.
REQUIRE_CHOICES = ("host", "held", "holding", "started")
#: ``?require=`` values answered from this process alone (no Redis call: liveness probes).
LOCAL_REQUIRES = ("holding", "started")

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


_READERS: weakref.WeakKeyDictionary[OwnerSettings, LeaseReader] = weakref.WeakKeyDictionary()
_READERS_LOCK = threading.Lock()


def lease_reader(settings: OwnerSettings) -> LeaseReader:
    """The ``LeaseReader`` of ``settings``' lease, made once and reused by every status
    request (it reconnects by itself after ``fork()``)."""
    with _READERS_LOCK:
        try:
            reader = _READERS.get(settings)
        except TypeError:  # unhashable settings (an exotic callable): no caching
            reader = None
        if reader is None:
            reader = LeaseReader(
                settings.redis,
                settings.key,
                prefix=settings.prefix,
                where=settings.redis_description,
            )
            with contextlib.suppress(TypeError):
                _READERS[settings] = reader
        return reader


def status_response(
    owner: Optional[MutexOwner],
    key: str,
    require: Optional[str],
    reader: Optional[LeaseReader] = None,
) -> tuple[dict[str, Any], int]:
    """The status document of this process's owner (and, with ``reader``, of the lease as
    Redis sees it) and the HTTP code to serve it with.

    ``require=None``: always 200 (a dashboard). ``"host"``: 503 unless Redis says the holder
    runs on this host (a load balancer check that finds the active node, whichever process
    of the host holds the lease). ``"held"``: 503 unless some owner anywhere holds the lease
    (fleet health). ``"holding"``: 503 unless *this process* holds the lease. ``"started"``:
    503 unless this process runs an owner (liveness of an autostarted owner). ``"holding"``
    and ``"started"`` never call Redis; the others do (one short read-only round trip), and
    answer 503 when Redis cannot be read. Anything else: 400.
    """
    if require is not None and require not in REQUIRE_CHOICES:
        error = f"require must be one of {', '.join(REQUIRE_CHOICES)}, got {require!r}"
        return {"error": error}, 400
    if owner is None:
        body: dict[str, Any] = {"key": key, "state": "not_started", "holding": False}
    else:
        body = {k: _jsonable(v) for k, v in dataclasses.asdict(owner.status()).items()}
    body["pid"] = os.getpid()
    view: Optional[LeaseView] = None
    if reader is not None and require not in LOCAL_REQUIRES:
        view = reader.read()
        body["lease"] = view.as_dict()
    if require is None:
        return body, 200
    if require == "holding":
        ok = bool(body["holding"])
    elif require == "started":
        ok = body["state"] not in ("not_started", "stopped")
    elif view is None:
        ok = False  # no reader: nobody can tell
    elif require == "host":
        ok = view.error is None and view.held_by_this_host is True
    else:  # "held"
        ok = view.error is None and view.held
    return body, 200 if ok else 503


def _reader(settings: OwnerSettings, timeout: float) -> LeaseReader:
    """A read-only view of the settings' lease (status and check use the same)."""
    return LeaseReader(
        settings.redis,
        settings.key,
        prefix=settings.prefix,
        timeout=timeout,
        where=settings.redis_description,
    )


def lease_report(
    settings: OwnerSettings, out: TextIO, *, as_json: bool = False, timeout: float = 2.0
) -> int:
    """Write the lease as Redis sees it (no token shown), as ``mutexowner status`` does;
    return the same exit status: ``STATUS_HELD`` (0), ``STATUS_FREE`` (3) or
    ``STATUS_ERROR`` (2)."""
    reader = _reader(settings, timeout)
    try:
        view = reader.read()
    finally:
        reader.close()
    if as_json:
        out.write(json.dumps(view.as_dict(), sort_keys=True) + "\n")
    else:
        out.write(format_view(view))
    out.flush()
    return view.exit_code


def check_report(
    settings: OwnerSettings, out: TextIO, *, as_json: bool = False, timeout: float = 2.0
) -> int:
    """Print the validated settings (password hidden), then test Redis: PING, SCRIPT EXISTS,
    a read-only lease script call and the lease user's permissions
    (``inspection.check_redis``). 0 when Redis passed, ``STATUS_ERROR`` (2) otherwise."""
    reader = _reader(settings, timeout)
    try:
        result = check_redis(reader)
    finally:
        reader.close()
    if as_json:
        steps = [{"step": s, "ok": ok, "detail": d} for s, ok, d in result.steps]
        document = {"settings": settings.describe(), "redis": {"ok": result.ok, "steps": steps}}
        out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        out.write("settings: valid\n")
        out.write(json.dumps(settings.describe(), indent=2, sort_keys=True) + "\n")
        out.write(f"redis: {settings.redis_description}\n")
        out.write("".join(f"  {line}\n" for line in result.lines()))
        out.write("redis: ok\n" if result.ok else "redis: FAILED\n")
    out.flush()
    return 0 if result.ok else STATUS_ERROR
