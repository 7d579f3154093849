"""One lease engine per Redis client: a scheduler thread drives every lease of the process.

Every ``MutexOwner`` built on the same Redis client (or URL) and clock shares one engine:
one scheduler thread that runs each lease's turn when it is due (a heap of due times; the
round trips of leases due together go out as one pipelined batch), one release hub (one
pub/sub connection and thread for every lease's channel) and one events thread. The engine
is created on demand and its threads end when its last lease stops; a forked child starts
with no engines (its inherited owners are dead there).

Step-down never depends on this thread: the supervisor's monitor stops workers at the
deadline on its own, and ``holding`` is computed from the clock (docs/safety.md, point 3).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any, Optional, TypeVar, Union

from mutexowner import machine as m
from mutexowner.backoff import BackoffPolicy
from mutexowner.clock import SAFETY_WAIT_CAP, Clock, wait_on
from mutexowner.connection import client_from, derive_lease_client
from mutexowner.core import Call, Release
from mutexowner.errors import LeaseError
from mutexowner.events import EventThread
from mutexowner.hub import ReleaseHub, Subscription
from mutexowner.lease import Lease, call_many, release_many
from mutexowner.slot import CallOutcome, LeaseSlot

__all__ = ["Engine", "engine_for"]

log = logging.getLogger("mutexowner.engine")

#: Socket timeout of the release hub's pub/sub connection (connect and subscribe replies).
HUB_TIMEOUT = 1.0
#: Leases due within this many seconds of one that is due now take their turn with it, so
#: that their renewals share a pipeline (renewing up to this much early is harmless).
BATCH_WINDOW = 0.05
#: At most this many round trips in one pipeline (each chunk timed on its own).
BATCH_MAX = 256
#: stop_threads re-checks at least this often (seconds) whether a lease started meanwhile.
STOP_POLL = 0.05
#: After an unexpected error in a lease's turn, try that lease again this much later.
ERROR_RETRY = 1.0

_REGISTRY_LOCK = threading.Lock()
_NUMBERS = itertools.count(1)
_ENGINES: dict[tuple[object, ...], Engine] = {}


def _registry_key(redis: Any, clock: Clock) -> tuple[object, ...]:
    source: object = ("url", redis) if isinstance(redis, str) else ("client", id(redis))
    return (source, id(clock))


def engine_for(redis: Any, clock: Clock) -> Engine:
    """The engine for this Redis client (or URL) and clock, created on first use."""
    key = _registry_key(redis, clock)
    with _REGISTRY_LOCK:
        engine = _ENGINES.get(key)
        if engine is None or engine.pid != os.getpid():
            engine = Engine(client_from(redis), clock, source=redis)
            _ENGINES[key] = engine
        return engine


def _forget_engines_after_fork() -> None:
    # The child has none of the parent's threads: its engines are dead, and its owners are
    # marked forked by owner.py. A new owner in the child gets a new engine.
    _ENGINES.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_engines_after_fork)


_T = TypeVar("_T")


def _chunks(groups: Iterable[list[_T]]) -> list[list[_T]]:
    """Each group (the calls on one client) cut into pipelines of at most BATCH_MAX."""
    return [g[i : i + BATCH_MAX] for g in groups for i in range(0, len(g), BATCH_MAX)]


class Engine:
    """The scheduler, release hub and events thread shared by the leases of one client."""

    def __init__(self, base_client: Any, clock: Clock, *, source: object = None) -> None:
        self.base_client = base_client
        self.clock = clock
        self.pid = os.getpid()
        # Keeps the user's client object alive while the engine exists, so that its id,
        # which keys the registry, cannot be reused by another client.
        self._source = source
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, LeaseSlot]] = []
        self._due_at: dict[LeaseSlot, float] = {}
        self._slots: set[LeaseSlot] = set()
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._lease_clients: dict[float, Any] = {}
        #: Names this engine's threads: mutexowner-engine-<n>, mutexowner-events-<n>.
        self.number = next(_NUMBERS)
        self.events = EventThread(f"mutexowner-events-{self.number}")
        self._hub: Optional[ReleaseHub] = None
        #: The scheduler thread that is ending (stop_threads joins it).
        self._last_thread: Optional[threading.Thread] = None

    # -- leases --------------------------------------------------------------------------------

    def lease_client(self, call_timeout: float) -> Any:
        """The client lease calls use: one per call timeout, shared by the engine's leases."""
        with self._lock:
            client = self._lease_clients.get(call_timeout)
            if client is None:
                client = derive_lease_client(self.base_client, timeout=call_timeout)
                self._lease_clients[call_timeout] = client
            return client

    def add(self, slot: LeaseSlot, *, channel: str, backoff: BackoffPolicy) -> Subscription:
        """Begin ``slot`` and drive it from now on (its first turn is due now): its events go
        to the engine's events thread, and release notices on ``channel`` not sent by its
        own identity to ``slot.notify_released``. Returns the subscription (for removal)."""
        slot.on_wake = self.wake
        slot.threaded = True
        with self._cond:
            self._slots.add(slot)
            self.events.start()
            slot.events.start(self.events)
            slot.begin()
            self._schedule_locked(slot, -math.inf)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mutexowner-engine-{self.number}", daemon=True
                )
                self._thread.start()
            # Our own release must not cut our own backoff: ignore notices from ourselves.
            return self._subscribe_locked(channel, slot, slot.core.identity, backoff)

    def _subscribe_locked(
        self, channel: str, slot: LeaseSlot, identity: str, backoff: BackoffPolicy
    ) -> Subscription:
        hub = self._hub
        if hub is None:
            client = derive_lease_client(self.base_client, timeout=HUB_TIMEOUT)
            hub = ReleaseHub(client, name=f"engine-{self.number}", backoff=backoff)
            self._hub = hub
        return hub.subscribe(channel, lambda: self._on_notice(slot), ignore_from=identity)

    def _on_notice(self, slot: LeaseSlot) -> None:
        """A release notice for ``slot`` (on the hub thread). A standby takes its look right
        here, without a hand-over to the scheduler thread: that is the hand-off's latency."""
        with slot.lock:
            core = slot.core
            core.notice_release()
            # A standby waiting on the holder's ttl looks now, here. One due anyway (just
            # started, or retrying) is left to the scheduler, which batches the looks.
            waiting = core.next_attempt_at is not None and core.next_attempt_at > self.clock()
            standby = core.state == m.ACQUIRING and waiting and not core.errors
        if standby and slot in self._slots:
            self.run_inline(slot)
        else:
            slot.wake()

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._cond:
            hub = self._hub
        if hub is not None:
            hub.unsubscribe(subscription)

    def remove(self, slot: LeaseSlot) -> None:
        """Stop driving ``slot`` (it has finished); the threads end with the last slot."""
        with self._cond:
            self._slots.discard(slot)
            self._due_at.pop(slot, None)
            self._cond.notify_all()

    def wake(self, slot: LeaseSlot) -> None:
        """Run ``slot``'s turn as soon as possible."""
        with self._cond:
            if slot in self._slots:
                self._schedule_locked(slot, -math.inf)

    def run_inline(self, slot: LeaseSlot) -> bool:
        """Run ``slot``'s turn on the calling thread if no other turn of it is running (the
        fast path of ``stop()``: no thread wake-up); False if one was."""
        if not slot.turn_lock.acquire(blocking=False):
            self.wake(slot)
            return False
        try:
            wait = self._turn_locked(slot)
        finally:
            slot.turn_lock.release()
        self._reschedule(slot, wait)
        return True

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """The engine's threads: scheduler, events, release hub (those running now)."""
        hub = self._hub
        threads = [self._thread, self.events.thread, hub.thread if hub is not None else None]
        return tuple(t for t in threads if t is not None and t.is_alive())

    def stop_threads(self, timeout: Optional[float]) -> bool:
        """Wait for the threads to end once no lease is left; True when they have, or when
        the engine serves other leases (then they are not ours to wait for: a lease started
        meanwhile keeps them, and waiting would take the whole timeout)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if self._slots:
                    return True
                thread = self._thread or self._last_thread
            if thread is None or not thread.is_alive():
                return True
            if thread is threading.current_thread():
                return False
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            thread.join(STOP_POLL if left is None else min(STOP_POLL, left))

    # -- scheduling ----------------------------------------------------------------------------

    def _schedule_locked(self, slot: LeaseSlot, at: float) -> None:
        current = self._due_at.get(slot)
        if current is not None and current <= at:
            return  # already due at least as soon
        self._due_at[slot] = at
        heapq.heappush(self._heap, (at, next(self._seq), slot))
        self._cond.notify_all()

    def _reschedule(self, slot: LeaseSlot, wait: Optional[float]) -> None:
        if slot.finished:
            self.remove(slot)
            slot.finished_hook()
            return
        with self._cond:
            # A wake that came during the turn is still scheduled: keep the earlier time.
            if slot in self._slots and wait is not None:
                self._schedule_locked(slot, self.clock() + wait)

    def _take_due_locked(self, now: float) -> list[LeaseSlot]:
        """Every lease due now, and, when one is, those due within BATCH_WINDOW: their
        round trips share one pipeline (a call sent early only makes its deadline earlier)."""
        if not self._heap or self._heap[0][0] > now:
            return []
        due: list[LeaseSlot] = []
        horizon = now + BATCH_WINDOW
        while self._heap and self._heap[0][0] <= horizon:
            at, _, slot = heapq.heappop(self._heap)
            if self._due_at.get(slot) == at:
                del self._due_at[slot]
                due.append(slot)
        return due

    def _guarding_locked(self) -> bool:
        """A lease or a worker is live (waits are then capped: see SAFETY_WAIT_CAP). Stops at
        the first live one: with many leases held, the first look answers."""
        return any(s.core.state in m.LEASE_STATES or s.core.workers_alive() for s in self._slots)

    # -- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._slots:
                    # The last lease stopped: end; a lease added later starts new threads.
                    self._thread = None
                    self._last_thread = threading.current_thread()
                    self._heap.clear()
                    self._due_at.clear()
                    events = self.events
                    self.events = EventThread(f"mutexowner-events-{self.number}")
                    hub, self._hub = self._hub, None
                    break
                due = self._take_due_locked(self.clock())
                if not due:
                    self._wait_locked()
                    continue
            try:
                self._run_turns(due)
            except BaseException as exc:  # never die: every lease would stop renewing
                self._turns_failed(due, exc)
        if hub is not None:
            hub.stop(timeout=None)
        events.stop(timeout=None)

    def _wait_locked(self) -> None:
        now = self.clock()
        timeout = self._heap[0][0] - now if self._heap else None
        # Under a lease, re-read the clock often: see SAFETY_WAIT_CAP.
        cap = SAFETY_WAIT_CAP if self._guarding_locked() else None
        try:
            wait_on(self.clock, self._cond, timeout, cap=cap)
        except BaseException:  # never die, never spin
            self._cond.wait(SAFETY_WAIT_CAP)

    def _run_turns(self, due: list[LeaseSlot]) -> None:
        """One turn of every due lease; their acquire/renew round trips go out together."""
        taken: list[LeaseSlot] = []
        for slot in due:
            if slot.turn_lock.acquire(blocking=False):
                taken.append(slot)
            # else: a turn of it runs on another thread (stop), which reschedules it.
        planned: list[tuple[LeaseSlot, Union[Call, Release, None]]] = []
        waits: dict[LeaseSlot, Optional[float]] = {}
        try:
            for slot in taken:
                try:
                    planned.append((slot, slot.prepare(BATCH_WINDOW)))
                except BaseException as exc:
                    waits[slot] = self._turn_failed(slot, exc)
            self._execute(planned, waits)
            for slot, _ in planned:
                if slot not in waits:
                    waits[slot] = self._finish(slot)
        finally:
            for slot in taken:
                slot.turn_lock.release()
        for slot in taken:
            self._reschedule(slot, waits.get(slot, ERROR_RETRY))

    def _execute(
        self,
        planned: list[tuple[LeaseSlot, Union[Call, Release, None]]],
        waits: dict[LeaseSlot, Optional[float]],
    ) -> None:
        calls = [(slot, plan) for slot, plan in planned if isinstance(plan, Call)]
        outcomes: dict[LeaseSlot, Union[CallOutcome, bool]] = {}
        outcomes.update(self._call_all(calls) if calls else {})
        outcomes.update(self._release_all(planned))
        for slot, plan in planned:
            if plan is None:
                continue
            try:
                outcome = outcomes[slot] if slot in outcomes else slot.execute(plan)
                slot.complete(plan, outcome)
            except BaseException as exc:
                waits[slot] = self._turn_failed(slot, exc)

    def _call_all(self, calls: list[tuple[LeaseSlot, Call]]) -> dict[LeaseSlot, CallOutcome]:
        """Acquire/renew round trips: one pipelined batch per lease client where possible."""
        if len(calls) == 1:
            slot, plan = calls[0]
            single = slot.execute(plan)
            assert isinstance(single, CallOutcome)
            return {slot: single}
        by_client: dict[int, list[tuple[LeaseSlot, Call]]] = {}
        for slot, plan in calls:
            by_client.setdefault(id(slot.lease.client), []).append((slot, plan))
        outcomes: dict[LeaseSlot, CallOutcome] = {}
        chunks = _chunks(by_client.values())
        for group in chunks:
            # Each chunk's send time is read just before it goes: a reply is judged against
            # the time its own request left, not the start of a long batch (with 10,000
            # leases due together, one batch outlived a short ttl and no lease ever held).
            sent = self.clock()
            leases: list[tuple[Lease, str, Optional[int]]] = [
                (slot.lease, plan.token, plan.fencing_token) for slot, plan in group
            ]
            replies = call_many(leases)
            received = self.clock()
            for (slot, _), reply in zip(group, replies):
                outcomes[slot] = CallOutcome(reply, sent, received)
        return outcomes

    @staticmethod
    def _release_all(
        planned: list[tuple[LeaseSlot, Union[Call, Release, None]]],
    ) -> dict[LeaseSlot, Union[CallOutcome, bool]]:
        """Single-token releases of leases on one client, in one round trip (a stop of many
        leases). Others are left to ``slot.execute``: several tokens stop at the first error."""
        by_client: dict[int, list[tuple[LeaseSlot, str]]] = {}
        for slot, plan in planned:
            if (
                isinstance(plan, Release)
                and len(plan.tokens) == 1
                and slot.lease._batchable_release()
            ):
                by_client.setdefault(id(slot.lease.client), []).append((slot, plan.tokens[0]))
        outcomes: dict[LeaseSlot, Union[CallOutcome, bool]] = {}
        chunks = _chunks(by_client.values())
        for group in chunks:
            if len(group) < 2:
                continue
            results = release_many([(slot.lease, token) for slot, token in group])
            for (slot, _), result in zip(group, results):
                if isinstance(result, LeaseError):
                    slot.log_release_error(result)
                    outcomes[slot] = False
                else:
                    outcomes[slot] = result
        return outcomes

    def _finish(self, slot: LeaseSlot) -> Optional[float]:
        try:
            return slot.finish_turn()
        except BaseException as exc:
            return self._turn_failed(slot, exc)

    def _turn_locked(self, slot: LeaseSlot) -> Optional[float]:
        """One whole turn of ``slot`` on this thread (its turn lock held)."""
        try:
            plan = slot.prepare()
            if plan is not None:
                slot.complete(plan, slot.execute(plan))
            return slot.finish_turn()
        except BaseException as exc:
            return self._turn_failed(slot, exc)

    def _turns_failed(self, due: list[LeaseSlot], exc: BaseException) -> None:
        """A batch failed outside any one lease's turn (a bug in the batch I/O): each of its
        leases is tried again a little later, on its own turn."""
        for slot in due:
            with contextlib.suppress(BaseException):
                self._reschedule(slot, self._turn_failed(slot, exc))

    @staticmethod
    def _turn_failed(slot: LeaseSlot, exc: BaseException) -> float:
        """A turn raised (a bug, or user code's BaseException): log it, carry on."""
        with contextlib.suppress(BaseException):
            slot.log.add(
                logging.CRITICAL,
                "owner machine error for key=%s; continuing",
                slot.core.key,
                exc=exc,
            )
            slot.log.flush()
        return min(slot.core.timing.renew_interval, ERROR_RETRY)
