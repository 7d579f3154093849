"""mutexowner: run a set of worker threads in exactly one process of a fleet,
guarded by a lease held in Redis."""

from __future__ import annotations

from mutexowner.backoff import BackoffPolicy

__version__ = "0.1.0.dev0"

__all__ = ["BackoffPolicy", "__version__"]
