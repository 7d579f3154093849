"""mutexowner.inspection: the lease as Redis sees it, on fakeredis (no real server)."""

from __future__ import annotations

import io
import json
import os
import socket
from typing import Any, Optional

import pytest

from mutexowner import cli, inspection
from mutexowner.inspection import (
    STATUS_ERROR,
    STATUS_FREE,
    STATUS_HELD,
    LeaseReader,
    check_redis,
    format_view,
    parse_identity,
)
from mutexowner.lease import Lease, LeaseKeys, new_token
from mutexowner.testing import fake_redis

PASSWORD = "s3cret-pw"
CLOSED_URL = f"redis://alice:{PASSWORD}@127.0.0.1:1/0"
HOST = socket.gethostname()


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("web-1:4242:a1b2c3", ("web-1", 4242)),
        ("web-1.example.org:7:x", ("web-1.example.org", 7)),
        ("fe80::1:12:ab", ("fe80::1", 12)),  # only the last two fields are split off
        ("node-7", (None, None)),
        ("web-1:notapid:abc", (None, None)),
        ("web-1:12:", (None, None)),
        (":12:abc", (None, None)),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_parse_identity(identity: Optional[str], expected: tuple[Any, Any]) -> None:
    assert parse_identity(identity) == expected


def test_exit_codes_are_defined_once_and_used_by_the_cli() -> None:
    assert (STATUS_HELD, STATUS_FREE, STATUS_ERROR) == (0, 3, 2)
    assert cli.STATUS_ERROR is inspection.STATUS_ERROR


def acquire(client: Any, name: str, identity: str) -> int:
    result = Lease(client, name, ttl=30.0, identity=identity).acquire(new_token())
    return result.fencing_token  # type: ignore[union-attr]


def test_a_reader_that_holds_nothing_sees_the_holder_and_its_host() -> None:
    client = fake_redis("job")
    reader = LeaseReader(client, "job")
    view = reader.read()
    assert (view.held, view.holder, view.held_by_this_host) == (False, None, False)
    assert view.exit_code == STATUS_FREE and view.host == HOST

    fence = acquire(client, "job", "other-host:99:abc")
    view = reader.read()
    assert view.exit_code == STATUS_HELD
    assert (view.holder, view.holder_host, view.holder_pid) == (
        "other-host:99:abc",
        "other-host",
        99,
    )
    assert view.held_by_this_host is False and view.fencing_token == fence
    assert view.ttl_left is not None and 29.0 < view.ttl_left <= 30.0
    assert view.key == LeaseKeys("job").lease and view.error is None
    data = view.as_dict()
    assert data["holder"] == "other-host:99:abc" and data["held_by_this_host"] is False
    assert "token" not in json.dumps(data).replace("fencing_token", "")

    client.delete(LeaseKeys("job").lease)
    acquire(client, "job", f"{HOST}:12345:abc")
    assert reader.read().held_by_this_host is True

    client.delete(LeaseKeys("job").lease)
    acquire(client, "job", "custom-name")
    view = reader.read()
    assert view.held and view.holder_host is None and view.held_by_this_host is None
    reader.close()


def test_a_redis_error_is_a_view_with_the_error_and_no_password() -> None:
    reader = LeaseReader(CLOSED_URL, "job", timeout=0.5)
    view = reader.read()
    assert view.exit_code == STATUS_ERROR and view.error_kind == "connection"
    assert view.redis == "redis://alice:***@127.0.0.1:1/0"
    assert "cannot reach Redis" in str(view.error)
    text = json.dumps(view.as_dict()) + format_view(view)
    assert PASSWORD not in text and "error" in view.as_dict()
    assert "held" not in view.as_dict()  # nothing is claimed about the lease


def test_reader_rejects_a_bad_name_at_once() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        LeaseReader(fake_redis(), "a{b}")


def test_check_redis_runs_ping_script_exists_and_the_read_only_script() -> None:
    client = fake_redis("job")
    result = check_redis(LeaseReader(client, "job"))
    assert result.ok
    assert [step for step, _, _ in result.steps] == [
        "PING",
        "SCRIPT EXISTS",
        "inspect script",
        "permissions",
    ]
    assert result.lines()[0] == "ok   PING: PONG"
    assert "lease scripts cached by Redis" in result.lines()[1]
    # fakeredis runs no INFO inside a script: reported as a degraded mode, not a failure.
    assert result.lines()[3].startswith("ok   permissions: user default:")
    assert "does not run INFO inside a script" in result.lines()[3]
    assert "without +info:" in result.lines()[3]

    failed = check_redis(LeaseReader(CLOSED_URL, "job", timeout=0.5))
    assert not failed.ok and len(failed.steps) == 1
    assert failed.lines()[0].startswith("FAIL PING: cannot reach Redis")
    assert PASSWORD not in "".join(failed.lines())


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (f"{HOST}:4242:abc", f"  on this host     yes ({HOST}, pid 4242)"),
        ("far-away:1:abc", f"  on this host     no (held on far-away; this is {HOST})"),
        (
            "node-7",
            "  on this host     unknown (the identity does not start with <hostname>:<pid>:)",
        ),
    ],
)
def test_status_text_says_whether_this_host_runs_the_holder(identity: str, expected: str) -> None:
    client = fake_redis("job")
    acquire(client, "job", identity)
    out = io.StringIO()
    assert cli.status(client, "job", out=out, err=io.StringIO()) == STATUS_HELD
    assert expected in out.getvalue().splitlines()
    out = io.StringIO()
    assert cli.status(client, "job", as_json=True, out=out, err=io.StringIO()) == STATUS_HELD
    data = json.loads(out.getvalue())
    assert data["holder"] == identity and data["host"] == HOST


def test_a_reader_keeps_working_in_a_forked_child() -> None:
    """A gunicorn worker inherits the reader its master made (``--preload``): the child gets
    its own connection and lease object instead of failing the fork check."""
    client = fake_redis("job")
    acquire(client, "job", "web-1:1:a")
    reader = LeaseReader(client, "job")
    assert reader.read().holder == "web-1:1:a"
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        view = reader.read()
        os._exit(0 if view.error is None and view.holder == "web-1:1:a" else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reader.read().holder == "web-1:1:a"  # the parent's reader is untouched


def test_status_names_the_command_line_option_of_a_bad_argument() -> None:
    err = io.StringIO()
    assert cli.status(fake_redis(), "a{b", out=io.StringIO(), err=err) == STATUS_ERROR
    assert err.getvalue().startswith("mutexowner status: --key must not contain")
    err = io.StringIO()
    assert cli.status("http://u:pw@h", "job", out=io.StringIO(), err=err) == STATUS_ERROR
    assert "--redis must be" in err.getvalue() and "pw" not in err.getvalue()
