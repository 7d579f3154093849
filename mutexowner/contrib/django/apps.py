"""The Django app: validates ``settings.MUTEXOWNER`` at start-up and wires autostart."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.signals import request_started
from django.test.signals import setting_changed

from mutexowner.contrib.django import _holder
from mutexowner.contrib.django.conf import clear_cache, get_settings

__all__ = ["MutexOwnerConfig"]


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
        setting_changed.connect(clear_cache, dispatch_uid="mutexowner.clear_cache")
        settings = get_settings()  # invalid settings fail every manage.py command early
        if settings.autostart:
            request_started.connect(_start_on_request, dispatch_uid="mutexowner.autostart")
