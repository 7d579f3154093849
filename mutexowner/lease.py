"""The Redis side of the lease: Lua scripts, plain result objects, and error classification.

A ``Lease`` knows nothing of threads or time; it turns one Redis round trip into one of
``Acquired``, ``Renewed``, ``Retaken``, ``Taken`` or ``Quiet``, or raises a ``LeaseError`` whose
``transient`` flag tells the owner whether to retry with backoff (connection trouble,
LOADING, READONLY, failover) or to report and slow down (auth, ACL, wrong key type).
This module is the only place Redis exceptions are classified.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Optional, TypeVar, Union, cast

import redis
from redis import exceptions as rex
from redis.cluster import RedisCluster

from mutexowner.errors import ForkedOwnerError, LeaseError, RedisFatalError, RedisTransientError

__all__ = [
    "Acquired",
    "Lease",
    "LeaseInfo",
    "LeaseKeys",
    "LeaseResult",
    "Quiet",
    "Renewed",
    "ReplicaPolicy",
    "Retaken",
    "Taken",
    "call_many",
    "classify_error",
    "new_token",
    "release_many",
    "unwrap_script_error",
]

_T = TypeVar("_T")

#: A standalone/Sentinel client, or a Redis Cluster client (the lease's keys share one slot).
LeaseClient = Union[redis.Redis, RedisCluster]
#: MOVED/ASK redirects one lease call follows before it gives up (a transient error).
MAX_REDIRECTS = 3

#: Bits of randomness in every acquisition token (DESIGN invariant 1 asks for >= 128).
TOKEN_BYTES = 16


def _load_script(name: str) -> str:
    return (resources.files("mutexowner") / "lua" / name).read_text(encoding="utf-8")


# Read once at import; redis-py's Script objects then run them by SHA (EVALSHA) and
# reload them transparently after a Redis restart (NOSCRIPT).
ACQUIRE_LUA = _load_script("acquire.lua")
RELEASE_LUA = _load_script("release.lua")
INSPECT_LUA = _load_script("inspect.lua")


def new_token() -> str:
    """A fresh random acquisition token: 128 bits, hex encoded."""
    return secrets.token_hex(TOKEN_BYTES)


@dataclass(frozen=True)
class Acquired:
    """The key was free and is now ours, with a new, strictly greater fencing token.

    ``lock_delay`` > 0 means Redis recently lost its state: workers must wait that long.
    """

    fencing_token: int
    lock_delay: float


@dataclass(frozen=True)
class Renewed:
    """The key already held our token (a renewal, or an acquire whose reply was lost)."""

    fencing_token: int
    lock_delay: float


@dataclass(frozen=True)
class Retaken:
    """The key had vanished (Redis lost it) and was set again with our token and fencing token.

    Safe without waiting only if our own lease was still valid when the reply arrived;
    the owner decides, ``lock_delay`` tells how long a new holder would have to wait.
    """

    fencing_token: int
    lock_delay: float


@dataclass(frozen=True)
class Quiet:
    """The key is free, but Redis lost its state recently: nobody new may take it yet.

    Leases granted before the loss may still be running on their holders' clocks for up to
    ``lock_delay`` seconds; only such a holder may re-take the key meanwhile (``renew``).
    """

    lock_delay: float


@dataclass(frozen=True)
class Taken:
    """Another token holds the key; it expires in ``ttl_left`` seconds unless renewed."""

    holder: str
    ttl_left: float
    fencing_token: Optional[int]


LeaseResult = Union[Acquired, Renewed, Retaken, Taken, Quiet]


@dataclass(frozen=True)
class LeaseInfo:
    """A read-only snapshot of a lease, as ``mutexowner status`` shows it."""

    key: str
    holder: Optional[str]
    fencing_token: Optional[int]
    ttl_left: Optional[float]
    fencing_counter: Optional[int]
    lock_delay_remaining: float
    epoch_present: bool

    @property
    def held(self) -> bool:
        """True when some owner holds the lease right now."""
        return self.holder is not None


@dataclass(frozen=True)
class LeaseKeys:
    """The Redis keys of one lease. They share the hash tag ``{name}``, so one cluster slot."""

    name: str
    prefix: str = "mutexowner"

    @property
    def tag(self) -> str:
        return f"{self.prefix}:{{{self.name}}}"

    @property
    def lease(self) -> str:
        return f"{self.tag}:lease"

    @property
    def fence(self) -> str:
        return f"{self.tag}:fence"

    @property
    def epoch(self) -> str:
        return f"{self.tag}:epoch"

    @property
    def channel(self) -> str:
        return f"{self.tag}:released"

    def all(self) -> tuple[str, str, str]:
        return (self.lease, self.fence, self.epoch)


#: A renewal of the key that still holds our token skips ``INFO server`` (the run_id that
#: reveals a restart from older data or a fail-over) when the script last read it less than
#: this many ttls ago. Skipping it there cannot let anyone else in (docs/safety.md, point 5):
#: every call that could hand the key to someone else reads the run_id first. The period
#: only bounds how late the holder's own renewals record a new server instance (and open
#: the quiet period for newcomers) when nobody else calls.
RUN_ID_CHECK_TTLS = 1.0

#: ``min_replicas_timeout`` when neither it nor ``call_timeout`` is given, seconds.
DEFAULT_MIN_REPLICAS_TIMEOUT = 0.5
#: Default ``min_replicas_timeout`` as a share of ``call_timeout``: the rest of the call's
#: socket timeout is left for the round trip itself.
MIN_REPLICAS_TIMEOUT_SHARE = 0.75


@dataclass(frozen=True)
class ReplicaPolicy:
    """How many replicas must acknowledge an acquire/renew before it counts (invariant 10).

    ``min_replicas=None`` (the default, "auto"): one replica, when the master has replicas
    now or this dataset was ever seen on a master with replicas (a sticky mark in the
    epoch hash, replicated with it: an old master cut off from its replicas still
    requires one). ``0``: never wait (no replication check). ``N >= 1``: always N.
    ``timeout`` is the ``WAIT`` timeout in seconds; it must leave the reply time to arrive
    within ``call_timeout``.
    """

    min_replicas: Optional[int]
    timeout: float

    def __post_init__(self) -> None:
        n = self.min_replicas
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"min_replicas must be None (auto) or an int >= 0, got {n!r}")
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"min_replicas_timeout must be a finite number > 0, got {t!r}")
        if t <= 0:
            raise ValueError(f"min_replicas_timeout must be > 0 (seconds), got {t!r}")

    @classmethod
    def build(
        cls,
        min_replicas: Optional[int],
        timeout: Optional[float],
        call_timeout: Optional[float],
    ) -> ReplicaPolicy:
        if timeout is None:
            timeout = (
                call_timeout * MIN_REPLICAS_TIMEOUT_SHARE
                if call_timeout
                else DEFAULT_MIN_REPLICAS_TIMEOUT
            )
        policy = cls(min_replicas, timeout)
        if call_timeout is not None and not policy.timeout < call_timeout:
            raise ValueError(
                f"min_replicas_timeout must be < call_timeout ({call_timeout:g}): the WAIT "
                f"reply has to arrive within the call's socket timeout, got {timeout!r}"
            )
        return policy

    @property
    def timeout_ms(self) -> int:
        # WAIT's timeout 0 means "forever": never send it.
        return max(1, round(self.timeout * 1000))

    def required(self, reply: Any) -> int:
        """Replicas this successful script reply must be acknowledged by."""
        if self.min_replicas is not None:
            return self.min_replicas
        replicas = _int_or_none(reply[4]) if len(reply) > 4 else None
        replicated = _text(reply[5]) == "1" if len(reply) > 5 else False
        return 1 if replicated or (replicas or 0) > 0 else 0


def validate_name(name: object, parameter: str = "name") -> str:
    """Check a lease name: a non-empty str without braces (they would break the hash tag)."""
    if not isinstance(name, str):
        raise TypeError(f"{parameter} must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{parameter} must be a non-empty string")
    if "{" in name or "}" in name:
        raise ValueError(
            f"{parameter} must not contain '{{' or '}}' (the lease keys use {{{parameter}}} as "
            f"their cluster hash tag), got {name!r}"
        )
    return name


# Error replies that mean "the server is not able to do this right now": restarting,
# failing over, busy with a script, out of memory, or cannot persist.
_TRANSIENT_PREFIXES = (
    "LOADING",
    "READONLY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "BUSY",
    "NOREPLICAS",
    "MISCONF",
    "OOM",
    "UNBLOCKED",
)


# redis-py added AuthorizationError after 5.0; older versions raise ResponseError instead.
_AUTHORIZATION_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(rex, "AuthorizationError", None),) if isinstance(cls, type)
)


# redis-py strips the error code from these replies, so the prefix test below misses them.
_STRIPPED_TRANSIENT: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(rex, "OutOfMemoryError", None),) if isinstance(cls, type)
)

# Redis < 7 does not pass an error raised by redis.call() inside a script through with its
# code: it wraps it in an ERR reply (checked against redis-server 6.2.14), in two forms:
#   ERR Error running script (call to f_<sha>): @user_script:19: @user_script: 19: -READONLY ...
#   ERR Error running script (call to f_<sha>): @user_script:19: WRONGTYPE Operation ...
# (the first for the checks scripting.c makes before running a command: READONLY, OOM,
# NOREPLICAS, MISCONF, ACL; the second for an error reply of the command itself). Redis 7
# passes the code through and appends " script: <sha>, on @user_script:19.".
_SCRIPT_WRAPPER = re.compile(r"(?:ERR\s+)?Error running script\b[^:]*:\s*")
_SCRIPT_LOCATION = re.compile(r"@?user_script:\s*\d+:\s*")
# ACL refusals of a command run by a script: Redis 6.2 and 7.0 say "The user executing the
# script can't run this command or subcommand" (or "...can't access at least one of the keys",
# "...can't publish to the channel") without an error code; Redis 7.2 says "NOPERM User u has
# no permissions to run the 'time' command".
_SCRIPT_ACL_DENIED = re.compile(r"The user executing the script can't|\bno permissions to\b")


_SCRIPT_AT_LINE = re.compile(
    r"(?:f_|script: )(?P<sha>[0-9a-f]{40})\b.*?@user_script:\s*(?P<line>\d+)", re.DOTALL
)
_LUA_CALL = re.compile(r"redis\.p?call\(\s*'([A-Za-z]+)'")


def _scripts_by_sha() -> dict[str, str]:
    return {
        hashlib.sha1(text.encode("utf-8")).hexdigest(): text  # Redis names scripts by SHA-1
        for text in (ACQUIRE_LUA, RELEASE_LUA, INSPECT_LUA)
    }


def _acl_hint(message: str) -> str:
    """``" (line 19 of the lease script runs TIME: grant +time)"`` for an ACL refusal whose
    message names one of our scripts and a line; ``""`` when it cannot tell."""
    match = _SCRIPT_AT_LINE.search(message)
    script = _scripts_by_sha().get(match.group("sha")) if match else None
    if match is None or script is None:
        return ""
    lines = script.splitlines()
    number = int(match.group("line"))
    commands = _LUA_CALL.findall(lines[number - 1]) if 0 < number <= len(lines) else []
    if not commands:
        return ""
    names = " ".join(dict.fromkeys(c.upper() for c in commands))
    grants = " ".join(dict.fromkeys(f"+{c.lower()}" for c in commands))
    return f" (line {number} of the lease script runs {names}: grant {grants})"


# TLS failures that retrying soon will not fix: the server's certificate is not trusted (wrong
# CA, wrong host name), the server wants a client certificate, or one side does not speak TLS.
# Other SSL errors (EOF in the middle of a handshake, reset) are connection trouble.
_TLS_CONFIG_ERROR = re.compile(
    r"CERTIFICATE_VERIFY_FAILED|CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA|"
    r"CERTIFICATE_UNKNOWN|WRONG_VERSION_NUMBER|certificate verify failed"
)


def _tls_config_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if (isinstance(current, ssl.SSLError) or "[SSL" in text) and _TLS_CONFIG_ERROR.search(text):
            return True
        current = current.__cause__ or current.__context__
    return False


def unwrap_script_error(message: str) -> str:
    """The error a Redis < 7 script failure wraps, code first; ``message`` if not wrapped.

    ``"Error running script (call to f_ab…): @user_script:19: @user_script: 19: -READONLY You
    can't write against a read only replica."`` gives ``"READONLY You can't write against a
    read only replica."``.
    """
    text = message.strip()
    wrapper = _SCRIPT_WRAPPER.match(text)
    if wrapper is None:
        return message
    inner = text[wrapper.end() :]
    location = _SCRIPT_LOCATION.match(inner)
    while location is not None:
        inner = inner[location.end() :]
        location = _SCRIPT_LOCATION.match(inner)
    return inner.lstrip("-").strip() or message


def _classify_reply(message: str) -> Optional[LeaseError]:
    """Classify an error reply by its code, unwrapping a Redis 6 script error first."""
    inner = unwrap_script_error(message)
    upper = inner.lstrip().upper()
    if upper.startswith(_TRANSIENT_PREFIXES):
        kind = upper.split(" ", 1)[0].lower()
        return RedisTransientError(f"Redis is temporarily refusing: {inner}", kind=kind)
    if "WRONGTYPE" in upper:
        return RedisFatalError(
            f"a lease key holds a value of the wrong type: {inner}", kind="wrongtype"
        )
    if "NOPERM" in upper or _SCRIPT_ACL_DENIED.search(inner):
        return RedisFatalError(
            f"ACL denied the lease script: {message}{_acl_hint(message)}", kind="noperm"
        )
    if "NOAUTH" in upper or "WRONGPASS" in upper:
        return RedisFatalError(f"authentication failed: {message}", kind="auth")
    if upper.startswith("NOSCRIPT"):
        return RedisFatalError(
            f"Redis does not keep the lease scripts even after reloading them: {message}",
            kind="noscript",
        )
    return None


def classify_error(exc: BaseException) -> LeaseError:
    """Map any exception from a lease round trip to a transient or fatal ``LeaseError``.

    Error replies are classified by their code, also when Redis 6 wraps the code inside an
    ``Error running script`` reply (``unwrap_script_error``).
    """
    if isinstance(exc, LeaseError):
        return exc
    message = str(exc) or type(exc).__name__
    if isinstance(exc, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError)):
        return RedisFatalError(f"authentication failed: {message}", kind="auth")
    if isinstance(exc, _AUTHORIZATION_ERRORS):
        return RedisFatalError(f"not authorized: {message}", kind="auth")
    if isinstance(exc, rex.NoPermissionError):
        return RedisFatalError(
            f"ACL denied the lease script: {message}{_acl_hint(message)}", kind="noperm"
        )
    if isinstance(exc, rex.BusyLoadingError):
        return RedisTransientError(f"Redis is loading its dataset: {message}", kind="loading")
    if isinstance(exc, _STRIPPED_TRANSIENT):
        return RedisTransientError(f"Redis is temporarily refusing: {message}", kind="oom")
    if isinstance(exc, rex.ReadOnlyError):
        return RedisTransientError(f"Redis is a read-only replica: {message}", kind="readonly")
    if isinstance(exc, (rex.TimeoutError, socket.timeout)):
        return RedisTransientError(f"Redis did not answer in time: {message}", kind="timeout")
    if isinstance(exc, (rex.ConnectionError, OSError)) and _tls_config_error(exc):
        return RedisFatalError(
            f"TLS handshake refused: {message} (check ssl_ca_certs, ssl_certfile/ssl_keyfile "
            "and the server's tls-* settings)",
            kind="tls",
        )
    if isinstance(exc, (rex.ConnectionError, ConnectionError, OSError)):
        return RedisTransientError(f"cannot reach Redis: {message}", kind="connection")
    if isinstance(exc, (rex.ClusterDownError, rex.TryAgainError)):
        return RedisTransientError(f"cluster not ready: {message}", kind="cluster")
    if isinstance(exc, rex.NoScriptError):
        # redis-py strips the code; its Script object already reloaded the script once.
        return RedisFatalError(
            f"Redis does not keep the lease scripts even after reloading them: {message}",
            kind="noscript",
        )
    if isinstance(exc, rex.ResponseError):
        classified = _classify_reply(message)
        if classified is not None:
            return classified
        return RedisFatalError(f"the lease script failed: {message}", kind="script")
    if isinstance(exc, rex.RedisError):
        return RedisFatalError(f"Redis client error: {message}", kind="client")
    return RedisFatalError(f"unexpected {type(exc).__name__}: {message}", kind="unexpected")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int_or_none(value: Any) -> Optional[int]:
    text = _text(value) if value is not None else ""
    return int(text) if text.lstrip("-").isdigit() else None


def _fence(value: Any) -> int:
    fence = _int_or_none(value)
    if fence is None:
        raise RedisFatalError(f"the lease hash has no valid fencing token: {value!r}", kind="data")
    return fence


class Lease:
    """One lease key and its protocol: acquire-or-renew, release with notice, inspect.

    ``client`` should be the dedicated lease client (see ``connection.derive_lease_client``);
    every method is a single bounded round trip (two if Redis forgot the script).
    """

    def __init__(
        self,
        client: LeaseClient,
        name: str,
        *,
        ttl: float,
        identity: str,
        prefix: str = "mutexowner",
        min_replicas: Optional[int] = None,
        min_replicas_timeout: Optional[float] = None,
        call_timeout: Optional[float] = None,
    ) -> None:
        self.keys = LeaseKeys(validate_name(name), prefix)
        self.ttl_ms = max(1, round(ttl * 1000))
        self.identity = identity
        self.replicas = ReplicaPolicy.build(min_replicas, min_replicas_timeout, call_timeout)
        #: How old the script's last reading of the server's run_id may be before a renewal
        #: of our own key reads it again (`RUN_ID_CHECK_TTLS` ttls; docs/safety.md, point 5).
        self.check_ms = max(1, round(self.ttl_ms * RUN_ID_CHECK_TTLS))
        #: Replicas the next acquire/renew WAITs for in the same round trip, learnt from the
        #: last reply (so a standalone server never sees a WAIT).
        self._expect_replicas = self.replicas.min_replicas or 0
        self._client = client
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._refresh_slots = False
        self._pid = os.getpid()
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._inspect = client.register_script(INSPECT_LUA)

    @property
    def client(self) -> redis.Redis:
        # A RedisCluster is typed as redis.Redis outside this module (see
        # connection._as_client); it has no ``connection_pool``.
        return cast(redis.Redis, self._client)

    def close(self) -> None:
        """Close this lease's connections (for a cluster client: every node's)."""
        if self._cluster is not None:
            self._cluster.close()
        else:
            self._client.connection_pool.disconnect()  # type: ignore[union-attr]

    def acquire(self, token: str) -> LeaseResult:
        """Take the key if it is free (or already ours); report the holder if it is not."""
        return self._acquire_or_renew(token, own_fence=None)

    def renew(self, token: str, fencing_token: int) -> LeaseResult:
        """Extend our lease; re-take the key with the same fencing token if Redis lost it."""
        return self._acquire_or_renew(token, own_fence=fencing_token)

    def release(self, token: str) -> bool:
        """Delete the key if it still holds ``token`` and notify standbys; False if not ours."""
        if self._cluster is not None:
            reply = self._run_script(
                self._release,
                keys=[self.keys.lease],
                args=[token, self.keys.channel, self.identity],
            )
            return bool(int(reply))
        command = ["EVALSHA", self._release.sha, "1", self.keys.lease]
        command += [token, self.keys.channel, self.identity]
        return bool(int(self._run(lambda: self._raw_script(self._release, command))))

    def _raw_script(self, script: Any, command: list[str]) -> Any:
        """EVALSHA on one pooled connection, loading the script once if Redis forgot it."""
        reply = _send_raw(self._client, [command])[0]
        if isinstance(reply, rex.NoScriptError):
            self._client.script_load(script.script)
            reply = _send_raw(self._client, [command])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def inspect(self) -> LeaseInfo:
        """Who holds the lease, for how long, and the fencing counter (no token revealed)."""
        reply = self._run_script(self._inspect, keys=list(self.keys.all()), args=[])
        identity, fence, pttl, counter, quiet_ms = (_text(v) for v in reply[:5])
        epoch_present = bool(int(reply[7])) if len(reply) > 7 else True
        pttl_ms = int(pttl)
        held = pttl_ms != -2
        return LeaseInfo(
            key=self.keys.lease,
            holder=identity if held else None,
            fencing_token=_int_or_none(fence) if held else None,
            ttl_left=(pttl_ms / 1000.0 if pttl_ms >= 0 else None) if held else None,
            fencing_counter=_int_or_none(counter),
            lock_delay_remaining=int(quiet_ms) / 1000.0,
            epoch_present=epoch_present,
        )

    def _script_call(self, token: str, own_fence: Optional[int]) -> tuple[list[str], list[str]]:
        """KEYS and ARGV of the acquire-or-renew script for this call."""
        keys = list(self.keys.all())
        args = [
            token,
            self.identity,
            str(self.ttl_ms),
            "" if own_fence is None else str(own_fence),
            new_token(),
            str(self.check_ms),
        ]
        return keys, args

    def _batchable(self) -> bool:
        """May go in a pipeline with other leases' calls: a standalone client, no WAIT, and
        acquire/renew not replaced on this object (a test's fault injection, a wrapper)."""
        replaced = "acquire" in self.__dict__ or "renew" in self.__dict__
        return self._cluster is None and self._expect_replicas == 0 and not replaced

    def _batchable_release(self) -> bool:
        """A release may go in a pipeline with other leases' releases."""
        return self._cluster is None and "release" not in self.__dict__

    def _acquire_or_renew(self, token: str, own_fence: Optional[int]) -> LeaseResult:
        keys, args = self._script_call(token, own_fence)
        first: Optional[LeaseResult] = None
        # Twice at most: when the reply asks for more replicas than this call WAITed for (the
        # first call, or replicas just appeared), the script runs again with the right WAIT on
        # the same pipeline. Running it again is idempotent: the key already holds our token.
        for _ in range(2):
            wait_for = self._expect_replicas
            reply, acked = self._run_with_wait(keys, args, wait_for)
            result = self._parse(reply)
            if isinstance(result, (Taken, Quiet)):
                return result
            first = first or result
            need = self.replicas.required(reply)
            self._expect_replicas = need
            if need == 0:
                return first
            if wait_for >= need:
                if acked is not None and acked >= need:
                    return first
                self._not_replicated(need, acked or 0, reply)
        # The replica count changed between the two runs: not confirmed this time.
        self._not_replicated(self._expect_replicas, 0, reply)
        raise AssertionError("unreachable")  # pragma: no cover

    def _not_replicated(self, need: int, acked: int, reply: Any) -> None:
        """The write reached the master but not enough replicas: not confirmed (transient).

        The connections are dropped so that the next call asks Sentinel where the master is:
        an old master cut off from its replicas is exactly what this check exists to catch.
        """
        if self._cluster is not None:
            self._refresh_slots = True  # the shard may have failed over: ask the cluster
        else:
            # A failing disconnect must not hide the real result.
            with contextlib.suppress(Exception):
                self._client.connection_pool.disconnect()  # type: ignore[union-attr]
        connected = _int_or_none(reply[4]) if len(reply) > 4 else None
        if connected is None or connected == -1:
            count = "the master reports ? connected"
        elif connected < 0:
            # -2: a renewal of a dataset already marked replicated does not count them.
            count = "connected replicas not counted by a renewal"
        else:
            count = f"the master reports {connected} connected"
        raise RedisTransientError(
            f"the lease write was acknowledged by {acked} of the {need} replica(s) required "
            f"within {self.replicas.timeout_ms} ms (min_replicas; {count}): not "
            f"confirmed; the master may have lost its replicas, be an old master after a "
            f"fail-over, or its replicas lag",
            kind="noreplicas",
        )

    def _run_with_wait(
        self, keys: list[str], args: list[str], wait_for: int
    ) -> tuple[Any, Optional[int]]:
        """EVALSHA the acquire script, then ``WAIT wait_for`` on the same connection.

        One round trip (a pipeline); two if Redis forgot the script. Returns the script's
        reply and the number of replicas that acknowledged it (None when not asked).
        On a Redis Cluster the pipeline goes to the master of the keys' slot and follows
        ``MOVED``/``ASK`` (at most `MAX_REDIRECTS` times).
        """
        if self._cluster is not None:
            cluster = self._cluster
            return self._run(lambda: self._cluster_call(cluster, keys, args, wait_for))
        client = self._client
        assert isinstance(client, redis.Redis)
        return self._run(lambda: self._node_call(client, keys, args, wait_for, asking=False))

    def _node_call(
        self,
        node: redis.Redis,
        keys: list[str],
        args: list[str],
        wait_for: int,
        *,
        asking: bool,
    ) -> tuple[Any, Optional[int]]:
        script = self._acquire

        commands: list[list[str]] = [["ASKING"]] if asking else []
        commands.append(["EVALSHA", script.sha, str(len(keys)), *keys, *args])
        if wait_for > 0:
            commands.append(["WAIT", str(wait_for), str(self.replicas.timeout_ms)])

        def attempt() -> list[Any]:
            # One write, one read of every reply: redis-py's pipeline costs more CPU here
            # than the round trip itself (the hand-off's latency).
            return _send_raw(node, commands)[1 if asking else 0 :]

        replies = attempt()
        if isinstance(replies[0], rex.NoScriptError):
            node.script_load(script.script)
            replies = attempt()
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[0], (int(replies[1]) if wait_for > 0 else None)

    def _cluster_call(
        self, cluster: RedisCluster, keys: list[str], args: list[str], wait_for: int
    ) -> tuple[Any, Optional[int]]:
        manager = cluster.nodes_manager
        if self._refresh_slots:
            # The last call could not reach the slot's master: it may have failed over.
            self._refresh_slots = False
            manager.initialize()
        ask: Optional[tuple[str, int]] = None
        for _ in range(MAX_REDIRECTS + 1):
            if ask is not None:
                target = cluster.get_node(  # type: ignore[no-untyped-call]
                    host=ask[0], port=ask[1]
                )
                if target is None:
                    raise RedisTransientError(
                        f"cluster: ASK to unknown node {ask[0]}:{ask[1]}", kind="cluster"
                    )
            else:
                target = cluster.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
            node = cluster.get_redis_connection(target)
            try:
                return self._node_call(node, keys, args, wait_for, asking=ask is not None)
            except rex.MovedError as moved:
                manager.move_slot(moved)  # the slot lives elsewhere now: follow it
                ask = None
            except rex.AskError as redirect:
                ask = (redirect.host, redirect.port)  # mid-migration: this call only
            except (rex.ConnectionError, rex.TimeoutError):
                self._refresh_slots = True
                raise
        raise RedisTransientError(
            f"cluster: more than {MAX_REDIRECTS} redirects for slot of {keys[0]!r}",
            kind="cluster",
        )

    def _parse(self, reply: Any) -> LeaseResult:
        try:
            status = _text(reply[0])
            if status == "taken":
                pttl = int(reply[2])
                # -1: someone set the key without an expiry; look again after one ttl.
                ttl_left = pttl / 1000.0 if pttl >= 0 else self.ttl_ms / 1000.0
                return Taken(
                    holder=_text(reply[1]) or "<unknown>",
                    ttl_left=max(0.0, ttl_left),
                    fencing_token=_int_or_none(reply[3]),
                )
            if status == "quiet":
                return Quiet(lock_delay=int(reply[2]) / 1000.0)
            fence = _fence(reply[1])
            lock_delay = int(reply[2]) / 1000.0
        except (IndexError, TypeError, ValueError) as exc:
            raise RedisFatalError(
                f"unexpected reply from the lease script: {reply!r}", kind="data"
            ) from exc
        if status == "acquired":
            return Acquired(fence, lock_delay)
        if status == "renewed":
            return Renewed(fence, lock_delay)
        if status == "retaken":
            return Retaken(fence, lock_delay)
        raise RedisFatalError(f"unexpected reply from the lease script: {reply!r}", kind="data")

    def _run_script(self, script: Any, *, keys: list[str], args: list[str]) -> Any:
        return self._run(lambda: script(keys=keys, args=args, client=self._client))

    def _run(self, call: Callable[[], _T]) -> _T:
        if os.getpid() != self._pid:
            raise ForkedOwnerError(
                f"lease {self.keys.name!r} was created in process {self._pid}; this forked "
                f"child ({os.getpid()}) must not renew or release it"
            )
        try:
            return call()
        except rex.RedisClusterException as exc:
            # Not a RedisError in redis-py: "cannot be connected", slot not covered. A cluster
            # being failed over or resharded, so transient (classify_error would call it
            # unexpected).
            raise RedisTransientError(
                f"cluster not ready: {exc or type(exc).__name__}", kind="cluster"
            ) from exc
        except Exception as exc:  # classified once, here
            raise classify_error(exc) from exc


def call_many(
    calls: Sequence[tuple[Lease, str, Optional[int]]],
) -> list[Union[LeaseResult, LeaseError]]:
    """Acquire (fencing token None) or renew each ``(lease, token, fencing_token)``; one
    result or classified error per call, in order.

    Calls of leases on one standalone client go out as one pipeline (one round trip, one
    socket timeout); a lease that must WAIT for replicas, lives on a cluster, or whose reply
    asks for a second look (NOSCRIPT, replicas just appeared) is called on its own, as
    ``Lease.acquire``/``renew`` would. One failing call does not fail the others.
    """
    results: list[Optional[Union[LeaseResult, LeaseError]]] = [None] * len(calls)
    batch = [i for i, (lease, _, _) in enumerate(calls) if lease._batchable()]
    if len(batch) > 1:
        _run_batch(calls, batch, results)
    for i, (lease, token, fence) in enumerate(calls):
        if results[i] is None:
            results[i] = _call_one(lease, token, fence)
    return [r for r in results if r is not None]


def _call_one(lease: Lease, token: str, fence: Optional[int]) -> Union[LeaseResult, LeaseError]:
    try:
        return lease.acquire(token) if fence is None else lease.renew(token, fence)
    except ForkedOwnerError:
        raise
    except Exception as exc:
        return classify_error(exc)


def _run_batch(
    calls: Sequence[tuple[Lease, str, Optional[int]]],
    batch: list[int],
    results: list[Optional[Union[LeaseResult, LeaseError]]],
) -> None:
    """One pipeline of acquire scripts for the leases at ``batch`` (same client). Replies
    that need a second look stay None (the caller runs those on their own)."""
    first = calls[batch[0]][0]
    try:
        replies = first._run(lambda: _pipeline(calls, batch))
    except ForkedOwnerError:
        raise
    except LeaseError as error:
        for i in batch:
            results[i] = error
        return
    for i, reply in zip(batch, replies):
        lease = calls[i][0]
        if isinstance(reply, rex.NoScriptError):
            continue  # loaded by the single call
        if isinstance(reply, Exception):
            results[i] = classify_error(reply)
            continue
        try:
            result = lease._parse(reply)
        except LeaseError as error:
            results[i] = error
            continue
        if not isinstance(result, (Taken, Quiet)):
            need = lease.replicas.required(reply)
            if need > 0:
                lease._expect_replicas = need
                continue  # replicas appeared: the single call WAITs for them
        results[i] = result


def _pipeline(calls: Sequence[tuple[Lease, str, Optional[int]]], batch: list[int]) -> list[Any]:
    """EVALSHA of every call at ``batch`` in one write and one read (same client)."""
    commands = []
    for i in batch:
        lease, token, fence = calls[i]
        keys, args = lease._script_call(token, fence)
        commands.append((lease._acquire.sha, keys, args))
    return _send_batch(calls[batch[0]][0]._client, commands)


def _resp(parts: Sequence[Union[str, bytes]]) -> bytes:
    """One command in the Redis protocol (all arguments are text)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _send_batch(client: Any, commands: list[tuple[str, list[str], list[str]]]) -> list[Any]:
    """EVALSHA commands in one round trip (see ``_send_raw``)."""
    return _send_raw(
        client, [["EVALSHA", sha, str(len(keys)), *keys, *args] for sha, keys, args in commands]
    )


def _send_raw(client: Any, commands: Sequence[Sequence[str]]) -> list[Any]:
    """Send commands as one write on one pooled connection and read every reply: a reply
    that is an error comes back as the exception, in its place. The connection is dropped
    on any other error (a lease call never reuses a connection in an unknown state).
    redis-py's pipeline would cost about twice the CPU per command, in packing."""
    assert isinstance(client, redis.Redis)
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        packed = b"".join(_resp(command) for command in commands)
        conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except rex.ResponseError as error:
                replies.append(error)
        return replies
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(conn)


def release_many(calls: Sequence[tuple[Lease, str]]) -> list[Union[bool, LeaseError]]:
    """Release each ``(lease, token)`` (leases on one standalone client) in one round trip;
    per call: True if the token held the key, False if not, or the classified error."""
    if not calls:
        return []
    first = calls[0][0]
    commands = [
        (lease._release.sha, [lease.keys.lease], [token, lease.keys.channel, lease.identity])
        for lease, token in calls
    ]
    try:
        replies = first._run(lambda: _send_batch(first._client, commands))
    except ForkedOwnerError:
        raise
    except LeaseError as error:
        return [error for _ in calls]
    results: list[Union[bool, LeaseError]] = []
    for (lease, token), reply in zip(calls, replies):
        if isinstance(reply, Exception):  # NOSCRIPT included: the single call loads it
            results.append(_release_one(lease, token))
        else:
            results.append(bool(int(reply)))
    return results


def _release_one(lease: Lease, token: str) -> Union[bool, LeaseError]:
    try:
        return lease.release(token)
    except ForkedOwnerError:
        raise
    except Exception as exc:
        return classify_error(exc)
