"""No surface shows a Redis password (issue 15's review), one test per surface.

Surfaces: URL redaction (``redact_url``/``redact_text``), the owner's ``repr``, ``status()``,
``last_error``, events and log records (URL, username, query-string password, Sentinel with
passwords for the sentinels and the master), the CLI (``status``, ``status --json``,
``status --check``), exceptions raised for bad arguments, Prometheus samples and labels, the
Flask status view and CLI. TLS URLs: tests/integration/test_tls.py; a real password-protected
server: tests/integration/test_acl_redis.py and test_owner_redis.py. Django's ``check``:
tests/contrib/test_django.py.

Owners are stepped with ``OwnerDriver`` against closed loopback ports: every call fails at
once with "connection refused" (or "no master found"), the path where a password is most
likely to slip into a message.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Union

import pytest
import redis
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from mutexowner import MutexOwner, cli
from mutexowner.connection import redact_text, redact_url
from mutexowner.contrib.flask import MutexOwnerExtension, get_state, status_blueprint
from mutexowner.contrib.prometheus import instrument
from mutexowner.events import Event
from mutexowner.inspection import STATUS_ERROR
from mutexowner.testing import FakeClock, OwnerDriver
from tests.redis_server import free_port

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("restore_logging")]

SECRET = "Pw-6b1f0e"
SENTINEL_SECRET = "Sentinel-Pw-93ac"
SECRETS = (SECRET, SENTINEL_SECRET, "Pw%2D6b1f0e")


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in str(text), f"{secret!r} shown in: {text}"


def closed_urls() -> list[str]:
    port = free_port()
    return [
        f"redis://app:{SECRET}@127.0.0.1:{port}/0",
        f"redis://:{SECRET}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={SECRET}",
        f"redis://app:{SECRET}@127.0.0.1:{port}/0?password={SECRET}",
        f"rediss://app:{SECRET}@127.0.0.1:{port}/0?ssl_cert_reqs=none",
        f"redis://app:{SECRET.replace('-', '%2D')}@127.0.0.1:{port}/0",
    ]


@pytest.mark.parametrize(
    "text",
    [
        f"redis://app:{SECRET}@host:6379/0",
        f"rediss://:{SECRET}@host:6379/0",
        f"unix://:{SECRET}@/run/redis.sock?db=0",
        f"redis://host:6379/0?db=1&password={SECRET}",
        f"redis://app:{SECRET}@@host:6379/0",
        f"see redis://app:p@{SECRET}/x@host:6379/0 and rediss://host/0?password={SECRET} too",
    ],
)
def test_redaction_of_urls_and_of_urls_in_text(text: str) -> None:
    assert_no_secret(redact_text(text))
    if " " not in text:
        assert_no_secret(redact_url(text))


def drive_to_errors(
    redis_arg: Union[str, redis.Redis], caplog: pytest.LogCaptureFixture
) -> tuple[MutexOwner, OwnerDriver, list[Event]]:
    caplog.set_level(logging.DEBUG, logger="mutexowner")
    clock = FakeClock()
    events: list[Event] = []
    owner = MutexOwner(redis_arg, "job", clock=clock, call_timeout=0.2)
    owner.add_listener(events.append)
    driver = OwnerDriver(owner, clock)
    for _ in range(3):
        driver.step()
        clock.advance(60)
    return owner, driver, events


@pytest.mark.parametrize("index", range(6))
def test_owner_repr_status_errors_events_and_logs(
    index: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = closed_urls()[index]
    owner, driver, events = drive_to_errors(url, caplog)
    status = owner.status()
    assert status.consecutive_errors >= 1 and status.last_error
    assert_no_secret(repr(owner), repr(status), status.redis, events, caplog.text)
    assert "***" in status.redis or "password" not in url
    driver.stop()


@pytest.fixture
def sentinel_master() -> Iterator[redis.Redis]:
    sentinel = Sentinel(
        [("127.0.0.1", free_port())],
        # No retries on the sentinels' own sockets (redis-py retries 3 times by default:
        # about 3.4 s per lease call while every sentinel refuses).
        sentinel_kwargs={
            "password": SENTINEL_SECRET,
            "socket_timeout": 0.2,
            "retry": Retry(NoBackoff(), 0),
        },
        socket_timeout=0.2,
    )
    master = sentinel.master_for("mymaster", username="app", password=SECRET)
    yield master
    master.close()


def test_owner_behind_sentinel_with_passwords(
    sentinel_master: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    owner, driver, events = drive_to_errors(sentinel_master, caplog)
    status = owner.status()
    assert status.consecutive_errors >= 1 and "mymaster" in (status.last_error or "")
    assert status.redis == "sentinel://mymaster/0"
    assert_no_secret(repr(owner), repr(status), events, caplog.text)
    driver.stop()


def test_prometheus_samples_and_labels(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    owner, driver, _ = drive_to_errors(closed_urls()[0], caplog)
    instrument(owner, registry)
    driver.step()
    scraped = generate_latest(registry).decode()
    assert "mutexowner_redis_errors_total" in scraped
    assert_no_secret(scraped)
    driver.stop()


@pytest.mark.parametrize("argv", [["--json"], [], ["--check"]])
def test_cli_status_status_json_and_check(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = closed_urls()[3]
    code = cli.main(["status", "--redis", url, "--key", "job", *argv])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert "***" in out + err
    assert_no_secret(out, err)
    if argv == ["--json"]:
        assert json.loads(out)["redis"].startswith("redis://app:***@")


def test_check_with_a_client_never_shows_its_password() -> None:
    client = redis.Redis(host="127.0.0.1", port=free_port(), password=SECRET, socket_timeout=0.2)
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(client, "job", out=out, err=err) == 2
    assert_no_secret(out.getvalue(), err.getvalue())


@pytest.mark.parametrize(
    "bad", [f"http://app:{SECRET}@host/0", f"redis//app:{SECRET}@host/0", f"redis:/{SECRET}@h"]
)
def test_exceptions_for_a_bad_url(bad: str) -> None:
    with pytest.raises(ValueError) as caught:
        MutexOwner(bad, "job")
    assert_no_secret(str(caught.value), repr(caught.value))


def test_flask_status_view_and_cli() -> None:
    url = closed_urls()[0]
    app = Flask("secrets")
    app.config.update(
        MUTEXOWNER_REDIS_URL=url,
        MUTEXOWNER_KEY="job",
        MUTEXOWNER_TTL=1.0,
        MUTEXOWNER_STUCK_WORKER_POLICY="abandon",
    )
    MutexOwnerExtension(app)
    app.register_blueprint(status_blueprint)
    state = get_state(app)
    state.start()
    try:
        body = app.test_client().get("/mutexowner/status").get_data(as_text=True)
        checked = app.test_cli_runner().invoke(args=["mutexowner", "check"])
        reported = app.test_cli_runner().invoke(args=["mutexowner", "status"])
    finally:
        assert state.stop(5)
    # Redis is unreachable here: both commands fail with the shared status error code.
    assert "***" in body and checked.exit_code == STATUS_ERROR and "***" in checked.output
    assert reported.exit_code == STATUS_ERROR and reported.output
    assert_no_secret(body, checked.output, reported.output)


def test_log_formatter_of_the_cli_redacts_tracebacks() -> None:
    record = logging.LogRecord("mutexowner", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise RuntimeError(f"cannot use redis://app:{SECRET}@host:6379/0")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    text = cli._RedactingLogFormatter("%(message)s").format(record)
    assert "RuntimeError" in text
    assert_no_secret(text)
