"""The Django app: registers the system checks, wires autostart and the status view's
log filter. Invalid settings never raise here: ``manage.py check`` reports them
(``mutexowner.E001``…) and commands that skip checks, such as ``shell``, keep working."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_started
from django.test.signals import setting_changed

from mutexowner.contrib.django import _holder
from mutexowner.contrib.django.conf import clear_cache, get_settings

__all__ = ["MutexOwnerConfig"]

log = logging.getLogger("mutexowner.contrib.django")


def _start_on_request(sender: Any, **kwargs: Any) -> None:
    """``request_started`` receiver: start this process's owner on its first request.

    A request is only ever served by a process that will not fork again (a gunicorn, uWSGI
    or runserver worker), so a pre-fork master never takes the lease. Never raises.
    """
    _holder.start_quietly()


class MutexOwnerConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    """``INSTALLED_APPS`` entry ``"mutexowner.contrib.django"`` (app label ``mutexowner``)."""

    name = "mutexowner.contrib.django"
    label = "mutexowner"
    verbose_name = "mutexowner"

    def ready(self) -> None:
        from mutexowner.contrib.django import checks  # noqa: F401  (registers the checks)
        from mutexowner.contrib.django.views import install_log_filter

        setting_changed.connect(clear_cache, dispatch_uid="mutexowner.clear_cache")
        install_log_filter()
        try:
            settings = get_settings()
        except ImproperlyConfigured as exc:
            # Reported by the system checks (mutexowner.E001...); nothing to wire up.
            log.debug("settings.MUTEXOWNER is invalid, see manage.py check: %s", exc)
            return
        if settings.autostart:
            request_started.connect(_start_on_request, dispatch_uid="mutexowner.autostart")
