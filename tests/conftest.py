"""Shared fixtures: real redis-server processes, a thread-leak check, Hypothesis settings.

Real-Redis fixtures skip their test when ``redis-server`` is missing, unless
``MUTEXOWNER_REQUIRE_REDIS=1`` (set by ``.ci/run``), which turns that skip, and
any other skip of a test marked ``redis``, into a failure.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from hypothesis import settings

from tests.redis_server import RedisServer, find_redis_server, redis_server_version

REQUIRE_REDIS_ENV = "MUTEXOWNER_REQUIRE_REDIS"
REDIS_FIXTURES = frozenset({"redis_server", "redis_server_factory", "redis_server_executable"})
LIBRARY_THREAD_PREFIX = "mutexowner"
THREAD_GRACE_SECONDS = 2.0

# Deterministic property tests (fixed derivation of examples, no example database)
# and no per-example deadline: this machine is noisy. HYPOTHESIS_PROFILE overrides.
settings.register_profile("mutexowner", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mutexowner"))


def redis_required() -> bool:
    """True when a missing redis-server must fail the run instead of skipping tests."""
    return os.environ.get(REQUIRE_REDIS_ENV, "").strip().lower() in ("1", "true", "yes")


def _redis_server_or_skip() -> str:
    """Path of redis-server, or skip (fail under MUTEXOWNER_REQUIRE_REDIS=1) the test."""
    path = find_redis_server()
    if path is not None:
        return path
    if redis_required():
        pytest.fail(
            f"redis-server not found on PATH but {REQUIRE_REDIS_ENV}=1: real-Redis tests "
            "must run here; install it (apt-get install redis-server)",
            pytrace=False,
        )
    pytest.skip(
        "redis-server not found on PATH; install it (apt-get install redis-server) "
        "to run real-Redis tests"
    )


# -- thread-leak check -------------------------------------------------------------------


def leaked_library_threads(
    before: set[Optional[int]], grace: float = THREAD_GRACE_SECONDS
) -> list[threading.Thread]:
    """Library threads (named ``mutexowner...``) not in ``before`` that are still alive
    after being given ``grace`` seconds in total to finish."""
    deadline = time.monotonic() + grace
    leaked = []
    for thread in threading.enumerate():
        if thread.ident in before or not thread.name.startswith(LIBRARY_THREAD_PREFIX):
            continue
        if thread is threading.current_thread():
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(thread)
    return leaked


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail the test if it leaves a ``mutexowner-*`` thread running (after a 2 s grace)."""
    before = {thread.ident for thread in threading.enumerate()}
    yield
    leaked = leaked_library_threads(before)
    if leaked:
        names = ", ".join(f"{t.name!r} (ident {t.ident}, daemon={t.daemon})" for t in leaked)
        pytest.fail(
            f"test leaked {len(leaked)} mutexowner thread(s) still alive "
            f"{THREAD_GRACE_SECONDS} s after it ended: {names}",
            pytrace=False,
        )


# -- real redis-server fixtures ----------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests of ``main()`` entry points, which configure logging: restore its state."""
    root = logging.getLogger()
    ours = logging.getLogger("mutexowner")
    saved = (root.level, list(root.handlers), ours.level)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    ours.setLevel(saved[2])


@pytest.fixture
def redis_server_executable() -> str:
    """Path of redis-server, for tests that start servers themselves (e.g. in subprocesses)."""
    return _redis_server_or_skip()


@pytest.fixture
def redis_server_factory(
    tmp_path_factory: pytest.TempPathFactory, redis_server_executable: str
) -> Iterator[Callable[..., RedisServer]]:
    """Factory for real redis-servers on free 127.0.0.1 ports, all stopped at teardown.

    ``redis_server_factory(appendonly=True, appendfsync="always", config={...},
    start=True)`` returns a started `RedisServer` (``start=False``: not started).
    Keyword options are those of `RedisServer`; each server gets its own data dir.
    """
    servers: list[RedisServer] = []

    def make(*, start: bool = True, **options: Any) -> RedisServer:
        options.setdefault("executable", redis_server_executable)
        data_dir: Path = tmp_path_factory.mktemp("redis")
        server = RedisServer(data_dir, **options)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make

    errors = []
    for server in reversed(servers):
        try:
            server.close()
        except Exception as exc:  # report, but still stop the other servers
            errors.append(f"{server!r}: {exc!r}")
    if errors:
        pytest.fail("could not stop redis-server(s): " + "; ".join(errors), pytrace=False)


@pytest.fixture
def redis_server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A running real redis-server on a free 127.0.0.1 port, persistence off."""
    return redis_server_factory()


# -- hooks -------------------------------------------------------------------------------


def pytest_report_header() -> str:
    """Which redis-server the real-Redis tests start (``$MUTEXOWNER_REDIS_SERVER`` or PATH)."""
    path = find_redis_server()
    if path is None:
        return "redis-server: not found (real-Redis tests skip unless required)"
    version = ".".join(map(str, redis_server_version(path))) or "unknown version"
    return f"redis-server: {path} ({version})"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a real-Redis fixture with ``redis``."""
    for item in items:
        if REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """Under MUTEXOWNER_REQUIRE_REDIS=1 a skipped ``redis`` test is a failure."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and redis_required()
        and item.get_closest_marker("redis") is not None
        and not hasattr(report, "wasxfail")
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"real-Redis test was skipped while {REQUIRE_REDIS_ENV}=1 "
            f"(skip reason: {report.longrepr!r})"
        )
