"""Framework integrations: Django (``mutexowner.contrib.django``), Flask
(``mutexowner.contrib.flask``) and Prometheus metrics (``mutexowner.contrib.prometheus``).

Each needs its extra (``pip install 'mutexowner[django]'``, ``[flask]``, ``[prometheus]``);
importing this package alone imports no framework. The Django and Flask integrations share
one settings reader (``OwnerSettings``) and one per-process owner holder that is never
shared across ``fork()``.
"""

from __future__ import annotations

from mutexowner.contrib._settings import ConfigurationError, OwnerSettings, import_string

__all__ = ["ConfigurationError", "OwnerSettings", "import_string"]
