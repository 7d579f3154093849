"""The least-privilege Redis ACL of one lease, derived from the Lua scripts, and a check of it.

Redis 7 checks every command a script runs against the caller's ACL, so the user needs the
scripts' own commands as well as the ones the client sends. `SCRIPT_COMMANDS` is read from
the ``.lua`` files shipped in ``mutexowner/lua`` (every ``redis.call``/``redis.pcall``), so
the list cannot drift from the scripts; `CLIENT_COMMANDS` is what the library sends itself.
`acl_rules` turns both into ``ACL SETUSER`` rules for one lease; `check_permissions` tells,
without taking the lease, which of them the connected user is missing.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

import redis
from redis import exceptions as rex

from mutexowner.lease import LeaseKeys, validate_name

__all__ = [
    "CLIENT_COMMANDS",
    "CONNECT_COMMANDS",
    "DEGRADED_WITHOUT",
    "SCRIPT_COMMANDS",
    "SENTINEL_COMMANDS",
    "AclCheck",
    "acl_rules",
    "acl_setuser",
    "check_permissions",
    "script_commands",
    "sentinel_acl_rules",
    "users_acl_line",
]

#: The scripts whose commands the lease user runs (the probe below runs the same commands).
LEASE_SCRIPTS = ("acquire.lua", "release.lua", "inspect.lua")

_CALL = re.compile(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]")


def script_commands(names: Iterable[str] = LEASE_SCRIPTS) -> frozenset[str]:
    """Lower-case names of the commands the given ``mutexowner/lua`` scripts run."""
    found: set[str] = set()
    for name in names:
        text = (resources.files("mutexowner") / "lua" / name).read_text(encoding="utf-8")
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        found.update(match.lower() for match in _CALL.findall(code))
    return frozenset(found)


#: Commands the lease scripts run (Redis checks each one against the caller's ACL).
SCRIPT_COMMANDS: frozenset[str] = script_commands()

#: Commands the library sends itself: scripts by SHA (redis-py's ``Script`` loads a script
#: again after NOSCRIPT; it never sends EVAL), and the release listener's subscription (it
#: leaves by closing the connection, without UNSUBSCRIBE), and ``WAIT`` after an acquire or
#: renewal when the master has (or had) replicas (docs/ha.md). PUBLISH is sent by the
#: release script only.
CLIENT_COMMANDS: frozenset[str] = frozenset({"evalsha", "script|load", "subscribe", "wait"})

#: Sent only when configured: ``SELECT`` on connect for a database other than 0, ``CLIENT
#: SETNAME`` for a ``client_name``, ``PING`` for a Sentinel pool with ``check_connection``.
#: (redis-py ignores a refused ``CLIENT SETINFO``; ``AUTH`` and ``HELLO`` need no grant.)
CONNECT_COMMANDS: dict[str, str] = {
    "select": "db != 0",
    "client|setname": "a client_name",
    "ping": "Sentinel with check_connection=True",
}

#: What a Sentinel client asks the sentinels (redis-py's ``discover_master``); a sentinel's
#: ACL user needs nothing else (no keys, no channels).
SENTINEL_COMMANDS: frozenset[str] = frozenset({"sentinel|masters"})

#: Grants whose absence only degrades the lease (see docs/security.md), and how.
DEGRADED_WITHOUT: dict[str, str] = {
    "info": "a restart from persisted data or a fail-over is noticed only when the epoch key "
    "is lost (the script reads the server's run_id with INFO)",
    "channels": "no millisecond hand-off: a standby takes over when the holder's lease runs "
    "out (up to one ttl after a clean release)",
}

#: Commands whose absence only degrades (with the lease's channels, see DEGRADED_WITHOUT).
_OPTIONAL = frozenset({"info"})
_CHANNEL_COMMANDS = frozenset({"publish", "subscribe"})


def _command_order(command: str) -> tuple[int, str]:
    order = (
        "evalsha",
        "script|load",
        "wait",
        "subscribe",
        "publish",
        "select",
        "client|setname",
        "ping",
    )
    return (order.index(command), "") if command in order else (len(order), command)


def lease_commands(
    *, db: int = 0, client_name: bool = False, check_connection: bool = False
) -> list[str]:
    """Every command the lease user needs, client commands first, in a stable order."""
    commands = set(CLIENT_COMMANDS | SCRIPT_COMMANDS)
    if db:
        commands.add("select")
    if client_name:
        commands.add("client|setname")
    if check_connection:
        commands.add("ping")
    return sorted(commands, key=_command_order)


def acl_rules(
    name: str,
    *,
    prefix: str = "mutexowner",
    db: int = 0,
    client_name: bool = False,
    check_connection: bool = False,
) -> list[str]:
    """The ACL rules of a user that may run lease ``name`` and nothing else.

    ``reset`` drops every earlier grant and password; ``resetchannels`` is repeated because
    on Redis 6.2 ``reset`` leaves ``allchannels`` when ``acl-pubsub-default`` says so.
    """
    keys = LeaseKeys(validate_name(name), prefix)
    pattern = f"{keys.tag}:*"
    return [
        "reset",
        "on",
        ">PASSWORD",
        f"~{pattern}",
        "resetchannels",
        f"&{pattern}",
        "-@all",
        *(
            f"+{command}"
            for command in lease_commands(
                db=db, client_name=client_name, check_connection=check_connection
            )
        ),
    ]


def sentinel_acl_rules() -> list[str]:
    """The ACL rules of the user a ``Sentinel`` client authenticates as on each sentinel
    (``sentinel_kwargs={"username": ..., "password": ...}``) to find the master."""
    return ["reset", "on", ">PASSWORD", "-@all", *(f"+{c}" for c in sorted(SENTINEL_COMMANDS))]


def _with_password(rules: list[str], password: Optional[str]) -> list[str]:
    if password is None:
        return rules
    return [f">{password}" if rule == ">PASSWORD" else rule for rule in rules]


def acl_setuser(user: str, rules: list[str], password: Optional[str] = None) -> str:
    """The ``ACL SETUSER`` line for redis-cli (``PASSWORD`` stays a placeholder by default)."""
    return " ".join(["ACL", "SETUSER", user, *_with_password(rules, password)])


def users_acl_line(user: str, rules: list[str], password: Optional[str] = None) -> str:
    """The same rules as a line of a ``users.acl`` file (``aclfile`` in redis.conf)."""
    return " ".join(["user", user, *_with_password(rules, password)])


# -- checking a user's permissions without taking the lease ---------------------------------

# Runs every command of the lease scripts on two scratch keys of the lease's own key space
# (never the lease keys), with pcall so that each refusal is reported, not just the first.
# KEYS[1] scratch hash   KEYS[2] scratch string   ARGV[1] a channel nobody listens to
_PROBE_LUA = """
local refused = {}
local function try(name, ...)
  local ok = redis.pcall(...)
  if type(ok) == 'table' and ok.err then
    refused[#refused + 1] = name
    refused[#refused + 1] = ok.err
  end
  return ok
end
try('time', 'TIME')
try('info', 'INFO', 'server')
try('hset', 'HSET', KEYS[1], 'probe', '1')
try('hmget', 'HMGET', KEYS[1], 'probe')
try('hget', 'HGET', KEYS[1], 'probe')
try('pexpire', 'PEXPIRE', KEYS[1], 10000)
try('exists', 'EXISTS', KEYS[1])
try('pttl', 'PTTL', KEYS[1])
try('set', 'SET', KEYS[2], '1', 'PX', 10000)
try('get', 'GET', KEYS[2])
try('publish', 'PUBLISH', ARGV[1], 'permission check')
try('del', 'DEL', KEYS[1])
redis.pcall('DEL', KEYS[2])
return refused
"""

#: Commands the probe script exercises (a test checks that this equals SCRIPT_COMMANDS).
PROBED_COMMANDS: frozenset[str] = frozenset(re.findall(r"try\('(\w+)'", _PROBE_LUA))

_DENIED_COMMAND = re.compile(r"run the '([\w|]+)' command", re.IGNORECASE)


@dataclass(frozen=True)
class AclCheck:
    """What a permission check found: ``missing`` commands and channels, and other errors."""

    user: str
    missing_commands: tuple[str, ...] = ()
    missing_keys: tuple[str, ...] = ()
    missing_channels: tuple[str, ...] = ()
    #: Commands that failed for another reason than the ACL (e.g. ``"hset: OOM ..."``).
    errors: tuple[str, ...] = ()
    #: Optional commands this server does not run inside a script (some Redis-compatible
    #: servers refuse INFO there): no grant can fix it; the lease works, degraded.
    unsupported: tuple[str, ...] = ()

    @property
    def required_missing(self) -> bool:
        """True when something the lease cannot work without is missing (not only degraded)."""
        optional = _OPTIONAL | _CHANNEL_COMMANDS
        return bool(
            self.missing_keys or any(command not in optional for command in self.missing_commands)
        )

    @property
    def ok(self) -> bool:
        """True when nothing at all is missing and every command could be checked."""
        return not (
            self.missing_commands or self.missing_keys or self.missing_channels or self.errors
        )

    def describe(self) -> str:
        """One line in ACL terms, e.g. ``missing: +time +pttl; channels &mutexowner:{job}:*``."""
        if self.ok:
            granted = f"user {self.user}: every permission the lease needs is granted"
            return granted + (self._unsupported_note() if self.unsupported else "")
        parts = []
        if self.missing_commands:
            parts.append(" ".join(f"+{c}" for c in self.missing_commands))
        if self.missing_keys:
            parts.append("keys " + " ".join(f"~{k}" for k in self.missing_keys))
        if self.missing_channels:
            parts.append("channels " + " ".join(f"&{c}" for c in self.missing_channels))
        line = f"user {self.user}: missing: " + "; ".join(parts) if parts else f"user {self.user}"
        if self.errors:
            line += "; could not check: " + "; ".join(self.errors)
        return line if not self.unsupported else line + self._unsupported_note()

    def _unsupported_note(self) -> str:
        names = " ".join(c.upper() for c in self.unsupported)
        return f"; this server does not run {names} inside a script"

    def degraded(self) -> list[str]:
        """What works less well with the optional grants that are missing."""
        notes = []
        if "info" in self.missing_commands or "info" in self.unsupported:
            notes.append(f"without +info: {DEGRADED_WITHOUT['info']}")
        if self.missing_channels or _CHANNEL_COMMANDS & set(self.missing_commands):
            notes.append(f"without channel access: {DEGRADED_WITHOUT['channels']}")
        return notes


def _denied(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, rex.NoPermissionError) or "NOPERM" in text or "no permissions" in text


def _whoami(client: redis.Redis) -> str:
    try:
        name = client.execute_command("ACL", "WHOAMI")  # type: ignore[no-untyped-call]
    except Exception:  # ACL WHOAMI is not granted: name the user from the client's settings
        pool = getattr(client, "connection_pool", None)  # a cluster client has none
        kwargs = pool.connection_kwargs if pool is not None else {}
        name = kwargs.get("username") or "default"
    return name.decode() if isinstance(name, bytes) else str(name)


def check_permissions(
    client: redis.Redis, name: str, *, prefix: str = "mutexowner", user: Optional[str] = None
) -> AclCheck:
    """Test, without touching the lease keys, that ``client``'s user can run lease ``name``.

    Runs every command of the lease scripts in a probe script on two scratch keys
    ``<prefix>:{name}:check:*`` (deleted again; they expire in 10 s should DEL be refused),
    publishing on a private channel of the lease, and subscribes to the release channel.
    Works the same on Redis 6.2 and 7 and needs no admin rights (``ACL DRYRUN`` would need
    ``+acl|dryrun``, which the lease user should not have).
    Connection errors propagate.
    """
    keys = LeaseKeys(validate_name(name), prefix)
    who = user or _whoami(client)
    denials = _Denials(f"{keys.tag}:*")
    reply = _run_probe(client, keys, denials)
    refused, failed, keys_refused, channel_missing = _probe_refusals(reply)
    unsupported = [f.split(":", 1)[0] for f in failed if _unsupported_optional(f)]
    failed = [f for f in failed if not _unsupported_optional(f)]
    denials.commands += refused
    if keys_refused:
        denials.keys.append(denials.key_pattern)
    channel_missing |= _try_subscribe(client, [keys.channel], denials.commands)
    _check_wait(client, denials)
    ordered = tuple(sorted(dict.fromkeys(denials.commands), key=_command_order))
    return AclCheck(
        user=who,
        missing_commands=ordered,
        missing_keys=tuple(dict.fromkeys(denials.keys)),
        missing_channels=(denials.key_pattern,) if channel_missing else (),
        errors=tuple(failed),
        unsupported=tuple(unsupported),
    )


@dataclass
class _Denials:
    """What ``check_permissions`` found refused so far: commands, and key access."""

    #: The lease's key pattern, ``<prefix>:{name}:*``: what a key refusal is reported as.
    key_pattern: str
    commands: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def add(self, exc: BaseException, fallback: str) -> None:
        """Record what a permission error names: a command (``fallback`` if none), or keys."""
        match = _DENIED_COMMAND.search(str(exc))
        if match:
            # Redis 6.2 names only the parent of a subcommand ('script' for SCRIPT LOAD).
            named = match.group(1).lower()
            self.commands.append(fallback if fallback.split("|")[0] == named else named)
        elif "keys" in str(exc):
            self.keys.append(self.key_pattern)
        else:
            self.commands.append(fallback)


def _run_probe(client: redis.Redis, keys: LeaseKeys, denials: _Denials) -> Any:
    """Load and run the probe script on scratch keys; its reply, or None if it could not run.

    A refused SCRIPT LOAD or EVALSHA is recorded in ``denials``; other errors propagate.
    """
    scratch = [f"{keys.tag}:check:{secrets.token_hex(4)}:{part}" for part in ("h", "s")]
    channel = f"{keys.channel}:check-{secrets.token_hex(4)}"
    probe = client.register_script(_PROBE_LUA)
    try:
        client.script_load(_PROBE_LUA)
    except rex.ResponseError as exc:
        if not _denied(exc):
            raise
        denials.add(exc, "script|load")
    try:
        return client.evalsha(probe.sha, 2, *scratch, channel)
    except rex.NoScriptError:
        return None  # SCRIPT LOAD was refused: EVALSHA cannot be tried further
    except rex.ResponseError as exc:
        if not _denied(exc):
            raise
        denials.add(exc, "evalsha")
        return None


def _check_wait(client: redis.Redis, denials: _Denials) -> None:
    """Try ``WAIT 0 0`` (it returns at once); a refusal is recorded in ``denials``."""
    try:
        client.execute_command("WAIT", 0, 0)  # type: ignore[no-untyped-call]
    except rex.ResponseError as exc:
        if _denied(exc):
            denials.add(exc, "wait")
        elif "unknown command" not in str(exc).lower():
            raise
        # A server without WAIT has no replicas to wait for: the lease never sends it there.


def _unsupported_optional(failure: str) -> bool:
    """``"info: ERR unknown command ..."``: an optional command the server does not have."""
    command, _, error = failure.partition(":")
    return command in _OPTIONAL and "unknown command" in error.lower()


#: How servers word an ACL refusal inside a script: Redis 6.2/7.0 ("... can't run this
#: command", "can't access", NOPERM) and Redis 7.2+/Valkey ("ACL failure in script: No
#: permissions to access a channel / a key").
_ACL_REFUSAL = re.compile(
    r"can't run this command|can't access|can't publish|NOPERM|no permissions"
    r"|ACL failure in script",
    re.IGNORECASE,
)


def _probe_refusals(reply: Any) -> tuple[list[str], list[str], bool, bool]:
    """From the probe's flat {name, error, ...} reply: commands the ACL refused, other
    failures (``"name: error"``), and whether the scratch keys or the channel were refused."""
    refused: list[str] = []
    failed: list[str] = []
    keys_refused = channel_refused = False
    if not isinstance(reply, list):
        return refused, failed, keys_refused, channel_refused
    texts = [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
    for command, error in zip(texts[::2], texts[1::2]):
        if not _ACL_REFUSAL.search(error):
            failed.append(f"{command}: {error}")
        elif "channel" in error.lower():
            channel_refused = True
        elif re.search(r"\bkeys?\b", error, re.IGNORECASE):
            keys_refused = True
        else:
            refused.append(command)
    return refused, failed, keys_refused, channel_refused


def _try_subscribe(client: redis.Redis, channels: list[str], missing: list[str]) -> bool:
    """Subscribe to ``channels`` as the release listener does; True when they are refused."""
    pubsub = client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
    try:
        pubsub.subscribe(*channels)
        # The confirmation (or the refusal) comes back as a reply to read.
        for _ in channels:
            pubsub.get_message(timeout=2.0)
    except rex.ResponseError as exc:
        if not _denied(exc):
            raise
        if "channel" in str(exc):
            return True
        match = _DENIED_COMMAND.search(str(exc))
        missing.append(match.group(1).lower() if match else "subscribe")
    finally:
        pubsub.close()
    return False
