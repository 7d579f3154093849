"""The chaos harness itself: the checker must catch what it claims to, the proxy must cut.

The checker tests feed it hand-made ledgers (no Redis, no processes), so that a checker
that stopped failing would be noticed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.chaos import checker
from tests.chaos.fence_store import FenceLogEntry, FenceStore
from tests.chaos.ledger import Ledger, LedgerWriter, build_runs
from tests.chaos.proxy import BLACKHOLE, DROP, PASS, TcpProxy
from tests.redis_server import RedisServer, poll

TOKEN_A, TOKEN_B = 1_000, 2_000


def checks(
    identity: str, pid: int, token: int, *times: float, run: int = 1
) -> list[dict[str, Any]]:
    """run_start then beats of one run, at ``times``."""
    records = []
    for i, t in enumerate(times):
        ev = "run_start" if i == 0 else "beat"
        records.append({"ev": ev, "id": identity, "pid": pid, "t": t, "run": run, "token": token})
    return records


def exit_record(identity: str, pid: int, *, alive: bool = True) -> dict[str, Any]:
    return {"ev": "proc_exit", "id": identity, "pid": pid, "t": 99.0, "owner_alive": alive}


def verdict(
    records: list[dict[str, Any]],
    *,
    fence_log: tuple[FenceLogEntry, ...] = (),
    faults: tuple[checker.Fault, ...] = (),
    exits: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> checker.Verdict:
    if exits is None:
        exits = {"A": 0, "B": 0}
        records = [*records, exit_record("A", 1), exit_record("B", 2)]
    return checker.check(records, list(fence_log), list(faults), exits, **kwargs)


def test_clean_hand_off_passes_with_its_figures() -> None:
    records = checks("A", 1, TOKEN_A, 1.0, 1.5, 2.0) + checks("B", 2, TOKEN_B, 2.5, 3.0)
    result = verdict(
        records,
        fence_log=(FenceLogEntry(True, TOKEN_A, "A"), FenceLogEntry(True, TOKEN_B, "B")),
        faults=(checker.Fault("kill", start=2.1, measure_from="start", bound=1.0),),
    )
    assert result.ok, result.problems
    assert result.figures["handoffs"] == 1
    assert result.figures["min_gap"] == pytest.approx(0.5)
    assert result.figures["max_overlap"] == 0.0
    assert result.figures["recovery_max"] == pytest.approx(0.4)


def test_overlapping_runs_are_caught_even_within_one_process() -> None:
    across = checks("A", 1, TOKEN_A, 1.0, 2.0) + checks("B", 2, TOKEN_B, 1.9, 3.0)
    result = verdict(across)
    assert any("overlap of 0.100000 s" in p for p in result.problems), result.problems
    assert result.figures["max_overlap"] == pytest.approx(0.1)
    within = checks("A", 1, TOKEN_A, 1.0, 2.0) + checks("A", 1, TOKEN_A, 1.5, 2.5, run=2)
    assert any("overlap" in p for p in verdict(within).problems)


def test_an_overlap_hidden_behind_a_long_run_is_caught() -> None:
    # C starts after B ended but before A (which started first) ended.
    records = (
        checks("A", 1, 1, 1.0, 5.0) + checks("B", 2, 2, 2.0, 3.0) + checks("C", 3, 3, 4.0, 4.5)
    )
    problems = verdict(records, exits={}).problems
    assert sum("overlap" in p for p in problems) == 2, problems


def test_fencing_tokens_must_increase_between_holders() -> None:
    records = checks("A", 1, TOKEN_B, 1.0, 2.0) + checks("B", 2, TOKEN_A, 3.0)
    assert any("did not increase" in p for p in verdict(records).problems)
    same_process = checks("A", 1, TOKEN_B, 1.0) + checks("A", 1, TOKEN_A, 2.0, run=2)
    assert any("went down" in p for p in verdict(same_process).problems)


def test_a_stale_write_accepted_by_the_store_is_caught() -> None:
    log = (
        FenceLogEntry(True, TOKEN_A, "A"),
        FenceLogEntry(True, TOKEN_B, "B"),
        FenceLogEntry(False, TOKEN_A, "A"),
        FenceLogEntry(True, TOKEN_A, "A"),
    )
    result = verdict([], fence_log=log)
    assert any("accepted token 1000 (A) after 2000" in p for p in result.problems)
    assert result.figures["fence_rejected"] == 1
    shared = (FenceLogEntry(True, TOKEN_A, "A"), FenceLogEntry(True, TOKEN_A, "B"))
    assert any("used by A and B" in p for p in verdict([], fence_log=shared).problems)


def test_slow_or_missing_recovery_is_caught() -> None:
    records = checks("A", 1, TOKEN_A, 1.0) + checks("B", 2, TOKEN_B, 5.0)
    slow = checker.Fault("freeze", start=1.5, clear=2.0, bound=2.0)
    never = checker.Fault("restart", start=6.0, clear=6.5, bound=2.0)
    problems = verdict(records, faults=(slow, never)).problems
    assert any("freeze: workers ran again 3.000 s after the fault cleared" in p for p in problems)
    assert any("restart: no owner held again" in p for p in problems)


def test_crashes_stuck_workers_and_error_logs_are_caught() -> None:
    records = [
        exit_record("A", 1, alive=False),
        {"ev": "stuck", "id": "A", "pid": 1, "t": 1.0, "workers": ["w"]},
        {"ev": "thread_exception", "id": "A", "pid": 1, "t": 1.0, "thread": "x", "exc": "E"},
        {"ev": "log", "id": "A", "pid": 1, "t": 1.0, "level": "CRITICAL", "msg": "machine error"},
        {"ev": "log", "id": "A", "pid": 1, "t": 1.0, "level": "ERROR", "msg": "expected one"},
        {"ev": "log", "id": "A", "pid": 1, "t": 1.0, "level": "WARNING", "msg": "fine"},
    ]
    exits = {"A": 0, "B": 70, "C": None, "D": -9}
    problems = verdict(records, exits=exits, killed=["D"], expected_logs=["^expected"]).problems
    text = "\n".join(problems)
    assert "owner thread of A was dead" in text
    assert "B exited with 70" in text and "C exited with None" in text
    assert "D" not in text  # killed by the scenario
    assert "B wrote no proc_exit" in text
    assert "stuck" in text and "thread_exception" in text and "machine error" in text
    assert "expected one" not in text and "fine" not in text


def test_an_owner_losing_the_lease_to_its_own_token_is_caught() -> None:
    def log(msg: str) -> dict[str, Any]:
        return {"ev": "log", "id": "A", "pid": 1, "t": 1.0, "level": "WARNING", "msg": msg}

    records = [
        log("key=chaos identity=A lease taken by B"),
        log("key=chaos identity=A lease taken by A"),
    ]
    problems = verdict(records).problems
    assert len(problems) == 1 and "own earlier token" in problems[0], problems


def test_ledger_reads_incrementally_and_ignores_a_torn_last_line(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path, "A")
    writer.write("run_start", t=1.0, run=1, token=5)
    ledger = Ledger(tmp_path).refresh()
    assert [r["ev"] for r in ledger.records] == ["run_start"]
    writer.write("beat", t=2.0, run=1, token=5)
    with open(writer.path, "ab") as raw:
        raw.write(b'{"ev":"beat","id":"A"')  # a write cut short
    ledger.refresh()
    assert [r["ev"] for r in ledger.records] == ["run_start", "beat"]
    runs = build_runs(ledger.records)
    assert [(r.start, r.end, r.beats) for r in runs] == [(1.0, 2.0, 2)]
    writer.close()


# -- against a real redis-server ---------------------------------------------------------------


@pytest.mark.redis
def test_fence_store_rejects_a_lower_token(redis_server: RedisServer) -> None:
    store = FenceStore(redis_server.client())
    assert store.write(TOKEN_A, "A") and store.write(TOKEN_A, "A")
    assert store.write(TOKEN_B, "B")
    assert not store.write(TOKEN_A, "A")
    assert store.log() == [
        FenceLogEntry(True, TOKEN_A, "A"),
        FenceLogEntry(True, TOKEN_B, "B"),
        FenceLogEntry(False, TOKEN_A, "A"),
    ]
    assert store.accepted_writes() == 3


@pytest.mark.redis
@pytest.mark.timeout(30)
def test_proxy_passes_drops_and_blackholes(redis_server: RedisServer) -> None:
    proxy = TcpProxy(redis_server.port).start()
    try:
        client = redis.Redis(
            host="127.0.0.1",
            port=proxy.port,
            socket_timeout=0.3,
            socket_connect_timeout=0.3,
            retry=Retry(NoBackoff(), 0),
        )
        assert client.ping()
        proxy.set_mode(DROP)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        with pytest.raises(redis.ConnectionError):
            client.ping()  # a new connection is refused too
        proxy.set_mode(PASS)
        assert client.ping()
        proxy.set_mode(BLACKHOLE)
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert proxy.stats.discarded_bytes > 0
        proxy.set_mode(PASS)
        assert client.ping()  # the broken connection was dropped; a new one works
        redis_server.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        # A server-side close reaches the client's side of the proxy.
        assert poll(lambda: proxy.connections == 0, 5), proxy.connections
        with contextlib.suppress(redis.ConnectionError):
            client.ping()  # the pool may hand out the closed connection once
        assert client.ping()
        with pytest.raises(ValueError, match="mode must be one of"):
            proxy.set_mode("sideways")
    finally:
        proxy.close()
