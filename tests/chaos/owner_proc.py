"""One chaos owner process: a MutexOwner and a Supervisor whose single worker keeps a ledger.

Run from the repository root::

    python -m tests.chaos.owner_proc --redis URL --store URL --identity o1 --ledger DIR

The worker, in a loop: reads the clock, calls ``ctx.ensure_held()`` (recording ``run_start``
for the first check of a run and ``beat`` for later ones, at the time read *before* the
check), then makes one fenced write to the store (``fence`` record), then sleeps ``--beat``
seconds. A ``LeaseLost`` is recorded (``lease_lost``), as is a write the store rejected,
which the worker then treats as a lost lease. The process runs until SIGTERM, then stops
the owner (release, notify) and exits 0; exit status 3 means the owner thread had died or
``stop()`` did not finish. The stuck-worker policy records ``stuck`` and ``os._exit(70)``s,
as the library's "exit" policy does, but observably.

The test drives a process through its control file ``<ledger>/<identity>.ctl``: the word
``freeze-in-gap`` makes the worker stop its own process with SIGSTOP right after a passed
check and before the write that follows it (the test resumes it with SIGCONT).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mutexowner import BackoffPolicy, Event, LeaseLost, MutexOwner, Supervisor, WorkerContext
from tests.chaos.fence_store import FenceStore
from tests.chaos.ledger import LedgerWriter

LEASE_NAME = "chaos"
STUCK_EXIT_STATUS = 70
FREEZE_IN_GAP = "freeze-in-gap"


def control_path(ledger_dir: Path, identity: str) -> Path:
    return Path(ledger_dir) / f"{identity}.ctl"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="URL of the Redis under test")
    parser.add_argument("--store", required=True, help="URL of the fencing store's Redis")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--ledger", required=True, type=Path, help="ledger directory")
    parser.add_argument("--name", default=LEASE_NAME, help="lease name")
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--renew", type=float, default=None, help="renew interval")
    parser.add_argument("--shutdown", type=float, default=0.5, help="shutdown_timeout")
    parser.add_argument("--backoff-initial", type=float, default=0.05)
    parser.add_argument("--backoff-max", type=float, default=0.5)
    parser.add_argument("--beat", type=float, default=0.02, help="seconds between checks")
    return parser.parse_args(argv)


class _LedgerLogHandler(logging.Handler):
    """Copies WARNING and worse log records into the ledger (the checker looks at them)."""

    def __init__(self, ledger: LedgerWriter) -> None:
        super().__init__(logging.WARNING)
        self._ledger = ledger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._ledger.write(
                "log", level=record.levelname, logger=record.name, msg=record.getMessage()
            )
        except Exception:  # never let logging break the owner
            self.handleError(record)


class _MonotonicFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.mono = time.monotonic()
        return True


def setup_logging(ledger: LedgerWriter) -> None:
    stderr = logging.StreamHandler(sys.stderr)
    stderr.addFilter(_MonotonicFilter())
    stderr.setFormatter(
        logging.Formatter("%(mono).3f %(threadName)s %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(stderr)
    logging.getLogger("mutexowner").addHandler(_LedgerLogHandler(ledger))
    logging.getLogger("transitions").setLevel(logging.WARNING)


class ChaosWorker:
    """The worker: check, fenced write, heartbeat; everything it does goes to the ledger."""

    def __init__(self, ledger: LedgerWriter, store: FenceStore, control: Path, beat: float) -> None:
        self.ledger = ledger
        self.store = store
        self.control = control
        self.beat = beat
        self._runs = 0
        self._lock = threading.Lock()

    def _next_run(self) -> int:
        with self._lock:
            self._runs += 1
            return self._runs

    def _control(self) -> Optional[str]:
        try:
            command = self.control.read_text().strip()
        except FileNotFoundError:
            return None
        self.control.unlink(missing_ok=True)
        return command

    def __call__(self, ctx: WorkerContext) -> None:
        run = self._next_run()
        token = ctx.fencing_token
        started = False
        last_ok: Optional[float] = None
        reason = "stopping"
        try:
            while True:
                t_check = time.monotonic()
                try:
                    ctx.ensure_held()
                except LeaseLost as exc:
                    reason = "lease_lost"
                    self.ledger.write(
                        "lease_lost",
                        run=run,
                        token=token,
                        t_check=t_check,
                        stopping=ctx.stopping.is_set(),
                        msg=str(exc),
                    )
                    raise
                self.ledger.write(
                    "beat" if started else "run_start",
                    t=t_check,
                    run=run,
                    token=token,
                    restart=ctx.restart_count,
                )
                started = True
                last_ok = t_check
                if self.control.exists() and self._control() == FREEZE_IN_GAP:
                    # A pause exactly between the lease check and the side effect: only
                    # the fencing token can stop this write now.
                    self.ledger.write("self_freeze", run=run, token=token, t_check=t_check)
                    # Directed at this thread, so that this thread stops before it returns
                    # from the call (a process-directed SIGSTOP lets it run on a little).
                    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
                ok = self._fenced_write(token)
                self.ledger.write("fence", run=run, token=token, t_check=t_check, ok=ok)
                if ok is False:
                    reason = "fence_rejected"
                    raise LeaseLost(f"the fencing store rejected token {token}")
                if ctx.sleep(self.beat):
                    break
        finally:
            self.ledger.write("run_end", run=run, token=token, last_ok=last_ok, reason=reason)

    def _fenced_write(self, token: Optional[int]) -> Optional[bool]:
        if token is None:
            return None
        try:
            return self.store.write(token, self.ledger.identity)
        except Exception as exc:  # the store is not under test; record and carry on
            self.ledger.write("store_error", error=repr(exc))
            return None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # SIGTERM is blocked in every thread (they inherit the mask) and taken by sigwait() in
    # the main thread: no Python handler. A handler that sets a threading.Event deadlocks
    # when the signal lands while the main thread is inside that same Event's wait().
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    ledger = LedgerWriter(args.ledger, args.identity)
    ledger.write("proc_start")
    setup_logging(ledger)

    def excepthook(hook_args: threading.ExceptHookArgs) -> None:
        thread = hook_args.thread.name if hook_args.thread is not None else "?"
        ledger.write("thread_exception", thread=thread, exc=repr(hook_args.exc_value))
        if hook_args.exc_value is not None:
            sys.__excepthook__(hook_args.exc_type, hook_args.exc_value, hook_args.exc_traceback)

    threading.excepthook = excepthook

    def stuck_policy(names: tuple[str, ...]) -> None:
        ledger.write("stuck", workers=list(names))
        logging.shutdown()
        os._exit(STUCK_EXIT_STATUS)

    def on_event(event: Event) -> None:
        ledger.write(
            "owner",
            t=event.time,
            kind=event.kind,
            state=event.state,
            prev=event.previous_state,
            token=event.fencing_token,
            reason=event.reason,
            error_kind=event.error_kind,
        )

    store_client = redis.Redis.from_url(
        args.store, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    worker = ChaosWorker(
        ledger, FenceStore(store_client), control_path(args.ledger, args.identity), args.beat
    )
    sup = Supervisor(shutdown_timeout=args.shutdown)
    sup.add(worker, name="ledger-worker")
    owner = MutexOwner(
        args.redis,
        args.name,
        ttl=args.ttl,
        renew_interval=args.renew,
        backoff=BackoffPolicy(initial=args.backoff_initial, max_delay=args.backoff_max),
        supervisor=sup,
        identity=args.identity,
        stuck_worker_policy=stuck_policy,
    )
    owner.add_listener(on_event)

    owner.start()
    ledger.write("ready", call_timeout=owner.call_timeout, renew_interval=owner.renew_interval)
    signal.sigwait({signal.SIGTERM})
    owner_alive = any(t.name.startswith("mutexowner-engine-") for t in owner.threads)
    state = owner.state
    stopped = owner.stop(timeout=10.0)
    code = 0 if owner_alive and stopped else 3
    ledger.write("proc_exit", code=code, owner_alive=owner_alive, state=state, stopped=stopped)
    return code


if __name__ == "__main__":
    sys.exit(main())
