"""URLs: ``path("mutexowner/", include("mutexowner.contrib.django.urls"))`` serves
``/mutexowner/status`` (URL name ``mutexowner:status``)."""

from __future__ import annotations

from django.urls import path

from mutexowner.contrib.django import views

app_name = "mutexowner"
urlpatterns = [path("status", views.status, name="status")]
