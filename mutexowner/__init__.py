"""mutexowner: run a set of worker threads in exactly one process of a fleet,
guarded by a lease held in Redis."""

from __future__ import annotations

from mutexowner.backoff import BackoffPolicy
from mutexowner.errors import (
    ForkedOwnerError,
    LeaseError,
    LeaseLost,
    MutexOwnerError,
    OwnerStoppedError,
    RedisFatalError,
    RedisTransientError,
)
from mutexowner.events import Event
from mutexowner.lease import LeaseInfo
from mutexowner.once import RunOnceResult, once_job, run_once
from mutexowner.owner import MutexOwner, OwnerStatus
from mutexowner.supervisor import Supervisor, WorkerContext

__version__ = "0.1.0.dev0"

__all__ = [
    "BackoffPolicy",
    "Event",
    "ForkedOwnerError",
    "LeaseError",
    "LeaseInfo",
    "LeaseLost",
    "MutexOwner",
    "MutexOwnerError",
    "OwnerStatus",
    "OwnerStoppedError",
    "RedisFatalError",
    "RedisTransientError",
    "RunOnceResult",
    "Supervisor",
    "WorkerContext",
    "__version__",
    "once_job",
    "run_once",
]
