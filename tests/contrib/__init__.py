"""Tests of mutexowner.contrib: Django, Flask, Prometheus, and what they share."""
