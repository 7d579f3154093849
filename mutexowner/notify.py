"""Hand-off notices: a standby learns within milliseconds that the holder released the lease.

The release script publishes on the lease's channel; each owner keeps one subscription in a
small thread and wakes its machine when a notice arrives, or when the subscription comes
back after an outage (a release may have been missed meanwhile). The owner's own timed
retries remain the fallback, so a lost notice only costs latency, never correctness.

``stop()`` never talks to Redis: it shuts the subscription's socket down, which wakes the
blocked read at once, so stopping is bounded by the caller's timeout even while Redis is
paused or unreachable.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any, Callable, Optional

import redis

from mutexowner.backoff import BackoffPolicy

__all__ = ["ReleaseListener"]

log = logging.getLogger("mutexowner.notify")

#: How often the subscription thread looks at its stop flag while no message arrives; stop()
#: wakes it sooner by shutting the subscription's socket down.
POLL_SECONDS = 1.0


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ReleaseListener:
    """Subscribes to a release channel and calls ``on_notice()`` for every notice."""

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        on_notice: Callable[[], None],
        *,
        name: str,
        backoff: BackoffPolicy,
        ignore_from: Optional[str] = None,
    ) -> None:
        self._client = client
        self._channel = channel
        self._on_notice = on_notice
        self._name = name
        self._backoff = backoff
        #: Notices published by this releaser (our own owner) wake nobody.
        self._ignore_from = ignore_from
        self._rng = random.Random()
        self._subscribed = False
        self._refused_logged = False
        #: The live subscription (set by the listener thread), so stop() can cut it.
        self._pubsub: Optional[Any] = None
        self._pubsub_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        #: Subscription failures so far (for status and tests).
        self.failures_seen = 0

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The subscription thread (None before start())."""
        return self._thread

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"mutexowner-notify-{self._name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop listening; True when the thread has ended within ``timeout``."""
        self._stopping.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return thread is None
        self._cut_subscription()
        thread.join(timeout)
        return not thread.is_alive()

    def _cut_subscription(self) -> None:
        """Wake a blocked read by shutting its socket down: no Redis round trip, no new
        connection, so a paused or unreachable Redis cannot make ``stop()`` wait."""
        with self._pubsub_lock:
            pubsub = self._pubsub
        connection = getattr(pubsub, "connection", None)
        # While (re)connecting, the pubsub has no connection yet: cut the pool's instead (a
        # cluster client has none: its subscription then stops at its next poll).
        target = connection or getattr(self._client, "connection_pool", None)
        try:
            if target is not None:
                target.disconnect()
        except Exception:  # the read fails or times out on its own; we only hurry it
            log.debug("could not cut the release subscription; it stops at its next poll")

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub(  # type: ignore[no-untyped-call]
                    ignore_subscribe_messages=True
                )
                with self._pubsub_lock:
                    self._pubsub = pubsub
                if self._stopping.is_set():
                    break
                pubsub.subscribe(self._channel)
                confirmed = False
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=POLL_SECONDS)
                    if not confirmed and pubsub.subscribed:
                        # The server confirmed SUBSCRIBE (a refusal, e.g. ACL, raised above):
                        # only now is the subscription a success.
                        confirmed = self._subscribed = True
                        if failures:
                            log.debug("release notices resumed on %s", self._channel)
                        # A release may have happened before we were subscribed, or while cut off.
                        self._notice()
                        failures = 0
                    if (
                        message is not None
                        and message.get("type") == "message"
                        and _text(message.get("data")) != self._ignore_from
                    ):
                        self._notice()
            except BaseException as exc:  # Redis down, or cut by stop(): resubscribe or end
                self._subscribed = False
                if self._stopping.is_set():
                    break
                failures += 1
                self.failures_seen += 1
                if isinstance(exc, redis.exceptions.NoPermissionError):
                    if not self._refused_logged:
                        self._refused_logged = True
                        log.warning(
                            "the ACL refuses SUBSCRIBE to %s (%s): standbys are not woken by "
                            "releases and wait for the holder's lease to run out instead; "
                            "grant the channels &%s* (see `mutexowner acl`)",
                            self._channel,
                            exc,
                            self._channel.rsplit(":", 1)[0] + ":",
                        )
                elif failures == 1:
                    log.debug("release notices interrupted on %s: %s", self._channel, exc)
                self._stopping.wait(self._backoff.delay(failures, self._rng))
            finally:
                with self._pubsub_lock:
                    self._pubsub = None
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        log.debug("closing the release subscription failed", exc_info=True)

    def _notice(self) -> None:
        try:
            self._on_notice()
        except BaseException:  # the listener thread must outlive any handler
            log.exception("release notice handler failed")
