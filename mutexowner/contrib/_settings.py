"""Settings shared by the Django and Flask integrations: read, validate, build an owner.

Both frameworks describe an owner with the same keys (``REDIS_URL``, ``KEY``, ``TTL``, …);
only how a key is spelled in messages differs (``MUTEXOWNER["TTL"]`` in Django,
``MUTEXOWNER_TTL`` in Flask). Validation happens once, at start-up, with messages that name
the setting and its allowed values, and never show a Redis password.
"""

from __future__ import annotations

import contextlib
import math
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar, Union

import redis

from mutexowner.connection import (
    URL_FORMS,
    describe_client,
    redact_text,
    redact_url,
    validate_url,
)
from mutexowner.errors import MutexOwnerError
from mutexowner.lease import validate_name
from mutexowner.owner import OUTAGE_MODES, STUCK_POLICIES, MutexOwner, OutageMode, StuckPolicy
from mutexowner.supervisor import Supervisor
from mutexowner.timing import LeaseTiming, TimingError, TimingNames

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "KEYS",
    "ConfigurationError",
    "OwnerSettings",
    "import_string",
    "parse_settings",
]

#: Canonical setting names (each framework spells them its own way in messages).
KEYS = (
    "REDIS_URL",
    "KEY",
    "TTL",
    "RENEW_INTERVAL",
    "IDENTITY",
    "WORKERS",
    "MAX_RESTARTS",
    "MAX_SECONDS",
    "SHUTDOWN_TIMEOUT",
    "OUTAGE",
    "STUCK_WORKER_POLICY",
    "AUTOSTART",
    "PREFIX",
    "PROMETHEUS",
)
#: The supervisor's shutdown budget when none is configured and it fits the timing rule.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0

WorkerTarget = Callable[..., Any]
Namer = Callable[[str], str]
Choice = TypeVar("Choice", bound=str)
#: Wraps each configured worker (Django closes DB connections, Flask pushes an app context).
WorkerWrapper = Callable[[WorkerTarget], WorkerTarget]
#: Imports a dotted path (``"package.module.attribute"``); raises ImportError.
Importer = Callable[[str], Any]


class ConfigurationError(MutexOwnerError, ValueError):
    """An integration setting is missing or invalid; the message names it and what is allowed."""


def import_string(path: str) -> Any:
    """Import ``"package.module.attribute"`` or ``"package.module:attribute"``.

    The default importer of ``parse_settings`` (the standard library's
    ``pkgutil.resolve_name``, every failure as ``ImportError``); the Django integration uses
    Django's ``import_string`` and the Flask integration werkzeug's instead.
    """
    if not isinstance(path, str) or not path.strip():
        raise ImportError(f"not a dotted path: {path!r}")
    if "." not in path and ":" not in path:
        raise ImportError(f"{path!r} is not a dotted path like 'package.module.attribute'")
    try:
        return pkgutil.resolve_name(path)
    except ImportError:
        raise
    except (AttributeError, ValueError) as exc:
        raise ImportError(f"cannot import {path!r}: {exc}") from None


@dataclass(frozen=True)
class OwnerSettings:
    """Validated settings of one owner, as read from Django settings or Flask config."""

    redis: Union[str, redis.Redis]
    key: str
    ttl: float = 10.0
    renew_interval: Optional[float] = None
    identity: Optional[str] = None
    #: (name, callable) pairs, in start order; names are the dotted paths.
    workers: tuple[tuple[str, WorkerTarget], ...] = ()
    max_restarts: int = 3
    max_seconds: float = 5.0
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    outage: OutageMode = "step_down"
    stuck_worker_policy: StuckPolicy = "exit"
    autostart: bool = False
    prefix: str = "mutexowner"
    prometheus: bool = False

    @property
    def timing(self) -> LeaseTiming:
        """The lease's numbers as the owner will use them (validated by ``parse_settings``)."""
        return LeaseTiming.of(self.ttl, self.renew_interval)

    @property
    def effective_renew_interval(self) -> float:
        """The renew interval the owner will use (``renew_interval`` or ttl/3)."""
        return self.timing.renew_interval

    @property
    def redis_description(self) -> str:
        """Where the owner connects, password hidden."""
        if isinstance(self.redis, str):
            return redact_url(self.redis)
        return describe_client(self.redis)

    def describe(self) -> dict[str, Any]:
        """The settings as plain data, safe to print (no password)."""
        return {
            "redis": self.redis_description,
            "key": self.key,
            "ttl": self.ttl,
            "renew_interval": self.effective_renew_interval,
            "identity": self.identity,
            "workers": [name for name, _ in self.workers],
            "max_restarts": self.max_restarts,
            "max_seconds": self.max_seconds,
            "shutdown_timeout": self.shutdown_timeout,
            "outage": self.outage,
            "stuck_worker_policy": (
                self.stuck_worker_policy
                if isinstance(self.stuck_worker_policy, str)
                else _callable_name(self.stuck_worker_policy)
            ),
            "autostart": self.autostart,
            "prefix": self.prefix,
            "prometheus": self.prometheus,
        }

    def build_supervisor(self, wrap: Optional[WorkerWrapper] = None) -> Optional[Supervisor]:
        """A fresh supervisor with the configured workers (None when there are none)."""
        if not self.workers:
            return None
        sup = Supervisor(
            max_restarts=self.max_restarts,
            max_seconds=self.max_seconds,
            shutdown_timeout=self.shutdown_timeout,
        )
        for name, target in self.workers:
            sup.add(wrap(target) if wrap is not None else target, name=name)
        return sup

    def build_owner(
        self,
        *,
        supervisor: Optional[Supervisor] = None,
        wrap: Optional[WorkerWrapper] = None,
    ) -> MutexOwner:
        """A new, not yet started ``MutexOwner`` (and supervisor) from these settings.

        ``supervisor`` replaces the configured workers; ``wrap`` wraps each configured one.
        """
        if supervisor is None:
            supervisor = self.build_supervisor(wrap)
        owner = MutexOwner(
            self.redis,
            self.key,
            ttl=self.ttl,
            renew_interval=self.renew_interval,
            supervisor=supervisor,
            identity=self.identity,
            outage=self.outage,
            stuck_worker_policy=self.stuck_worker_policy,
            prefix=self.prefix,
        )
        if self.prometheus:
            from mutexowner.contrib.prometheus import instrument

            instrument(owner)
        return owner


def _callable_name(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qualname}" if module else str(qualname)


def _is_number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(float(value))
    )


class _Reader:
    """Validates one settings mapping, raising ``error(message)`` on the first problem."""

    def __init__(
        self,
        values: Mapping[str, Any],
        name: Namer,
        error: Callable[[str], Exception],
        importer: Importer,
    ) -> None:
        unknown = sorted(set(values) - set(KEYS))
        if unknown:  # a programming error in the framework adapter, not a user error
            raise ValueError(f"unknown canonical setting(s): {unknown}")
        self.values = values
        self.name = name
        self.error = error
        self.importer = importer

    def fail(self, message: str, *, key: str) -> Exception:
        """The exception for a problem with setting ``key``; it carries ``setting = key``."""
        exc = self.error(message)
        with contextlib.suppress(AttributeError):  # an exception type with __slots__
            exc.setting = key  # type: ignore[attr-defined]
        return exc

    def seconds(
        self, key: str, default: Optional[float], *, allow_zero: bool = False
    ) -> Optional[float]:
        value = self.values.get(key)
        if value is None:
            return default
        bound = ">= 0" if allow_zero else "> 0"
        if not _is_number(value) or float(value) < 0 or (float(value) == 0 and not allow_zero):
            raise self.fail(
                f"{self.name(key)} must be a finite number of seconds {bound}, got {value!r}",
                key=key,
            )
        return float(value)

    def redis(self) -> Union[str, redis.Redis]:
        key = "REDIS_URL"
        value = self.values.get(key)
        allowed = f"a URL starting with {URL_FORMS}, or a redis.Redis client"
        if value is None or value == "":
            raise self.fail(f"{self.name(key)} is required: {allowed}", key=key)
        if isinstance(value, redis.Redis):
            return value
        if not isinstance(value, str):
            raise self.fail(
                f"{self.name(key)} must be {allowed}, got {type(value).__name__}", key=key
            )
        try:
            validate_url(value, parameter=self.name(key))  # never connects (checks run offline)
        except (TypeError, ValueError) as exc:
            # "NAME must be ..." repeats what we say; "NAME: why" (a Sentinel or Cluster URL)
            # and redis-py's parse errors explain the problem.
            text, named = redact_text(str(exc)), f"{self.name(key)}: "
            if text.startswith(named):
                detail = f": {text[len(named) :]}"
            else:
                detail = "" if text.startswith(self.name(key)) else f": {text}"
            raise self.fail(
                f"{self.name(key)} must be {allowed}, got {redact_url(value)!r}{detail}", key=key
            ) from None
        return value

    def lease_name(self, key: str, default: Optional[str]) -> str:
        value = self.values.get(key, default)
        if value is None or value == "":
            raise self.fail(
                f"{self.name(key)} is required: the lease name, e.g. 'myapp:scheduler'", key=key
            )
        try:
            return validate_name(value, self.name(key))
        except (TypeError, ValueError) as exc:
            raise self.fail(str(exc), key=key) from None

    def identity(self) -> Optional[str]:
        key = "IDENTITY"
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            raise self.fail(
                f"{self.name(key)} must be a non-empty single-line string (default: "
                f"hostname:pid:random, different in every process), got {value!r}",
                key=key,
            )
        return value

    def workers(self) -> tuple[tuple[str, WorkerTarget], ...]:
        key = "WORKERS"
        value = self.values.get(key)
        if value is None:
            return ()
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise self.fail(
                f"{self.name(key)} must be a list of dotted paths (or callables) of workers "
                f"taking a WorkerContext, got {value!r}",
                key=key,
            )
        workers: list[tuple[str, WorkerTarget]] = []
        for index, item in enumerate(value):
            if isinstance(item, str):
                try:
                    target = self.importer(item)
                except ImportError as exc:
                    raise self.fail(
                        f"{self.name(key)}[{index}] = {item!r} cannot be imported: {exc}", key=key
                    ) from exc
                name = item
            else:
                target = item
                name = _callable_name(item)
            if not callable(target):
                raise self.fail(
                    f"{self.name(key)}[{index}] must be a dotted path to a callable taking a "
                    f"WorkerContext (or the callable), got {item!r}",
                    key=key,
                )
            if any(existing == name for existing, _ in workers):
                raise self.fail(f"{self.name(key)} lists {name!r} twice", key=key)
            workers.append((name, target))
        return tuple(workers)

    def choice(self, key: str, default: Choice, allowed: tuple[Choice, ...]) -> Choice:
        value = self.values.get(key, default)
        for option in allowed:
            if value == option:
                return option
        raise self.fail(
            f"{self.name(key)} must be one of {', '.join(map(repr, allowed))}, got {value!r}",
            key=key,
        )

    def stuck_policy(self) -> StuckPolicy:
        key = "STUCK_WORKER_POLICY"
        value = self.values.get(key, "exit")
        allowed = f"{', '.join(map(repr, STUCK_POLICIES))}, a callable or a dotted path to one"
        if value in STUCK_POLICIES or (callable(value) and not isinstance(value, str)):
            return value  # type: ignore[no-any-return]
        if isinstance(value, str) and "." in value:
            try:
                target = self.importer(value)
            except ImportError as exc:
                raise self.fail(
                    f"{self.name(key)} = {value!r} cannot be imported: {exc}", key=key
                ) from exc
            if callable(target):
                return target  # type: ignore[no-any-return]
        raise self.fail(f"{self.name(key)} must be {allowed}, got {value!r}", key=key)

    def timing(self) -> tuple[float, Optional[float], LeaseTiming]:
        """TTL and RENEW_INTERVAL as given, and the lease timing they make (rule checked)."""
        ttl = self.seconds("TTL", 10.0)
        assert ttl is not None
        renew = self.seconds("RENEW_INTERVAL", None)
        names = TimingNames(
            ttl=self.name("TTL"),
            renew_interval=self.name("RENEW_INTERVAL"),
            shutdown=self.name("SHUTDOWN_TIMEOUT"),
        )
        try:
            return ttl, renew, LeaseTiming.of(ttl, renew, names=names)
        except TimingError as exc:
            raise self.fail(str(exc), key="RENEW_INTERVAL") from None

    def shutdown_timeout(self, timing: LeaseTiming, *, has_workers: bool) -> float:
        """SHUTDOWN_TIMEOUT, or a default; checked to fit ``timing`` when there are workers."""
        shutdown = self.seconds("SHUTDOWN_TIMEOUT", None, allow_zero=True)
        if shutdown is None:
            # The library's default when it fits the timing rule; otherwise half the time
            # between the first renewal and the lease deadline (small TTLs in tests and demos).
            slack = timing.slack
            default = DEFAULT_SHUTDOWN_TIMEOUT
            shutdown = default if slack > default else round(slack / 2, 3)
        if has_workers:
            try:
                timing.with_shutdown_budget(shutdown)
            except TimingError as exc:
                raise self.fail(str(exc), key="SHUTDOWN_TIMEOUT") from None
        return shutdown

    def flag(self, key: str) -> bool:
        value = self.values.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(f"{self.name(key)} must be True or False, got {value!r}", key=key)
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{self.name(key)} must be an int >= 0, got {value!r}", key=key)
        return value


def parse_settings(
    values: Mapping[str, Any],
    *,
    name: Namer,
    error: Callable[[str], Exception] = ConfigurationError,
    importer: Optional[Importer] = None,
) -> OwnerSettings:
    """Validate ``values`` (canonical keys, see ``KEYS``) into ``OwnerSettings``.

    ``name(key)`` spells a setting the way the user wrote it; ``error(message)`` makes the
    exception raised (``ImproperlyConfigured`` for Django), with the canonical key of the
    offending setting in its ``setting`` attribute. ``importer(path)`` imports dotted paths
    (default: ``import_string``; the frameworks pass their own) and raises ImportError.
    """
    r = _Reader(values, name, error, import_string if importer is None else importer)
    redis_value = r.redis()
    key = r.lease_name("KEY", None)
    ttl, renew, timing = r.timing()
    workers = r.workers()
    shutdown = r.shutdown_timeout(timing, has_workers=bool(workers))
    max_seconds = r.seconds("MAX_SECONDS", 5.0)
    assert max_seconds is not None
    return OwnerSettings(
        redis=redis_value,
        key=key,
        ttl=ttl,
        renew_interval=renew,
        identity=r.identity(),
        workers=workers,
        max_restarts=r.integer("MAX_RESTARTS", 3),
        max_seconds=max_seconds,
        shutdown_timeout=shutdown,
        outage=r.choice("OUTAGE", "step_down", OUTAGE_MODES),
        stuck_worker_policy=r.stuck_policy(),
        autostart=r.flag("AUTOSTART"),
        prefix=r.lease_name("PREFIX", "mutexowner"),
        prometheus=r.flag("PROMETHEUS"),
    )
