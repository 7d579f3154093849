"""The lease's own Redis connection, derived from the user's client, and URL redaction.

The owner thread must never be stalled by a user's ``Retry`` settings or by an unbounded
socket read (DESIGN invariant 3), so lease round trips go through a separate pool that
reuses the user's address, database, credentials and TLS settings but has short socket
timeouts and no client-side retries: the owner's state machine does the retrying.
"""

from __future__ import annotations

import re
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

__all__ = ["RedisLike", "client_from", "derive_lease_client", "describe_client", "redact_url"]

#: What ``MutexOwner`` accepts: a ``redis.Redis`` client or a URL string.
RedisLike = Union[redis.Redis, str]

_URL_SCHEMES = ("redis://", "rediss://", "unix://")
# Greedy up to the last "@" of the URL, so a password containing "@" or "/" is covered too.
_PASSWORD_IN_TEXT = re.compile(r"(?P<scheme>\b(?:rediss?|unix)://)(?P<user>[^:@/\s]*):\S*@")
_QUERY_PASSWORD_IN_TEXT = re.compile(r"(?i)(?P<name>[?&]password=)[^&\s'\"]*")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (``redis://u:***@host:6379/0``).

    Query-string passwords (``?password=...``) are redacted too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _PASSWORD_IN_TEXT.sub(r"\g<scheme>\g<user>:***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostinfo}" if sep else f"{userinfo}@{hostinfo}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if "@" in redacted and "@" not in netloc:
        # Not a URL urlsplit understands ("redis//u:pw@host", "redis:/pw@host"): whatever
        # stands before the last "@" may be a password.
        return "***@" + redacted.rpartition("@")[2]
    return redacted


def redact_text(text: str) -> str:
    """Redact passwords of any Redis URL embedded in free text (error messages, reprs),
    in the user-info part and in a ``?password=`` / ``&password=`` query parameter."""
    text = _PASSWORD_IN_TEXT.sub(r"\g<scheme>\g<user>:***@", text)
    return _QUERY_PASSWORD_IN_TEXT.sub(r"\g<name>***", text)


def client_from(redis_or_url: object, *, parameter: str = "redis") -> redis.Redis:
    """Turn the user's ``redis`` argument into a client; a clear error when it is neither."""
    if isinstance(redis_or_url, str):
        if not redis_or_url.startswith(_URL_SCHEMES):
            raise ValueError(
                f"{parameter} must be a redis.Redis client or a URL starting with "
                f"redis://, rediss:// or unix://, got {redact_url(redis_or_url)!r}"
            )
        return redis.Redis.from_url(redis_or_url)
    if isinstance(redis_or_url, redis.Redis):
        return redis_or_url
    if isinstance(redis_or_url, RedisCluster):
        raise TypeError(
            f"{parameter}: Redis Cluster clients are not supported; pass a redis.Redis client "
            "or URL for one node (the lease keys share one hash tag, so one slot)"
        )
    raise TypeError(
        f"{parameter} must be a redis.Redis client or a URL string, got "
        f"{type(redis_or_url).__name__}"
    )


def derive_lease_client(client: redis.Redis, *, timeout: float) -> redis.Redis:
    """A new client on the same server as ``client``, with bounded timeouts and no retries.

    ``timeout`` bounds both connecting and each socket read/write, in seconds.
    """
    pool = client.connection_pool
    kwargs: dict[str, Any] = {
        key: value
        for key, value in pool.connection_kwargs.items()
        # Pool-internal plumbing that points back at the user's pool; the new pool adds its own.
        if not key.startswith(("maint_notifications", "orig_"))
    }
    kwargs.update(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        retry_on_error=[],
        health_check_interval=0,
    )
    new_pool: redis.ConnectionPool
    if isinstance(pool, SentinelConnectionPool):
        kwargs.pop("connection_pool", None)
        new_pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
            pool.service_name,
            pool.sentinel_manager,
            is_master=True,
            check_connection=pool.check_connection,
            connection_class=pool.connection_class,
            max_connections=4,
            **kwargs,
        )
    else:
        new_pool = redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=4, **kwargs
        )
    return redis.Redis(connection_pool=new_pool)


def describe_client(client: redis.Redis) -> str:
    """A password-free description of where ``client`` connects, for logs and reprs."""
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        return f"sentinel://{pool.service_name}/{kw.get('db', 0)}"
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if "SSL" in getattr(pool.connection_class, "__name__", "") else "redis"
    user = kw.get("username")
    auth = f"{user}:***@" if user else (":***@" if kw.get("password") else "")
    return (
        f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    )
