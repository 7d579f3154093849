"""A JSON status view for health checks: ``GET .../status[?require=holding|started]``."""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from mutexowner.contrib._runtime import status_response
from mutexowner.contrib.django import get_owner
from mutexowner.contrib.django.conf import get_settings

__all__ = ["status"]


@never_cache  # type: ignore[untyped-decorator]  # Django ships no type hints
@require_safe  # type: ignore[untyped-decorator]
def status(request: Any) -> Any:
    """This process's ``owner.status()`` as JSON (never a password or a token).

    200 by default; with ``?require=holding``, 503 unless this process holds the lease;
    with ``?require=started``, 503 unless this process runs an owner.
    """
    body, code = status_response(get_owner(), get_settings().key, request.GET.get("require"))
    return JsonResponse(body, status=code)
