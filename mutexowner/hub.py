"""One pub/sub connection and one thread for every release channel of a Redis client.

A standby learns within milliseconds that the holder released the lease: the release script
publishes on the lease's channel. ``ReleaseHub`` carries those notices for any number of
leases (channels) over ONE Redis connection read by ONE thread, instead of one connection
and one thread per owner (the ReleaseListener it replaced). Its semantics are the
listener's:

* a subscriber's callback runs once per notice on its channel, except for notices whose data
  equals its ``ignore_from`` (an owner is not woken by its own release);
* it also runs once as soon as the server confirmed the subscription, and once again after
  every reconnection (a release may have been missed while not subscribed);
* a broken connection is re-made with the owner's backoff policy, forever; the thread
  survives anything a callback raises (docs/safety.md, point 7);
* a channel the ACL refuses is reported once at WARNING and retried with backoff, without
  disturbing the other channels (each channel is its own ``SUBSCRIBE`` command, so a refusal
  names exactly one channel).

The owner's own timed retries remain the fallback, so a lost notice only costs latency,
never correctness.

How it waits (no polling): the hub thread blocks in a selector on the connection's socket and
on a wake-up socket pair. ``subscribe``/``unsubscribe``/``stop`` only record what they want
and write one byte to the pair; every byte on the Redis connection is written and read by
the hub thread alone (redis-py connections are not safe for concurrent use). When the
socket is readable the hub drains every complete reply redis-py can give
(``Connection.can_read(0)`` also sees bytes already buffered in redis-py's parser or in the
TLS layer, which a selector cannot see), then blocks again. Clients without a real socket
(fakeredis) are polled every `FAKE_POLL_SECONDS` instead.

Fork: a hub belongs to the process that created it. In a forked child ``subscribe`` raises
`ForkedOwnerError`, and ``unsubscribe``/``stop`` neither wake nor touch the parent's
connection (the socket and the wake-up pair are shared with the parent).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import redis
from redis.cluster import RedisCluster

from mutexowner.backoff import BackoffPolicy
from mutexowner.connection import describe_client, redact_text
from mutexowner.errors import ForkedOwnerError, MutexOwnerError

__all__ = ["FAKE_POLL_SECONDS", "ReleaseHub", "Subscription"]

log = logging.getLogger("mutexowner.hub")

#: How often the hub looks for messages and wake-ups on a client without a real socket
#: (fakeredis), where nothing can be waited on. Real connections are never polled.
FAKE_POLL_SECONDS = 0.02
#: Socket read bound for the rest of a partly received reply when the client itself sets no
#: ``socket_timeout`` (derived lease clients always set one).
DEFAULT_READ_TIMEOUT = 5.0
#: How long ``stop()`` lets the hub thread end by itself before it shuts the connection's
#: socket down to wake a send or read that is blocked on an unresponsive server.
CUT_AFTER_SECONDS = 0.05


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _same(reply: Any) -> Any:
    return reply


class Subscription:
    """One subscriber of a channel, returned by `ReleaseHub.subscribe`; pass it to
    `ReleaseHub.unsubscribe`. Its fields are read-only."""

    __slots__ = ("_active", "_callback", "_channel", "_ignore_from", "_needs_kick")

    def __init__(
        self, channel: str, callback: Callable[[], None], ignore_from: Optional[str]
    ) -> None:
        self._channel = channel
        self._callback = callback
        self._ignore_from = ignore_from
        self._active = True
        #: Call the callback once when the channel's subscription is (re)confirmed.
        self._needs_kick = True

    @property
    def channel(self) -> str:
        """The channel subscribed to."""
        return self._channel

    @property
    def ignore_from(self) -> Optional[str]:
        """Notices whose data equals this (our own releases) do not call the callback."""
        return self._ignore_from

    @property
    def active(self) -> bool:
        """False once unsubscribed (or the hub stopped): the callback is not called again."""
        return self._active

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"<Subscription {self._channel!r} {state}>"


class _Refusal:
    """A channel whose ``SUBSCRIBE`` the server refused (ACL): retried with backoff."""

    __slots__ = ("failures", "retry_at")

    def __init__(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


class ReleaseHub:
    """Release notices of any number of channels over one pub/sub connection and one thread.

    ``client`` is a redis-py client (``redis.Redis``, a Sentinel-managed client, a
    ``RedisCluster``, or fakeredis); the hub takes one connection of its pool for itself and
    keeps it until `stop`. Give it a client with bounded socket timeouts and no client-side
    retries (``connection.derive_lease_client``): a reconnection then fails fast and is
    retried with ``backoff``.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str,
        backoff: BackoffPolicy,
        rng: Optional[random.Random] = None,
    ) -> None:
        if not isinstance(backoff, BackoffPolicy):
            raise TypeError(f"backoff must be a BackoffPolicy, got {type(backoff).__name__}")
        self.name = name
        self._client = client
        self._backoff = backoff
        self._rng = rng if rng is not None else random.Random()
        self._where = describe_client(client)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # -- shared with callers (under _lock) --
        self._subs: dict[str, tuple[Subscription, ...]] = {}
        #: Channels whose wanted state may differ from what was sent on the connection.
        self._dirty: set[str] = set()
        #: Channels with a subscriber waiting for its first call after (re)subscribing.
        self._kicks: set[str] = set()
        self._stopping = False
        self._stop_event = threading.Event()
        self._woken = False
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        #: The live connection (set by the hub thread), so stop() can cut a blocked call.
        self._conn: Optional[Any] = None
        self._failures_seen = 0
        # -- the hub thread's own state (touched by no other thread) --
        self._sent: set[str] = set()  # SUBSCRIBE sent on this connection, not unsubscribed
        self._confirmed: set[str] = set()  # ... and confirmed by the server
        self._inflight: deque[tuple[bool, str]] = deque()  # (is SUBSCRIBE, channel) per reply
        self._pending: dict[str, int] = {}  # commands per channel still waiting for a reply
        self._refused: dict[str, _Refusal] = {}
        self._refusal_logged: set[str] = set()
        self._streak = 0
        self._attempts = 0
        self._confirmed_snapshot: frozenset[str] = frozenset()
        self._snapshot_stale = False

    # -- public API --------------------------------------------------------------------

    def subscribe(
        self, channel: str, callback: Callable[[], None], *, ignore_from: Optional[str] = None
    ) -> Subscription:
        """Call ``callback()`` (on the hub thread) for every release notice on ``channel``.

        It is also called once when the subscription is confirmed by the server and once
        after every reconnection. Notices whose data equals ``ignore_from`` are skipped. The
        callback must be quick (it delays every other channel's notices) and may call
        `subscribe`/`unsubscribe`; what it raises is logged and ignored. Thread-safe; starts
        the hub thread on first use. Raises `ForkedOwnerError` in a forked child and
        `MutexOwnerError` after `stop`.
        """
        if not isinstance(channel, str) or not channel:
            raise ValueError(f"channel must be a non-empty string, got {channel!r}")
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._check_fork()
        subscription = Subscription(channel, callback, ignore_from)
        with self._lock:
            if self._stopping:
                raise MutexOwnerError(f"release hub {self.name!r} was stopped")
            existing = self._subs.get(channel, ())
            self._subs[channel] = (*existing, subscription)
            self._kicks.add(channel)
            if not existing:
                self._dirty.add(channel)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"mutexowner-{self.name}-hub", daemon=True
                )
                self._thread.start()
            self._wake_locked()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop calling ``subscription``'s callback (at once, even for a notice being
        dispatched now); when it was the channel's last one, the hub sends ``UNSUBSCRIBE``.
        Idempotent; thread-safe; a no-op in a forked child."""
        if os.getpid() != self._pid:  # the lock may have been copied held: do not take it
            subscription._active = False
            return
        with self._lock:
            existing = self._subs.get(subscription.channel, ())
            if not subscription._active or subscription not in existing:
                return  # already gone (or another hub's)
            subscription._active = False
            remaining = tuple(s for s in existing if s is not subscription)
            if remaining:
                self._subs[subscription.channel] = remaining
                return
            del self._subs[subscription.channel]
            self._kicks.discard(subscription.channel)
            self._dirty.add(subscription.channel)
            if not self._stopping:
                self._wake_locked()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """End the hub: its thread exits, its connection is closed, every subscription
        becomes inactive. Returns True when the thread has ended (or never started) within
        ``timeout`` seconds (None: wait). Idempotent, thread-safe; called from a callback
        it only requests the stop and returns False. In a forked child it returns True and
        touches nothing the parent still uses.
        """
        if os.getpid() != self._pid:  # the parent's thread, socket and lock are not ours
            self._stopping = True
            return True
        with self._lock:
            first = not self._stopping
            self._stopping = True
            for subs in self._subs.values():
                for subscription in subs:
                    subscription._active = False
            thread = self._thread
            if first:
                self._stop_event.set()
                self._wake_locked()
        if thread is None:
            self._close_wake()
            return True
        if thread is threading.current_thread():
            return False
        thread.join(CUT_AFTER_SECONDS if timeout is None else min(timeout, CUT_AFTER_SECONDS))
        if thread.is_alive():
            self._cut()
            thread.join(None if timeout is None else max(0.0, timeout - CUT_AFTER_SECONDS))
        return not thread.is_alive()

    @property
    def subscribed_channels(self) -> frozenset[str]:
        """Channels the server has confirmed on the current connection (for status and
        tests); empty while disconnected."""
        return self._confirmed_snapshot

    @property
    def channels(self) -> frozenset[str]:
        """Channels that have at least one active subscription."""
        if os.getpid() != self._pid:
            return frozenset()
        with self._lock:
            return frozenset(self._subs)

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The hub's thread (None before the first subscription)."""
        return self._thread

    @property
    def alive(self) -> bool:
        """True while the hub thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive() and os.getpid() == self._pid

    @property
    def failures_seen(self) -> int:
        """Connection failures so far (for status and tests)."""
        return self._failures_seen

    def __repr__(self) -> str:
        return f"<ReleaseHub {self.name!r} {self._where} channels={len(self._subs)}>"

    # -- callers' side helpers ---------------------------------------------------------

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedOwnerError(
                f"release hub {self.name!r} was created in process {self._pid}; this forked "
                f"child ({os.getpid()}) must create its own"
            )

    def _wake_locked(self) -> None:
        """Wake the hub thread (once until it looks); caller holds ``_lock``."""
        if self._woken:
            return
        self._woken = True
        with contextlib.suppress(OSError):  # full (so it is awake) or closed (it has ended)
            self._wake_w.send(b"\0")

    def _cut(self) -> None:
        """Shut the live connection's socket down: a send or read blocked on a server that
        does not answer fails at once. No Redis command, no new connection; ``shutdown``
        (not ``close``) so the hub thread still owns and closes the descriptor."""
        conn = self._conn
        sock = getattr(conn, "_sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _close_wake(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    # -- the hub thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop_event.is_set():
                conn = pool = None
                error: Optional[BaseException] = None
                try:
                    pool = self._next_pool()
                    conn = pool.get_connection()
                    self._conn = conn
                    self._session(conn)
                except BaseException as exc:  # Redis down, cut, or a bug: reconnect, never die
                    error = exc
                finally:
                    self._end_session(conn, pool)
                if error is None or self._stop_event.is_set():
                    continue
                self._streak += 1
                self._failures_seen += 1
                if self._streak == 1:
                    log.debug(
                        "release notices interrupted on %s (%d channels): %s",
                        self._where,
                        len(self._subs),
                        redact_text(f"{type(error).__name__}: {error}"),
                    )
                del error
                self._stop_event.wait(self._backoff.delay(self._streak, self._rng))
        finally:
            with self._lock:
                self._woken = True  # nobody writes to the wake pair any more
                self._close_wake()

    def _next_pool(self) -> Any:
        """The pool to take the connection from; a cluster's nodes are tried in turn (classic
        PUBLISH reaches every node's subscribers)."""
        cluster: object = self._client
        if isinstance(cluster, RedisCluster):
            nodes = [
                node
                for node in cluster.get_nodes()  # type: ignore[no-untyped-call]
                if node.redis_connection is not None
            ]
            if not nodes:
                raise redis.exceptions.ConnectionError("no cluster node to subscribe on")
            node = nodes[self._attempts % len(nodes)]
            self._attempts += 1
            return node.redis_connection.connection_pool
        return self._client.connection_pool

    def _end_session(self, conn: Optional[Any], pool: Optional[Any]) -> None:
        self._conn = None
        self._sent.clear()
        self._confirmed.clear()
        self._inflight.clear()
        self._pending.clear()
        self._confirmed_snapshot = frozenset()
        if conn is None or pool is None:
            return
        try:
            conn.disconnect()
        except Exception:
            log.debug("closing the release connection failed", exc_info=True)
        try:
            pool.release(conn)
        except Exception:
            log.debug("returning the release connection failed", exc_info=True)

    def _session(self, conn: Any) -> None:
        """Subscribe every wanted channel on ``conn``, then dispatch until stopped; raises
        when the connection fails."""
        with self._lock:
            self._dirty.update(self._subs)
            self._kicks.update(self._subs)
            for subs in self._subs.values():
                for subscription in subs:
                    subscription._needs_kick = True
        for refusal in self._refused.values():
            refusal.retry_at = 0.0  # a new connection may be allowed: ask again now
        parser: Any = getattr(conn, "_parser", None)
        if hasattr(parser, "set_pubsub_push_handler"):  # RESP3: hand pushes back, unlogged
            parser.set_pubsub_push_handler(_same)
        sock = getattr(conn, "_sock", None)
        real = isinstance(sock, socket.socket)
        read_timeout: Optional[float] = None
        if getattr(conn, "socket_timeout", None) is None:
            read_timeout = DEFAULT_READ_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            if isinstance(sock, socket.socket):
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop_event.is_set():
                if conn._sock is not sock:  # redis-py re-made it: it has no subscriptions
                    raise redis.exceptions.ConnectionError("the release connection was reset")
                self._drain_wake()
                self._sync(conn)
                self._drain(conn, read_timeout)
                if self._snapshot_stale:
                    self._snapshot_stale = False
                    self._confirmed_snapshot = frozenset(self._confirmed)
                self._kick_confirmed()
                if self._stop_event.is_set():
                    return
                timeout = self._retry_in()
                if real:
                    with self._lock:
                        if self._woken:  # something changed while we worked
                            continue
                    selector.select(timeout)
                else:
                    # fakeredis: no socket to wait on, so look again shortly (tests only).
                    poll = FAKE_POLL_SECONDS if timeout is None else min(timeout, FAKE_POLL_SECONDS)
                    conn.can_read(timeout=poll)

    def _drain_wake(self) -> None:
        with self._lock:
            self._woken = False
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _retry_in(self) -> Optional[float]:
        due = [r.retry_at for r in self._refused.values() if r.retry_at < math.inf]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _sync(self, conn: Any) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE for every channel whose wanted state changed, one
        command per channel (so an error reply names exactly one channel), pipelined."""
        now = time.monotonic()
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            dirty.update(c for c, r in self._refused.items() if r.retry_at <= now)
            wanted = {c for c in dirty if c in self._subs}
        commands: list[tuple[str, str]] = []
        for channel in dirty:
            if channel in wanted:
                if channel in self._sent:
                    continue
                waiting = self._refused.get(channel)
                if waiting is not None:
                    if waiting.retry_at > now:
                        continue  # asked again when its backoff ends (see _retry_in)
                    waiting.retry_at = math.inf  # until its reply comes
                commands.append(("SUBSCRIBE", channel))
                self._sent.add(channel)
            else:
                self._refused.pop(channel, None)
                if channel not in self._sent:
                    continue
                commands.append(("UNSUBSCRIBE", channel))
                self._sent.discard(channel)
                self._confirmed.discard(channel)  # no longer live, whatever the reply says
                self._snapshot_stale = True
            self._inflight.append((commands[-1][0] == "SUBSCRIBE", channel))
            self._pending[channel] = self._pending.get(channel, 0) + 1
        if commands:
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    def _drain(self, conn: Any, read_timeout: Optional[float]) -> None:
        """Handle every reply that can be read without waiting for the server."""
        while conn.can_read(timeout=0):
            try:
                if read_timeout is None:
                    reply = conn.read_response(disconnect_on_error=False, push_request=True)
                else:
                    reply = conn.read_response(
                        disconnect_on_error=False, push_request=True, timeout=read_timeout
                    )
            except redis.exceptions.ResponseError as exc:  # a refused (UN)SUBSCRIBE
                self._refusal(exc)
                continue
            self._handle(reply)
            if self._stop_event.is_set():
                return

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, (list, tuple)) or len(reply) < 3:
            return  # not a pub/sub reply (e.g. a RESP3 push of another kind)
        kind = _text(reply[0]).lower()
        channel = _text(reply[1])
        if kind == "message":
            self._dispatch(channel, _text(reply[2]))
        elif kind in ("subscribe", "unsubscribe"):
            last = self._answered(kind == "subscribe", channel)
            if kind == "subscribe" and last and channel in self._sent:
                # Live now (and no UNSUBSCRIBE/SUBSCRIBE of it still on its way).
                self._confirmed.add(channel)
                self._snapshot_stale = True
                self._refused.pop(channel, None)
                if self._streak:
                    log.debug("release notices resumed on %s", self._where)
                self._streak = 0

    def _answered(self, subscribe: bool, channel: str) -> bool:
        """Account for the reply to the oldest command in flight; True when it was the last
        one in flight for ``channel``. A reply out of step means the connection cannot be
        trusted: raise, so that a new one is made (and every subscriber called once)."""
        if not self._inflight or self._inflight[0] != (subscribe, channel):
            raise redis.exceptions.PubSubError(
                f"unexpected {'subscribe' if subscribe else 'unsubscribe'} reply for "
                f"{channel!r}; reconnecting"
            )
        self._inflight.popleft()
        left = self._pending.get(channel, 1) - 1
        if left:
            self._pending[channel] = left
        else:
            self._pending.pop(channel, None)
        return not left

    def _refusal(self, exc: redis.exceptions.ResponseError) -> None:
        """An error reply: it answers the oldest command still waiting for its reply."""
        if not self._inflight:
            raise exc  # nothing asked: the connection is out of step, make a new one
        subscribe, channel = self._inflight[0]
        self._answered(subscribe, channel)
        if not subscribe:
            return  # an UNSUBSCRIBE cannot be refused in practice; nothing to undo
        self._sent.discard(channel)
        refusal = self._refused.setdefault(channel, _Refusal())
        refusal.failures += 1
        refusal.retry_at = time.monotonic() + self._backoff.delay(refusal.failures, self._rng)
        if channel not in self._refusal_logged:
            self._refusal_logged.add(channel)
            log.warning(
                "the ACL refuses SUBSCRIBE to %s (%s): standbys are not woken by "
                "releases and wait for the holder's lease to run out instead; "
                "grant the channels &%s* (see `mutexowner acl`)",
                channel,
                redact_text(str(exc)),
                channel.rsplit(":", 1)[0] + ":",
            )

    def _kick_confirmed(self) -> None:
        """Call, once, each subscriber whose channel is now confirmed and that has not been
        called since it subscribed or since the connection was re-made."""
        calls: list[Subscription] = []
        with self._lock:
            if not self._kicks:
                return
            for channel in [c for c in self._kicks if c in self._confirmed]:
                self._kicks.discard(channel)
                for subscription in self._subs.get(channel, ()):
                    if subscription._needs_kick:
                        subscription._needs_kick = False
                        calls.append(subscription)
        for subscription in calls:
            if subscription._active:
                self._call(subscription)

    def _dispatch(self, channel: str, data: str) -> None:
        with self._lock:
            subs = self._subs.get(channel, ())
        for subscription in subs:
            if subscription._active and data != subscription._ignore_from:
                self._call(subscription)

    def _call(self, subscription: Subscription) -> None:
        try:
            subscription._callback()
        except BaseException:  # the hub thread must outlive any callback
            log.exception("release notice callback for %s failed", subscription.channel)
