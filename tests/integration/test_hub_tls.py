"""ReleaseHub over TLS: bursts of notices are all delivered without waiting for more traffic.

A selector sees the socket, not the bytes TLS (or redis-py's parser) already decrypted and
buffered; the hub must drain those before it blocks again, or a notice would sit in a buffer
until the next one arrived. A pipelined burst puts many notices in one TLS read.
"""

from __future__ import annotations

import threading
from typing import Callable

import pytest

from mutexowner.backoff import BackoffPolicy
from mutexowner.connection import client_from, derive_lease_client
from mutexowner.hub import ReleaseHub
from tests.integration.test_tls import PASSWORD, tls_server, tls_url
from tests.redis_server import RedisServer
from tests.tls import Pki, make_pki, openssl

pytestmark = [pytest.mark.redis, pytest.mark.tls, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if openssl() is None:
        pytest.fail("the openssl command is needed to make test certificates", pytrace=False)
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_burst_of_notices_is_delivered_in_full(
    redis_server_factory: Callable[..., RedisServer], tls_pki: Pki, tls: bool
) -> None:
    server = tls_server(redis_server_factory, tls_pki, clients=False)
    url = tls_url(server, tls_pki.ca) if tls else server.url.replace("//", f"//:{PASSWORD}@")
    client = derive_lease_client(client_from(url), timeout=1.0)
    hub = ReleaseHub(client, name="tls", backoff=BackoffPolicy(initial=0.01, max_delay=0.1))
    n = 300
    got = threading.Semaphore(0)
    try:
        for i in range(n):
            hub.subscribe(f"ch{i}", got.release)
        assert all(got.acquire(timeout=10) for _ in range(n))  # subscribed
        publisher = server.client(password=PASSWORD)
        pipe = publisher.pipeline(transaction=False)
        for i in range(n):
            pipe.publish(f"ch{i}", "x" * 200)
        pipe.execute()
        # Nothing else is published: every notice must come out of the buffers by itself.
        assert all(got.acquire(timeout=5) for _ in range(n))
        assert not got.acquire(timeout=0.05)
    finally:
        assert hub.stop(timeout=10)
