"""The lease as Redis sees it, from any process: who holds it, on which host, for how long.

An owner's ``status()`` describes the process that answers; a health check behind a load
balancer, a dashboard or ``mutexowner status`` needs the fleet's view instead. ``LeaseReader``
reads it with one read-only script call (``Lease.inspect``: no token is ever revealed) on
its own short-timeout connection, and compares the holder's host with this host.

The holder's host is known when its identity has the default form
``<hostname>:<pid>:<suffix>`` (``MutexOwner``'s default, also used by ``mutexowner run``);
for any other identity ``holder_host`` and ``held_by_this_host`` are None (unknown).

Every status command uses the same exit codes: ``STATUS_HELD`` (0), ``STATUS_FREE`` (3),
``STATUS_ERROR`` (2).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Optional

import redis

from mutexowner.acl import check_permissions
from mutexowner.connection import client_from, derive_lease_client, describe_client, redact_text
from mutexowner.errors import LeaseError
from mutexowner.lease import (
    ACQUIRE_LUA,
    INSPECT_LUA,
    RELEASE_LUA,
    Lease,
    LeaseInfo,
    classify_error,
    validate_name,
)

__all__ = [
    "STATUS_ERROR",
    "STATUS_FREE",
    "STATUS_HELD",
    "LeaseReader",
    "LeaseView",
    "RedisCheck",
    "check_redis",
    "format_view",
    "parse_identity",
]

#: Exit status of every status command (``mutexowner status``, ``flask mutexowner status``,
#: ``manage.py mutexowner --status``) when some owner holds the lease.
STATUS_HELD = 0
#: … when Redis could not be read (or the command was misused).
STATUS_ERROR = 2
#: … when nobody holds the lease.
STATUS_FREE = 3

#: Socket timeout of one status read, seconds: short, a health check must answer quickly.
DEFAULT_TIMEOUT = 1.0


def parse_identity(identity: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    """``(hostname, pid)`` of an identity of the default form ``<hostname>:<pid>:<suffix>``;
    ``(None, None)`` for any other form."""
    if not identity:
        return None, None
    parts = identity.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
        return None, None
    return parts[0], int(parts[1])


def this_host() -> str:
    """The host name a default identity starts with (``socket.gethostname()``)."""
    return socket.gethostname()


@dataclass(frozen=True)
class LeaseView:
    """One lease as Redis saw it at one moment (``error`` set when Redis could not be read).

    ``held_by_this_host`` is None when the holder's identity does not name its host (or when
    nobody holds the lease it is False).
    """

    name: str
    key: str
    redis: str
    host: str
    holder: Optional[str] = None
    holder_host: Optional[str] = None
    holder_pid: Optional[int] = None
    ttl_left: Optional[float] = None
    fencing_token: Optional[int] = None
    fencing_counter: Optional[int] = None
    lock_delay_remaining: float = 0.0
    epoch_present: bool = True
    held_by_this_host: Optional[bool] = False
    error: Optional[str] = None
    error_kind: Optional[str] = None

    @property
    def held(self) -> bool:
        """True when Redis says some owner holds the lease."""
        return self.holder is not None

    @property
    def exit_code(self) -> int:
        """``STATUS_HELD``, ``STATUS_FREE`` or ``STATUS_ERROR``."""
        if self.error is not None:
            return STATUS_ERROR
        return STATUS_HELD if self.held else STATUS_FREE

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (no token, no password)."""
        body: dict[str, Any] = {
            "name": self.name,
            "key": self.key,
            "redis": self.redis,
            "host": self.host,
        }
        if self.error is not None:
            body.update(error=self.error, error_kind=self.error_kind)
            return body
        body.update(
            held=self.held,
            holder=self.holder,
            holder_host=self.holder_host,
            holder_pid=self.holder_pid,
            held_by_this_host=self.held_by_this_host,
            ttl_left=self.ttl_left,
            fencing_token=self.fencing_token,
            fencing_counter=self.fencing_counter,
            lock_delay_remaining=self.lock_delay_remaining,
            epoch_present=self.epoch_present,
        )
        return body

    @classmethod
    def from_info(
        cls, info: LeaseInfo, *, name: str, redis: str, host: Optional[str] = None
    ) -> LeaseView:
        host = this_host() if host is None else host
        holder_host, holder_pid = parse_identity(info.holder)
        if info.holder is None:
            here: Optional[bool] = False
        else:
            here = None if holder_host is None else holder_host == host
        return cls(
            name=name,
            key=info.key,
            redis=redis,
            host=host,
            holder=info.holder,
            holder_host=holder_host,
            holder_pid=holder_pid,
            ttl_left=info.ttl_left,
            fencing_token=info.fencing_token,
            fencing_counter=info.fencing_counter,
            lock_delay_remaining=info.lock_delay_remaining,
            epoch_present=info.epoch_present,
            held_by_this_host=here,
        )


class LeaseReader:
    """Reads one lease as Redis sees it; reusable, thread-safe and fork-safe.

    ``redis`` is a URL or a ``redis.Redis`` client: the reader makes its own connection pool
    to the same server with ``timeout``-second socket timeouts and no retries, so a read
    never blocks longer than about ``timeout`` (twice that if Redis forgot the script).
    ``read()`` never raises for a Redis problem: the returned view carries ``error``.
    ``parameter``, ``name_parameter`` and ``prefix_parameter`` name the arguments in error
    messages (a command line says ``--redis``, ``--key``, ``--prefix``).
    """

    def __init__(
        self,
        redis: Any,
        name: str,
        *,
        prefix: str = "mutexowner",
        timeout: float = DEFAULT_TIMEOUT,
        parameter: str = "redis",
        where: Optional[str] = None,
        name_parameter: str = "name",
        prefix_parameter: str = "prefix",
    ) -> None:
        self._base = client_from(redis, parameter=parameter)
        self.name = validate_name(name, name_parameter)
        self.prefix = validate_name(prefix, prefix_parameter)
        self.timeout = timeout
        #: Where Redis is, password hidden (``where``, or a description of the client).
        self.where = describe_client(self._base) if where is None else where
        self._lock = threading.Lock()
        self._lease: Optional[Lease] = None
        self._pid = -1

    def _current_lease(self) -> Lease:
        if self._pid != os.getpid():  # new, or forked: the parent's lock may be held
            self._lock = threading.Lock()
        with self._lock:
            if self._lease is None or self._pid != os.getpid():
                client = derive_lease_client(self._base, timeout=self.timeout)
                self._lease = Lease(
                    client, self.name, ttl=1.0, identity="mutexowner-status", prefix=self.prefix
                )
                self._pid = os.getpid()
            return self._lease

    @property
    def client(self) -> redis.Redis:
        """The reader's own bounded client (for extra checks such as ``check_redis``)."""
        return self._current_lease().client

    def read(self) -> LeaseView:
        """One round trip: the lease as Redis sees it now, or a view with ``error`` set."""
        lease = self._current_lease()
        try:
            info = lease.inspect()
        except Exception as exc:
            error = classify_error(exc)
            return LeaseView(
                name=self.name,
                key=lease.keys.lease,
                redis=self.where,
                host=this_host(),
                error=redact_text(str(error)) or type(exc).__name__,
                error_kind=error.kind if isinstance(error, LeaseError) else None,
                held_by_this_host=None,
            )
        return LeaseView.from_info(info, name=self.name, redis=self.where)

    def close(self) -> None:
        """Close the reader's connections (it reconnects if used again)."""
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            lease.close()


def format_view(view: LeaseView) -> str:
    """The human-readable report of every status command (``error`` line when Redis failed)."""
    if view.error is not None:
        return f"lease {view.name!r} ({view.key} on {view.redis}): error: {view.error}\n"
    lines = [f"lease {view.name!r} ({view.key} on {view.redis}): {'held' if view.held else 'free'}"]
    if view.held:
        ttl = "no expiry (set by hand?)" if view.ttl_left is None else f"{view.ttl_left:.3f} s"
        if view.held_by_this_host is None:
            where = "unknown (the identity does not start with <hostname>:<pid>:)"
        elif view.held_by_this_host:
            where = f"yes ({view.host}, pid {view.holder_pid})"
        else:
            where = f"no (held on {view.holder_host}; this is {view.host})"
        lines += [
            f"  holder           {view.holder}",
            f"  on this host     {where}",
            f"  ttl left         {ttl}",
            f"  fencing token    {view.fencing_token}",
        ]
    counter = view.fencing_counter
    lines.append(
        f"  fencing counter  {counter if counter is not None else 'none (never acquired here)'}"
    )
    if view.lock_delay_remaining > 0:
        lines.append(
            f"  lock-delay       {view.lock_delay_remaining:.3f} s left: Redis lost its state, "
            "a new holder waits before starting workers"
        )
    if not view.epoch_present:
        lines.append(
            "  epoch marker     missing: the next acquisition waits one ttl (a fresh Redis, "
            "or one that lost its data)"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RedisCheck:
    """What ``check_redis`` found: ``ok`` when every step passed; ``steps`` in order."""

    ok: bool
    steps: tuple[tuple[str, bool, str], ...]

    def lines(self) -> list[str]:
        """One ``ok|FAIL step: detail`` line per step."""
        return [
            f"{'ok  ' if passed else 'FAIL'} {step}: {detail}"
            for step, passed, detail in self.steps
        ]


#: ``check_redis``'s steps so far: (step, passed, detail).
_Steps = list[tuple[str, bool, str]]


def check_redis(reader: LeaseReader) -> RedisCheck:
    """Test that Redis answers and that the lease can work: PING, SCRIPT EXISTS for the
    lease's scripts (loaded or not, both are fine: the owner loads them), one read-only
    ``inspect`` call, and the user's permissions (``acl.check_permissions``: every command
    the scripts run, the keys, the channels; a degraded mode is reported, not failed).
    Stops at the first failure other than an ACL refusal (then the permission step lists
    every grant missing); never raises."""
    steps: _Steps = []
    client = reader.client
    if not _check_ping(client, steps) or not _check_scripts(client, steps):
        return RedisCheck(False, tuple(steps))
    refused = _check_inspect(reader, steps)
    if refused is not None and refused != "noperm":
        return RedisCheck(False, tuple(steps))
    passed = _check_grants(client, reader, steps)
    return RedisCheck(refused is None and passed, tuple(steps))


def _failed(steps: _Steps, name: str, exc: Exception) -> str:
    """Record step ``name`` as failed with ``exc`` (redacted); return the error's kind."""
    error = classify_error(exc)
    steps.append((name, False, redact_text(str(error))))
    return error.kind


def _check_ping(client: redis.Redis, steps: _Steps) -> bool:
    """PING; a refusal by the ACL passes (the lease never sends PING). False: stop here."""
    try:
        pong = client.ping()
    except Exception as exc:
        if classify_error(exc).kind != "noperm":
            _failed(steps, "PING", exc)
            return False
        # Refused by the ACL: Redis answered and knows the user; the lease never sends PING.
        steps.append(("PING", True, "answering (PING not permitted for this user: not needed)"))
    else:
        steps.append(("PING", True, "PONG" if pong else repr(pong)))
    return True


def _check_scripts(client: redis.Redis, steps: _Steps) -> bool:
    """SCRIPT EXISTS for the lease's scripts (a refusal passes). False: stop here."""
    shas = [client.register_script(text).sha for text in (ACQUIRE_LUA, RELEASE_LUA, INSPECT_LUA)]
    try:
        exists = client.script_exists(*shas)
    except Exception as exc:
        if classify_error(exc).kind == "noperm":  # the lease needs only EVALSHA / SCRIPT LOAD
            steps.append(("SCRIPT EXISTS", True, "not permitted for this user (not needed)"))
        else:
            _failed(steps, "SCRIPT EXISTS", exc)
            return False
    else:
        loaded = sum(1 for flag in exists if flag)
        steps.append(
            ("SCRIPT EXISTS", True, f"{loaded} of {len(shas)} lease scripts cached by Redis")
        )
    return True


def _check_inspect(reader: LeaseReader, steps: _Steps) -> Optional[str]:
    """One read-only ``inspect`` call: None when it passed, else the error's kind."""
    try:
        info = reader._current_lease().inspect()
    except Exception as exc:
        return _failed(steps, "inspect script", exc)
    steps.append(
        (
            "inspect script",
            True,
            f"lease held by {info.holder}" if info.holder else "lease free",
        )
    )
    return None


def _check_grants(client: redis.Redis, reader: LeaseReader, steps: _Steps) -> bool:
    """The user's permissions (``acl.check_permissions``); True when nothing required lacks."""
    try:
        acl = check_permissions(client, reader.name, prefix=reader.prefix)
    except Exception as exc:
        _failed(steps, "permissions", exc)
        return False
    passed = not acl.required_missing and not acl.errors
    detail = "; ".join([acl.describe(), *acl.degraded()])
    if not passed:
        detail += f" (run `mutexowner acl --key {reader.name}` for the rules the lease needs)"
    steps.append(("permissions", passed, detail))
    return passed
