"""Every example in examples/ runs here, as a user would run it, against a real redis-server.

Each runs in its own process with a 1 s ttl (so the first acquisition's lock-delay on a
fresh Redis costs 1 s). A process that must be stopped gets SIGTERM/SIGINT once it showed
that it holds the lease; it must exit 0 having released the lease.
"""

from __future__ import annotations

import signal
from pathlib import Path

from mutexowner.lease import Lease, new_token
from mutexowner.testing import mark_epoch
from tests.contrib.helpers import (
    DJANGO_PROJECT,
    EXAMPLES,
    FLASK_PROJECT,
    PYTHON,
    child_env,
    heartbeats,
    lease_info,
    run_to_end,
    running,
)
from tests.redis_server import RedisServer


def test_minimal_ticks_then_stops_and_releases(redis_server: RedisServer, tmp_path: Path) -> None:
    args = [PYTHON, str(EXAMPLES / "minimal.py"), "--redis", redis_server.url, "--ttl", "1"]
    args += ["--interval", "0.05", "--ticks", "3"]
    proc = run_to_end(args, cwd=tmp_path, env=child_env(), log_dir=tmp_path, name="minimal")
    assert proc.popen.returncode == 0, proc.describe()
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("contending for 'examples:minimal' on " + redis_server.url)
    holding = next(line for line in lines if line.startswith("holding the lease"))
    token = holding.rsplit("=", 1)[1]
    assert f"tick 3 fencing_token={token}" in lines, proc.describe()
    assert lines[-2:] == ["not holding any more (stopped)", "stopped; lease released"]
    assert not lease_info(redis_server, "examples:minimal").held


def test_minimal_stops_cleanly_on_sigterm(redis_server: RedisServer, tmp_path: Path) -> None:
    args = [PYTHON, str(EXAMPLES / "minimal.py"), "--ttl", "1", "--interval", "0.05"]
    env = child_env(REDIS_URL=redis_server.url)  # the URL from the environment
    with running(args, cwd=tmp_path, env=env, log_dir=tmp_path, name="minimal") as proc:
        proc.wait_for_output("tick 1 ")
        proc.send(signal.SIGTERM)
        assert proc.finish() == 0, proc.describe()
    assert proc.stdout.splitlines()[-1] == "stopped; lease released"
    assert not lease_info(redis_server, "examples:minimal").held


def test_fencing_store_rejects_the_stale_writer(redis_server: RedisServer, tmp_path: Path) -> None:
    args = [PYTHON, str(EXAMPLES / "fencing.py"), "--redis", redis_server.url, "--ttl", "1"]
    proc = run_to_end(args, cwd=tmp_path, env=child_env(), log_dir=tmp_path, name="fencing")
    assert proc.popen.returncode == 0, proc.describe()
    out = proc.stdout
    assert "A: store accepted write #1" in out and "B: store accepted write #1" in out
    assert "A: store rejected the late write: token " in out, out
    assert "ACCEPTED" not in out
    assert "store holds 'written by B'" in out
    assert not lease_info(redis_server, "examples:fencing").held


def test_one_shot_runs_the_job_once(redis_server: RedisServer, tmp_path: Path) -> None:
    args = [PYTHON, str(EXAMPLES / "one_shot.py"), "--redis", redis_server.url, "--ttl", "1"]
    args += ["--timeout", "15", "--steps", "2"]
    proc = run_to_end(args, cwd=tmp_path, env=child_env(), log_dir=tmp_path, name="one_shot")
    assert proc.popen.returncode == 0, proc.describe()
    assert "step 2/2 done" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "job done; lease released"
    assert not lease_info(redis_server, "examples:one-shot").held


def test_one_shot_skips_while_another_node_holds(redis_server: RedisServer, tmp_path: Path) -> None:
    mark_epoch(redis_server.client(), "examples:one-shot")
    other = Lease(redis_server.client(), "examples:one-shot", ttl=60.0, identity="other-node")
    other.acquire(new_token())
    args = [PYTHON, str(EXAMPLES / "one_shot.py"), "--redis", redis_server.url, "--ttl", "1"]
    args += ["--timeout", "0.5"]
    proc = run_to_end(args, cwd=tmp_path, env=child_env(), log_dir=tmp_path, name="one_shot")
    assert proc.popen.returncode == 0, proc.describe()
    assert "another node holds the lease: not running the job" in proc.stdout
    assert "step" not in proc.stdout
    assert lease_info(redis_server, "examples:one-shot").holder == "other-node"


def _run_until_heartbeat_then_signal(
    args: list[str], cwd: Path, redis_server: RedisServer, tmp_path: Path, name: str, signum: int
) -> None:
    """Run a framework's ``mutexowner run`` command until its worker beats; signal; check."""
    beats = tmp_path / "heartbeats.txt"
    env = child_env(
        REDIS_URL=redis_server.url, MUTEXOWNER_TTL="1", EXAMPLE_HEARTBEAT_FILE=str(beats)
    )
    with running(args, cwd=cwd, env=env, log_dir=tmp_path, name=name) as proc:
        proc.wait_for(lambda: bool(heartbeats(beats)), "a heartbeat")
        info = lease_info(redis_server, name)
        (pid, token) = heartbeats(beats)[0]
        assert pid == proc.popen.pid
        assert info.holder is not None and info.fencing_token == token
        proc.send(signum)
        assert proc.finish() == 0, proc.describe()
    out = proc.stdout
    assert f"mutexowner: running key={name} identity={info.holder} " in out, out
    assert f"redis={redis_server.url}" in out
    assert out.splitlines()[-1] == "mutexowner: stopped (lease released)", out
    assert not lease_info(redis_server, name).held


def test_django_manage_py_mutexowner(redis_server: RedisServer, tmp_path: Path) -> None:
    _run_until_heartbeat_then_signal(
        [PYTHON, "manage.py", "mutexowner"],
        DJANGO_PROJECT,
        redis_server,
        tmp_path,
        "exampleproject:heartbeat",
        signal.SIGTERM,
    )


def test_flask_mutexowner_run(redis_server: RedisServer, tmp_path: Path) -> None:
    _run_until_heartbeat_then_signal(
        [PYTHON, "-m", "flask", "--app", "exampleapp", "mutexowner", "run"],
        FLASK_PROJECT,
        redis_server,
        tmp_path,
        "exampleapp:heartbeat",
        signal.SIGINT,
    )
