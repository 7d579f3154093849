"""The owner's state machine, declared as data in one place.

``MutexOwner`` feeds ``STATES`` and ``TRANSITIONS`` to a ``transitions`` machine; the
diagram in docs/state-machine.md is ``mermaid()`` of the same table (a test keeps them in step).
Callbacks are named methods of the owner, resolved by name.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ACQUIRING",
    "DRAINING",
    "HOLDING",
    "LEASE_STATES",
    "SETTLING",
    "STATES",
    "STOPPED",
    "SUSPENDED",
    "TRANSITIONS",
    "WORKER_STATES",
    "mermaid",
]

STOPPED = "stopped"
ACQUIRING = "acquiring"
SETTLING = "settling"
HOLDING = "holding"
SUSPENDED = "suspended"
DRAINING = "draining"

#: Every state, with what it means. The first four are the public names the docs promise
#: (docs/state-machine.md); the others are documented there too.
STATES: dict[str, str] = {
    STOPPED: "not started, or stopped for good; workers not running",
    ACQUIRING: "standby: trying to take the lease; workers not running",
    HOLDING: "lease confirmed and valid; workers running",
    SUSPENDED: "renewals failing with transient errors, lease not yet past its local "
    "deadline; workers still running (until the step-down point)",
    SETTLING: "lease taken after Redis lost its state: waiting out the lock-delay before "
    "starting workers",
    DRAINING: "giving the lease up (stop, or workers failed): workers asked to stop, lease "
    "still renewed until they have exited, then released",
}

#: States in which the owner holds (or is renewing) the key in Redis.
LEASE_STATES = frozenset({SETTLING, HOLDING, SUSPENDED, DRAINING})
#: States in which workers may be running.
WORKER_STATES = frozenset({HOLDING, SUSPENDED, DRAINING})

#: (trigger, sources, destination, meaning). Order matters only for readability.
_TABLE: list[tuple[str, tuple[str, ...], str, str]] = [
    ("start", (STOPPED,), ACQUIRING, "start()"),
    ("acquired", (ACQUIRING,), HOLDING, "key taken, no lock-delay"),
    ("lock_delay", (ACQUIRING,), SETTLING, "key taken, Redis lost its state"),
    ("settled", (SETTLING,), HOLDING, "lock-delay over"),
    ("renew_failed", (HOLDING,), SUSPENDED, "Redis error on renewal"),
    ("renewed", (SUSPENDED,), HOLDING, "renewal confirmed"),
    ("lost", (SETTLING, HOLDING, SUSPENDED, DRAINING), ACQUIRING, "another token, or deadline"),
    ("give_up", (SETTLING, HOLDING, SUSPENDED), DRAINING, "stop() or workers failed"),
    ("released", (DRAINING,), ACQUIRING, "workers exited, lease released"),
    ("stop", (ACQUIRING, DRAINING), STOPPED, "stop() completed"),
]

TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": trigger, "source": list(sources), "dest": dest}
    for trigger, sources, dest, _meaning in _TABLE
]


def mermaid() -> str:
    """The state diagram as a Mermaid ``stateDiagram-v2`` block, generated from the table."""
    lines = ["stateDiagram-v2", f"    [*] --> {STOPPED}"]
    for trigger, sources, dest, meaning in _TABLE:
        for source in sources:
            lines.append(f"    {source} --> {dest}: {trigger} ({meaning})")
    lines.append(f"    {STOPPED} --> [*]")
    return "\n".join(lines)
