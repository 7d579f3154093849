"""A JSON status view for health checks: ``GET .../status[?require=host|held|holding|started]``.

A 503 is this view's normal answer on a standby node, not a server error: Django's
``django.request`` logger would log it at ERROR (and ``mail_admins`` would mail it).
``StatusLogFilter``, which the app installs on that logger, logs this view's 503 at INFO
instead; every other response is logged as before.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from mutexowner.contrib._runtime import lease_reader, status_response
from mutexowner.contrib.django import get_owner
from mutexowner.contrib.django.conf import get_settings

__all__ = ["StatusLogFilter", "install_log_filter", "status"]

#: Attribute set on a request answered by ``status`` (read by ``StatusLogFilter``).
STATUS_REQUEST_MARK = "_mutexowner_status"


class StatusLogFilter(logging.Filter):
    """Logs the status view's 503 answers at INFO instead of ERROR; passes everything else.

    Django documents that ``django.request`` records carry ``status_code`` and ``request``;
    this filter looks for those of a request the status view answered. Installed on
    ``django.request`` when the app is ready; to install it yourself (for example after
    re-configuring logging), name it in ``LOGGING``::

        "filters": {"mutexowner_status": {"()": "mutexowner.contrib.django.views.StatusLogFilter"}},
        "loggers": {"django.request": {"filters": ["mutexowner_status"], ...}},
    """

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        if getattr(record, "status_code", None) == 503 and getattr(
            request, STATUS_REQUEST_MARK, False
        ):
            record.levelno = logging.INFO
            record.levelname = logging.getLevelName(logging.INFO)
        return True


def install_log_filter(logger_name: str = "django.request") -> None:
    """Add a ``StatusLogFilter`` to ``logger_name`` unless it already has one."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, StatusLogFilter) for f in logger.filters):
        logger.addFilter(StatusLogFilter())


@never_cache  # type: ignore[untyped-decorator]  # Django ships no type hints
@require_safe  # type: ignore[untyped-decorator]
def status(request: Any) -> Any:
    """This process's ``owner.status()`` and the lease as Redis sees it (``"lease"``), as
    JSON (never a password or a token).

    200 by default; ``?require=host``: 503 unless the holder runs on this host;
    ``?require=held``: 503 unless some owner holds the lease; ``?require=holding``: 503
    unless this process holds it; ``?require=started``: 503 unless this process runs an
    owner (the last two never call Redis).
    """
    setattr(request, STATUS_REQUEST_MARK, True)
    settings = get_settings()
    body, code = status_response(
        get_owner(), settings.key, request.GET.get("require"), lease_reader(settings)
    )
    return JsonResponse(body, status=code)
