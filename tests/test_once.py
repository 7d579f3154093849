"""``mutexowner.run_once`` and ``once_job``: run a job once, on one host (issue 14, item 1).

On a fakeredis lease (no lock-delay: the epoch is marked); the waits are real but short,
and every assertion is about an outcome, never about a sleep having been long enough.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import mutexowner
from mutexowner import RunOnceResult, once_job, run_once
from mutexowner.lease import Lease, new_token
from mutexowner.testing import fake_redis

pytestmark = pytest.mark.usefixtures("restore_logging")


def held(client: Any, name: str = "job") -> bool:
    return Lease(client, name, ttl=1.0, identity="check").inspect().held


def take(client: Any, name: str = "job", ttl: float = 30.0) -> None:
    """Another host holds the lease."""
    Lease(client, name, ttl=ttl, identity="other-host").acquire(new_token())


@pytest.mark.timeout(30)
def test_runs_the_job_when_the_lease_is_free_and_releases_it() -> None:
    client = fake_redis("job")
    seen: list[bool] = []

    def job() -> str:
        seen.append(held(client))
        return "done"

    result = run_once(client, "job", job, wait=0, ttl=2.0)
    assert result == RunOnceResult(
        ran=True, reason="ran", value="done", fencing_token=result.fencing_token
    )
    assert result and isinstance(result.fencing_token, int)
    assert seen == [True]  # the job ran under the lease
    assert not held(client)  # released on the way out


@pytest.mark.timeout(30)
def test_skips_at_once_when_another_host_holds_it() -> None:
    client = fake_redis("job")
    take(client)
    calls: list[int] = []
    started = time.monotonic()
    result = run_once(client, "job", lambda: calls.append(1), wait=0, ttl=2.0)
    assert not result and result.reason == "held_elsewhere" and result.value is None
    assert calls == []
    assert time.monotonic() - started < 5.0  # did not wait for the other lease to end


@pytest.mark.timeout(30)
def test_redis_unreachable_is_not_a_skip() -> None:
    import fakeredis

    server = fakeredis.FakeServer()
    server.connected = False
    result = run_once(fake_redis(server=server), "job", lambda: 1, wait=0, ttl=2.0)
    assert not result.ran and result.reason == "redis_unavailable"


@pytest.mark.timeout(30)
def test_hold_at_least_keeps_the_lease_after_a_quick_job() -> None:
    client = fake_redis("job")
    started: list[float] = []
    result = run_once(client, "job", lambda: started.append(time.monotonic()), hold_at_least=1.0)
    assert result.ran
    assert time.monotonic() - started[0] >= 1.0  # returned only after the hold
    assert not held(client)


@pytest.mark.timeout(30)
def test_a_failing_job_raises_after_the_lease_is_released() -> None:
    client = fake_redis("job")

    def job() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_once(client, "job", job, ttl=2.0)
    assert not held(client)


@pytest.mark.timeout(30)
def test_decorator_passes_arguments_and_reports_each_call() -> None:
    client = fake_redis("job")

    @once_job(client, "job", ttl=2.0)
    def report(day: str, *, fmt: str = "csv") -> str:
        return f"{day}.{fmt}"

    assert report.__name__ == "report"
    first = report("2026-01-01", fmt="pdf")
    assert first.ran and first.value == "2026-01-01.pdf"
    take(client)
    assert report("2026-01-02").reason == "held_elsewhere"


def test_bad_arguments_name_the_parameter() -> None:
    client = fake_redis("job")
    with pytest.raises(ValueError, match="wait"):
        run_once(client, "job", lambda: 1, wait=-1)
    with pytest.raises(ValueError, match="hold_at_least"):
        run_once(client, "job", lambda: 1, hold_at_least=-0.5)
    with pytest.raises(TypeError, match="fn must be callable"):
        run_once(client, "job", 42)  # type: ignore[arg-type]


def test_exported_from_the_package() -> None:
    assert mutexowner.run_once is run_once and mutexowner.once_job is once_job
    assert "run_once" in mutexowner.__all__


class _Snapshot:
    """An owner whose status() is a given snapshot."""

    def __init__(self, state: str, **fields: Any) -> None:
        from mutexowner.owner import OwnerStatus

        defaults: dict[str, Any] = dict(
            key="job",
            identity="me",
            state=state,
            holding=state == "holding",
            fencing_token=None,
            lease_remaining=None,
            consecutive_errors=0,
            last_error=None,
            next_attempt_in=0.0,
        )
        defaults.update(fields)
        self._status = OwnerStatus(**defaults)

    def status(self) -> Any:
        return self._status


@pytest.mark.parametrize(
    ("state", "fields", "decided"),
    [
        ("acquiring", {}, None),  # first attempt not answered yet
        ("acquiring", {"next_attempt_in": 1.5}, "taken"),
        ("acquiring", {"next_attempt_in": 1.5, "lock_delay_remaining": 1.5}, None),  # quiet
        # The quiet period has just passed; the look after it is not answered yet.
        ("acquiring", {"next_attempt_in": 0.0005, "lock_delay_remaining": 0.0}, None),
        ("acquiring", {"consecutive_errors": 1, "next_attempt_in": 0.5}, "unavailable"),
        # One snapshot: a holder's next renewal is not a "taken" answer.
        ("holding", {"next_attempt_in": 0.6}, "ours"),
        ("settling", {"next_attempt_in": 0.6, "lock_delay_remaining": 2.0}, "ours"),
        ("stopped", {}, "stopped"),
    ],
)
def test_what_one_status_snapshot_decides(
    state: str, fields: dict[str, Any], decided: object
) -> None:
    from mutexowner.once import _decided

    assert _decided(_Snapshot(state, **fields)) == decided  # type: ignore[arg-type]


def test_after_a_quiet_period_no_host_decides_taken_before_its_next_look() -> None:
    # Every host of a fresh Redis is told "quiet" for one ttl, then looks again ~1 ms after
    # it ends. In that gap a status snapshot used to read "taken" (next attempt pending, no
    # lock-delay left), so under load all three hosts of `run --once --wait 0` skipped the job
    # (seen in CI). The owner now reports 0 s of lock-delay until that look is answered.
    from mutexowner import MutexOwner
    from mutexowner.once import _decided
    from mutexowner.testing import FakeClock, OwnerDriver

    clock = FakeClock()
    owner = MutexOwner(fake_redis(), "nightly", ttl=10, clock=clock)
    driver = OwnerDriver(owner, clock)
    driver.step()  # a fresh server: "quiet", look again when the quiet period ends
    delay = owner.status().lock_delay_remaining
    assert delay is not None and delay > 0 and _decided(owner) is None
    clock.advance(delay + 0.0005)  # past the quiet period, before the look after it
    status = owner.status()
    assert status.next_attempt_in and status.lock_delay_remaining == 0.0
    assert _decided(owner) is None
    driver.stop()
