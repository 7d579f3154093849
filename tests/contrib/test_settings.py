"""Settings validation, on plain dicts: Django's ``MUTEXOWNER`` and Flask's ``MUTEXOWNER_*``.

Django's ``read_settings`` needs no configured Django (settings can be configured once per
process), so every message is checked here in-process; the subprocess tests check that a
bad setting stops ``manage.py`` early.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from mutexowner.contrib import ConfigurationError, OwnerSettings, import_string
from mutexowner.contrib._settings import DEFAULT_SHUTDOWN_TIMEOUT
from mutexowner.contrib.django.conf import read_settings
from mutexowner.contrib.flask import read_config
from mutexowner.supervisor import WorkerContext
from mutexowner.testing import fake_redis

SECRET = "s3cr3t-pw"
URL = f"redis://app:{SECRET}@cache.internal:6379/2"


def sample_worker(ctx: WorkerContext) -> None:
    """A worker importable by dotted path."""
    ctx.stopping.wait(0)


def other_worker(ctx: WorkerContext) -> None:
    ctx.stopping.wait(0)


NOT_CALLABLE = 42


def on_stuck(names: tuple[str, ...]) -> None:
    """A stuck-worker policy importable by dotted path."""


def django(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"REDIS_URL": URL, "KEY": "app:jobs"}
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


def django_error(value: object) -> str:
    with pytest.raises(ImproperlyConfigured) as info:
        read_settings(value)
    message = str(info.value)
    assert SECRET not in message
    return message


# -- Django: valid settings --------------------------------------------------------------------


def test_minimal_django_settings_take_the_library_defaults() -> None:
    settings = read_settings({"REDIS_URL": URL, "KEY": "app:jobs"})
    assert settings == OwnerSettings(redis=URL, key="app:jobs")
    assert settings.ttl == 10.0 and settings.effective_renew_interval == pytest.approx(10 / 3)
    assert settings.shutdown_timeout == DEFAULT_SHUTDOWN_TIMEOUT
    assert settings.workers == () and settings.autostart is False
    assert settings.stuck_worker_policy == "exit" and settings.outage == "step_down"


def test_full_django_settings() -> None:
    settings = read_settings(
        django(
            TTL=6,
            RENEW_INTERVAL=1.5,
            IDENTITY="web-1",
            WORKERS=[f"{__name__}.sample_worker", other_worker],
            SUPERVISOR={"MAX_RESTARTS": 5, "MAX_SECONDS": 30, "SHUTDOWN_TIMEOUT": 2},
            OUTAGE="keep_running",
            STUCK_WORKER_POLICY=f"{__name__}.on_stuck",
            AUTOSTART=True,
            PREFIX="acme",
            PROMETHEUS=True,
        )
    )
    assert settings.ttl == 6.0 and settings.renew_interval == 1.5
    assert settings.identity == "web-1"
    assert settings.workers == (
        (f"{__name__}.sample_worker", sample_worker),
        (f"{__name__}.other_worker", other_worker),
    )
    assert (settings.max_restarts, settings.max_seconds, settings.shutdown_timeout) == (5, 30, 2)
    assert settings.outage == "keep_running" and settings.stuck_worker_policy is on_stuck
    assert settings.autostart and settings.prometheus and settings.prefix == "acme"


def test_small_ttl_gets_a_shutdown_timeout_that_fits() -> None:
    settings = read_settings(django(TTL=1, WORKERS=[sample_worker]))
    # slack = ttl - drift - renew = 1 - 0.012 - 1/3; half of it.
    assert settings.shutdown_timeout == pytest.approx((1 - 0.012 - 1 / 3) / 2, abs=1e-3)
    owner = settings.build_owner()
    assert owner.supervisor is not None
    assert owner.supervisor.shutdown_timeout == settings.shutdown_timeout


def test_describe_is_printable_and_hides_the_password() -> None:
    described = read_settings(django(WORKERS=[f"{__name__}.sample_worker"])).describe()
    assert described["redis"] == "redis://app:***@cache.internal:6379/2"
    assert described["workers"] == [f"{__name__}.sample_worker"]
    assert SECRET not in repr(described)


def test_build_owner_from_settings() -> None:
    client = fake_redis()
    settings = read_settings(
        {
            "REDIS_URL": client,
            "KEY": "app:jobs",
            "TTL": 3,
            "WORKERS": [sample_worker],
            "SUPERVISOR": {"SHUTDOWN_TIMEOUT": 1, "MAX_RESTARTS": 7},
            "STUCK_WORKER_POLICY": "abandon",
        }
    )
    wrapped: list[str] = []

    def wrap(target: Any) -> Any:
        wrapped.append(target.__name__)
        return target

    owner = settings.build_owner(wrap=wrap)
    assert (owner.key, owner.ttl, owner.stuck_worker_policy) == ("app:jobs", 3.0, "abandon")
    assert owner.supervisor is not None
    assert owner.supervisor.worker_names == (f"{__name__}.sample_worker",)
    assert (owner.supervisor.max_restarts, owner.supervisor.shutdown_timeout) == (7, 1.0)
    assert wrapped == ["sample_worker"]
    assert owner.state == "stopped"


def test_settings_without_workers_build_an_owner_without_supervisor() -> None:
    owner = read_settings({"REDIS_URL": fake_redis(), "KEY": "solo"}).build_owner()
    assert owner.supervisor is None


# -- Django: messages --------------------------------------------------------------------------


def test_missing_setting() -> None:
    message = django_error(None)
    assert "settings.MUTEXOWNER is required" in message and "REDIS_URL" in message


def test_setting_must_be_a_dict() -> None:
    assert "settings.MUTEXOWNER must be a dict, got list" in django_error(["redis://"])


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"KEY": "k"}, 'MUTEXOWNER["REDIS_URL"] is required: a redis://, rediss:// or unix:// URL'),
        (django(REDIS_URL=""), 'MUTEXOWNER["REDIS_URL"] is required'),
        (django(REDIS_URL=6379), 'MUTEXOWNER["REDIS_URL"] must be a redis://'),
        (
            django(REDIS_URL=f"http://app:{SECRET}@cache:6379"),
            'MUTEXOWNER["REDIS_URL"] must be a redis://, rediss:// or unix:// URL (or a '
            "redis.Redis client), got 'http://app:***@cache:6379'",
        ),
        (
            django(REDIS_URL=f"redis://app:{SECRET}@cache:port/0"),
            "got 'redis://app:***@cache:port/0': Port could not be cast",
        ),
        ({"REDIS_URL": URL}, 'MUTEXOWNER["KEY"] is required: the lease name'),
        (django(KEY="a{b}"), 'MUTEXOWNER["KEY"] must not contain'),
        (django(KEY=7), 'MUTEXOWNER["KEY"] must be a str, got int'),
        (django(TTL=0), 'MUTEXOWNER["TTL"] must be a finite number of seconds > 0, got 0'),
        (django(TTL="10"), "MUTEXOWNER[\"TTL\"] must be a finite number of seconds > 0, got '10'"),
        (django(TTL=True), 'MUTEXOWNER["TTL"] must be a finite number of seconds > 0, got True'),
        (django(TTL=float("inf")), 'MUTEXOWNER["TTL"] must be a finite number'),
        (django(RENEW_INTERVAL=-1), 'MUTEXOWNER["RENEW_INTERVAL"] must be a finite number'),
        (
            django(TTL=5, RENEW_INTERVAL=5),
            'MUTEXOWNER["RENEW_INTERVAL"] must be > 0 and < MUTEXOWNER["TTL"] (5), got 5.0',
        ),
        (
            django(TTL=5, WORKERS=[sample_worker], SUPERVISOR={"SHUTDOWN_TIMEOUT": 4}),
            'MUTEXOWNER["RENEW_INTERVAL"] (1.66667) + '
            'MUTEXOWNER["SUPERVISOR"]["SHUTDOWN_TIMEOUT"] (4) must be < MUTEXOWNER["TTL"] '
            "- drift (4.948)",
        ),
        (django(IDENTITY=""), 'MUTEXOWNER["IDENTITY"] must be a non-empty single-line string'),
        (django(IDENTITY="a\nb"), 'MUTEXOWNER["IDENTITY"] must be a non-empty single-line'),
        (
            django(WORKERS="app.workers.run"),
            'MUTEXOWNER["WORKERS"] must be a list of dotted paths (or callables)',
        ),
        (
            django(WORKERS=["no_such_module_xyz.run"]),
            "MUTEXOWNER[\"WORKERS\"][0] = 'no_such_module_xyz.run' cannot be imported: "
            "No module named 'no_such_module_xyz'",
        ),
        (
            django(WORKERS=[sample_worker, f"{__name__}.missing"]),
            f"MUTEXOWNER[\"WORKERS\"][1] = '{__name__}.missing' cannot be imported: Module "
            f'"{__name__}" does not define a "missing" attribute/class',  # Django's import_string
        ),
        (django(WORKERS=["nodots"]), "MUTEXOWNER[\"WORKERS\"][0] = 'nodots' cannot be imported"),
        (
            django(WORKERS=[f"{__name__}.NOT_CALLABLE"]),
            'MUTEXOWNER["WORKERS"][0] must be a dotted path to a callable taking a WorkerContext',
        ),
        (django(WORKERS=[3]), 'MUTEXOWNER["WORKERS"][0] must be a dotted path to a callable'),
        (
            django(WORKERS=[sample_worker, f"{__name__}.sample_worker"]),
            f"MUTEXOWNER[\"WORKERS\"] lists '{__name__}.sample_worker' twice",
        ),
        (
            django(SUPERVISOR=[1]),
            'MUTEXOWNER["SUPERVISOR"] must be a dict with keys MAX_RESTARTS, MAX_SECONDS, '
            "SHUTDOWN_TIMEOUT, got list",
        ),
        (
            django(SUPERVISOR={"RESTARTS": 1}),
            "MUTEXOWNER[\"SUPERVISOR\"] has unknown key(s) 'RESTARTS'; allowed: MAX_RESTARTS, "
            "MAX_SECONDS, SHUTDOWN_TIMEOUT",
        ),
        (
            django(SUPERVISOR={"MAX_RESTARTS": -1}),
            'MUTEXOWNER["SUPERVISOR"]["MAX_RESTARTS"] must be an int >= 0, got -1',
        ),
        (
            django(SUPERVISOR={"MAX_RESTARTS": 1.5}),
            'MUTEXOWNER["SUPERVISOR"]["MAX_RESTARTS"] must be an int >= 0, got 1.5',
        ),
        (
            django(SUPERVISOR={"MAX_SECONDS": 0}),
            'MUTEXOWNER["SUPERVISOR"]["MAX_SECONDS"] must be a finite number of seconds > 0',
        ),
        (
            django(SUPERVISOR={"SHUTDOWN_TIMEOUT": -0.5}),
            'MUTEXOWNER["SUPERVISOR"]["SHUTDOWN_TIMEOUT"] must be a finite number of seconds >= 0',
        ),
        (
            django(OUTAGE="ignore"),
            "MUTEXOWNER[\"OUTAGE\"] must be one of 'step_down', 'keep_running', got 'ignore'",
        ),
        (
            django(STUCK_WORKER_POLICY="kill"),
            "MUTEXOWNER[\"STUCK_WORKER_POLICY\"] must be 'exit', 'abandon', a callable or a "
            "dotted path to one, got 'kill'",
        ),
        (
            django(STUCK_WORKER_POLICY="no_such_module_xyz.policy"),
            "MUTEXOWNER[\"STUCK_WORKER_POLICY\"] = 'no_such_module_xyz.policy' cannot be imported",
        ),
        (
            django(STUCK_WORKER_POLICY=f"{__name__}.NOT_CALLABLE"),
            'MUTEXOWNER["STUCK_WORKER_POLICY"] must be',
        ),
        (django(AUTOSTART="yes"), "MUTEXOWNER[\"AUTOSTART\"] must be True or False, got 'yes'"),
        (django(PROMETHEUS=1), 'MUTEXOWNER["PROMETHEUS"] must be True or False, got 1'),
        (django(PREFIX="a}"), 'MUTEXOWNER["PREFIX"] must not contain'),
    ],
)
def test_invalid_django_setting_is_named_with_what_is_allowed(
    settings: dict[str, Any], expected: str
) -> None:
    assert expected in django_error(settings)


def test_unknown_keys_are_listed_with_hints() -> None:
    message = django_error(django(ttl=5, MAX_RESTARTS=3, COLOR="red"))
    assert message.startswith(
        "MUTEXOWNER has unknown key(s) 'ttl', 'MAX_RESTARTS', 'COLOR' ('ttl' should be 'TTL'; "
        "'MAX_RESTARTS' belongs in MUTEXOWNER['SUPERVISOR']); allowed: REDIS_URL, KEY, TTL,"
    )
    assert message.endswith("PREFIX, PROMETHEUS, SUPERVISOR")


def test_no_message_ever_shows_the_password() -> None:
    """Every error above was checked by django_error; the URL also never leaks through a
    later key's message or through describe()."""
    for bad in (django(TTL=-1), django(KEY=""), django(OUTAGE=None, AUTOSTART="x")):
        django_error(bad)
    assert SECRET not in repr(read_settings(django()).describe())


# -- Flask ------------------------------------------------------------------------------------


def test_flask_config_keys() -> None:
    settings = read_config(
        {
            "SECRET_KEY": "unrelated",
            "MUTEXOWNER_REDIS_URL": URL,
            "MUTEXOWNER_KEY": "app:jobs",
            "MUTEXOWNER_TTL": 4,
            "MUTEXOWNER_SHUTDOWN_TIMEOUT": 1,
            "MUTEXOWNER_WORKERS": [f"{__name__}.sample_worker"],
            "MUTEXOWNER_AUTOSTART": True,
        }
    )
    assert (settings.key, settings.ttl, settings.shutdown_timeout) == ("app:jobs", 4.0, 1.0)
    assert settings.workers == ((f"{__name__}.sample_worker", sample_worker),)
    assert settings.autostart


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"MUTEXOWNER_KEY": "k"}, "MUTEXOWNER_REDIS_URL is required"),
        (
            {"MUTEXOWNER_REDIS_URL": f"https://u:{SECRET}@h", "MUTEXOWNER_KEY": "k"},
            "MUTEXOWNER_REDIS_URL must be a redis://, rediss:// or unix:// URL (or a "
            "redis.Redis client), got 'https://u:***@h'",
        ),
        (
            {"MUTEXOWNER_REDIS_URL": URL, "MUTEXOWNER_KEY": "k", "MUTEXOWNER_TTl": 3},
            "unknown config key(s) MUTEXOWNER_TTl; allowed: MUTEXOWNER_REDIS_URL, MUTEXOWNER_KEY",
        ),
        (
            {"MUTEXOWNER_REDIS_URL": URL, "MUTEXOWNER_KEY": "k", "MUTEXOWNER_TTL": "3"},
            "MUTEXOWNER_TTL must be a finite number of seconds > 0, got '3'",
        ),
        (
            {
                "MUTEXOWNER_REDIS_URL": URL,
                "MUTEXOWNER_KEY": "k",
                "MUTEXOWNER_TTL": 2,
                "MUTEXOWNER_SHUTDOWN_TIMEOUT": 2,
                "MUTEXOWNER_WORKERS": [sample_worker],
            },
            "MUTEXOWNER_RENEW_INTERVAL (0.666667) + MUTEXOWNER_SHUTDOWN_TIMEOUT (2) must be < "
            "MUTEXOWNER_TTL - drift (1.978)",
        ),
    ],
)
def test_invalid_flask_config(config: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        read_config(config)
    assert expected in str(info.value)
    assert SECRET not in str(info.value)


def test_flask_workers_argument_replaces_the_config_key() -> None:
    config = {"MUTEXOWNER_REDIS_URL": URL, "MUTEXOWNER_KEY": "k"}
    settings = read_config(config, workers=[sample_worker])
    assert [name for name, _ in settings.workers] == [f"{__name__}.sample_worker"]
    with pytest.raises(ConfigurationError, match="workers given both"):
        read_config({**config, "MUTEXOWNER_WORKERS": [other_worker]}, workers=[sample_worker])


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


# -- import_string -----------------------------------------------------------------------------


def test_import_string_forms() -> None:
    assert import_string(f"{__name__}.sample_worker") is sample_worker
    assert import_string(f"{__name__}:sample_worker") is sample_worker
    assert import_string("os.path.join") is import_string("os.path:join")
    for bad in ("", "nodots", "os.", ".x", f"{__name__}.nope"):
        with pytest.raises(ImportError):
            import_string(bad)


def test_each_framework_imports_with_its_own_helper() -> None:
    """Django's ``import_string`` (dotted only) and werkzeug's (dotted or ``module:attr``)."""
    base = {"MUTEXOWNER_REDIS_URL": URL, "MUTEXOWNER_KEY": "k"}
    colon = f"{__name__}:sample_worker"
    flask_settings = read_config({**base, "MUTEXOWNER_WORKERS": [colon]})
    assert flask_settings.workers == ((colon, sample_worker),)
    with pytest.raises(ConfigurationError, match=r"cannot be imported: import_string\(\)"):
        read_config({**base, "MUTEXOWNER_WORKERS": [f"{__name__}.missing"]})  # werkzeug's words
    assert "does not define" in django_error(django(WORKERS=[f"{__name__}.missing"]))


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        (django(TTL=-1), "TTL"),
        (django(KEY=None), "KEY"),
        (django(WORKERS=["no_such_module_xyz.run"]), "WORKERS"),
        (django(RENEW_INTERVAL=20), "RENEW_INTERVAL"),
        (django(WORKERS=[sample_worker], SUPERVISOR={"SHUTDOWN_TIMEOUT": 9}), "SHUTDOWN_TIMEOUT"),
        (django(REDIS_URL="http://x"), "REDIS_URL"),
    ],
)
def test_an_invalid_setting_error_names_its_key(settings: dict[str, Any], setting: str) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        read_settings(settings)
    assert getattr(info.value, "setting", None) == setting


# -- Django system checks (no configured Django needed) ------------------------------------------


@pytest.mark.parametrize(
    ("value", "check_id", "hint"),
    [
        (None, "mutexowner.E001", "Add to settings.py: MUTEXOWNER = {"),
        ([1], "mutexowner.E002", "keys are upper case"),
        (django(ttl=3), "mutexowner.E002", "keys are upper case"),
        (django(SUPERVISOR={"RESTARTS": 1}), "mutexowner.E002", "keys are upper case"),
        (django(REDIS_URL=f"http://u:{SECRET}@h"), "mutexowner.E003", "Use a URL such as"),
        (django(KEY="a{b}"), "mutexowner.E004", "the same on every node"),
        (django(IDENTITY=""), "mutexowner.E004", "Leave IDENTITY unset"),
        (django(TTL=0), "mutexowner.E005", "lease's length in seconds"),
        (
            django(TTL=3, WORKERS=[sample_worker], SUPERVISOR={"SHUTDOWN_TIMEOUT": 3}),
            "mutexowner.E005",
            "RENEW_INTERVAL + SUPERVISOR.SHUTDOWN_TIMEOUT < TTL - drift",
        ),
        (django(WORKERS=["no_such_module_xyz.run"]), "mutexowner.E006", "list of dotted paths"),
        (django(OUTAGE="ignore"), "mutexowner.E007", '"step_down" (default, safe)'),
    ],
)
def test_django_system_check_ids_and_hints(value: object, check_id: str, hint: str) -> None:
    from mutexowner.contrib.django.checks import setting_errors

    (error,) = setting_errors(value)
    assert error.id == check_id and hint in error.hint
    assert error.is_serious() and SECRET not in error.msg


def test_valid_django_settings_pass_the_checks() -> None:
    from mutexowner.contrib.django.checks import setting_errors

    assert setting_errors(django(WORKERS=[f"{__name__}.sample_worker"])) == []
