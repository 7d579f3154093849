"""The printed least-privilege ACL on real servers (6.2 and 7.0): enough, and no more.

A user built from ``mutexowner acl``'s line runs acquire, renew, release and the hand-off
notice, and ``status`` / ``status --check``; it may touch no other key; a user missing one
grant gets a precise message from the check and from the owner.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Callable

import pytest
import redis
from redis import exceptions as rex

from mutexowner import BackoffPolicy, Event, MutexOwner, cli
from mutexowner.acl import acl_rules, lease_commands, users_acl_line
from mutexowner.lease import LeaseKeys
from mutexowner.testing import mark_epoch
from tests.helpers import errors_of, stop_to_acquired
from tests.redis_server import RedisServer, poll, redis_server_version

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

PASSWORD = "lease-pw-8086"
USER = "mutexowner-job"


def printed_setuser_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The ACL SETUSER line exactly as ``mutexowner acl`` prints it."""
    assert cli.main(["acl", "--key", "job", "--user", USER]) == 0
    out = capsys.readouterr().out
    return next(line for line in out.splitlines() if line.startswith("ACL SETUSER "))


def create_user(server: RedisServer, line: str, *extra: str) -> str:
    """Run an ``ACL SETUSER`` line (PASSWORD filled in) as admin; the user's URL."""
    words = line.replace(">PASSWORD", f">{PASSWORD}").split(" ")
    server.client().execute_command(*words, *extra)
    return f"redis://{USER}:{PASSWORD}@{server.host}:{server.port}/0"


def check(url: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.check(url, "job", out=out, err=err)
    return code, out.getvalue() + err.getvalue()


def hand_off(url: str, owners: list[MutexOwner], ttl: float) -> tuple[float, list[Event]]:
    """A holds, B waits; A stops cleanly: seconds until B holds, and every error event."""
    a = MutexOwner(url, "job", ttl=ttl, identity="A", backoff=BackoffPolicy(0.05, max_delay=1))
    b = MutexOwner(url, "job", ttl=ttl, identity="B", backoff=BackoffPolicy(0.05, max_delay=1))
    owners += [a, b]
    errors_a, errors_b = errors_of(a), errors_of(b)
    a.start()
    assert a.wait_until_holding(10), a.status()
    b.start()
    assert poll(lambda: (b.status().next_attempt_in or 0) > ttl / 4, 10), b.status()
    took = stop_to_acquired(a, b, ttl)
    return took, errors_a + errors_b


def test_the_printed_user_hands_off_in_milliseconds_and_may_do_nothing_else(
    redis_server_factory: Callable[..., RedisServer],
    owners: list[MutexOwner],
    capsys: pytest.CaptureFixture[str],
    record_figures: Callable[..., None],
) -> None:
    # With a replica attached, so that whatever the library sends only when the master has
    # replicas (a confirmation that a renewal was replicated) runs under the ACL too.
    redis_server = redis_server_factory(config={"repl-diskless-sync-delay": 0})
    replica = redis_server_factory().client()
    replica.replicaof(redis_server.host, redis_server.port)
    assert poll(lambda: replica.info("replication").get("master_link_status") == "up", 10)
    url = create_user(redis_server, printed_setuser_line(capsys))
    mark_epoch(redis_server.client(), "job")
    assert check(url) == (
        0,
        f"lease 'job' on redis://{USER}:***@127.0.0.1:"
        f"{redis_server.port}/0: user {USER}: every permission the lease "
        "needs is granted\n",
    )
    took, errors = hand_off(url, owners, ttl=5.0)
    assert not errors, errors
    assert took < 1.0, f"hand-off took {took:.3f} s: the release notice did not arrive"
    record_figures(least_privilege_handoff=round(took, 4), ttl=5.0)
    out = io.StringIO()
    assert cli.status(url, "job", out=out, err=out) == 3, out.getvalue()  # free, readable
    user = redis.Redis.from_url(url)
    for command in (
        ("SET", "other", "1"),
        ("SET", LeaseKeys("other").lease, "1"),
        ("GET", "other"),
        ("EVAL", "return 1", "0"),
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("PUBLISH", "other-channel", "x"),
    ):
        with pytest.raises(rex.NoPermissionError):
            user.execute_command(*command)
    # Nor through the lease's own script: its keys must match the lease's pattern.
    sha = user.script_load("return redis.call('SET', KEYS[1], 'x')")
    with pytest.raises(rex.NoPermissionError):
        user.evalsha(sha, 1, "other")
    assert redis_server.client().keys("other*") == []
    user.close()


def test_the_users_acl_form_loads_and_passes_the_check(
    redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(
        "user default on nopass ~* &* +@all\n"
        + users_acl_line(USER, acl_rules("job"), password=PASSWORD)
        + "\n"
    )
    server = redis_server_factory(config={"aclfile": str(aclfile)})
    url = f"redis://{USER}:{PASSWORD}@{server.host}:{server.port}/0"
    code, text = check(url)
    assert code == 0, text


def test_each_grant_is_needed_and_a_user_missing_it_is_told_exactly_which(
    redis_server: RedisServer,
) -> None:
    """Nothing less than the printed line works: drop any one grant and the check names it."""
    admin = redis_server.client()
    url = f"redis://{USER}:{PASSWORD}@{redis_server.host}:{redis_server.port}/0"
    for command in lease_commands():
        rules = [r for r in acl_rules("job") if r != f"+{command}"]
        admin.execute_command("ACL", "SETUSER", USER, *_with_password(rules))
        code, text = check(url)
        assert code == cli.EXIT_PERMISSIONS, (command, text)
        assert f"user {USER}: missing: +{command}\n" in text, (command, text)
        assert "mutexowner acl --key job" in text and PASSWORD not in text
    # Scratch keys remain only when +del was missing, and then expire within 10 s.
    left = admin.keys("*")
    assert all(key.startswith(b"mutexowner:{job}:check:") for key in left), left
    assert all(0 < admin.pttl(key) <= 10_000 for key in left), left


def _with_password(rules: list[str]) -> list[str]:
    return [f">{PASSWORD}" if rule == ">PASSWORD" else rule for rule in rules]


def test_the_owner_names_the_missing_grant_and_retries_at_the_cap(
    redis_server: RedisServer, owners: list[MutexOwner], capsys: pytest.CaptureFixture[str]
) -> None:
    url = create_user(redis_server, printed_setuser_line(capsys), "-time")
    cap = 0.3
    owner = MutexOwner(url, "job", ttl=2.0, backoff=BackoffPolicy(0.05, max_delay=cap))
    owners.append(owner)
    errors = errors_of(owner)
    owner.start()
    assert poll(lambda: len(errors) >= 5, 10), owner.status()
    status = owner.status()
    assert status.state == "acquiring" and {e.error_kind for e in errors} == {"noperm"}
    assert status.last_error and status.last_error.endswith("runs TIME: grant +time)")
    gaps = [b.time - a.time for a, b in zip(errors, errors[1:])]
    assert sum(gap < cap * 0.9 for gap in gaps) <= 1, gaps  # at the cap, not a hot loop
    assert any(t.name.startswith("mutexowner-engine-") for t in owner.threads)


def test_without_channels_or_info_the_lease_still_works_degraded(
    redis_server: RedisServer,
    owners: list[MutexOwner],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mutexowner.hub")
    url = create_user(redis_server, printed_setuser_line(capsys), "resetchannels", "-info")
    mark_epoch(redis_server.client(), "job")
    code, text = check(url)
    assert code == cli.EXIT_PERMISSIONS, text
    assert f"missing: +info; channels &{LeaseKeys('job').tag}:*" in text
    assert "without +info:" in text and "without channel access:" in text
    took, errors = hand_off(url, owners, ttl=1.5)
    assert not errors, errors  # a refused notice or subscription is not a lease error
    assert took < 1.5 + 3.0  # by expiry of the lease B was told about (generous: load)
    assert not redis_server.client().exists(LeaseKeys("job").lease)  # released
    # The engine's hub (one for both owners: same URL) says once per channel that hand-off
    # notices are off, and what to grant.
    refused = [r.getMessage() for r in caplog.records if "refuses SUBSCRIBE" in r.getMessage()]
    assert len(refused) == 1, refused
    assert all(f"&{LeaseKeys('job').tag}:*" in m for m in refused), refused


def test_redis_version_supports_the_printed_rules(redis_server: RedisServer) -> None:
    assert redis_server_version(redis_server.executable) >= (6, 2)


def test_a_database_other_than_0_needs_select_and_the_check_says_so(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    url = f"redis://{USER}:{PASSWORD}@{redis_server.host}:{redis_server.port}/2"
    admin.execute_command("ACL", "SETUSER", USER, *_with_password(acl_rules("job", db=2)))
    assert check(url)[0] == 0
    admin.execute_command("ACL", "SETUSER", USER, *_with_password(acl_rules("job")))
    code, text = check(url)
    assert code == cli.EXIT_PERMISSIONS and f"user {USER}: missing: +select\n" in text, text


def test_the_framework_check_commands_test_permissions_too(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # `flask mutexowner check` and `manage.py mutexowner --check` share inspection.check_redis.
    from flask import Flask

    from mutexowner.contrib.flask import MutexOwnerExtension
    from mutexowner.inspection import STATUS_ERROR

    url = create_user(redis_server, printed_setuser_line(capsys), "-time")
    app = Flask("acl-check")
    app.config.update(MUTEXOWNER_REDIS_URL=url, MUTEXOWNER_KEY="job", MUTEXOWNER_TTL=2.0)
    MutexOwnerExtension(app)
    result = app.test_cli_runner().invoke(args=["mutexowner", "check"])
    assert result.exit_code == STATUS_ERROR, result.output
    assert "FAIL permissions: user mutexowner-job: missing: +time" in result.output
    assert "mutexowner acl --key job" in result.output
    assert PASSWORD not in result.output
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", USER, "+time")
    result = app.test_cli_runner().invoke(args=["mutexowner", "check"])
    assert result.exit_code == 0, result.output
    assert "ok   permissions: user mutexowner-job: every permission" in result.output
