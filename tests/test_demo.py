"""``mutexowner demo``: the README's first command, on the embedded fake Redis and a real one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from mutexowner import cli
from mutexowner.demo import (
    MIN_SECONDS,
    DemoPlan,
    _hand_offs,
    _max_overlap,
    _Run,
)
from mutexowner.owner import drift_for
from tests.redis_server import RedisServer

SUMMARY = re.compile(
    r"^summary: (?P<hand_offs>\d+) hand-offs, max overlap = (?P<overlap>\S+), "
    r"crash takeover (?P<takeover>[\d.]+) s .*clean hand-off (?P<hand_off>\d+) ms, "
    r"(outage [\d.]+ s: stepped down after (?P<step_down>[\d.]+) s, "
    r"back (?P<recovery>[\d.]+) s after Redis returned|outage skipped); "
    r"(?P<runs>\d+) worker runs, (?P<errors>\d+) Redis errors",
    re.MULTILINE,
)


pytestmark = pytest.mark.usefixtures("restore_logging")


# -- the plan ------------------------------------------------------------------------------


def test_plan_scales_with_seconds_and_respects_the_timing_rule() -> None:
    short, default = DemoPlan.for_seconds(8), DemoPlan.for_seconds(20)
    assert 0.75 <= short.ttl < default.ttl <= 2.5
    for plan in (DemoPlan.for_seconds(MIN_SECONDS), short, default, DemoPlan.for_seconds(600)):
        assert plan.outage > plan.ttl  # an outage longer than the ttl
        assert plan.ttl / 3 + plan.shutdown_timeout < plan.ttl - drift_for(plan.ttl)
        # Nominal scenario (about 5.75 ttls) fits well within the budget.
        assert plan.ttl * 5.75 <= plan.seconds * 0.7 + 0.06 or plan.ttl == 0.75


@pytest.mark.parametrize("seconds", [MIN_SECONDS - 0.5, 0, -1, float("inf"), float("nan")])
def test_plan_rejects_too_few_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="--seconds must be >= 6"):
        DemoPlan.for_seconds(seconds)


def _run(node: Any, start: float, end: Optional[float]) -> _Run:
    return _Run(node=node, token=1, start=start, end=end)


def test_overlap_and_hand_offs_are_computed_from_worker_runs() -> None:
    a, b = object(), object()  # stand-ins for two nodes (compared by identity)
    runs = [_run(a, 0.0, 1.0), _run(b, 1.5, 2.0), _run(a, 2.5, 3.0), _run(a, 3.5, None)]
    assert _max_overlap(runs, now=4.0) == 0.0
    assert _hand_offs(runs) == 2
    runs.append(_run(b, 3.75, 3.9))  # b ran while a's last run was still going
    assert _max_overlap(runs, now=4.0) == pytest.approx(0.15)
    assert _max_overlap([_run(a, 0.0, None), _run(b, 1.0, None)], now=1.25) == 0.25


# -- the demo, in-process and as a command -------------------------------------------------


@pytest.mark.timeout(60)
def test_demo_in_process_with_a_short_budget(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert cli.main(["demo", "--seconds", "8", "--seed", "1"]) == 0
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert elapsed < 8.0, out
    assert "on an embedded fake Redis (no server needed)" in out
    assert "seed 1" in out
    # State changes, fencing tokens and the workers-running column.
    assert "nobody may take the lease for one ttl" in out
    # (The workers column may already show the new holder: workers start before the events
    # of the turn that acquired are delivered.)
    assert re.search(r"acquiring → holding\s+\d{6,}\s+(-|node-[abc])$", out, re.MULTILINE), out
    assert re.search(r"worker started\s+\d{6,}\s+node-[abc]$", out, re.MULTILINE), out
    for step in ("crashes (kill -9)", "stops cleanly", "Redis outage", "Redis is back"):
        assert step in out
    assert "holding → suspended (connection)" in out
    assert "suspended → acquiring (expired)" in out
    assert "released the lease, standbys notified" in out
    # Never two workers at once in the running column.
    assert not re.search(r"node-[abc],node-[abc]", out)
    match = SUMMARY.search(out)
    assert match, out
    assert match["overlap"] == "0"
    assert int(match["hand_offs"]) >= 2 and int(match["runs"]) >= 4
    ttl = DemoPlan.for_seconds(8).ttl
    # A crashed holder's lease runs out within one ttl; a clean stop hands over at once.
    assert float(match["takeover"]) <= ttl + 0.5
    assert int(match["hand_off"]) < ttl / 2 * 1000
    # In the outage the holder steps down before its lease can expire (< one ttl), and a
    # worker runs again soon after Redis returns (retries are capped at ttl/4 here).
    assert float(match["step_down"]) < ttl
    assert float(match["recovery"]) < ttl
    assert int(match["errors"]) > 0
    assert "FAILED" not in out
    assert out.rstrip().splitlines()[-1].startswith("summary: ")


@pytest.mark.timeout(90)
def test_demo_console_script_needs_no_redis(tmp_path: Path) -> None:
    script = shutil.which("mutexowner", path=str(Path(sys.executable).parent))
    script = script or shutil.which("mutexowner")
    assert script is not None, "the mutexowner console script is not installed"
    result = subprocess.run(
        [script, "demo", "--seconds", str(MIN_SECONDS), "--seed", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"},  # ignored
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = SUMMARY.search(result.stdout)
    assert match and match["overlap"] == "0", result.stdout
    assert "embedded fake Redis" in result.stdout
    assert result.stderr == ""  # the library's warnings are not shown at the demo's level


@pytest.mark.timeout(60)
def test_demo_against_a_real_redis_skips_the_outage_and_cleans_up(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--seconds", str(MIN_SECONDS), "--redis", redis_server.url]) == 0
    out = capsys.readouterr().out
    assert f"on {redis_server.url}" in out
    assert "outage phase skipped" in out
    assert SUMMARY.search(out) and "max overlap = 0," in out
    assert redis_server.client().dbsize() == 0  # the demo's keys are gone


def test_demo_reports_an_unreachable_redis_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = "redis://alice:s3cret-pw@127.0.0.1:1/0"
    assert cli.main(["demo", "--redis", url]) == 2
    out, err = capsys.readouterr()
    assert "cannot use Redis at redis://alice:***@127.0.0.1:1/0" in err
    assert "s3cret-pw" not in out + err


def test_demo_rejects_a_budget_below_the_minimum(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--seconds", "2"]) == 2
    assert "--seconds must be >= 6" in capsys.readouterr().err


def test_demo_without_fakeredis_says_which_extra_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mutexowner.demo

    def no_fakeredis() -> tuple[Any, Any]:
        raise ImportError("No module named 'fakeredis'")

    monkeypatch.setattr(mutexowner.demo, "_fake_client", no_fakeredis)
    assert cli.main(["demo", "--seconds", "6"]) == 2
    assert "pip install 'mutexowner[demo]'" in capsys.readouterr().err


def test_timeline_falls_back_to_ascii_arrows_where_the_terminal_cannot_print_them() -> None:
    import io

    from mutexowner.demo import _Timeline

    latin1 = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    assert _Timeline(latin1).arrow == "->"
    assert _Timeline(io.StringIO()).arrow == "→"
