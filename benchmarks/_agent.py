"""One contender (mutexowner or a peer lock) in its own process, driven by JSON lines.

Started by ``_common.Agent`` as ``python _agent.py '<json config>'``. It reads commands on
stdin (``acquire``, ``release``, ``status``, ``rusage``, ``exit``) and writes events on
stdout, each a JSON object with ``ev`` and ``t`` (``time.monotonic()``, comparable across
processes on Linux). Config keys: ``kind``, ``port``, ``name``, ``role``, ``client_name``,
``lease`` (lease length in seconds, or null for the library's default), ``renew_every``
(seconds between manual renewals for peers that have no renewal of their own, or null),
``shutdown_timeout`` (mutexowner's supervisor), ``supervisor`` (mutexowner: false runs the
owner without a supervisor; default true, one worker).

The peers are used through their documented public APIs with their default waiting
behaviour; the only non-defaults are stated in ``make_peer``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from typing import Any, Callable, Optional

import redis

CONFIG: dict[str, Any] = json.loads(sys.argv[1])
_OUT = threading.Lock()


def now() -> float:
    return time.monotonic()


def emit(ev: str, **fields: Any) -> None:
    fields.setdefault("t", now())
    line = json.dumps({"ev": ev, **fields}, default=str)
    with _OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _excepthook(args: threading.ExceptHookArgs) -> None:
    """A background thread died: report it (python-redis-lock's renewal thread does this)."""
    emit(
        "thread_died",
        thread=args.thread.name if args.thread is not None else "?",
        error=f"{getattr(args.exc_type, '__name__', args.exc_type)}: {args.exc_value}",
    )
    if args.exc_value is not None:
        logging.getLogger("agent").error("thread %s died", args.thread, exc_info=args.exc_value)


# -- peers ---------------------------------------------------------------------------------


class Peer:
    """A peer lock library behind one interface: blocking acquire, release, manual renew."""

    key: str = ""

    def new_lock(self) -> Any:
        raise NotImplementedError

    def acquire(self, lock: Any) -> None:
        raise NotImplementedError

    def release(self, lock: Any) -> None:
        lock.release()

    def renew(self, lock: Any) -> bool:
        """One manual renewal; False or an exception when the lock is no longer ours."""
        raise NotImplementedError

    def renews_itself(self) -> bool:
        return False


class RedisPyPeer(Peer):
    """redis-py ``Lock``: SET NX PX, blocking acquire polls every ``sleep`` (default 0.1 s)."""

    def __init__(self, client: redis.Redis, name: str, lease: Optional[float]) -> None:
        self.client, self.name, self.lease = client, name, lease
        self.key = name

    def new_lock(self) -> Any:
        # thread_local=False: the token must be visible to the renewal and release threads.
        return self.client.lock(self.name, timeout=self.lease, thread_local=False)

    def acquire(self, lock: Any) -> None:
        if not lock.acquire(blocking=True):
            raise RuntimeError("acquire returned False")

    def renew(self, lock: Any) -> bool:
        return bool(lock.reacquire())


class RedisLockPeer(Peer):
    """python-redis-lock: SET NX, waiters block in BLPOP on a signal list; auto_renewal thread."""

    def __init__(self, client: redis.Redis, name: str, lease: Optional[float]) -> None:
        import redis_lock

        self.mod = redis_lock
        self.client, self.name = client, name
        self.expire = int(lease) if lease else None
        self.key = f"lock:{name}"

    def new_lock(self) -> Any:
        return self.mod.Lock(
            self.client, self.name, expire=self.expire, auto_renewal=self.expire is not None
        )

    def acquire(self, lock: Any) -> None:
        if not lock.acquire(blocking=True):
            raise RuntimeError("acquire returned False")

    def renews_itself(self) -> bool:
        return True

    def renew(self, lock: Any) -> bool:
        return True


class PotteryPeer(Peer):
    """pottery ``Redlock`` with one master; blocking acquire retries after uniform(0, 0.2) s."""

    def __init__(
        self, client: redis.Redis, name: str, lease: Optional[float], extensions: bool
    ) -> None:
        from pottery import Redlock

        self.cls = Redlock
        self.client, self.name = client, name
        self.lease = lease
        self.extensions = extensions
        self.key = f"redlock:{name}"

    def new_lock(self) -> Any:
        kwargs: dict[str, Any] = {"key": self.name, "masters": {self.client}}
        if self.lease is not None:
            kwargs["auto_release_time"] = self.lease
        if self.extensions:
            # The default allows 3 extends per acquisition; a long-running holder needs more.
            kwargs["num_extensions"] = 10**9
        return self.cls(**kwargs)

    def acquire(self, lock: Any) -> None:
        if not lock.acquire(blocking=True):
            raise RuntimeError("acquire returned False")

    def renew(self, lock: Any) -> bool:
        lock.extend()
        return True


class SherlockPeer(Peer):
    """sherlock ``RedisLock``: SETNX + EXPIRE script, blocking acquire polls every 0.1 s."""

    def __init__(self, client: redis.Redis, name: str, lease: Optional[float]) -> None:
        from sherlock import RedisLock

        self.cls = RedisLock
        self.client, self.name = client, name
        self.lease = lease
        self.key = name

    def new_lock(self) -> Any:
        # timeout: how long a blocking acquire may wait before raising (default 10 s); the
        # benchmark's waiters must outwait any holder, so it is raised to an hour.
        kwargs: dict[str, Any] = {"client": self.client, "timeout": 3600}
        if self.lease is not None:
            kwargs["expire"] = int(self.lease)
        return self.cls(self.name, **kwargs)

    def acquire(self, lock: Any) -> None:
        if not lock.acquire(blocking=True):
            raise RuntimeError("acquire returned False")

    def renew(self, lock: Any) -> bool:
        return bool(lock.renew())


def make_peer(kind: str, client: redis.Redis, name: str, config: dict[str, Any]) -> Peer:
    lease = config.get("lease")
    if kind == "redis-py":
        return RedisPyPeer(client, name, lease)
    if kind == "python-redis-lock":
        return RedisLockPeer(client, name, lease)
    if kind == "pottery":
        return PotteryPeer(client, name, lease, extensions=config.get("renew_every") is not None)
    if kind == "sherlock":
        return SherlockPeer(client, name, lease)
    raise SystemExit(f"unknown kind {kind!r}")


class PeerAgent:
    """Runs one peer: acquire in a thread, manual renewal every ``renew_every``, release."""

    def __init__(self, peer: Peer, renew_every: Optional[float]) -> None:
        self.peer = peer
        self.renew_every = renew_every
        self.lock: Any = None
        self.held = False
        self._renew_stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def acquire(self) -> None:
        threading.Thread(target=self._acquire, name="bench-acquire", daemon=True).start()

    def _acquire(self) -> None:
        lock = self.peer.new_lock()
        emit("waiting")
        while True:
            try:
                self.peer.acquire(lock)
                break
            except Exception as exc:  # e.g. Redis down: a real caller would try again
                emit("acquire_error", error=f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
        t = now()
        self.lock, self.held = lock, True
        emit("acquired", t=t)
        if self.renew_every is not None and not self.peer.renews_itself():
            self._renew_stop = threading.Event()
            self._renewer = threading.Thread(
                target=self._renew_loop,
                args=(lock, self._renew_stop),
                name="bench-renew",
                daemon=True,
            )
            self._renewer.start()

    def _renew_loop(self, lock: Any, stop: threading.Event) -> None:
        assert self.renew_every is not None
        while not stop.wait(self.renew_every):
            try:
                ok = self.peer.renew(lock)
            except Exception as exc:
                emit("renew_error", error=f"{type(exc).__name__}: {exc}")
                continue
            if not ok:
                emit("renew_failed")

    def release(self) -> None:
        t0 = now()
        self._renew_stop.set()
        error = None
        try:
            self.peer.release(self.lock)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        t1 = now()
        self.held = False
        emit("released", t0=t0, t1=t1, error=error)

    def status(self) -> dict[str, Any]:
        renewal = getattr(self.lock, "_lock_renewal_thread", None)  # python-redis-lock only
        return {
            "believes_held": self.held,
            "renewal_thread_alive": renewal.is_alive() if renewal is not None else None,
        }


# -- mutexowner ----------------------------------------------------------------------------


class OwnerAgent:
    """Runs one ``MutexOwner`` per acquire command (an owner's stop() is final)."""

    def __init__(self, client: redis.Redis, name: str, config: dict[str, Any]) -> None:
        import mutexowner
        from mutexowner.lease import LeaseKeys

        self.mod = mutexowner
        self.client, self.name = client, name
        self.ttl = float(config.get("lease") or 10.0)
        self.shutdown = float(config.get("shutdown_timeout") or 5.0)
        self.supervised = bool(config.get("supervisor", True))
        self.keys = LeaseKeys(name)
        self.owner: Optional[Any] = None

    def acquire(self) -> None:
        sup = None
        if self.supervised:
            sup = self.mod.Supervisor(shutdown_timeout=self.shutdown)

            def work(ctx: Any) -> None:
                t = now()  # the worker's first line: the hand-off benchmark's end point
                emit("worker_start", t=t, fence=ctx.fencing_token)
                ctx.stopping.wait()
                emit("worker_end")

            sup.add(work, name="work")
        owner = self.mod.MutexOwner(
            self.client,
            self.name,
            ttl=self.ttl,
            supervisor=sup,
            identity=f"{CONFIG['role']}:{os.getpid()}",
            on_acquired=lambda fence: emit("acquired", fence=fence),
            stuck_worker_policy=lambda names: emit("workers_stuck", names=list(names)),
        )
        owner.add_listener(self._on_event)
        self.owner = owner
        owner.start()
        emit("waiting")
        threading.Thread(target=self._watch_standby, args=(owner,), daemon=True).start()

    @staticmethod
    def _on_event(event: Any) -> None:
        emit(
            f"mo.{event.kind}",
            state=event.state,
            previous=event.previous_state,
            reason=event.reason,
            error_kind=event.error_kind,
            t_event=event.time,
        )

    @staticmethod
    def _watch_standby(owner: Any) -> None:
        """Report when the owner is a settled standby: it was told the key is taken."""
        deadline = now() + 30
        while now() < deadline:
            status = owner.status()
            if status.holding or status.state != "acquiring":
                return
            if status.next_attempt_in is not None and status.next_attempt_in > 0.2:
                emit("standby_ready", next_attempt_in=status.next_attempt_in)
                return
            time.sleep(0.002)

    def release(self) -> None:
        owner = self.owner
        assert owner is not None
        t0 = now()
        ok = owner.stop(timeout=15)
        t1 = now()
        emit("released", t0=t0, t1=t1, error=None if ok else "stop() timed out")

    def status(self) -> dict[str, Any]:
        owner = self.owner
        if owner is None:
            return {"believes_held": False}
        status = owner.status()
        return {
            "believes_held": status.holding,
            "state": status.state,
            "renew_interval": owner.renew_interval,
        }


# -- main loop -----------------------------------------------------------------------------


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    threading.excepthook = _excepthook
    kind = CONFIG["kind"]
    client = redis.Redis(
        host="127.0.0.1", port=int(CONFIG["port"]), client_name=CONFIG["client_name"]
    )
    name = CONFIG["name"]
    agent: Any
    if kind == "mutexowner":
        agent = OwnerAgent(client, name, CONFIG)
        key, channel = agent.keys.lease, agent.keys.channel
    else:
        peer = make_peer(kind, client, name, CONFIG)
        agent = PeerAgent(peer, CONFIG.get("renew_every"))
        key, channel = peer.key, None
    emit("hello", pid=os.getpid(), key=key, channel=channel, cpu=cpu_seconds())
    handlers: dict[str, Callable[[], None]] = {
        "acquire": agent.acquire,
        "release": lambda: threading.Thread(target=agent.release, daemon=True).start(),
        "status": lambda: emit("status", **agent.status()),
        "rusage": lambda: emit("rusage", cpu=cpu_seconds(), threads=threading.active_count()),
    }
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line).get("cmd")
        if cmd == "exit":
            break
        handler = handlers.get(cmd)
        if handler is None:
            emit("error", error=f"unknown command {cmd!r}")
            continue
        handler()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
