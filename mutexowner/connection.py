"""The lease's own Redis connection, derived from the user's client, and URL redaction.

The owner thread must never be stalled by a user's ``Retry`` settings or by an unbounded
socket read (DESIGN invariant 3), so lease round trips go through a separate pool that
reuses the user's address, database, credentials and TLS settings but has short socket
timeouts and no client-side retries: the owner's state machine does the retrying.
"""

from __future__ import annotations

import re
from typing import Any, Union, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

__all__ = [
    "RedisLike",
    "client_from",
    "derive_lease_client",
    "describe_client",
    "parse_cluster_url",
    "parse_sentinel_url",
    "redact_url",
]

#: What ``MutexOwner`` accepts: a ``redis.Redis`` client or a URL string.
RedisLike = Union[redis.Redis, str]

_SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_URL_SCHEMES = ("redis://", "rediss://", "unix://", *_SENTINEL_SCHEMES, *_CLUSTER_SCHEMES)
# Greedy up to the last "@" of the URL, so a password containing "@" or "/" is covered too.
_PASSWORD_IN_TEXT = re.compile(
    r"(?P<scheme>\b(?:rediss?(?:\+sentinel|\+cluster)?|unix)://)(?P<user>[^:@/\s]*):\S*@"
)
# ``?password=...`` / ``&sentinel_password=...`` in a URL's query.
_PASSWORD_IN_QUERY = re.compile(r"(?i)(?P<name>[?&][a-z_]*password=)[^&\s'\"]*")
#: Port of a sentinel address given without one.
SENTINEL_PORT = 26379
#: Query parameters of a Sentinel URL that apply to the sentinels, not to the master.
_SENTINEL_QUERY = ("sentinel_username", "sentinel_password")


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
    in the user-info part and in a ``?password=`` / ``&sentinel_password=`` query parameter."""
    text = _PASSWORD_IN_TEXT.sub(r"\g<scheme>\g<user>:***@", text)
    return _PASSWORD_IN_QUERY.sub(r"\g<name>***", text)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """Split a Sentinel URL into (sentinel addresses, service name, master kwargs).

    The form is ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
    (``rediss+sentinel://`` for TLS to the sentinels and the master). The user and password
    are the master's (as in ``redis://``); the sentinels' own credentials, if any, go in the
    query as ``sentinel_username`` / ``sentinel_password``. Other query parameters are
    those of ``redis://`` URLs (``ssl_cert_reqs``, ``ssl_ca_certs``, ...) and apply to the
    master and the sentinels alike. A port defaults to 26379. The master kwargs contain
    ``sentinel_kwargs`` for the sentinels' connections.
    """
    if not url.startswith(_SENTINEL_SCHEMES):
        raise ValueError(f"not a Sentinel URL: {redact_url(url)!r}")
    scheme, _, rest = url.partition("+sentinel://")
    netloc, slash, path_query = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    path, _, query = path_query.partition("?")
    parts = [part for part in path.split("/") if part]
    if not slash or not parts or len(parts) > 2:
        raise ValueError(
            f"a Sentinel URL needs a service name: redis+sentinel://host:port[,host:port...]"
            f"/service_name[/db], got {redact_url(url)!r}"
        )
    service = unquote(parts[0])
    addresses = [_sentinel_address(item, url) for item in hosts.split(",") if item.strip()]
    if not addresses:
        raise ValueError(f"a Sentinel URL needs at least one host:port, got {redact_url(url)!r}")
    # Everything but the sentinel list is a plain redis:// URL for the master; redis-py
    # parses it (credentials, db, TLS options) exactly as it parses redis:// URLs today.
    db = parts[1] if len(parts) > 1 else "0"
    if not db.isdigit():
        raise ValueError(f"the db of a Sentinel URL must be an integer, got {db!r}")
    plain = f"{scheme}://{userinfo}{at}sentinel/{db}{'?' + query if query else ''}"
    kwargs: dict[str, Any] = parse_url(plain)  # type: ignore[no-untyped-call]
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    sentinel_kwargs: dict[str, Any] = {}
    for name in _SENTINEL_QUERY:
        value = kwargs.pop(name, None)
        if value is not None:
            sentinel_kwargs[name.split("_", 1)[1]] = value
    if kwargs.pop("connection_class", None) is not None:  # rediss: TLS everywhere
        kwargs["ssl"] = True
    for name, value in kwargs.items():
        if name.startswith("ssl"):
            sentinel_kwargs[name] = value
    kwargs["sentinel_kwargs"] = sentinel_kwargs
    return addresses, service, kwargs


def _sentinel_address(item: str, url: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad address {item!r} in {redact_url(url)!r}")
    return unquote(host), int(port) if port else SENTINEL_PORT


def _sentinel_client(url: str) -> redis.Redis:
    addresses, service, kwargs = parse_sentinel_url(url)
    sentinel_kwargs = kwargs.pop("sentinel_kwargs")
    manager = Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
        service, redis_class=redis.Redis, **kwargs
    )
    return client


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Split a Cluster URL into (startup nodes, client kwargs).

    The form is ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/][?options]``
    (``rediss+cluster://`` for TLS); a port defaults to 6379, options are those of
    ``redis://`` URLs. A cluster has only database 0.
    """
    if not url.startswith(_CLUSTER_SCHEMES):
        raise ValueError(f"not a Cluster URL: {redact_url(url)!r}")
    scheme, _, rest = url.partition("+cluster://")
    netloc, _, path_query = rest.partition("/")
    path, _, query = path_query.partition("?")
    if "?" in netloc:  # no "/" before the query
        netloc, _, query = netloc.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, got {redact_url(url)!r}")
    nodes = []
    for item in hosts.split(","):
        if item.strip():
            host, port = _sentinel_address(item, url)
            nodes.append((host, 6379 if port == SENTINEL_PORT and ":" not in item else port))
    if not nodes:
        raise ValueError(f"a Cluster URL needs at least one host:port, got {redact_url(url)!r}")
    plain = f"{scheme}://{userinfo}{at}cluster/0{'?' + query if query else ''}"
    kwargs: dict[str, Any] = parse_url(plain)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "db"):
        kwargs.pop(name, None)
    if kwargs.pop("connection_class", None) is not None:
        kwargs["ssl"] = True
    return nodes, kwargs


def _cluster_client(url: str) -> redis.Redis:
    nodes, kwargs = parse_cluster_url(url)
    startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
    cluster = RedisCluster(startup_nodes=startup, **kwargs)
    return _as_client(cluster)


def _as_client(cluster: RedisCluster) -> redis.Redis:
    """A RedisCluster offers the command API the owner uses (scripts, pubsub, pipelines are
    routed by key); the lease (``Lease``) tells the two apart at run time."""
    return cast(redis.Redis, cluster)


#: The URL forms every entry point accepts, as error messages list them.
URL_FORMS = (
    "redis://, rediss:// or unix:// (redis+sentinel:// for Sentinel, redis+cluster:// for "
    "Cluster; rediss+ for TLS)"
)


def validate_url(url: str, *, parameter: str = "redis") -> None:
    """Check a Redis URL the way ``client_from`` reads it, without connecting (a Cluster
    client connects when it is created; settings checks must never reach the network)."""
    if not url.startswith(_URL_SCHEMES):
        raise ValueError(
            f"{parameter} must be a redis.Redis client or a URL starting with {URL_FORMS}, "
            f"got {redact_url(url)!r}"
        )
    if not url.startswith((*_SENTINEL_SCHEMES, *_CLUSTER_SCHEMES)):
        parse_url(url)  # type: ignore[no-untyped-call]  # redis-py's own message
        return
    try:
        if url.startswith(_SENTINEL_SCHEMES):
            parse_sentinel_url(url)
        else:
            parse_cluster_url(url)
    except ValueError as exc:
        raise ValueError(f"{parameter}: {redact_text(str(exc))}") from None


def client_from(redis_or_url: object, *, parameter: str = "redis") -> redis.Redis:
    """Turn the user's ``redis`` argument into a client; a clear error when it is neither.

    URLs: ``redis://``, ``rediss://``, ``unix://`` (redis-py's forms),
    ``redis+sentinel://`` / ``rediss+sentinel://`` (see `parse_sentinel_url`), which give a
    client that follows the master Sentinel names, and ``redis+cluster://`` /
    ``rediss+cluster://`` (see `parse_cluster_url`). A ``redis.cluster.RedisCluster`` is
    accepted as it is (typed as ``redis.Redis`` here; it connects when created).
    """
    if isinstance(redis_or_url, str):
        if not redis_or_url.startswith(_URL_SCHEMES):
            raise ValueError(
                f"{parameter} must be a redis.Redis client or a URL starting with {URL_FORMS}, "
                f"got {redact_url(redis_or_url)!r}"
            )
        if redis_or_url.startswith(_SENTINEL_SCHEMES):
            try:
                return _sentinel_client(redis_or_url)
            except ValueError as exc:
                raise ValueError(f"{parameter}: {exc}") from None
        if redis_or_url.startswith(_CLUSTER_SCHEMES):
            try:
                return _cluster_client(redis_or_url)
            except ValueError as exc:
                raise ValueError(f"{parameter}: {exc}") from None
        return redis.Redis.from_url(redis_or_url)
    if isinstance(redis_or_url, redis.Redis):
        return redis_or_url
    if isinstance(redis_or_url, RedisCluster):
        return _as_client(redis_or_url)
    raise TypeError(
        f"{parameter} must be a redis.Redis client or a URL string, got "
        f"{type(redis_or_url).__name__}"
    )


def derive_lease_client(client: redis.Redis, *, timeout: float) -> redis.Redis:
    """A new client on the same server as ``client``, with bounded timeouts and no retries.

    ``timeout`` bounds both connecting and each socket read/write, in seconds. For a
    ``RedisCluster``: a new cluster client on the same nodes (it connects now, to learn the
    slots), with the same bounds; redirects are followed by the lease itself.
    """
    cluster: object = client  # typed redis.Redis, see _as_client
    if isinstance(cluster, RedisCluster):
        return _as_client(_derive_cluster(cluster, timeout))
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
            _bounded_sentinel(pool.sentinel_manager, timeout),
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


# Connection kwargs a RedisCluster adds for itself; the new cluster client adds its own.
_CLUSTER_INTERNAL = ("redis_connect_func", "himport_registry", "event_dispatcher", "host", "port")


def _derive_cluster(cluster: RedisCluster, timeout: float) -> RedisCluster:
    kwargs: dict[str, Any] = {
        key: value
        for key, value in cluster.nodes_manager.connection_kwargs.items()
        if key not in _CLUSTER_INTERNAL
        and not key.startswith(("maint_notifications", "orig_", "oss_cluster"))
    }
    kwargs.pop("retry", None)
    kwargs.update(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry_on_error=[],
        health_check_interval=0,
    )
    nodes = [
        ClusterNode(node.host, node.port)  # type: ignore[no-untyped-call]
        for node in cluster.get_nodes()  # type: ignore[no-untyped-call]
    ]
    # Creating the client asks a node for the slots and the command table; a dead node
    # (a master being failed over) must not make that fail: one retry per node, here only.
    # Afterwards no cluster-level retries: the owner's machine does the retrying.
    derived = RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), len(nodes)), **kwargs)
    derived.set_retry(Retry(NoBackoff(), 0))
    return derived


def _bounded_sentinel(manager: Sentinel, timeout: float) -> Sentinel:
    """A copy of ``manager`` whose sentinel calls together take at most ``timeout`` seconds.

    Master discovery asks the sentinels one after the other, so each gets an equal share of
    ``timeout`` (connect and read), and no retries: a dead sentinel costs its share, not the
    user's socket timeout times redis-py's retries. The user's manager is left untouched.
    """
    addresses = []
    for sentinel in manager.sentinels:
        kw = sentinel.connection_pool.connection_kwargs
        addresses.append((kw.get("host", "localhost"), kw.get("port", SENTINEL_PORT)))
    share = timeout / max(1, len(addresses))
    sentinel_kwargs = dict(manager.sentinel_kwargs)
    sentinel_kwargs.update(
        socket_timeout=share,
        socket_connect_timeout=share,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        health_check_interval=0,
    )
    bounded = Sentinel(  # type: ignore[no-untyped-call]
        addresses,
        min_other_sentinels=manager.min_other_sentinels,
        sentinel_kwargs=sentinel_kwargs,
        force_master_ip=getattr(manager, "_force_master_ip", None),
    )
    return bounded


def describe_client(client: redis.Redis) -> str:
    """A password-free description of where ``client`` connects, for logs and reprs."""
    cluster: object = client  # typed redis.Redis, see _as_client
    if isinstance(cluster, RedisCluster):
        kw = cluster.nodes_manager.connection_kwargs
        nodes = ",".join(
            _host_port({"host": n.host, "port": n.port})
            for n in cluster.get_nodes()  # type: ignore[no-untyped-call]
        )
        scheme = "rediss" if kw.get("ssl") or "SSL" in str(kw.get("connection_class")) else "redis"
        return f"{scheme}+cluster://{_auth(kw)}{nodes}"
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        sentinels = ",".join(
            _host_port(s.connection_pool.connection_kwargs) for s in pool.sentinel_manager.sentinels
        )
        scheme = "rediss" if "SSL" in getattr(pool.connection_class, "__name__", "") else "redis"
        return f"{scheme}+sentinel://{_auth(kw)}{sentinels}/{pool.service_name}/{kw.get('db', 0)}"
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if "SSL" in getattr(pool.connection_class, "__name__", "") else "redis"
    return f"{scheme}://{_auth(kw)}{_host_port(kw)}/{kw.get('db', 0)}"


def _auth(kw: dict[str, Any]) -> str:
    user = kw.get("username")
    return f"{user}:***@" if user else (":***@" if kw.get("password") else "")


def _host_port(kw: dict[str, Any]) -> str:
    host = str(kw.get("host", "localhost"))
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{kw.get('port', 6379)}"
