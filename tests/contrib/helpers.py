"""Helpers for tests that run examples and framework commands as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable

import pytest

from mutexowner.lease import Lease, LeaseInfo, LeaseKeys
from mutexowner.testing import fake_redis
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DJANGO_PROJECT = EXAMPLES / "django_app"
FLASK_PROJECT = EXAMPLES / "flask_app"
PYTHON = sys.executable

#: Environment variables of the developer's shell that would change what the examples do.
_SCRUB = (
    "REDIS_URL",
    "DJANGO_SETTINGS_MODULE",
    "FLASK_APP",
    "MUTEXOWNER_TTL",
    "MUTEXOWNER_AUTOSTART",
    "EXAMPLE_HEARTBEAT_FILE",
    "EXAMPLE_HEARTBEAT_INTERVAL",
)


def child_env(**extra: str) -> dict[str, str]:
    """The test process's environment, unbuffered, without settings the examples read."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A subprocess whose output goes to files (no pipe can fill up and block it)."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_dir: Path,
        name: str,
    ) -> None:
        self.args = list(args)
        self.out_path = log_dir / f"{name}.stdout"
        self.err_path = log_dir / f"{name}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.args,
                cwd=cwd,
                env=dict(env),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        return (
            f"command {self.args} (exit {self.popen.poll()})\n--- stdout ---\n{self.stdout}"
            f"\n--- stderr ---\n{self.stderr}"
        )

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        """Poll ``condition`` until true; fail (with the output) on timeout or early exit."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.popen.poll() is not None:
                if condition():
                    return
                pytest.fail(f"process exited before {what}:\n{self.describe()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s:\n{self.describe()}", pytrace=False)
            time.sleep(0.05)

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        self.wait_for(lambda: text in self.stdout, f"{text!r} on stdout", timeout)

    def send(self, signum: int = signal.SIGTERM) -> None:
        self.popen.send_signal(signum)

    def finish(self, timeout: float = 20.0) -> int:
        """Wait for the exit status; fail (killing the process) on timeout."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"did not exit within {timeout} s:\n{self.describe()}", pytrace=False)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@contextmanager
def running(
    args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_dir: Path, name: str
) -> Iterator[Proc]:
    """Start a ``Proc``; kill it on the way out whatever happened."""
    proc = Proc(args, cwd=cwd, env=env, log_dir=log_dir, name=name)
    try:
        yield proc
    finally:
        proc.kill()


def run_to_end(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_dir: Path,
    name: str,
    timeout: float = 30.0,
) -> Proc:
    """Run a command to completion and return it (its output is in files)."""
    with running(args, cwd=cwd, env=env, log_dir=log_dir, name=name) as proc:
        proc.finish(timeout)
        return proc


def lease_info(server: RedisServer, key: str) -> LeaseInfo:
    """Who holds ``key`` in ``server`` right now."""
    return Lease(server.client(), key, ttl=1.0, identity="test-inspector").inspect()


def heartbeats(path: Path) -> list[tuple[int, int]]:
    """The ``pid fencing_token`` lines an example worker wrote."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(int(a), int(b)) for a, b in (line.split() for line in lines if line.strip())]


def seeded_fake_redis(*names: str) -> Any:
    """A fakeredis that looks as if it had kept the leases' state for long: the first
    acquisition of ``names`` skips the one-ttl lock-delay (real time saved in tests)."""
    client = fake_redis()
    for name in names:
        client.hset(
            LeaseKeys(name).epoch, mapping={"id": "seeded", "run_id": "", "quiet_until": "0"}
        )
    return client
