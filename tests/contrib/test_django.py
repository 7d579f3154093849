"""mutexowner.contrib.django, through the example project in subprocesses.

Django's settings can be configured once per process, so everything that needs a configured
Django runs in a child process (``manage.py`` or a script); validation messages are tested
in-process on plain dicts in test_settings.py. ``manage.py mutexowner`` running the worker
and stopping on SIGTERM is in tests/test_examples.py.
"""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mutexowner.inspection import STATUS_ERROR, STATUS_FREE, STATUS_HELD
from mutexowner.lease import Lease, LeaseKeys, new_token
from mutexowner.testing import mark_epoch
from tests.contrib.helpers import (
    DJANGO_PROJECT,
    PYTHON,
    child_env,
    lease_info,
    run_to_end,
    running,
)
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.timeout(60)

KEY = "exampleproject:heartbeat"
SECRET = "pw-never-shown"


def manage(tmp_path: Path, *args: str, name: str = "manage", **env: str) -> tuple[int, str, str]:
    proc = run_to_end(
        [PYTHON, "manage.py", *args],
        cwd=DJANGO_PROJECT,
        env=child_env(**env),
        log_dir=tmp_path,
        name=name,
    )
    assert proc.popen.returncode is not None
    return proc.popen.returncode, proc.stdout, proc.stderr


def test_invalid_settings_are_reported_by_the_system_checks(tmp_path: Path) -> None:
    """A bad setting is a system check error with an ID and a hint: `check` and the
    commands that run checks report it; `shell` (which skips them) still works."""
    bad = {"REDIS_URL": f"http://admin:{SECRET}@cache:6379/0"}
    code, out, err = manage(tmp_path, "check", name="check", **bad)
    assert code == 1, out + err
    assert "mutexowner.E003" in err
    assert (
        'MUTEXOWNER["REDIS_URL"] must be a redis://, rediss:// or unix:// URL (or a '
        "redis.Redis client), got 'http://admin:***@cache:6379/0'"
    ) in err
    assert 'HINT: Use a URL such as "redis://localhost:6379/0"' in err
    assert "Traceback" not in err and SECRET not in out + err

    code, out, err = manage(tmp_path, "mutexowner", name="run", **bad)
    assert code == 1 and "SystemCheckError" in err and "mutexowner.E003" in err
    assert SECRET not in out + err

    code, out, err = manage(tmp_path, "shell", "-c", "print('shell works')", name="shell", **bad)
    assert (code, out.splitlines()[-1]) == (0, "shell works"), err


def test_check_prints_the_settings_and_tests_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url = f"redis://admin:{SECRET}@127.0.0.1:{free_port()}/3"
    code, out, err = manage(
        tmp_path, "mutexowner", "--check", "--json", REDIS_URL=url, MUTEXOWNER_TTL="2"
    )
    assert code == STATUS_ERROR, err
    document = json.loads(out)
    described = document["settings"]
    assert described["redis"].startswith("redis://admin:***@127.0.0.1:")
    assert described["key"] == KEY and described["ttl"] == 2.0
    assert described["workers"] == ["exampleproject.workers.heartbeat"]
    assert described["autostart"] is False and described["stuck_worker_policy"] == "exit"
    assert document["redis"]["ok"] is False
    assert document["redis"]["steps"][0]["step"] == "PING"
    assert SECRET not in out + err

    code, out, err = manage(tmp_path, "mutexowner", "--check", REDIS_URL=redis_server.url)
    assert code == 0, out + err
    assert "ok   PING: PONG" in out and "ok   inspect script: lease free" in out
    assert out.rstrip().endswith("redis: ok")


def test_status_shows_the_holder(redis_server: RedisServer, tmp_path: Path) -> None:
    code, out, _ = manage(tmp_path, "mutexowner", "--status", REDIS_URL=redis_server.url)
    assert code == STATUS_FREE
    assert out.splitlines()[0] == (
        f"lease {KEY!r} (mutexowner:{{{KEY}}}:lease on {redis_server.url}): free"
    )

    mark_epoch(redis_server.client(), KEY)
    Lease(redis_server.client(), KEY, ttl=30, identity="node-7:12:ab").acquire(new_token())
    code, out, _ = manage(tmp_path, "mutexowner", "--status", REDIS_URL=redis_server.url)
    assert code == STATUS_HELD
    lines = out.splitlines()
    assert lines[1] == "  holder           node-7:12:ab"
    assert lines[2].startswith("  on this host     no (held on node-7; this is ")
    assert lines[4] == f"  fencing token    {lease_info(redis_server, KEY).fencing_token}"


def test_status_fails_with_exit_2_when_redis_is_down(tmp_path: Path) -> None:
    url = f"redis://admin:{SECRET}@127.0.0.1:{free_port()}/0"
    code, out, err = manage(tmp_path, "mutexowner", "--status", REDIS_URL=url)
    assert code == STATUS_ERROR
    assert f"on redis://admin:***@127.0.0.1:{url.rsplit(':', 1)[1]}): error: " in out
    assert SECRET not in out + err


STATUS_VIEW_SCRIPT = """
import json, logging
from django.test import Client
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, getattr(record, "status_code", None)])
logging.getLogger("django.request").addHandler(Keep(logging.DEBUG))
client = Client()
answers = {}
for require in ("", "host", "held", "holding", "nonsense"):
    response = client.get("/mutexowner/status" + ("?require=" + require if require else ""))
    answers[require or "none"] = [response.status_code, json.loads(response.content)]
print(json.dumps({"answers": answers, "records": records}))
"""


def test_status_view_shows_the_holder_and_logs_its_503_at_info(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The web process runs no owner (the workers run under manage.py mutexowner on another
    node): the view reports the holder from Redis; its 503 answers never reach
    django.request at ERROR (which mail_admins would mail); other answers are unchanged."""
    mark_epoch(redis_server.client(), KEY)
    lease = Lease(redis_server.client(), KEY, ttl=30, identity="node-9:321:cd")
    fence = lease.acquire(new_token()).fencing_token  # type: ignore[union-attr]
    code, out, err = manage(
        tmp_path, "shell", "-c", STATUS_VIEW_SCRIPT, name="view", REDIS_URL=redis_server.url
    )
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    answers = result["answers"]
    status, body = answers["none"]
    assert status == 200 and body["state"] == "not_started"
    assert body["lease"]["holder"] == "node-9:321:cd" and body["lease"]["fencing_token"] == fence
    assert body["lease"]["held_by_this_host"] is False
    assert answers["host"][0] == 503 and answers["holding"][0] == 503
    assert answers["held"][0] == 200 and answers["nonsense"][0] == 400
    # Three 503s logged at INFO; the 400 stays a WARNING as Django logs it.
    assert sorted(map(tuple, result["records"])) == [
        ("INFO", 503),
        ("INFO", 503),
        ("WARNING", 400),
    ]


def test_autostart_under_a_preloading_master_starts_only_in_the_forked_worker(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """gunicorn --preload: the master loads the app and forks; only a worker that serves a
    request starts an owner; its exit releases the lease (atexit)."""
    # An epoch marker as if Redis had kept our state: no lock-delay, so a 5 s ttl costs
    # nothing, and a lease that was not released would still be held when we look.
    client = redis_server.client()
    client.hset(LeaseKeys(KEY).epoch, mapping={"id": "seeded", "run_id": "", "quiet_until": "0"})
    script = Path(__file__).with_name("django_autostart_check.py")
    env = child_env(
        PYTHONPATH=str(DJANGO_PROJECT),
        REDIS_URL=redis_server.url,
        MUTEXOWNER_TTL="5",
        MUTEXOWNER_AUTOSTART="1",
    )
    proc = run_to_end(
        [PYTHON, str(script)], cwd=DJANGO_PROJECT, env=env, log_dir=tmp_path, name="fork"
    )
    assert proc.popen.returncode == 0, proc.describe()
    worker, master = (json.loads(line) for line in proc.stdout.splitlines())
    assert worker["process"] == "worker" and master["process"] == "master"
    # The worker: no inherited owner; its first request started one (503 until holding).
    assert worker["owner_before"] is None
    assert (worker["first_status"], worker["first_state"]) in ((503, "acquiring"), (200, "holding"))
    assert worker["started"] == 200 and worker["holding"] is True
    assert worker["holding_status"] == 200 and worker["body"]["holding"] is True
    assert worker["body"]["identity"] == worker["identity"] == worker["holder"]
    assert worker["body"]["fencing_token"] > 0 and worker["same_owner_on_next_request"]
    # The master: never an owner, never a library thread; the worker's exit released.
    assert master["owner_before_fork"] is None and master["owner_after"] is None
    assert master["threads_before_fork"] == [] and master["threads_after"] == []
    assert master["worker_exit"] == 0
    assert master["holder_after_worker_exit"] is None
    assert not lease_info(redis_server, KEY).held


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("mode", ["autostart", "hooks"])
def test_gunicorn_preload_master_never_holds_the_lease(
    redis_server: RedisServer, tmp_path: Path, mode: str
) -> None:
    """The real thing: gunicorn --preload with two sync workers, the owner started on a
    worker's first request (AUTOSTART) or by the post_worker_init hook (gunicorn_conf.py).
    The lease is held by a worker process (its pid is in the identity), never by the master;
    a graceful shutdown (SIGTERM) releases it."""
    pytest.importorskip("gunicorn")
    client = redis_server.client()
    client.hset(LeaseKeys(KEY).epoch, mapping={"id": "seeded", "run_id": "", "quiet_until": "0"})
    port = free_port()
    args = [PYTHON, "-m", "gunicorn", "--preload", "--workers", "2", "--bind"]
    args += [f"127.0.0.1:{port}", "--graceful-timeout", "15"]
    env = child_env(REDIS_URL=redis_server.url, MUTEXOWNER_TTL="5")
    if mode == "autostart":
        env["MUTEXOWNER_AUTOSTART"] = "1"
    else:
        args += ["-c", "gunicorn_conf.py"]
    args.append("exampleproject.wsgi")
    url = f"http://127.0.0.1:{port}/mutexowner/status?require=holding"
    answers: list[tuple[int, dict[str, Any]]] = []

    def some_worker_holds() -> bool:
        if mode == "hooks" and not lease_info(redis_server, KEY).held:
            return False  # no request needed: a worker takes the lease after booting
        try:
            answers.append(_get(url))
        except OSError:  # not listening yet
            return False
        return answers[-1][0] == 200

    with running(args, cwd=DJANGO_PROJECT, env=env, log_dir=tmp_path, name="gunicorn") as proc:
        proc.wait_for(some_worker_holds, "a worker holding the lease", timeout=30)
        master = proc.popen.pid
        body = answers[-1][1]
        info = lease_info(redis_server, KEY)
        assert info.holder == body["identity"]
        assert body["pid"] != master and f":{body['pid']}:" in body["identity"]
        assert f":{master}:" not in str(info.holder)
        # Every process that answered is a worker; none of them is the master.
        assert all(answer["pid"] != master for _, answer in answers)
        # ?require=holding depends on which worker answers; ?require=host does not: every
        # worker reads the holder from Redis and finds it on this host.
        host_url = url.replace("require=holding", "require=host")
        for _ in range(6):
            code, seen = _get(host_url)
            assert code == 200 and seen["lease"]["holder"] == info.holder, seen
        proc.send(signal.SIGTERM)
        assert proc.finish(30) == 0, proc.describe()
    # Released by the worker's exit, not expired: the ttl (5 s) has not run out.
    assert not lease_info(redis_server, KEY).held
