"""Reads and validates ``settings.MUTEXOWNER`` into ``OwnerSettings``.

``read_settings`` works on a plain dict (no configured Django needed), so validation is easy
to test; ``get_settings`` reads ``django.conf.settings`` once and caches the result (cleared
when a test changes settings with ``override_settings``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Optional

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from mutexowner.contrib._settings import KEYS, OwnerSettings, parse_settings

__all__ = [
    "SETTING",
    "STRUCTURE",
    "SUPERVISOR_KEYS",
    "TOP_LEVEL_KEYS",
    "get_settings",
    "read_settings",
]

#: The Django setting's name.
SETTING = "MUTEXOWNER"
#: Keys of ``MUTEXOWNER["SUPERVISOR"]``.
SUPERVISOR_KEYS = ("MAX_RESTARTS", "MAX_SECONDS", "SHUTDOWN_TIMEOUT")
#: The ``setting`` of an error about the shape of ``MUTEXOWNER`` (not a dict, unknown keys).
STRUCTURE = "MUTEXOWNER"
#: Keys allowed at the top level of ``MUTEXOWNER``.
TOP_LEVEL_KEYS = (*(k for k in KEYS if k not in SUPERVISOR_KEYS), "SUPERVISOR")

_cache_lock = threading.Lock()
_cached: Optional[OwnerSettings] = None


def setting_name(key: str) -> str:
    """How a canonical key is spelled in ``settings.py``, for messages."""
    if key in SUPERVISOR_KEYS:
        return f'{SETTING}["SUPERVISOR"]["{key}"]'
    return f'{SETTING}["{key}"]'


def _improper(message: str, setting: str = STRUCTURE) -> ImproperlyConfigured:
    error = ImproperlyConfigured(message)
    error.setting = setting
    return error


def _check_keys(where: str, given: Mapping[Any, Any], allowed: tuple[str, ...]) -> None:
    unknown = [k for k in given if k not in allowed]
    if not unknown:
        return
    hints = []
    for k in unknown:
        upper = str(k).upper()
        if upper in allowed:
            hints.append(f"{k!r} should be {upper!r}")
        elif where == SETTING and upper in SUPERVISOR_KEYS:
            hints.append(f"{k!r} belongs in {SETTING}['SUPERVISOR']")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise _improper(
        f"{where} has unknown key(s) {', '.join(map(repr, unknown))}{hint}; "
        f"allowed: {', '.join(allowed)}"
    )


def read_settings(value: object) -> OwnerSettings:
    """Validate the value of ``settings.MUTEXOWNER``; ``ImproperlyConfigured`` naming the
    offending key and its allowed values otherwise (a Redis password is never shown)."""
    if value is None:
        raise _improper(
            f"settings.{SETTING} is required when 'mutexowner.contrib.django' is in "
            f"INSTALLED_APPS: a dict with at least REDIS_URL and KEY, e.g. "
            f'{SETTING} = {{"REDIS_URL": "redis://localhost:6379/0", "KEY": "myapp:scheduler", '
            f'"WORKERS": ["myapp.workers.schedule"]}}'
        )
    if not isinstance(value, Mapping):
        raise _improper(f"settings.{SETTING} must be a dict, got {type(value).__name__}")
    _check_keys(SETTING, value, TOP_LEVEL_KEYS)
    flat = {k: v for k, v in value.items() if k != "SUPERVISOR"}
    supervisor = value.get("SUPERVISOR")
    if supervisor is not None:
        if not isinstance(supervisor, Mapping):
            raise _improper(
                f'{SETTING}["SUPERVISOR"] must be a dict with keys '
                f"{', '.join(SUPERVISOR_KEYS)}, got {type(supervisor).__name__}"
            )
        _check_keys(f'{SETTING}["SUPERVISOR"]', supervisor, SUPERVISOR_KEYS)
        flat.update(supervisor)
    return parse_settings(
        flat, name=setting_name, error=ImproperlyConfigured, importer=import_string
    )


def get_settings() -> OwnerSettings:
    """``settings.MUTEXOWNER``, validated (cached until Django's settings change)."""
    global _cached
    with _cache_lock:
        if _cached is None:
            from django.conf import settings

            _cached = read_settings(getattr(settings, SETTING, None))
        return _cached


def clear_cache(**kwargs: Any) -> None:
    """Forget the cached settings (a ``setting_changed`` receiver)."""
    global _cached
    setting = kwargs.get("setting")
    if setting is None or setting == SETTING:
        with _cache_lock:
            _cached = None
