"""``/mutexowner/status``: this process's owner as JSON (``?require=holding`` for checks)."""

from __future__ import annotations

from django.urls import include, path

urlpatterns = [path("mutexowner/", include("mutexowner.contrib.django.urls"))]
