"""Packaging metadata, the CLI stub, and the shared fixtures' own behaviour."""

from __future__ import annotations

import configparser
import importlib.metadata
import os
from pathlib import Path

import pytest

import mutexowner
from mutexowner import cli

ROOT = Path(__file__).resolve().parent.parent
INNER_CONFTEST = "from tests.conftest import *  # noqa: F403\n"
INNER_INI = """
[pytest]
markers =
    redis: needs a real redis-server
    chaos: fault-injection suite against real redis-server
"""


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return parser


# -- packaging ---------------------------------------------------------------------------


def test_version_is_single_value_everywhere() -> None:
    # Defined once, in mutexowner/__init__.py; setup.cfg reads it from there.
    assert _setup_cfg()["metadata"]["version"] == "attr: mutexowner.__version__"
    assert mutexowner.__version__ == "0.1.0.dev0"
    assert importlib.metadata.version("mutexowner") == mutexowner.__version__


def test_public_api() -> None:
    assert "BackoffPolicy" in mutexowner.__all__
    from mutexowner import BackoffPolicy
    from mutexowner.backoff import BackoffPolicy as Same

    assert BackoffPolicy is Same


def test_package_data_ships_typing_marker_and_lua() -> None:
    package_data = _setup_cfg()["options.package_data"]["mutexowner"].split()
    assert {"py.typed", "*.lua", "lua/*.lua"} <= set(package_data)
    assert (ROOT / "mutexowner" / "py.typed").is_file()


def test_console_script_is_declared() -> None:
    scripts = _setup_cfg()["options.entry_points"]["console_scripts"]
    assert "mutexowner = mutexowner.cli:main" in scripts
    installed = [
        ep
        for ep in importlib.metadata.distribution("mutexowner").entry_points
        if ep.group == "console_scripts"
    ]
    assert [(ep.name, ep.value) for ep in installed] == [("mutexowner", "mutexowner.cli:main")]


# -- CLI entry point (the commands themselves: tests/test_cli.py, tests/test_demo.py) --------


def test_cli_main_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2  # nothing to do: a usage error
    out = capsys.readouterr().out
    assert out.startswith("usage: mutexowner")
    assert "Redis" in out
    for command in ("demo", "run", "status"):
        assert f"\n    {command} " in out


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mutexowner {mutexowner.__version__}"


# -- the shared fixtures -----------------------------------------------------------------


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A scratch pytest project that uses this suite's conftest."""
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini(INNER_INI)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return pytester


def test_leaked_library_thread_fails_the_test(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import threading, time

        def test_leaks_a_library_thread():
            threading.Thread(
                target=threading.Event().wait, args=(60,), name="mutexowner-leaky", daemon=True
            ).start()

        def test_other_threads_are_not_checked():
            threading.Thread(
                target=threading.Event().wait, args=(60,), name="someone-else", daemon=True
            ).start()

        def test_thread_that_finishes_within_the_grace_period_is_fine():
            threading.Thread(target=time.sleep, args=(0.1,), name="mutexowner-quick").start()
        """
    )
    # A subprocess, so the deliberately leaked thread dies with it.
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["*test leaked 1 mutexowner thread(s) still alive*'mutexowner-leaky'*"]
    )


def test_missing_redis_server_skips(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUTEXOWNER_REDIS_SERVER", str(inner.path / "no-such-redis-server"))
    monkeypatch.delenv("MUTEXOWNER_REQUIRE_REDIS", raising=False)
    inner.makepyfile("def test_needs_redis(redis_server):\n    pass\n")
    result = inner.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*redis-server not found on PATH; install it*"])


def test_missing_redis_server_fails_when_required(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUTEXOWNER_REDIS_SERVER", str(inner.path / "no-such-redis-server"))
    monkeypatch.setenv("MUTEXOWNER_REQUIRE_REDIS", "1")
    inner.makepyfile(
        """
        import pytest

        def test_needs_redis(redis_server):
            pass

        @pytest.mark.redis
        def test_marked_redis_test_that_skips():
            pytest.skip("for another reason")

        def test_unrelated_skip_is_still_a_skip():
            pytest.skip("not a redis test")
        """
    )
    result = inner.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*MUTEXOWNER_REQUIRE_REDIS=1*",
            "*real-Redis test was skipped while MUTEXOWNER_REQUIRE_REDIS=1*for another reason*",
        ],
        consecutive=False,
    )


def test_real_redis_fixtures_are_marked(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        def test_a(redis_server_factory):
            pass

        def test_b():
            pass
        """
    )
    result = inner.runpytest("-p", "no:cacheprovider", "-m", "redis", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_a*"])
    assert "test_b" not in result.stdout.str()
