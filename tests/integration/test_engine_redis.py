"""The lease engine against real redis-servers (issue 12, "Done when"): many leases on one
client through a connection fault and a Redis restart, two clients on two servers with one
frozen, and a fork with an engine running.

Holding is sampled from the owners' public ``fencing_token`` by ``tests.holdings`` (inner
intervals bracketed by clock reads: two recorded holds of one key that overlap prove a real
overlap). Expectations come from docs/safety.md ("Failure modes" table) and docs/owner.md:

- ``CLIENT KILL`` of every connection: "the next call reconnects; a renewal that failed is
  retried before the deadline" -> every holder keeps its lease (same fencing token);
- Redis ``kill -9`` and restart without persistence: "the holder's next renewal finds its
  key gone while its own lease is still valid and re-takes it"; "no newcomer runs before
  ttl + drift after the data loss";
- a frozen Redis: workers stop by the local deadline ``t_sent + ttl - drift``;
- fork: "an owner started before fork() must not renew or release the parent's lease from
  the child"; ``stop()`` in a forked child does nothing and returns True.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import redis

from mutexowner import BackoffPolicy, Event, MutexOwner
from mutexowner.clock import default_clock
from mutexowner.timing import drift_for
from tests.helpers import wait_for
from tests.holdings import Hold, HoldingSampler, check_holds
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

TTL = 2.0
DRIFT = drift_for(TTL)
BACKOFF_MAX = 0.5
BACKOFF = BackoffPolicy(initial=0.05, max_delay=BACKOFF_MAX)
#: Extra seconds on every bound: process scheduling on a loaded 2-core machine.
SLACK = 1.0
#: Someone holds again within this of a Redis fault clearing (docs/safety.md, "B").
RECOVERY = TTL + DRIFT + TTL / 9 + BACKOFF_MAX + SLACK
#: Library threads one engine may add: scheduler, events, release hub (+1 spare).
MAX_NEW_THREADS = 4
#: Connections one engine may open: lease calls, release hub, and one spare.
MAX_CONNECTIONS = 3

Record = Callable[..., None]


def library_threads(exclude: set[Optional[int]]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("mutexowner") and t.ident not in exclude and t.is_alive()
    ]


def other_connections(admin: redis.Redis) -> list[dict[str, str]]:
    """CLIENT LIST without ``admin``'s own connection: the process's engine(s)."""
    me = admin.client_id()
    return [c for c in admin.client_list() if int(c["id"]) != me]


def lease_keys(server: RedisServer) -> list[bytes]:
    return sorted(server.client().keys("mutexowner:*:lease"))


@dataclass
class Fleet:
    """Holders on ``n`` keys (``k0``...), standbys on the first ``contested`` of them, all on
    one Redis source; every owner's events counted."""

    source: object
    n: int
    contested: int
    prefix: str = "k"
    ttl: float = TTL
    holders: list[MutexOwner] = field(default_factory=list)
    standbys: list[MutexOwner] = field(default_factory=list)
    events: dict[str, list[Event]] = field(default_factory=dict)

    def build(self, registry: list[MutexOwner]) -> Fleet:
        for i in range(self.n):
            self.holders.append(self._owner(f"{self.prefix}{i}", f"h-{self.prefix}{i}", registry))
        for i in range(self.contested):
            self.standbys.append(self._owner(f"{self.prefix}{i}", f"s-{self.prefix}{i}", registry))
        return self

    def _owner(self, name: str, identity: str, registry: list[MutexOwner]) -> MutexOwner:
        owner = MutexOwner(self.source, name, ttl=self.ttl, backoff=BACKOFF, identity=identity)
        seen: list[Event] = []
        self.events[identity] = seen
        owner.add_listener(seen.append)
        registry.append(owner)
        return owner

    @property
    def owners(self) -> list[MutexOwner]:
        return self.holders + self.standbys

    def start_holders(self, wait: bool = True) -> None:
        for owner in self.holders:
            owner.start()
        if wait:
            self.wait_holders()

    def wait_holders(self) -> None:
        # The first acquisition on an empty Redis waits one ttl (lock-delay).
        assert wait_for(lambda: all(o.holding for o in self.holders), self.ttl + 10), [
            o.status() for o in self.holders if not o.holding
        ][:3]

    def start_standbys(self) -> None:
        for owner in self.standbys:
            owner.start()
        # Every standby has been told who holds its key.
        assert wait_for(
            lambda: all(o.status().next_attempt_in is not None for o in self.standbys), 10
        )
        assert not any(o.holding for o in self.standbys)

    def tokens(self) -> dict[str, Optional[int]]:
        return {o.identity: o.fencing_token for o in self.holders}

    def count(self, identity: str, kind: str, since: float) -> int:
        return sum(1 for e in list(self.events[identity]) if e.kind == kind and e.time >= since)

    def renewal_gaps(self, since: float, until: float) -> list[float]:
        """Seconds between consecutive renewals of each holder, renewals in [since, until]."""
        gaps = []
        for owner in self.holders:
            times = [
                e.time
                for e in list(self.events[owner.identity])
                if e.kind == "renewed" and since <= e.time <= until
            ]
            gaps += [b - a for a, b in zip(times, times[1:])]
        return gaps

    def stop_all(self) -> float:
        """Stop every owner (standbys first, so nobody takes over); seconds it took."""
        began = default_clock()
        for owner in self.standbys + self.holders:
            assert owner.stop(timeout=10), owner.status()
        return default_clock() - began


@contextmanager
def sampling(owners: Sequence[MutexOwner]) -> Iterator[HoldingSampler]:
    sampler = HoldingSampler([(o, i) for i, o in enumerate(owners)], clock=default_clock)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.finish()


def holds_of(holds: Sequence[Hold], identity: str) -> list[Hold]:
    return [h for h in holds if h.identity == identity]


# -- many leases on one client ----------------------------------------------------------------


N_MANY = 200
CONTESTED = 50


def test_many_leases_on_one_client_share_one_engine_and_keep_their_leases_through_client_kill(
    redis_server: RedisServer, owners: list[MutexOwner], record_figures: Record
) -> None:
    before = {t.ident for t in threading.enumerate()}
    fleet = Fleet(redis_server.url, N_MANY, CONTESTED).build(owners)
    began = default_clock()
    fleet.start_holders()
    all_holding = default_clock() - began
    fleet.start_standbys()

    # One engine for the whole process: its threads and connections, whatever the count.
    new_threads = library_threads(before)
    assert len(new_threads) <= MAX_NEW_THREADS, [t.name for t in new_threads]
    assert set(fleet.holders[0].threads) == set(fleet.standbys[-1].threads)
    admin = redis_server.client()
    connections = other_connections(admin)
    assert 1 <= len(connections) <= MAX_CONNECTIONS, connections
    tokens = fleet.tokens()

    with sampling(fleet.owners) as sampler:
        # The fault: every connection of the process is cut (lease calls and subscriptions).
        killed_at = default_clock()
        killed = sum(
            int(admin.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes"))
            for kind in ("normal", "pubsub")
        )
        assert killed == len(connections)
        # Every holder renews twice after the fault (the first may be the failed one).
        assert wait_for(
            lambda: all(fleet.count(o.identity, "renewed", killed_at) >= 2 for o in fleet.holders),
            4 * TTL + 5,
        ), [o.status() for o in fleet.holders if fleet.count(o.identity, "renewed", killed_at) < 2][
            :3
        ]
        recovered = default_clock() - killed_at
        assert fleet.tokens() == tokens  # nobody lost its lease, so no new token
        assert all(o.holding for o in fleet.holders)
        assert not any(o.holding for o in fleet.standbys)
        assert 1 <= len(other_connections(admin)) <= MAX_CONNECTIONS

        # The release hub came back too: a standby takes over at the holder's release notice,
        # long before a "taken, ttl_left" timer would fire.
        handoffs = []
        for holder, standby in zip(fleet.holders[:10], fleet.standbys[:10]):
            stopped = default_clock()
            assert holder.stop(timeout=5)
            assert standby.wait_until_holding(TTL + 5), standby.status()
            handoffs.append(default_clock() - stopped)
        assert max(handoffs) < 1.0, handoffs

    holds = sampler.finish()
    assert check_holds(holds) == []
    for holder in fleet.holders:
        assert fleet.count(holder.identity, "lost", began) <= (
            1 if holder in fleet.holders[:10] else 0
        )
        runs = holds_of(holds, holder.identity)
        assert len(runs) == 1, runs  # held without a gap from the first sample to its stop

    stop_all = fleet.stop_all()
    assert lease_keys(redis_server) == []
    assert wait_for(lambda: not library_threads(before), 5), library_threads(before)
    assert stop_all < 2.0
    record_figures(
        owners=len(fleet.owners),
        all_holding=all_holding,
        threads=len(new_threads),
        connections=len(connections),
        recovered=recovered,
        handoff_p50=statistics.median(handoffs),
        stop_all=stop_all,
        scans=sampler.scans,
    )


def test_many_leases_through_a_redis_restart_without_persistence(
    redis_server: RedisServer, owners: list[MutexOwner], record_figures: Record
) -> None:
    before = {t.ident for t in threading.enumerate()}
    fleet = Fleet(redis_server.url, N_MANY, CONTESTED).build(owners)
    fleet.start_holders()
    fleet.start_standbys()
    tokens = fleet.tokens()

    with sampling(fleet.owners) as sampler:
        assert wait_for(lambda: sampler.scans >= 3, 5)
        lost_at = default_clock()
        redis_server.restart(persist=False)
        back_at = default_clock()
        # Every key is held again once any lock-delay has passed.
        assert wait_for(
            lambda: (
                default_clock() > lost_at + TTL + DRIFT
                and all(o.holding for o in fleet.holders[CONTESTED:])
                and all(a.holding or b.holding for a, b in zip(fleet.holders, fleet.standbys))
            ),
            RECOVERY + TTL,
        ), [o.status() for o in fleet.owners if not o.holding][:3]
        # A moment of steady running, so that a late second holder would show.
        settled = default_clock()
        assert wait_for(lambda: sampler.scans >= 3 and default_clock() > settled + 0.3, 5)

    holds = sampler.finish()
    assert check_holds(holds) == []
    kept = stepped_down = 0
    for i, holder in enumerate(fleet.holders):
        key_holds = [h for h in holds if h.key == holder.key]
        first = holds_of(key_holds, holder.identity)[0]
        assert first.start < lost_at and first.token == tokens[holder.identity]
        if first is key_holds[-1]:
            # Kept (re-taken by its valid holder): held without a gap, same fencing token.
            kept += 1
            assert holder.fencing_token == tokens[holder.identity]
            continue
        # Stepped down: whoever holds the key next waited out the lock-delay of the data loss.
        stepped_down += 1
        assert i < CONTESTED, f"uncontested {holder.key} lost its lease: {key_holds}"
        later = [h for h in key_holds if h.start > first.end]
        assert later and all(h.start >= lost_at + TTL for h in later), (lost_at, key_holds)
        assert later[0].token > first.token
    # docs/safety.md: "holder keeps running if Redis is back before its deadline" (the quiet
    # period turns newcomers away meanwhile). Every deadline was at least ttl - drift - one
    # renew interval after the kill; with Redis back well before that, every holder kept.
    if back_at < lost_at + TTL - DRIFT - TTL / 3 - BACKOFF_MAX:
        assert kept == N_MANY, f"{stepped_down} holder(s) stepped down"
    else:  # a very slow restart: only the uncontested ones must have kept
        assert kept >= N_MANY - CONTESTED

    stop_all = fleet.stop_all()
    assert lease_keys(redis_server) == []
    assert wait_for(lambda: not library_threads(before), 5), library_threads(before)
    record_figures(
        owners=len(fleet.owners),
        restart=back_at - lost_at,
        kept=kept,
        stepped_down=stepped_down,
        stop_all=stop_all,
    )


# -- two clients, two servers ------------------------------------------------------------------


N_EACH = 100
FREEZE = TTL + 0.5
#: How late a renewal of a healthy server's lease may be while the other server is frozen.
RENEW_LATE = 0.15


def test_a_frozen_server_stalls_only_its_own_leases(
    redis_server_factory: Callable[..., RedisServer],
    owners: list[MutexOwner],
    record_figures: Record,
) -> None:
    before = {t.ident for t in threading.enumerate()}
    one, two = redis_server_factory(), redis_server_factory()
    frozen = Fleet(one.client(), N_EACH, 0, prefix="a").build(owners)
    healthy = Fleet(two.url, N_EACH, 0, prefix="b").build(owners)
    frozen.start_holders(wait=False)
    healthy.start_holders()
    frozen.wait_holders()
    assert set(frozen.holders[0].threads).isdisjoint(healthy.holders[0].threads)
    assert len(library_threads(before)) <= 2 * MAX_NEW_THREADS
    frozen_tokens, healthy_tokens = frozen.tokens(), healthy.tokens()

    with sampling(frozen.owners + healthy.owners) as sampler:
        assert wait_for(lambda: sampler.scans >= 3, 5)
        one.freeze()
        froze_at = default_clock()
        try:
            # By the deadline of the last renewal sent before the freeze, none of server 1's
            # leases holds; meanwhile server 2's leases renew as usual.
            assert wait_for(
                lambda: (
                    default_clock() > froze_at + FREEZE
                    or not any(o.holding for o in frozen.holders)
                ),
                FREEZE + 5,
            )
            stalled = default_clock() - froze_at
            assert wait_for(lambda: default_clock() > froze_at + FREEZE, FREEZE + 5)
            renewals = [healthy.count(o.identity, "renewed", froze_at) for o in healthy.holders]
            gaps = healthy.renewal_gaps(froze_at, froze_at + FREEZE)
            assert all(o.holding for o in healthy.holders)
            assert healthy.tokens() == healthy_tokens
        finally:
            thawed_at = default_clock()
            one.thaw()
        assert wait_for(lambda: all(o.holding for o in frozen.holders), RECOVERY + TTL), [
            o.status() for o in frozen.holders if not o.holding
        ][:3]
        recovered = default_clock() - thawed_at

    holds = sampler.finish()
    assert check_holds(holds) == []
    # Server 2's leases never noticed: one hold each, renewed all along (~3 per freeze).
    assert min(renewals) >= 2, renewals
    # ... on time: each renewal is due renew_interval after the previous one was sent. A
    # scheduler that waited for server 1's timed-out calls would be late by up to a
    # call_timeout (ttl/9 = 0.22 s) each time.
    late = max(gaps) - TTL / 3
    assert late < RENEW_LATE, sorted(gaps)[-5:]
    for owner in healthy.holders:
        assert len(holds_of(holds, owner.identity)) == 1
        assert healthy.count(owner.identity, "lost", froze_at) == 0
        assert healthy.count(owner.identity, "suspended", froze_at) == 0
    # Server 1's leases stopped holding by their deadline: last seen holding at most
    # ttl - drift after the freeze (their last renewal was sent before it).
    for owner in frozen.holders:
        first = holds_of(holds, owner.identity)[0]
        assert first.token == frozen_tokens[owner.identity]
        assert first.end < froze_at + TTL - DRIFT, (owner.key, first.end - froze_at)
        assert frozen.count(owner.identity, "suspended", froze_at) >= 1
        assert frozen.count(owner.identity, "lost", froze_at) >= 1
    assert stalled < TTL

    frozen.stop_all()
    healthy.stop_all()
    assert lease_keys(one) == [] and lease_keys(two) == []
    assert wait_for(lambda: not library_threads(before), 5), library_threads(before)
    record_figures(
        leases=2 * N_EACH,
        stalled=stalled,
        renewals_min=min(renewals),
        renew_late=late,
        recovered=recovered,
    )


# -- fork ---------------------------------------------------------------------------------------


#: Short: each first acquisition of a key on a fresh Redis waits one ttl (lock-delay).
FORK_TTL = 1.0
#: Bits of the child's exit status, one per check that failed.
CHILD_CHECKS = (
    "inherited owners report state stopped",
    "inherited owners report holding False and no fencing token",
    "stop() of an inherited owner returns True at once",
    "a new owner in the child holds its own key",
    "the new owner runs on a new engine (not the parent's threads)",
    "the new owner stops cleanly and releases its key",
    "the child raised",
)


def _child(inherited: Sequence[MutexOwner], source: object, parent_threads: set[str]) -> int:
    failed = 0

    def check(bit: int, ok: bool) -> None:
        nonlocal failed
        if not ok:
            failed |= 1 << bit

    try:
        check(0, all(o.state == "stopped" for o in inherited))
        check(1, not any(o.holding or o.fencing_token is not None for o in inherited))
        began = time.monotonic()
        check(2, all(o.stop(timeout=1) is True for o in inherited))
        check(2, time.monotonic() - began < 1.0)
        child = MutexOwner(source, "child-key", ttl=FORK_TTL, backoff=BACKOFF, identity="child")
        child.start()
        check(3, child.wait_until_holding(TTL + 5))
        names = {t.name for t in child.threads}
        check(4, bool(names) and not any(t in parent_threads for t in names))
        check(5, child.stop(timeout=5) and not child.threads)
        client = child.redis_client
        check(5, not client.exists("mutexowner:{child-key}:lease"))
    except BaseException:
        failed |= 1 << 6
    return failed


@pytest.mark.parametrize("kind", ["url", "client"])
def test_fork_with_an_engine_running(
    redis_server: RedisServer, owners: list[MutexOwner], kind: str
) -> None:
    source: object = redis_server.url if kind == "url" else redis_server.client()
    fleet = Fleet(source, 10, 0, ttl=FORK_TTL).build(owners)
    fleet.start_holders()
    tokens = fleet.tokens()
    parent_threads = {t.name for t in fleet.holders[0].threads}
    assert parent_threads

    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1 << 7
        try:
            code = _child(fleet.holders, source, parent_threads)
        finally:
            os._exit(code)

    end = time.monotonic() + 30
    status = None
    while status is None:
        waited, raw = os.waitpid(pid, os.WNOHANG)
        if waited:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not exit within 30 s")
        else:
            time.sleep(0.01)
    failed = [what for bit, what in enumerate(CHILD_CHECKS) if status & (1 << bit)]
    assert status == 0, f"child exit status {status}: failed: {failed}"

    # The parent's leases did not notice: held all along with the same fencing tokens (a
    # renewal after the child ended proves the engine still runs).
    since = default_clock()
    assert wait_for(
        lambda: all(fleet.count(o.identity, "renewed", since) >= 1 for o in fleet.holders), 5
    )
    assert fleet.tokens() == tokens
    assert all(fleet.count(o.identity, "lost", 0) == 0 for o in fleet.holders)
    assert (
        set(fleet.holders[0].threads)
        and {t.name for t in fleet.holders[0].threads} == parent_threads
    )
    assert len(lease_keys(redis_server)) == 10
    fleet.stop_all()
    assert lease_keys(redis_server) == []


# -- bugs found while writing these tests (regression tests) ----


def test_stop_of_an_engines_last_lease_is_not_held_up_by_a_lease_started_meanwhile(
    redis_server: RedisServer, owners: list[MutexOwner]
) -> None:
    """A's ``stop()`` ends the engine's last lease while B starts on the same client: A's
    stop must not wait for B. The interleaving (about 1 run in 100 when the two calls race on
    two threads) is forced here: B starts after A's stop() found the engine idle and began
    to join its scheduler thread, before that thread noticed it had nothing left to do."""
    a = MutexOwner(redis_server.url, "race-a", ttl=TTL, backoff=BACKOFF, identity="a")
    b = MutexOwner(redis_server.url, "race-b", ttl=TTL, backoff=BACKOFF, identity="b")
    owners += [a, b]
    a.start()
    assert a.wait_until_holding(TTL + 5)
    scheduler = next(t for t in a.threads if t.name.startswith("mutexowner-engine-"))
    joining = threading.Event()
    join = scheduler.join

    def join_noting(timeout: Optional[float] = None) -> None:
        joining.set()
        join(timeout)

    scheduler.join = join_noting  # type: ignore[method-assign]
    finished = a.slot.on_finished
    assert finished is not None

    def finished_then_start_b() -> None:
        finished()  # A is finished: its stop() goes on to join the engine's threads
        if joining.wait(2):
            b.start()

    a.slot.on_finished = finished_then_start_b
    began = time.monotonic()
    # A timeout of at most 3 call timeouts: no fast path, the engine's thread releases.
    stopped = a.stop(timeout=0.6)
    elapsed = time.monotonic() - began
    assert joining.is_set() and b.slot.core.started
    assert stopped, f"A's stop() returned False after {elapsed:.3f} s"
    assert b.wait_until_holding(TTL + 5)
