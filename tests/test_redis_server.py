"""The real-server helper itself: start, kill -9 + restart (with and without AOF), freeze/thaw."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import redis

import tests.redis_server as redis_server_module
from tests.redis_server import RedisServer, RedisServerError

Factory = Callable[..., RedisServer]


def _config(client: redis.Redis, name: str) -> bytes:
    """One CONFIG GET value as bytes (redis-py decodes CONFIG replies in some versions)."""
    reply = client.config_get(name)
    value = reply[name] if name in reply else reply[name.encode()]
    return value if isinstance(value, bytes) else str(value).encode()


def test_starts_on_loopback_with_persistence_off(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.ping() is True
    assert redis_server.running and not redis_server.frozen
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.pid is not None
    assert _config(client, "bind") == b"127.0.0.1"
    assert _config(client, "port") == str(redis_server.port).encode()
    assert _config(client, "save") == b""
    assert _config(client, "appendonly") == b"no"
    assert _config(client, "dir") == str(redis_server.dir).encode()
    info = client.info("server")
    assert info["process_id"] == redis_server.pid
    assert redis.Redis.from_url(redis_server.url, socket_timeout=2).ping() is True


def test_client_defaults_and_overrides(redis_server: RedisServer) -> None:
    raw = redis_server.client()
    raw.set("k", "v")
    assert raw.get("k") == b"v"
    assert redis_server.client(decode_responses=True).get("k") == "v"
    kwargs = raw.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 2.0
    assert kwargs["socket_connect_timeout"] == 2.0


def test_stop_is_graceful_and_idempotent(redis_server: RedisServer) -> None:
    redis_server.stop()
    assert not redis_server.running
    assert redis_server.pid is None
    with pytest.raises(redis.ConnectionError):
        redis_server.client().ping()
    redis_server.stop()
    redis_server.kill()


def test_kill_then_restart_without_persistence_loses_data(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set("key", "value")
    old_pid, port = redis_server.pid, redis_server.port

    redis_server.kill()
    assert not redis_server.running
    with pytest.raises(redis.ConnectionError):
        client.ping()

    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid not in (None, old_pid)
    assert client.ping() is True  # the client reconnects to the same address
    assert client.get("key") is None


def test_restart_with_aof_keeps_data(redis_server_factory: Factory) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    client = server.client()
    assert _config(client, "appendonly") == b"yes"
    assert _config(client, "appendfsync") == b"always"
    client.set("key", "kept")
    client.incr("counter", 41)
    old_pid, port = server.pid, server.port

    server.restart()  # kill -9, keep the AOF

    assert server.port == port and server.pid != old_pid
    assert client.get("key") == b"kept"
    assert client.get("counter") == b"41"


def test_restart_with_aof_but_persist_false_loses_data(redis_server_factory: Factory) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    client = server.client()
    client.set("key", "lost")
    server.restart(persist=False)
    assert client.get("key") is None
    assert client.dbsize() == 0
    assert server.log_path.exists()  # the log survives the wipe, for diagnosis


def test_restart_persist_true_needs_appendonly(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="appendonly"):
        redis_server.restart(persist=True)
    assert redis_server.running  # nothing was killed


def test_restart_of_a_killed_server(redis_server: RedisServer) -> None:
    redis_server.kill()
    redis_server.restart()
    assert redis_server.client().ping() is True


def test_freeze_and_thaw(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=0.3)
    client.set("key", "value")
    redis_server.freeze()
    assert redis_server.frozen and redis_server.running
    # A frozen server keeps its socket open: clients time out instead of being refused.
    with pytest.raises(redis.TimeoutError):
        client.get("key")
    redis_server.thaw()
    assert not redis_server.frozen
    redis_server.wait_until_ready(timeout=5)
    assert redis_server.client().get("key") == b"value"


def test_kill_while_frozen(redis_server: RedisServer) -> None:
    redis_server.freeze()
    redis_server.kill()
    assert not redis_server.running and not redis_server.frozen
    redis_server.restart()
    assert redis_server.client().ping() is True


def test_stop_while_frozen(redis_server: RedisServer) -> None:
    redis_server.freeze()
    redis_server.stop()
    assert not redis_server.running


def test_freeze_and_wait_need_a_running_server(redis_server: RedisServer) -> None:
    redis_server.kill()
    with pytest.raises(RedisServerError, match="not running"):
        redis_server.freeze()
    with pytest.raises(RedisServerError, match="not running"):
        redis_server.wait_until_ready(timeout=0.1)


def test_wait_until_ready_times_out_while_frozen(redis_server: RedisServer) -> None:
    redis_server.freeze()
    with pytest.raises(RedisServerError, match="did not answer PING"):
        redis_server.wait_until_ready(timeout=0.3)
    redis_server.thaw()
    redis_server.wait_until_ready(timeout=5)


def test_factory_starts_several_independent_servers(redis_server_factory: Factory) -> None:
    servers = [redis_server_factory() for _ in range(3)]
    assert len({s.port for s in servers}) == 3
    assert len({s.dir for s in servers}) == 3
    for index, server in enumerate(servers):
        server.client().set("who", index)
    assert [s.client().get("who") for s in servers] == [b"0", b"1", b"2"]


def test_factory_passes_extra_config(redis_server_factory: Factory) -> None:
    server = redis_server_factory(config={"maxmemory": "10mb", "maxmemory-policy": "noeviction"})
    client = server.client()
    assert _config(client, "maxmemory") == str(10 * 1024 * 1024).encode()
    assert _config(client, "maxmemory-policy") == b"noeviction"


def test_factory_start_false(redis_server_factory: Factory) -> None:
    server = redis_server_factory(start=False)
    assert not server.running
    server.start()
    assert server.client().ping() is True
    with pytest.raises(RedisServerError, match="already running"):
        server.start()


def test_start_moves_to_another_port_when_the_first_is_taken(
    redis_server_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        real_free_port = redis_server_module.free_port

        def first_taken_then_free(host: str = "127.0.0.1") -> int:
            return next(picks, None) or real_free_port(host)

        monkeypatch.setattr(redis_server_module, "free_port", first_taken_then_free)
        server = redis_server_factory()
        assert server.port != taken
        assert server.client().ping() is True


def test_explicit_port_in_use_is_an_error(redis_server_factory: Factory) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        with pytest.raises(RedisServerError, match="in use"):
            redis_server_factory(port=taken)


def test_start_failure_reports_the_log(redis_server_factory: Factory) -> None:
    with pytest.raises(RedisServerError, match=r"Bad directive|wrong number of arguments"):
        redis_server_factory(config={"no-such-directive": "1"})


def test_usable_from_a_subprocess_without_pytest(redis_server_executable: str) -> None:
    """Chaos tests run owner processes that start/inspect servers with this helper."""
    code = textwrap.dedent(
        """
        import sys
        from tests.redis_server import RedisServer
        with RedisServer() as server:
            client = server.client()
            client.set("x", "1")
            server.restart()
            assert client.get("x") is None
            print(server.port, "pytest" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    assert result.returncode == 0, result.stderr
    port, pytest_loaded = result.stdout.split()
    assert int(port) > 0
    assert pytest_loaded == "False"


def test_context_manager_cleans_up_its_temporary_dir(redis_server_executable: str) -> None:
    with RedisServer(executable=redis_server_executable) as server:
        data_dir = server.dir
        assert server.client().ping() is True
        assert data_dir.is_dir()
    assert not server.running
    assert not data_dir.exists()
