"""mutexowner.contrib.flask in-process: the extension, the status blueprint, autostart and the
CLI, with the example app on fakeredis. ``flask mutexowner run`` against a real redis-server
is in tests/test_examples.py."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from mutexowner import MutexOwner, Supervisor, WorkerContext
from mutexowner.contrib import ConfigurationError
from mutexowner.contrib.flask import (
    MutexOwnerExtension,
    MutexOwnerState,
    get_state,
    status_blueprint,
)
from mutexowner.inspection import STATUS_ERROR, STATUS_FREE, STATUS_HELD
from mutexowner.lease import Lease, new_token
from tests.contrib.helpers import FLASK_PROJECT, heartbeats, seeded_fake_redis

pytestmark = pytest.mark.timeout(60)

KEY = "exampleapp:heartbeat"


@pytest.fixture
def exampleapp(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The example app's package, imported from examples/flask_app."""
    monkeypatch.syspath_prepend(str(FLASK_PROJECT))
    import exampleapp

    return exampleapp


@pytest.fixture
def apps() -> Iterator[list[Flask]]:
    """Apps made by a test; their owners are stopped at the end."""
    made: list[Flask] = []
    yield made
    for app in made:
        assert get_state(app).stop(5)


def make_app(exampleapp: Any, apps: list[Flask], tmp_path: Path, **config: Any) -> Flask:
    base = {
        "MUTEXOWNER_REDIS_URL": seeded_fake_redis(KEY),
        "MUTEXOWNER_TTL": 1.0,
        "MUTEXOWNER_STUCK_WORKER_POLICY": "abandon",
        "HEARTBEAT_FILE": str(tmp_path / "beats.txt"),
        "HEARTBEAT_INTERVAL": 0.05,
    }
    base.update(config)
    app: Flask = exampleapp.create_app(base)
    apps.append(app)
    return app


def test_init_app_stores_state_and_adds_the_cli(
    exampleapp: Any, apps: list[Flask], tmp_path: Path
) -> None:
    app = make_app(exampleapp, apps, tmp_path)
    state = app.extensions["mutexowner"]
    assert isinstance(state, MutexOwnerState)
    assert state.extension is exampleapp.mutexowner and state.owner is None
    assert state.settings.key == KEY and state.settings.ttl == 1.0
    assert [name for name, _ in state.settings.workers] == ["exampleapp.workers.heartbeat"]
    assert "mutexowner" in app.cli.commands
    with pytest.raises(RuntimeError, match="already initialised"):
        exampleapp.mutexowner.init_app(app)


def test_one_extension_serves_several_apps(
    exampleapp: Any, apps: list[Flask], tmp_path: Path
) -> None:
    first = make_app(exampleapp, apps, tmp_path)
    second = make_app(exampleapp, apps, tmp_path, MUTEXOWNER_KEY="other:key")
    assert get_state(first) is not get_state(second)
    assert get_state(second).settings.key == "other:key"
    with first.app_context():
        assert exampleapp.mutexowner.state().settings.key == KEY


def test_status_blueprint_and_workers_in_an_app_context(
    exampleapp: Any, apps: list[Flask], tmp_path: Path
) -> None:
    app = make_app(exampleapp, apps, tmp_path)
    client = app.test_client()
    response = client.get("/mutexowner/status")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.get_json()["state"] == "not_started"
    assert client.get("/mutexowner/status?require=holding").status_code == 503
    assert client.get("/mutexowner/status?require=started").status_code == 503
    bad = client.get("/mutexowner/status?require=leader")
    assert bad.status_code == 400 and "require must be one of" in bad.get_json()["error"]
    assert client.post("/mutexowner/status").status_code == 405

    with app.app_context():
        owner = exampleapp.mutexowner.start()
        assert exampleapp.mutexowner.start() is owner  # idempotent
        assert exampleapp.mutexowner.get_owner() is owner
    assert owner.wait_until_holding(10)
    response = client.get("/mutexowner/status?require=holding")
    assert response.status_code == 200
    body = response.get_json()
    assert body["holding"] is True and body["fencing_token"] == owner.fencing_token
    assert body["identity"] == owner.identity and body["workers_running"] is True
    assert client.get("/").get_json() == {"app": "exampleapp", "holding": True}

    # The worker read HEARTBEAT_FILE from current_app: it runs inside an app context.
    token = owner.fencing_token
    with app.app_context():
        assert exampleapp.mutexowner.stop() is True
    beats = heartbeats(tmp_path / "beats.txt")
    assert beats and {fence for _, fence in beats} == {token}
    assert get_state(app).owner is None
    assert client.get("/mutexowner/status").get_json()["state"] == "not_started"
    redis_client = app.config["MUTEXOWNER_REDIS_URL"]  # the fakeredis client
    assert not Lease(redis_client, KEY, ttl=1, identity="t").inspect().held


def test_autostart_on_the_first_request(exampleapp: Any, apps: list[Flask], tmp_path: Path) -> None:
    app = make_app(exampleapp, apps, tmp_path, MUTEXOWNER_AUTOSTART=True)
    assert get_state(app).owner is None  # nothing at create_app: a pre-fork master is safe
    client = app.test_client()
    assert client.get("/mutexowner/status?require=started").status_code == 200
    owner = get_state(app).owner
    assert owner is not None
    client.get("/")
    assert get_state(app).owner is owner  # started once
    assert owner.wait_until_holding(10)


def test_no_autostart_by_default(exampleapp: Any, apps: list[Flask], tmp_path: Path) -> None:
    app = make_app(exampleapp, apps, tmp_path)
    assert app.test_client().get("/").status_code == 200
    assert get_state(app).owner is None


def test_invalid_config_fails_at_init_app(exampleapp: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"MUTEXOWNER_TTL must be a finite number"):
        exampleapp.create_app({"MUTEXOWNER_TTL": -1})
    with pytest.raises(ConfigurationError, match=r"unknown config key\(s\) MUTEXOWNER_KEYS"):
        exampleapp.create_app({"MUTEXOWNER_KEYS": "x"})


def test_cli_check_and_status(exampleapp: Any, apps: list[Flask], tmp_path: Path) -> None:
    app = make_app(exampleapp, apps, tmp_path)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["mutexowner", "check", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    described = document["settings"]
    assert described["key"] == KEY and described["workers"] == ["exampleapp.workers.heartbeat"]
    assert document["redis"]["ok"] is True
    steps = [step["step"] for step in document["redis"]["steps"]]
    assert steps == ["PING", "SCRIPT EXISTS", "inspect script", "permissions"]
    result = runner.invoke(args=["mutexowner", "check"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("settings: valid\n") and "redis: ok" in result.output

    # Same exit codes as `mutexowner status`: 3 free, 0 held.
    result = runner.invoke(args=["mutexowner", "status"])
    assert result.exit_code == STATUS_FREE, result.output
    assert result.output.startswith(f"lease {KEY!r} (mutexowner:{{{KEY}}}:lease on ")
    assert ": free" in result.output.splitlines()[0]
    redis_client = app.config["MUTEXOWNER_REDIS_URL"]
    host = socket.gethostname()
    Lease(redis_client, KEY, ttl=30, identity=f"{host}:4242:abc").acquire(new_token())
    result = runner.invoke(args=["mutexowner", "status", "--json"])
    assert result.exit_code == STATUS_HELD, result.output
    view = json.loads(result.output)
    assert view["holder"] == f"{host}:4242:abc" and view["holder_pid"] == 4242
    assert view["held_by_this_host"] is True and view["fencing_token"] > 0


def test_cli_status_hides_the_password_and_fails_on_redis_errors(tmp_path: Path) -> None:
    from tests.redis_server import free_port

    app = Flask("broken")
    app.config.update(
        MUTEXOWNER_REDIS_URL=f"redis://u:topsecret@127.0.0.1:{free_port()}/0", MUTEXOWNER_KEY="k"
    )
    MutexOwnerExtension(app)
    result = app.test_cli_runner().invoke(args=["mutexowner", "status"])
    assert result.exit_code == STATUS_ERROR
    assert "redis://u:***@127.0.0.1:" in result.output and "error: " in result.output
    assert "topsecret" not in result.output
    result = app.test_cli_runner().invoke(args=["mutexowner", "check"])
    assert result.exit_code == STATUS_ERROR
    assert "FAIL PING: cannot reach Redis" in result.output and "redis: FAILED" in result.output
    assert "topsecret" not in result.output


def test_status_of_a_process_that_does_not_hold_shows_the_holder(
    exampleapp: Any, apps: list[Flask], tmp_path: Path
) -> None:
    """The web process runs no owner (the workers run under `flask mutexowner run`): its
    status still shows the holder as Redis sees it, and whether this host runs it."""
    app = make_app(exampleapp, apps, tmp_path)
    client = app.test_client()
    body = client.get("/mutexowner/status").get_json()
    assert body["state"] == "not_started" and body["lease"]["held"] is False
    assert client.get("/mutexowner/status?require=held").status_code == 503
    assert client.get("/mutexowner/status?require=host").status_code == 503

    redis_client = app.config["MUTEXOWNER_REDIS_URL"]
    lease = Lease(redis_client, KEY, ttl=30, identity="elsewhere:77:beef")
    fence = lease.acquire(new_token()).fencing_token  # type: ignore[union-attr]
    response = client.get("/mutexowner/status")
    assert response.status_code == 200
    seen = response.get_json()["lease"]
    assert seen["holder"] == "elsewhere:77:beef" and seen["holder_host"] == "elsewhere"
    assert seen["fencing_token"] == fence and 29 < seen["ttl_left"] <= 30
    assert seen["held_by_this_host"] is False and seen["host"] == socket.gethostname()
    assert client.get("/mutexowner/status?require=held").status_code == 200
    assert client.get("/mutexowner/status?require=host").status_code == 503
    assert client.get("/mutexowner/status?require=holding").status_code == 503

    # Another process of this host holds it: the host check passes, the process check not.
    redis_client.delete(lease.keys.lease)
    here = f"{socket.gethostname()}:{os.getpid() + 1}:cafe"
    Lease(redis_client, KEY, ttl=30, identity=here).acquire(new_token())
    response = client.get("/mutexowner/status?require=host")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["lease"]["held_by_this_host"] is True
    assert client.get("/mutexowner/status?require=holding").status_code == 503


# -- supervisor= and workers= ------------------------------------------------------------------


def plain_app(**config: Any) -> Flask:
    app = Flask("plain")
    app.config.update(
        MUTEXOWNER_REDIS_URL=seeded_fake_redis("plain"),
        MUTEXOWNER_KEY="plain",
        MUTEXOWNER_TTL=1.0,
        MUTEXOWNER_STUCK_WORKER_POLICY="abandon",
        **config,
    )
    return app


def test_supervisor_factory_builds_one_per_owner() -> None:
    built: list[Supervisor] = []

    def factory() -> Supervisor:
        sup = Supervisor(shutdown_timeout=0.2)
        sup.add(lambda ctx: ctx.stopping.wait(), name="waiter")
        built.append(sup)
        return sup

    app = plain_app()
    ext = MutexOwnerExtension(app, supervisor=factory)
    first = ext.start(app)
    assert first.supervisor is built[0]
    assert ext.stop(app) is True
    second = ext.start(app)
    assert second is not first and second.supervisor is built[1]
    assert ext.stop(app) is True


def test_supervisor_instance_is_checked_against_the_timing_rule() -> None:
    with pytest.raises(
        ConfigurationError, match=r"shutdown_timeout \(5\) must be < MUTEXOWNER_TTL"
    ):
        MutexOwnerExtension(plain_app(), supervisor=Supervisor(shutdown_timeout=5))
    with pytest.raises(ConfigurationError, match="cannot be used with MutexOwnerExtension"):
        MutexOwnerExtension(
            plain_app(MUTEXOWNER_WORKERS=["x.y"]), supervisor=Supervisor(shutdown_timeout=0.1)
        )


def test_workers_argument_runs_callables_in_an_app_context() -> None:
    seen: list[str] = []

    def worker(ctx: WorkerContext) -> None:
        from flask import current_app

        seen.append(current_app.name)
        ctx.stopping.wait()

    app = plain_app()
    ext = MutexOwnerExtension(app, workers=[worker])
    owner: MutexOwner = ext.start(app)
    assert owner.wait_until_holding(10)
    assert owner.supervisor is not None
    assert owner.supervisor.worker_names == (f"{__name__}.{worker.__qualname__}",)
    assert ext.stop(app)
    assert seen == ["plain"]


def test_bad_extension_arguments() -> None:
    with pytest.raises(TypeError, match="either supervisor or workers"):
        MutexOwnerExtension(supervisor=Supervisor(), workers=[])
    with pytest.raises(TypeError, match="supervisor must be a Supervisor or a callable"):
        MutexOwnerExtension(supervisor=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="workers must be a list"):
        MutexOwnerExtension(workers="a.b")


def test_state_of_an_app_without_the_extension() -> None:
    app = Flask("bare")
    app.register_blueprint(status_blueprint)
    with pytest.raises(RuntimeError, match="mutexowner is not initialised on app 'bare'"):
        get_state(app)
