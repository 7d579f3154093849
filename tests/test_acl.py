"""The least-privilege ACL derived from the Lua scripts, and the ``acl`` command (no Redis).

Real-server tests of the same rules (hand-off as that user, the permission check, Redis 6.2
and 7.0) are in tests/integration/test_acl_redis.py.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from importlib import resources
from pathlib import Path
from typing import Optional

import pytest
from redis import exceptions as rex

from mutexowner import acl, cli
from mutexowner.acl import (
    CLIENT_COMMANDS,
    PROBED_COMMANDS,
    SCRIPT_COMMANDS,
    AclCheck,
    acl_rules,
    acl_setuser,
    sentinel_acl_rules,
    users_acl_line,
)
from mutexowner.lease import _acl_hint, classify_error

pytestmark = pytest.mark.usefixtures("restore_logging")

LUA_DIR = resources.files("mutexowner") / "lua"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def lua_sources() -> dict[str, str]:
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in LUA_DIR.iterdir()
        if entry.name.endswith(".lua")
    }


def test_every_lua_file_is_a_lease_script() -> None:
    assert sorted(lua_sources()) == sorted(acl.LEASE_SCRIPTS)


def test_every_redis_call_in_the_scripts_names_its_command_literally() -> None:
    """A command name built at run time would escape the derived ACL: there is none."""
    for name, text in lua_sources().items():
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        for use in re.finditer(r"redis\.(\w+)\s*(\(?)\s*([^,)]*)", code):
            function, paren, first = use.groups()
            if function in ("call", "pcall"):
                assert paren and re.fullmatch(r"'[A-Za-z]+'", first), (name, use.group(0))
            else:
                assert function == "replicate_commands", (name, use.group(0))


def test_script_commands_are_exactly_what_the_scripts_run() -> None:
    # Change detector: a new command in a script changes the ACL users must grant;
    # docs/security.md and the CHANGELOG must say so.
    assert {
        "time", "info", "hmget", "hset", "hget", "pexpire", "exists", "pttl", "get", "set",
        "del", "publish",
    } == SCRIPT_COMMANDS  # fmt: skip


def test_the_permission_probe_exercises_every_script_command() -> None:
    assert PROBED_COMMANDS == SCRIPT_COMMANDS


def test_rules_grant_the_lease_keys_and_channels_and_nothing_else() -> None:
    rules = acl_rules("job")
    assert rules[:3] == ["reset", "on", ">PASSWORD"]
    keys = [r for r in rules if r.startswith("~")]
    channels = [r for r in rules if r.startswith("&")]
    assert keys == ["~mutexowner:{job}:*"] and channels == ["&mutexowner:{job}:*"]
    assert rules.index("resetchannels") < rules.index("&mutexowner:{job}:*")
    assert rules.index("-@all") < min(i for i, r in enumerate(rules) if r.startswith("+"))
    granted = {r[1:] for r in rules if r.startswith("+")}
    assert granted == SCRIPT_COMMANDS | CLIENT_COMMANDS
    assert not {"eval", "keys", "flushall", "config", "select"} & granted
    assert "+select" in acl_rules("job", db=2)
    assert "+ping" in acl_rules("job", check_connection=True)
    assert "~app:{job}:*" in acl_rules("job", prefix="app")
    with pytest.raises(ValueError, match="name"):
        acl_rules("bad{name}")


def test_setuser_and_users_acl_lines() -> None:
    rules = acl_rules("job")
    line = acl_setuser("lease", rules)
    assert line.startswith("ACL SETUSER lease reset on >PASSWORD ~mutexowner:{job}:* ")
    assert users_acl_line("lease", rules, password="pw").startswith("user lease reset on >pw ")
    assert ">PASSWORD" not in acl_setuser("lease", rules, password="pw")


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Optional[int], str, str]:
    try:
        code: Optional[int] = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else None
    out, err = capsys.readouterr()
    return code, out, err


def test_acl_command_prints_the_three_forms(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["acl", "--key", "job", "--user", "lease"], capsys)
    assert code == 0
    rules = acl_rules("job")
    lines = out.splitlines()
    assert acl_setuser("lease", rules) in lines
    assert users_acl_line("lease", rules) in lines
    shell = next(line for line in lines if line.startswith("redis-cli "))
    # The shell form quotes what the shell would redirect (>) or expand (&, |, *).
    assert shlex.split(shell)[1:] == acl_setuser("lease", rules).split(" ")


def test_acl_command_prints_the_sentinel_user_on_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_main(["acl", "--key", "job", "--sentinel-user", "discovery"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert "ACL SETUSER discovery reset on >PASSWORD -@all +sentinel|masters" in lines
    assert "user discovery reset on >PASSWORD -@all +sentinel|masters" in lines
    assert "sentinel" not in run_main(["acl", "--key", "job"], capsys)[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["acl", "--key", "a{b}"],
        ["acl", "--key", "job", "--user", "two words"],
        ["acl", "--key", "job", "--sentinel-user", ""],
    ],
)
def test_acl_command_refuses_bad_arguments(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "mutexowner acl:" in err


def test_docs_show_the_printed_recipe() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert acl_setuser("mutexowner-job", acl_rules("job")) in text
    assert users_acl_line("mutexowner-job", acl_rules("job")) in text
    assert acl_setuser("discovery", sentinel_acl_rules()) in text


def test_check_result_in_acl_terms() -> None:
    result = AclCheck(
        user="lease",
        missing_commands=("pttl", "info"),
        missing_channels=("mutexowner:{job}:*",),
    )
    assert result.describe() == ("user lease: missing: +pttl +info; channels &mutexowner:{job}:*")
    assert result.required_missing and not result.ok
    assert len(result.degraded()) == 2
    degraded_only = AclCheck(user="lease", missing_commands=("info",))
    assert not degraded_only.required_missing and not degraded_only.ok
    assert AclCheck(user="lease").ok


def test_an_acl_refusal_names_the_command_to_grant() -> None:
    acquire = resources.files("mutexowner").joinpath("lua", "acquire.lua").read_text("utf-8")
    sha = hashlib.sha1(acquire.encode()).hexdigest()
    line = next(n for n, text in enumerate(acquire.splitlines(), 1) if "redis.call('TIME')" in text)
    v7 = f"The user executing the script can't run this command or subcommand script: {sha}, "
    v7 += f"on @user_script:{line}."
    v6 = f"Error running script (call to f_{sha}): @user_script:{line}: @user_script: {line}: "
    v6 += "The user executing the script can't run this command or subcommand"
    for message in (v7, v6):
        error = classify_error(rex.ResponseError(message))
        assert error.kind == "noperm"
        assert str(error).endswith(f"(line {line} of the lease script runs TIME: grant +time)")
    assert _acl_hint("no script named here") == ""
    assert _acl_hint(f"script: {'0' * 40}, on @user_script:3.") == ""
