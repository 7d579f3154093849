"""Events the owner reports (state changes, lease events) and their in-order delivery.

User code (``on_acquired``, ``on_lost``, listeners) never runs on the owner thread: a slow
or failing listener must not delay a renewal. Events are queued and delivered in order by
one dispatcher thread; listener exceptions are logged and swallowed.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Literal, Optional

__all__ = ["Event", "EventDispatcher", "EventKind", "EventThread", "Listener"]

log = logging.getLogger("mutexowner.events")

#: Event kinds, in the order they typically occur.
EventKind = Literal[
    "state",  # every state change: previous_state -> state
    "acquired",  # holding began (fencing_token set)
    "renewed",  # a renewal was confirmed (latency: its round trip)
    "suspended",  # a renewal failed with a transient error while holding
    "lost",  # holding ended; reason: taken | expired | stopped | workers_failed
    "error",  # a Redis call failed; error and error_kind set
    "workers_restarted",  # the supervisor restarted all workers (one_for_all)
    "workers_stuck",  # a worker ignored stopping past shutdown_timeout
    "stuck_policy",  # the lease was lost while a worker still ran: stuck_worker_policy applied
    "released",  # the lease was released in Redis
]


@dataclass(frozen=True)
class Event:
    """One thing that happened to an owner, delivered to listeners in order."""

    kind: EventKind
    key: str
    identity: str
    state: str
    time: float
    previous_state: Optional[str] = None
    fencing_token: Optional[int] = None
    reason: Optional[str] = None
    error: Optional[str] = None
    error_kind: Optional[str] = None
    detail: Optional[str] = None
    #: "renewed": the renewal's round trip in seconds (owner's clock), for latency metrics.
    latency: Optional[float] = None


Listener = Callable[[Event], object]

_STOP = object()


class EventThread:
    """One thread that runs tasks in order: the events and log lines of every lease of an
    engine. A task that raises (even SystemExit) is logged and the thread carries on."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._stopping = False
        #: Tasks submitted and not yet finished (drain returns at once when there are none).
        self._queued = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def submit(self, task: Callable[[], object]) -> None:
        """Run ``task`` on the thread, after everything submitted before it."""
        with self._lock:
            self._queued += 1
        self._queue.put(task)

    def drain(self, timeout: Optional[float]) -> bool:
        """Wait until everything submitted so far has run; False on timeout (or when called
        from the thread itself, which cannot wait for itself)."""
        if self.on_its_thread():
            return False
        with self._lock:
            stopping = self._stopping
            if not stopping and self._queued == 0:
                return True  # nothing submitted is waiting or running
            if not stopping:
                done = threading.Event()
                self._queued += 1
                self._queue.put(done.set)
        if stopping:  # everything before the stop runs before the thread ends
            thread = self._thread
            if thread is not None:
                thread.join(timeout)
            return thread is None or not thread.is_alive()
        return done.wait(timeout)

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Run what is queued, then end the thread. True if it ended within ``timeout``."""
        thread = self._thread
        if thread is None:
            return True
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._queue.put(_STOP)
        if thread is threading.current_thread():
            return False
        thread.join(timeout)
        return not thread.is_alive()

    def on_its_thread(self) -> bool:
        thread = self._thread
        return thread is not None and thread is threading.current_thread()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if callable(item):
                    item()
            except BaseException:  # the thread must outlive anything it runs
                log.debug("event task failed on %s", self._name, exc_info=True)
            finally:
                with self._lock:
                    self._queued -= 1


class EventDispatcher:
    """Delivers events to listeners, in order: on an ``EventThread`` (the engine's, shared,
    or one of its own), or inline when not started."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._runner: Optional[EventThread] = None
        self._owns_runner = False

    def add(self, listener: Listener) -> None:
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        with self._lock:
            self._listeners.append(listener)

    @property
    def has_listeners(self) -> bool:
        return bool(self._listeners)

    def remove(self, listener: Listener) -> None:
        """Remove a listener; ValueError if it was never added."""
        with self._lock:
            try:
                self._listeners.remove(listener)
            except ValueError:
                raise ValueError("listener was not added") from None

    def start(self, shared: Optional[EventThread] = None) -> None:
        """Deliver on a background thread from now on: ``shared`` if given, else its own."""
        if self._runner is not None:
            return
        if shared is None:
            shared = EventThread(f"mutexowner-events-{self._name}")
            shared.start()
            self._owns_runner = True
        self._runner = shared

    @property
    def _thread(self) -> Optional[threading.Thread]:
        """The thread of its own, when it has one."""
        return self._runner.thread if self._owns_runner and self._runner is not None else None

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Deliver what is queued; on a thread of its own, then end it. True if that was
        done within ``timeout``."""
        runner = self._runner
        if runner is None:
            return True
        return runner.stop(timeout) if self._owns_runner else runner.drain(timeout)

    def on_its_thread(self) -> bool:
        """True when called from the thread that delivers (a listener, a callback)."""
        return self._runner is not None and self._runner.on_its_thread()

    def emit(self, event: Event) -> None:
        """Queue an event (delivered inline when no thread was started)."""
        self.submit(lambda: self.deliver(event))

    def submit(self, task: Callable[[], object]) -> None:
        """Run ``task`` on the delivering thread, in order with the events (inline when no
        thread was started). Log lines are handed over this way: a log handler that blocks
        then stalls only event delivery, never a lease's turn."""
        if self._runner is not None:
            self._runner.submit(task)
        else:
            self._run_task(task)

    @staticmethod
    def _run_task(task: Callable[[], object]) -> None:
        try:
            task()
        except BaseException:
            log.debug("deferred task failed", exc_info=True)

    def deliver(self, event: Event) -> None:
        """Call every listener with ``event`` now, on this thread (exceptions logged)."""
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except BaseException:  # even SystemExit: the dispatcher thread must live on
                log.exception(
                    "listener %r failed on %s event for key=%s; ignored",
                    listener,
                    event.kind,
                    event.key,
                )
