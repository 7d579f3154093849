"""System checks (``manage.py check``) for ``settings.MUTEXOWNER``.

A bad setting is reported as ``mutexowner.E001``… with a hint, the Django way: ``check``,
``runserver`` and every command that runs the checks list it; ``shell`` and the other
commands that skip checks keep working. (An exception from ``AppConfig.ready()`` would break
every ``manage.py`` command, ``check`` included.) Commands that run the checks can be forced
past them with ``--skip-checks``; ``SILENCED_SYSTEM_CHECKS`` silences an ID.

| ID | problem |
|---|---|
| ``mutexowner.E001`` | ``settings.MUTEXOWNER`` is missing |
| ``mutexowner.E002`` | ``MUTEXOWNER`` (or its ``SUPERVISOR``) is not a dict, or has unknown keys |
| ``mutexowner.E003`` | ``REDIS_URL`` is missing or not a Redis URL / client |
| ``mutexowner.E004`` | ``KEY``, ``PREFIX`` or ``IDENTITY`` is missing or invalid |
| ``mutexowner.E005`` | a timing setting is invalid, or they break the timing rule |
| ``mutexowner.E006`` | ``WORKERS`` is invalid or a worker cannot be imported |
| ``mutexowner.E007`` | ``OUTAGE``, ``STUCK_WORKER_POLICY``, ``AUTOSTART``, ``PROMETHEUS`` |

No check calls Redis: ``manage.py mutexowner --check`` does.
"""

from __future__ import annotations

from typing import Any, Optional

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from mutexowner.contrib.django.conf import SETTING, STRUCTURE, read_settings

__all__ = ["CHECK_IDS", "check_settings", "setting_errors"]

#: Check ID and hint per setting (canonical key; ``STRUCTURE`` for the dicts themselves).
CHECK_IDS: dict[str, tuple[str, str]] = {
    STRUCTURE: (
        "mutexowner.E002",
        f"{SETTING} is a dict of REDIS_URL, KEY, TTL, RENEW_INTERVAL, IDENTITY, WORKERS, "
        "OUTAGE, STUCK_WORKER_POLICY, AUTOSTART, PREFIX, PROMETHEUS and SUPERVISOR (a dict of "
        "MAX_RESTARTS, MAX_SECONDS, SHUTDOWN_TIMEOUT); keys are upper case.",
    ),
    "REDIS_URL": (
        "mutexowner.E003",
        'Use a URL such as "redis://localhost:6379/0" (rediss:// for TLS, unix:///path for a '
        "socket), or a redis.Redis client.",
    ),
    "KEY": (
        "mutexowner.E004",
        'The lease name, the same on every node that competes for it, e.g. "myapp:scheduler" '
        "(no braces).",
    ),
    "PREFIX": ("mutexowner.E004", "The Redis key prefix: a non-empty string without braces."),
    "IDENTITY": (
        "mutexowner.E004",
        "Leave IDENTITY unset: the default <hostname>:<pid>:<random> is unique per process "
        "and lets status checks tell which host holds the lease.",
    ),
    "TTL": ("mutexowner.E005", "TTL is the lease's length in seconds, e.g. 10."),
    "RENEW_INTERVAL": (
        "mutexowner.E005",
        "Leave RENEW_INTERVAL unset (TTL / 3), or use a number of seconds below TTL.",
    ),
    "SHUTDOWN_TIMEOUT": (
        "mutexowner.E005",
        "Workers must be able to stop between the first missed renewal and the lease's end: "
        "RENEW_INTERVAL + SUPERVISOR.SHUTDOWN_TIMEOUT < TTL - drift. Raise TTL or lower one "
        "of the others.",
    ),
    "MAX_SECONDS": ("mutexowner.E005", "SUPERVISOR.MAX_SECONDS is a window in seconds > 0."),
    "MAX_RESTARTS": ("mutexowner.E005", "SUPERVISOR.MAX_RESTARTS is an int >= 0."),
    "WORKERS": (
        "mutexowner.E006",
        'A list of dotted paths ("myapp.workers.schedule") of callables taking a '
        "WorkerContext; check the module imports without errors.",
    ),
    "OUTAGE": ("mutexowner.E007", 'OUTAGE is "step_down" (default, safe) or "keep_running".'),
    "STUCK_WORKER_POLICY": (
        "mutexowner.E007",
        'STUCK_WORKER_POLICY is "exit" (default), "abandon", or a dotted path to a callable.',
    ),
    "AUTOSTART": ("mutexowner.E007", "AUTOSTART is True or False."),
    "PROMETHEUS": ("mutexowner.E007", "PROMETHEUS is True or False."),
}

_MISSING_HINT = (
    f'Add to settings.py: {SETTING} = {{"REDIS_URL": "redis://localhost:6379/0", '
    f'"KEY": "myapp:scheduler", "WORKERS": ["myapp.workers.schedule"]}}, or remove '
    f'"mutexowner.contrib.django" from INSTALLED_APPS.'
)


def setting_errors(value: object) -> list[checks.CheckMessage]:
    """The check messages for ``value``, the value of ``settings.MUTEXOWNER`` (None when
    it is not set): an empty list when it is valid."""
    if value is None:
        return [
            checks.Error(
                f"settings.{SETTING} is missing.", hint=_MISSING_HINT, id="mutexowner.E001"
            )
        ]
    try:
        read_settings(value)
    except ImproperlyConfigured as exc:
        setting = getattr(exc, "setting", None) or STRUCTURE
        check_id, hint = CHECK_IDS.get(setting, CHECK_IDS[STRUCTURE])
        return [checks.Error(str(exc), hint=hint, id=check_id)]
    return []


def check_settings(app_configs: Optional[Any] = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Validate ``settings.MUTEXOWNER``: one ``Error`` with an ID and a hint for the first
    problem found (registered with Django's checks framework, tag ``mutexowner``)."""
    from django.conf import settings

    if app_configs is not None and not any(
        getattr(config, "label", None) == "mutexowner" for config in app_configs
    ):
        return []
    return setting_errors(getattr(settings, SETTING, None))


checks.register(check_settings, "mutexowner")
