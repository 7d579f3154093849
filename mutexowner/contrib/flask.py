"""Flask integration: ``MutexOwnerExtension``, ``flask mutexowner run`` and a status blueprint.

::

    from mutexowner.contrib.flask import MutexOwnerExtension, status_blueprint

    mutexowner = MutexOwnerExtension()

    def create_app():
        app = Flask(__name__)
        app.config.update(
            MUTEXOWNER_REDIS_URL="redis://localhost:6379/0",
            MUTEXOWNER_KEY="myapp:scheduler",
            MUTEXOWNER_WORKERS=["myapp.workers.schedule"],
        )
        mutexowner.init_app(app)
        app.register_blueprint(status_blueprint)  # GET /mutexowner/status
        return app

Run the workers in a dedicated process with ``flask --app myapp mutexowner run`` (recommended),
or set ``MUTEXOWNER_AUTOSTART = True`` to start an owner in each web worker process on its
first request (fork-safe: a pre-fork master that serves no request never starts one).
Workers run inside an application context of their app.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import click
from flask import Blueprint, Flask, current_app, jsonify, request
from flask.cli import AppGroup
from werkzeug.utils import import_string

from mutexowner.contrib._runtime import (
    ProcessOwner,
    check_report,
    configure_logging,
    lease_reader,
    lease_report,
    run_foreground,
    status_response,
)
from mutexowner.contrib._settings import (
    KEYS,
    ConfigurationError,
    OwnerSettings,
    WorkerTarget,
    parse_settings,
)
from mutexowner.owner import MutexOwner
from mutexowner.supervisor import Supervisor
from mutexowner.timing import LeaseTiming, TimingError, TimingNames

__all__ = [
    "CONFIG_PREFIX",
    "EXTENSION_KEY",
    "MutexOwnerExtension",
    "MutexOwnerState",
    "cli",
    "status_blueprint",
]

#: Every config key of the extension starts with this.
CONFIG_PREFIX = "MUTEXOWNER_"
#: Where the per-app state lives: ``app.extensions["mutexowner"]``.
EXTENSION_KEY = "mutexowner"
_SUPERVISOR_KEYS = ("WORKERS", "MAX_RESTARTS", "MAX_SECONDS", "SHUTDOWN_TIMEOUT")

SupervisorArg = Union[Supervisor, Callable[[], Supervisor]]


def config_name(key: str) -> str:
    """How a canonical key is spelled in ``app.config``."""
    return f"{CONFIG_PREFIX}{key}"


def read_config(
    config: Mapping[str, Any], *, workers: Optional[Sequence[Union[str, WorkerTarget]]] = None
) -> OwnerSettings:
    """Validate the ``MUTEXOWNER_*`` keys of ``config``; ``ConfigurationError`` naming the key
    and its allowed values otherwise. ``workers`` (from the extension) replaces
    ``MUTEXOWNER_WORKERS``."""
    values: dict[str, Any] = {}
    unknown = []
    for name, value in config.items():
        if not isinstance(name, str) or not name.startswith(CONFIG_PREFIX):
            continue
        key = name[len(CONFIG_PREFIX) :]
        if key in KEYS:
            values[key] = value
        else:
            unknown.append(name)
    if unknown:
        raise ConfigurationError(
            f"unknown config key(s) {', '.join(sorted(unknown))}; allowed: "
            f"{', '.join(config_name(k) for k in KEYS)}"
        )
    if workers is not None:
        if values.get("WORKERS") is not None:
            raise ConfigurationError(
                f"workers given both to MutexOwnerExtension() and as {config_name('WORKERS')}: "
                "use one"
            )
        values["WORKERS"] = list(workers)
    return parse_settings(values, name=config_name, importer=import_string)


class MutexOwnerState:
    """One app's owner settings and this process's owner: ``app.extensions["mutexowner"]``."""

    def __init__(
        self,
        extension: MutexOwnerExtension,
        app: Flask,
        settings: OwnerSettings,
        supervisor: Optional[SupervisorArg],
    ) -> None:
        self.extension = extension
        self.settings = settings
        self._app = app
        self._supervisor = supervisor
        self._holder = ProcessOwner(self._build_owner, label=f"flask app {app.name!r}")

    def _in_app_context(self, target: WorkerTarget) -> WorkerTarget:
        app = self._app

        @functools.wraps(target)
        def run(*args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return target(*args, **kwargs)

        return run

    def _build_owner(self) -> MutexOwner:
        supervisor = self._supervisor
        if supervisor is not None and not isinstance(supervisor, Supervisor):
            supervisor = supervisor()
            if not isinstance(supervisor, Supervisor):
                raise TypeError(
                    f"the supervisor factory must return a Supervisor, got "
                    f"{type(supervisor).__name__}"
                )
        return self.settings.build_owner(supervisor=supervisor, wrap=self._in_app_context)

    @property
    def owner(self) -> Optional[MutexOwner]:
        """This process's owner, or None when none was started here."""
        return self._holder.get()

    def start(self) -> MutexOwner:
        """Build (once per process) and start the owner; idempotent."""
        return self._holder.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop this process's owner (workers stop, the lease is released); True when done."""
        return self._holder.stop(timeout)

    def _autostart(self) -> None:
        """``before_request`` hook: start the owner on this process's first request."""
        if self._holder.get() is None:
            self._holder.start_quietly()


class MutexOwnerExtension:
    """Flask extension: ``MutexOwnerExtension(app)`` or ``ext.init_app(app)`` in a factory.

    ``workers``: dotted paths or callables taking a ``WorkerContext`` (instead of
    ``MUTEXOWNER_WORKERS``). ``supervisor``: a ``Supervisor`` or a zero-argument callable
    returning a new one (instead of workers; a callable lets a process build a new owner
    after ``stop()``, or one extension serve several apps). Configured workers run inside
    an app context; a given supervisor's workers run as they are.
    """

    def __init__(
        self,
        app: Optional[Flask] = None,
        *,
        supervisor: Optional[SupervisorArg] = None,
        workers: Optional[Sequence[Union[str, WorkerTarget]]] = None,
    ) -> None:
        if supervisor is not None and workers is not None:
            raise TypeError("give either supervisor or workers, not both")
        if supervisor is not None and not (
            isinstance(supervisor, Supervisor) or callable(supervisor)
        ):
            raise TypeError(
                f"supervisor must be a Supervisor or a callable returning one, got "
                f"{type(supervisor).__name__}"
            )
        if workers is not None and (
            isinstance(workers, (str, bytes)) or not isinstance(workers, Sequence)
        ):
            raise TypeError(f"workers must be a list of dotted paths or callables, got {workers!r}")
        self._supervisor = supervisor
        self._workers = workers
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate ``app.config``, store the state in ``app.extensions["mutexowner"]`` and
        add the ``flask mutexowner`` commands (and the autostart hook if enabled)."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(f"mutexowner is already initialised on app {app.name!r}")
        if self._supervisor is not None:
            given = [
                config_name(k)
                for k in _SUPERVISOR_KEYS
                if app.config.get(config_name(k)) is not None
            ]
            if given:
                raise ConfigurationError(
                    f"{', '.join(given)} cannot be used with MutexOwnerExtension(supervisor=...): "
                    "the supervisor brings its own workers and options"
                )
        settings = read_config(app.config, workers=self._workers)
        if isinstance(self._supervisor, Supervisor):
            _check_timing(settings, self._supervisor)
        state = MutexOwnerState(self, app, settings, self._supervisor)
        app.extensions[EXTENSION_KEY] = state
        app.cli.add_command(cli)
        if settings.autostart:
            app.before_request(state._autostart)

    @staticmethod
    def state(app: Optional[Flask] = None) -> MutexOwnerState:
        """The state of ``app`` (default: ``current_app``)."""
        return get_state(app)

    def get_owner(self, app: Optional[Flask] = None) -> Optional[MutexOwner]:
        """This process's owner for ``app`` (default: ``current_app``), or None."""
        return get_state(app).owner

    def start(self, app: Optional[Flask] = None) -> MutexOwner:
        """Start this process's owner for ``app`` (default: ``current_app``)."""
        return get_state(app).start()

    def stop(self, app: Optional[Flask] = None, timeout: Optional[float] = None) -> bool:
        """Stop this process's owner for ``app`` (default: ``current_app``)."""
        return get_state(app).stop(timeout)


def _check_timing(settings: OwnerSettings, supervisor: Supervisor) -> None:
    names = TimingNames(
        ttl=config_name("TTL"),
        renew_interval=config_name("RENEW_INTERVAL"),
        shutdown="the supervisor's shutdown_timeout",
    )
    try:
        LeaseTiming.of(
            settings.ttl,
            settings.renew_interval,
            shutdown_budget=supervisor.shutdown_timeout,
            names=names,
        )
    except TimingError as exc:
        raise ConfigurationError(str(exc)) from None


def get_state(app: Optional[Flask] = None) -> MutexOwnerState:
    """``app.extensions["mutexowner"]`` (default app: ``current_app``)."""
    app = app if app is not None else current_app
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, MutexOwnerState):
        raise RuntimeError(
            f"mutexowner is not initialised on app {app.name!r}: call "
            "MutexOwnerExtension().init_app(app)"
        )
    return state


# -- status blueprint ------------------------------------------------------------------------

#: ``app.register_blueprint(status_blueprint)`` serves ``GET /mutexowner/status``; pass
#: ``url_prefix=`` to mount it elsewhere.
status_blueprint = Blueprint("mutexowner", __name__, url_prefix="/mutexowner")


@status_blueprint.route("/status", methods=["GET"])
def status() -> Any:
    """This process's ``owner.status()`` and the lease as Redis sees it (``"lease"``), as
    JSON (never a password or a token).

    200 by default; ``?require=host``: 503 unless the holder runs on this host;
    ``?require=held``: 503 unless some owner holds the lease; ``?require=holding``: 503
    unless this process holds it; ``?require=started``: 503 unless this process runs an
    owner (the last two never call Redis).
    """
    state = get_state()
    body, code = status_response(
        state.owner,
        state.settings.key,
        request.args.get("require"),
        lease_reader(state.settings),
    )
    response = jsonify(body)
    response.status_code = code
    response.headers["Cache-Control"] = "no-store"
    return response


# -- CLI -------------------------------------------------------------------------------------

cli = AppGroup("mutexowner", help="Run or inspect the app's mutexowner lease.")


@cli.command("run")
@click.option("-v", "--verbose", count=True, help="-v: state changes (INFO), -vv: DEBUG.")
def run_command(verbose: int) -> None:
    """Run the workers in this process while it holds the lease, until SIGTERM or Ctrl-C;
    then stop them, release the lease and exit 0."""
    state = get_state()
    configure_logging(1 + verbose)
    if not state.settings.workers and state._supervisor is None:
        click.echo("mutexowner: no workers configured: holding the lease only", err=True)
    code = run_foreground(state._holder, sys.stdout)
    sys.exit(code)


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status_command(as_json: bool) -> None:
    """Print the lease as Redis sees it (holder, its host, ttl, fencing token; never a
    token); exit 0 held, 3 free, 2 Redis error (as `mutexowner status`)."""
    sys.exit(lease_report(get_state().settings, sys.stdout, as_json=as_json))


@cli.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check_command(as_json: bool) -> None:
    """Print the MUTEXOWNER_* config (password hidden) and test that Redis answers and runs
    the lease scripts; exit 0 ok, 2 Redis failed."""
    sys.exit(check_report(get_state().settings, sys.stdout, as_json=as_json))
