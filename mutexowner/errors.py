"""The exception hierarchy: everything the library raises derives from MutexOwnerError."""

from __future__ import annotations

__all__ = [
    "ForkedOwnerError",
    "LeaseError",
    "LeaseLost",
    "MutexOwnerError",
    "OwnerStoppedError",
    "RedisFatalError",
    "RedisTransientError",
]


class MutexOwnerError(Exception):
    """Base class of every error raised by mutexowner."""


class LeaseLost(MutexOwnerError):
    """Raised by ``WorkerContext.ensure_held()`` when the worker must not act any more.

    Either the worker was asked to stop, or the owner's local lease deadline has
    passed (for example after the process was paused), so a side effect now could
    run at the same time as another node's workers.
    """


class OwnerStoppedError(MutexOwnerError):
    """Raised by ``MutexOwner.start()`` on an owner that was already stopped (stop is final)."""


class ForkedOwnerError(MutexOwnerError):
    """Raised when an owner created in one process is used in a forked child.

    The child must never renew or release the parent's lease; create a new
    ``MutexOwner`` in the child instead.
    """


class LeaseError(MutexOwnerError):
    """A Redis call made for the lease failed; ``transient`` says whether retrying can help."""

    transient: bool = False

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        #: Short machine-readable class of the failure, e.g. ``"connection"``, ``"timeout"``,
        #: ``"loading"``, ``"auth"``, ``"wrongtype"``: used in logs, events and metrics labels.
        self.kind = kind


class RedisTransientError(LeaseError):
    """Redis is unreachable, slow, loading, read-only or failing over: retry with backoff."""

    transient = True


class RedisFatalError(LeaseError):
    """Redis refused the call in a way retrying soon will not fix (auth, ACL, wrong key type)."""

    transient = False
