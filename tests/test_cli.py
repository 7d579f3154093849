"""The ``mutexowner`` command line: parsing, help, errors, ``status``, and ``run``'s runner.

No real Redis here: ``status`` gets a fakeredis client, the runner runs real child
processes on a fakeredis lease. Cross-process behaviour (two ``mutexowner run`` processes,
kill -9, signals) is in tests/integration/test_cli_run.py against a real redis-server.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from mutexowner import _guard, cli, testing
from mutexowner.lease import Lease, LeaseKeys, new_token
from mutexowner.runner import (
    CLEAN_RESTART_DELAY,
    EXIT_GAVE_UP,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_STATUS_FREE,
    EXIT_USAGE,
    RunConfig,
    Runner,
    check_command,
    exit_status,
    guard_command,
    kill_margin,
)
from mutexowner.testing import fake_redis
from tests.helpers import alive, wait_for

PASSWORD = "s3cret-pw"
#: A loopback port nothing listens on (connection refused at once).
CLOSED_URL = f"redis://alice:{PASSWORD}@127.0.0.1:1/0"


pytestmark = pytest.mark.usefixtures("restore_logging")


def mark_epoch(client: Any, name: str = "job", prefix: str = "mutexowner") -> None:
    """Make Redis look as if it kept our state: no lock-delay on the first acquisition."""
    testing.mark_epoch(client, name, prefix)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Optional[int], str, str]:
    """``cli.main(argv)``: (exit status, stdout, stderr); argparse exits give their code."""
    try:
        code: Optional[int] = cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else None
    out, err = capsys.readouterr()
    return code, out, err


# -- parsing and help ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["mutexowner demo", "mutexowner run --redis", "mutexowner status", "exit status:"]),
        (["demo"], ["mutexowner demo --seconds 8 --seed 1", "--redis redis://"]),
        (["run"], ["mutexowner run --redis redis://", "--once", "exit status:", "--skip-ok"]),
        (["status"], ["mutexowner status --redis redis://", "--json", "3 it is free"]),
    ],
)
def test_help_of_every_command_has_examples(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main([*argv, "--help"], capsys)
    assert code == 0
    assert "examples:" in out
    for text in expected:
        assert text in out


def test_main_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_main(["--help"], capsys)
    for code in ("0", "1", "2", "3", "69", "70", "75", "126", "127", "N"):
        assert f"\n  {code} " in out, code
    assert "128+S when the command died from signal S" in out


def test_no_command_prints_help_and_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main([], capsys)
    assert code == EXIT_USAGE
    assert out.startswith("usage: mutexowner")


def test_everything_after_double_dash_is_the_command() -> None:
    args = cli.parse_args(
        ["run", "--redis", "redis://h/0", "--key", "k", "--", "python", "-c", "x", "--ttl", "5"]
    )
    assert args.command == ["python", "-c", "x", "--ttl", "5"]
    assert args.ttl == 10.0 and args.key == "k" and not args.once


def test_command_without_double_dash_and_defaults() -> None:
    args = cli.parse_args(["run", "--key", "k", "--once", "--grace", "0.5", "sleep", "10"])
    assert args.command == ["sleep", "10"]
    assert args.once and args.grace == 0.5 and args.redis is None
    assert (args.max_restarts, args.max_seconds, args.prefix) == (3, 5.0, "mutexowner")


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--key", "k", "--", "x"],  # only run takes a command
        ["run", "--key", "k", "sleep", "--", "sleep"],  # command given twice
        ["run", "--key", "k", "--log-level", "loud", "--", "true"],
        ["status"],  # --key is required
        ["demo", "--seconds", "soon"],
    ],
)
def test_bad_command_lines_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(argv, capsys)
    assert code == EXIT_USAGE
    assert "usage:" in err


def test_log_level_is_case_insensitive_before_or_after_the_command() -> None:
    assert cli.parse_args(["--log-level", "DEBUG", "status", "--key", "k"]).log_level == "debug"
    assert cli.parse_args(["status", "--key", "k", "--log-level", "Error"]).log_level == "error"


def test_run_needs_a_redis_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    code, _, err = run_main(["run", "--key", "k", "--", "true"], capsys)
    assert code == EXIT_USAGE
    assert "--redis URL or set $REDIS_URL" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ttl", "2", "--grace", "2"], "--grace 2 is too large for --ttl 2"),
        (["--ttl", "0"], "--ttl must be > 0"),
        (["--grace", "-1"], "--grace must be >= 0"),
        (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
        (["--max-seconds", "0"], "--max-seconds must be > 0"),
        (["--ttl", "nan"], "--ttl must be a finite number"),
    ],
)
def test_run_rejects_bad_timing_naming_the_flag(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(
        ["run", "--redis", CLOSED_URL, "--key", "k", *extra, "--", "true"], capsys
    )
    assert code == EXIT_USAGE
    assert message in err
    assert PASSWORD not in err


def test_run_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["run", "--redis", CLOSED_URL, "--key", "k"], capsys)
    assert code == EXIT_USAGE
    assert "a COMMAND is required after '--'" in err


def test_run_reports_a_missing_or_not_executable_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(
        ["run", "--redis", CLOSED_URL, "--key", "k", "--", "no-such-command-xyz"], capsys
    )
    assert code == EXIT_NOT_FOUND
    assert "command not found: no-such-command-xyz" in err
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    code, _, err = run_main(["run", "--redis", CLOSED_URL, "--key", "k", "--", str(script)], capsys)
    assert code == EXIT_NOT_EXECUTABLE
    assert "command not executable" in err
    assert check_command((sys.executable,)) is None
    assert check_command(("sh",), env={"PATH": str(tmp_path)}) == EXIT_NOT_FOUND


def test_run_rejects_a_bad_redis_url_without_showing_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://bob:{PASSWORD}@example.invalid/0"
    code, _, err = run_main(["run", "--redis", url, "--key", "k", "--", "true"], capsys)
    assert code == EXIT_USAGE
    assert "redis://, rediss:// or unix://" in err
    assert PASSWORD not in err


# -- RunConfig -----------------------------------------------------------------------------


def test_run_config_defaults_fit_the_lease() -> None:
    config = RunConfig(key="k", command=("true",))
    assert config.grace_seconds == pytest.approx(3.0)
    assert config.shutdown_timeout == pytest.approx(3.0 + kill_margin(10.0))
    assert RunConfig.max_grace(10.0) > config.grace_seconds
    assert RunConfig(key="k", command=("true",), ttl=2.0, grace=0).grace_seconds == 0.0


def test_run_config_error_says_which_grace_would_fit() -> None:
    limit = RunConfig.max_grace(10.0)
    with pytest.raises(ValueError, match=rf"Use --grace below {limit:.3g} or a larger --ttl"):
        RunConfig(key="k", command=("true",), grace=limit)
    with pytest.raises(ValueError, match="Use a larger --ttl"):
        RunConfig(key="k", command=("true",), ttl=0.3)


def test_exit_status_is_the_shells() -> None:
    assert exit_status(0) == 0
    assert exit_status(7) == 7
    assert exit_status(-signal.SIGTERM) == 143
    assert exit_status(-signal.SIGKILL) == 137


# -- status (fakeredis client injected) ----------------------------------------------------


def test_status_of_a_free_lease_on_a_fresh_redis(capsys: pytest.CaptureFixture[str]) -> None:
    client = fake_redis()
    assert cli.status(client, "job") == EXIT_STATUS_FREE
    out = capsys.readouterr().out
    assert out.startswith("lease 'job' (mutexowner:{job}:lease on the given client): free")
    assert "fencing counter  none" in out
    assert "epoch marker     missing: the next acquisition waits one ttl" in out


def test_status_of_a_held_lease_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    client = fake_redis("job")
    lease = Lease(client, "job", ttl=30.0, identity="host-a:42:abc")
    result = lease.acquire(new_token())
    fence = result.fencing_token  # type: ignore[union-attr]
    seconds, micros = client.time()
    quiet_until = seconds * 1000 + micros // 1000 + 20_000  # as if Redis just lost its data
    client.hset(LeaseKeys("job").epoch, "quiet_until", str(quiet_until))

    assert cli.status(client, "job") == 0
    out = capsys.readouterr().out
    assert ": held" in out
    assert "holder           host-a:42:abc" in out
    assert f"fencing token    {fence}" in out
    assert "lock-delay       " in out  # the quiet period is shown while it runs

    assert cli.status(client, "job", as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["held"] is True and data["holder"] == "host-a:42:abc"
    assert data["fencing_token"] == fence == data["fencing_counter"]
    assert 29.0 < data["ttl_left"] <= 30.0
    assert data["key"] == "mutexowner:{job}:lease" and data["name"] == "job"
    assert data["epoch_present"] is True and data["lock_delay_remaining"] > 0


def test_status_with_another_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    client = fake_redis()
    mark_epoch(client, "job", prefix="app")
    Lease(client, "job", ttl=30.0, identity="x", prefix="app").acquire(new_token())
    assert cli.status(client, "job") == EXIT_STATUS_FREE
    assert cli.status(client, "job", prefix="app") == 0
    assert "app:{job}:lease" in capsys.readouterr().out


@pytest.mark.parametrize("as_json", [False, True])
def test_status_error_exits_2_and_never_shows_the_password(
    as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.status(CLOSED_URL, "job", as_json=as_json) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    assert "redis://alice:***@127.0.0.1:1/0" in err
    assert "cannot reach Redis" in err
    if as_json:
        data = json.loads(out)
        assert data["redis"] == "redis://alice:***@127.0.0.1:1/0" and "error" in data


def test_status_reads_redis_url_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", CLOSED_URL)
    code, out, err = run_main(["status", "--key", "job"], capsys)
    assert code == EXIT_USAGE
    assert "redis://alice:***@127.0.0.1:1/0" in err
    assert PASSWORD not in out + err
    monkeypatch.delenv("REDIS_URL")
    code, _, err = run_main(["status", "--key", "job"], capsys)
    assert code == EXIT_USAGE and "set $REDIS_URL" in err


def test_log_lines_of_the_cli_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    root.handlers[:] = []  # as in a fresh process: main() installs its own handler
    cli._configure_logging("info")
    logging.getLogger("mutexowner.test").warning("connecting to %s", CLOSED_URL)
    err = capsys.readouterr().err
    assert "redis://alice:***@127.0.0.1:1/0" in err and PASSWORD not in err


# -- the runner, on a fakeredis lease, with real child processes ---------------------------

CHILD = """
import os, signal, sys
out = sys.argv[1]
mode = sys.argv[2]
with open(out, "a") as f:
    f.write("start %s %s %s %d\\n" % (os.environ["MUTEXOWNER_FENCING_TOKEN"],
            os.environ["MUTEXOWNER_KEY"], os.environ["MUTEXOWNER_IDENTITY"], os.getpid()))
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "term-exit-7":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))
if mode == "grandchild":
    import subprocess
    g = subprocess.Popen(["sleep", "60"])
    with open(out, "a") as f:
        f.write("grandchild %d\\n" % g.pid)
with open(out, "a") as f:
    f.write("ready\\n")
while True:
    signal.pause()  # until a signal ends the process
"""


class RunnerUnderTest:
    """A Runner on a fakeredis lease (no lock-delay), run in a helper thread."""

    def __init__(self, tmp_path: Path, mode: str, **config: Any) -> None:
        self.out = tmp_path / "child.log"
        self.client = fake_redis()
        mark_epoch(self.client)
        config.setdefault("ttl", 2.0)
        config.setdefault("grace", 0.3)
        self.config = RunConfig(
            key="job",
            command=(sys.executable, "-c", CHILD, str(self.out), mode),
            identity="tester",
            **config,
        )
        self.stuck: list[tuple[str, ...]] = []
        self.runner = Runner(
            self.config,
            self.client,
            stuck_worker_policy=self.stuck.append,
            install_signal_handlers=False,
        )
        self.code: Optional[int] = None
        self.thread = threading.Thread(target=self._main, name="test-runner")

    def _main(self) -> None:
        self.code = self.runner.run()

    def start(self) -> RunnerUnderTest:
        self.thread.start()
        return self

    def lines(self, prefix: str) -> list[list[str]]:
        if not self.out.exists():
            return []
        return [ln.split() for ln in self.out.read_text().splitlines() if ln.startswith(prefix)]

    def wait_ready(self) -> None:
        assert wait_for(lambda: bool(self.lines("ready")), 15), "the command never became ready"

    def join(self, timeout: float = 20.0) -> Optional[int]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "Runner.run() did not return"
        return self.code


@pytest.fixture
def make_runner(tmp_path: Path) -> Iterator[Callable[..., RunnerUnderTest]]:
    made: list[RunnerUnderTest] = []

    def make(mode: str, **config: Any) -> RunnerUnderTest:
        runner = RunnerUnderTest(tmp_path, mode, **config)
        made.append(runner)
        return runner.start()

    yield make
    for runner in made:  # never leave a runner (and its child) behind
        if runner.thread.is_alive():
            runner.runner.request_stop()
            runner.runner.request_stop()
            runner.thread.join(20)
        assert not runner.stuck


@pytest.mark.timeout(30)
def test_once_runs_the_command_with_the_lease_in_its_environment(
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner("exit0", once=True)
    assert run.join() == 0
    (start,) = run.lines("start")
    assert start[1].isdigit() and int(start[1]) > 0
    assert start[2:4] == ["job", "tester"]
    assert run.runner.statuses == [0] and run.runner.starts == 1
    info = Lease(run.client, "job", ttl=1.0, identity="check").inspect()
    assert not info.held  # released on the way out


@pytest.mark.timeout(30)
def test_a_failing_command_is_restarted_then_the_run_gives_up(
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner("exit5", max_restarts=2, max_seconds=30.0)
    assert run.join() == EXIT_GAVE_UP
    assert run.runner.statuses == [5, 5, 5]  # first run + 2 restarts, then give up
    assert len({line[1] for line in run.lines("start")}) == 1  # one holding period
    assert not Lease(run.client, "job", ttl=1.0, identity="check").inspect().held


@pytest.mark.timeout(30)
def test_once_exits_with_the_commands_status(make_runner: Callable[..., RunnerUnderTest]) -> None:
    run = make_runner("exit3", once=True)
    assert run.join() == 3
    assert run.runner.statuses == [3]


@pytest.mark.timeout(30)
def test_once_with_restart_on_failure_retries_then_exits_with_the_last_status(
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner("exit3", once=True, restart="on-failure", max_restarts=1)
    assert run.join() == 3
    assert run.runner.statuses == [3, 3]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("mode", "status", "killed_after_grace"),
    [("sleep", 0, False), ("term-exit-7", 7, False), ("ignore-term", 137, True)],
)
def test_stop_request_stops_the_command_and_returns_its_status(
    mode: str,
    status: int,
    killed_after_grace: bool,
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner(mode, grace=0.4)
    run.wait_ready()
    started = time.monotonic()
    run.runner.request_stop(signal.SIGTERM)
    # 0: it died from our SIGTERM, a clean stop; 7: its own status; 137: SIGKILL was needed
    assert run.join() == status
    if killed_after_grace:
        assert time.monotonic() - started >= 0.4
    assert not Lease(run.client, "job", ttl=1.0, identity="check").inspect().held


@pytest.mark.timeout(30)
def test_second_stop_request_skips_the_grace_period(
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner("ignore-term", ttl=30.0, grace=8.0)
    run.wait_ready()
    run.runner.request_stop()
    assert wait_for(lambda: run.runner._shutting_down, 5)
    started = time.monotonic()
    run.runner.request_stop()
    assert run.join() == 137
    assert time.monotonic() - started < 5.0


@pytest.mark.timeout(30)
def test_stopping_the_command_kills_its_whole_process_group(
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner("grandchild")
    run.wait_ready()
    (grandchild,) = run.lines("grandchild")
    pid = int(grandchild[1])
    assert alive(pid)
    run.runner.request_stop()
    assert run.join() == 0
    assert wait_for(lambda: not alive(pid), 5), "the command's own child survived"


@pytest.mark.timeout(30)
def test_lease_lost_stops_the_command_and_it_restarts_when_held_again(
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner("sleep")
    run.wait_ready()
    (first,) = run.lines("start")
    # Another token takes the key: the next renewal sees it and the command is stopped.
    keys = LeaseKeys("job")
    run.client.hset(keys.lease, "token", "someone-else")
    assert wait_for(lambda: bool(run.runner.statuses), 10), "the command was not stopped"
    assert run.runner.statuses == [143]
    assert not alive(int(first[4]))
    # The intruder's key expires; the runner takes the lease again and restarts the command.
    assert wait_for(lambda: len(run.lines("start")) == 2, 15), "no restart after re-acquiring"
    assert int(run.lines("start")[1][1]) > int(first[1])  # a new fencing token
    run.runner.request_stop()
    assert run.join() == 0


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This process adopts orphans and never reaps them by itself: a PID 1 that is no init."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_CHILD_SUBREAPER is Linux only")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(36, 0, 0, 0, 0)


@pytest.mark.timeout(30)
def test_stopping_does_not_wait_for_zombies(
    subreaper: None, make_runner: Callable[..., RunnerUnderTest], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14: as PID 1 without an init every stop waited the whole --grace for zombies."""
    run = make_runner("grandchild", ttl=30.0, grace=8.0)
    run.wait_ready()
    (grandchild,) = run.lines("grandchild")
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="mutexowner"):
        run.runner.request_stop(signal.SIGTERM)
        assert run.join() == 0
    assert time.monotonic() - started < 4.0  # not the 8 s grace
    assert "sending SIGKILL" not in caplog.text
    assert not alive(int(grandchild[1]))


@pytest.mark.timeout(30)
def test_restart_never_ends_the_run_with_the_commands_status(
    make_runner: Callable[..., RunnerUnderTest],
) -> None:
    run = make_runner("exit4", restart="never")
    assert run.join() == 4
    assert run.runner.statuses == [4]
    assert not Lease(run.client, "job", ttl=1.0, identity="check").inspect().held


@pytest.mark.timeout(30)
def test_a_command_that_exits_0_is_not_restarted_by_default(
    make_runner: Callable[..., RunnerUnderTest], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mutexowner"):
        run = make_runner("exit0")
        assert run.join() == 0
    assert run.runner.statuses == [0]
    assert "unexpectedly" not in caplog.text and "giving up" not in caplog.text


@pytest.mark.timeout(30)
def test_restart_always_restarts_a_clean_exit_without_a_tight_loop(
    make_runner: Callable[..., RunnerUnderTest], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mutexowner"):
        run = make_runner("exit0", restart="always", max_restarts=0)
        assert wait_for(lambda: len(run.lines("start")) >= 2, 10)
        run.runner.request_stop(signal.SIGTERM)
        assert run.join() == 0
    assert len(run.lines("start")) >= 2  # clean exits are not counted against --max-restarts 0
    started = [r.created for r in caplog.records if "started the command" in r.getMessage()]
    assert len(started) >= 2
    assert all(b - a >= CLEAN_RESTART_DELAY * 0.9 for a, b in zip(started, started[1:]))
    restarts = [r for r in caplog.records if "starting it again" in r.getMessage()]
    assert restarts and all(r.levelno == logging.INFO for r in restarts)
    assert len(restarts) in (run.runner.starts - 1, run.runner.starts)  # one line each


# -- the guard process ---------------------------------------------------------------------


def guard_argv(read_end: int, deadline_in: float = 3600.0) -> list[str]:
    """The guard's command line, as ``Runner`` builds it, before the command itself."""
    return guard_command(read_end, _guard.now() + deadline_in, 0.5, 0.25)


@pytest.mark.timeout(30)
def test_guard_kills_the_command_group_when_its_parent_is_gone(tmp_path: Path) -> None:
    out = tmp_path / "child.log"
    read_end, write_end = os.pipe()
    guard = subprocess.Popen(
        [*guard_argv(read_end), sys.executable, "-c", CHILD, str(out), "grandchild"],
        pass_fds=(read_end,),
        start_new_session=True,
        env={
            **os.environ,
            "MUTEXOWNER_FENCING_TOKEN": "1",
            "MUTEXOWNER_KEY": "k",
            "MUTEXOWNER_IDENTITY": "i",
        },
    )
    os.close(read_end)
    try:
        assert wait_for(lambda: out.exists() and "ready" in out.read_text(), 15)
        lines = out.read_text().split()
        child, grandchild = int(lines[4]), int(lines[6])
        assert alive(child) and alive(grandchild)
        os.close(write_end)  # what the kernel does when `mutexowner run` is killed
        write_end = -1
        assert guard.wait(10) == -signal.SIGKILL
        assert wait_for(lambda: not alive(child) and not alive(grandchild), 5)
    finally:
        if write_end >= 0:
            os.close(write_end)
        if guard.poll() is None:
            os.killpg(guard.pid, signal.SIGKILL)
            guard.wait()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("mode", "returncode"), [("exit4", 4), ("exit0", 0)])
def test_guard_exits_with_the_commands_status(mode: str, returncode: int, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        guard = subprocess.run(
            [*guard_argv(read_end), sys.executable, "-c", CHILD, str(tmp_path / "log"), mode],
            pass_fds=(read_end,),
            env={
                **os.environ,
                "MUTEXOWNER_FENCING_TOKEN": "1",
                "MUTEXOWNER_KEY": "k",
                "MUTEXOWNER_IDENTITY": "i",
            },
            timeout=20,
            check=False,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert guard.returncode == returncode


def test_guard_reports_a_command_it_cannot_execute(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        guard = subprocess.run(
            [*guard_argv(read_end), "no-such-cmd-xyz"],
            pass_fds=(read_end,),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert guard.returncode == EXIT_NOT_FOUND
    assert "cannot execute 'no-such-cmd-xyz'" in guard.stderr


# -- python -m mutexowner.cli --------------------------------------------------------------


def test_module_entry_point_exits_with_mains_status() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mutexowner.cli", "status", "--redis", CLOSED_URL, "--key", "k"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == EXIT_USAGE
    assert "redis://alice:***@127.0.0.1:1/0" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_python_dash_m_mutexowner_works_and_names_redis_url() -> None:
    env = {**os.environ, "REDIS_URL": "localhost:6379"}  # no scheme: refused
    result = subprocess.run(
        [sys.executable, "-m", "mutexowner", "run", "--key", "k", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "$REDIS_URL" in result.stderr and "--redis" not in result.stderr


@pytest.mark.parametrize("check", [False, True])
def test_status_names_redis_url_when_the_url_came_from_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], check: bool
) -> None:
    monkeypatch.setenv("REDIS_URL", "localhost:6379")  # no scheme: refused
    code = cli.main(["status", "--key", "k", *(["--check"] if check else [])])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "$REDIS_URL must be" in err and "--redis must be" not in err


def test_help_text_is_printed_by_the_console_script_too() -> None:
    script = shutil.which("mutexowner", path=str(Path(sys.executable).parent))
    script = script or shutil.which("mutexowner")
    assert script is not None, "the mutexowner console script is not installed"
    result = subprocess.run(
        [script, "run", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert "-- COMMAND [ARGS...]" in result.stdout


def test_status_output_goes_to_the_given_streams() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert cli.status(fake_redis(), "job", as_json=True, out=out, err=err) == EXIT_STATUS_FREE
    assert json.loads(out.getvalue())["held"] is False
    assert err.getvalue() == ""
