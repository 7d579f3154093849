"""Command-line interface: ``mutexowner demo | run | status``.

``main`` returns the process exit status instead of calling ``sys.exit``, so that it can be
tested directly; the console script and ``python -m mutexowner.cli`` exit with it. Every
Redis URL shown goes through ``redact_url`` and every error message through
``redact_text``: a password never reaches the terminal or the logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any, Optional, TextIO

from mutexowner import __version__
from mutexowner.connection import client_from, derive_lease_client, redact_text, redact_url
from mutexowner.inspection import STATUS_ERROR, LeaseReader, format_view
from mutexowner.runner import (
    EXIT_GAVE_UP,
    EXIT_INTERNAL,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_SKIPPED,
    EXIT_STATUS_FREE,
    EXIT_STUCK,
    EXIT_USAGE,
    RESTART_POLICIES,
    RunConfig,
    Runner,
    check_command,
)

__all__ = ["build_parser", "check", "main", "parse_args", "status"]

log = logging.getLogger("mutexowner.cli")

#: Environment variable read when ``--redis`` is not given (run, status).
REDIS_URL_ENV = "REDIS_URL"
#: Socket timeout of the ``status`` round trip (seconds).
STATUS_TIMEOUT = 2.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Log level per command when --log-level is not given.
DEFAULT_LOG_LEVEL = {"run": "info", "status": "warning", "demo": "error", "acl": "warning"}
#: ``status --check``: a permission the lease uses is missing.
EXIT_PERMISSIONS = 4

EXIT_CODES = f"""\
exit status:
  {EXIT_OK:<4} success; run: the command's run ended with 0, or the run was stopped
       (SIGTERM/SIGINT/SIGHUP) and the command exited 0 or on our SIGTERM;
       status: the lease is held
  {EXIT_INTERNAL:<4} internal error (the traceback is logged)
  {EXIT_USAGE:<4} usage or configuration error; status: error (Redis unreachable...);
       run --wait: Redis did not answer within --wait
  {EXIT_STATUS_FREE:<4} status: the lease is free
  {EXIT_PERMISSIONS:<4} status --check: a permission the lease uses is missing
  {EXIT_GAVE_UP:<4} run: gave up, the command failed more than --max-restarts times
       within --max-seconds
  {EXIT_STUCK:<4} run: the lease was lost and the command could not be stopped (never
       expected: SIGKILL is sent after --grace)
  {EXIT_SKIPPED:<4} run --wait: another host held the lease; skipped (0 with --skip-ok)
  {EXIT_NOT_EXECUTABLE:<4} run: the command is not executable
  {EXIT_NOT_FOUND:<4} run: the command was not found
  N    run: the command's own exit status, when the run ended with it (--once,
       --restart never, or a stop after which it exited with another status);
       128+S when the command died from signal S (e.g. 137 after SIGKILL)
"""

MAIN_EPILOG = f"""\
examples:
  mutexowner demo                      # three owners, one lease, no Redis needed
  mutexowner run --redis redis://localhost:6379/0 --key nightly-backup -- /usr/bin/backup --all
  mutexowner status --key nightly-backup --json     # Redis URL from $REDIS_URL

{EXIT_CODES}"""

DEMO_EPILOG = """\
examples:
  mutexowner demo                      # about 20 s on an embedded fake Redis
  mutexowner demo --seconds 8 --seed 1 # shorter, reproducible choices
  mutexowner demo --redis redis://localhost:6379/15   # on a real server (no outage phase)

The demo prints a timeline (time, owner, state change, fencing token, whose workers are
running) and a summary line; it exits 0 when every phase completed and no two workers ever
ran at the same time, 1 otherwise, 2 when it cannot start.
"""

RUN_EPILOG = f"""\
examples:
  # cron, on every host at 02:00: one host runs the backup, the others skip it (exit 0)
  mutexowner run --key nightly --once --wait 0 --skip-ok --hold-at-least 300 \\
      -- /usr/bin/backup --all
  mutexowner run --redis redis://localhost:6379/0 --key report -- python make_report.py
  # a singleton service: one host runs it, another takes over within a ttl
  REDIS_URL=redis://:secret@redis:6379/0 mutexowner run --key consumer --ttl 15 --grace 5 \\
      -- ./consume --queue jobs

Run the same command on every host: one holds the lease and runs COMMAND; the others wait
and take over within a ttl when it dies, at once when it stops cleanly. COMMAND runs in its
own process group with MUTEXOWNER_FENCING_TOKEN, MUTEXOWNER_KEY and MUTEXOWNER_IDENTITY set.
When the lease is lost it gets SIGTERM, then SIGKILL after --grace; the whole group goes
with it. A guard process enforces the lease deadline on its own clock, so even a frozen or
killed `mutexowner run` never leaves COMMAND running past its lease. --restart says what
happens when COMMAND exits on its own (default: on-failure; never with --once). On
SIGTERM/SIGINT/SIGHUP the command is stopped, the lease released, and run exits 0 when the
command exited 0 or on that SIGTERM, else with its status (a second signal skips the rest
of --grace). On a Redis that has no record of the lease (first use, or data lost) nobody
may take it for one ttl (lock-delay): every host waits that out, not counted in --wait,
then one runs COMMAND and the others skip.
Documentation: docs/cli.md.

{EXIT_CODES}"""

STATUS_EPILOG = """\
examples:
  mutexowner status --redis redis://localhost:6379/0 --key report
  mutexowner status --key report --json | jq .holder

exit status: 0 the lease is held, 3 it is free, 2 error (bad arguments, Redis unreachable).
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' layout, shows defaults only where the help text says so."""


class _RedactingLogFormatter(logging.Formatter):
    """Log lines, tracebacks included, with any Redis URL password replaced by ``***``."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _add_common(parser: argparse.ArgumentParser, *, redis_help: str) -> None:
    parser.add_argument("--redis", metavar="URL", help=redis_help)
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        default=argparse.SUPPRESS,
        help="debug, info, warning, error or critical: level of the mutexowner loggers "
        "(default: info for run, warning for status, error for demo)",
    )


def _add_lease(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", required=True, help="the lease name (no braces)")
    parser.add_argument(
        "--prefix",
        default="mutexowner",
        metavar="P",
        help="prefix of the Redis keys (default: mutexowner)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the ``mutexowner`` command."""
    parser = argparse.ArgumentParser(
        prog="mutexowner",
        description=(
            "Run worker threads, or a command, in exactly one process of a fleet,\n"
            "guarded by a lease held in Redis."
        ),
        epilog=MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        default=None,
        help="debug, info, warning, error or critical (default depends on the command)",
    )
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND")
    _add_demo_parser(commands)
    _add_run_parser(commands)
    _add_status_parser(commands)
    _add_acl_parser(commands)
    return parser


def _add_demo_parser(commands: Any) -> None:
    """The ``demo`` subcommand: three in-process owners on an embedded fake Redis."""
    demo = commands.add_parser(
        "demo",
        help="watch three owners compete for a lease (no Redis server needed)",
        description=(
            "Three owners in one process compete for one lease. The demo crashes the holder,\n"
            "hands the lease over cleanly, and cuts Redis off for longer than the ttl,\n"
            "printing a timeline and a summary. Runs on an embedded fake Redis (fakeredis)\n"
            "unless --redis is given ($REDIS_URL is ignored here)."
        ),
        epilog=DEMO_EPILOG,
        formatter_class=_Formatter,
    )
    _add_common(demo, redis_help="run against this Redis server instead of the embedded one")
    from mutexowner.demo import DEFAULT_SECONDS, MIN_SECONDS

    demo.add_argument(
        "--seconds",
        type=float,
        metavar="S",
        default=DEFAULT_SECONDS,
        help=f"upper bound of the whole demo; phases scale with it (default: "
        f"{DEFAULT_SECONDS:g}, minimum: {MIN_SECONDS:g})",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the random choices (default: random)",
    )


def _add_run_parser(commands: Any) -> None:
    """The ``run`` subcommand: its lease, restart and wait options, then the command."""
    run = commands.add_parser(
        "run",
        help="run a command on exactly one host of the fleet",
        usage="mutexowner run [--redis URL] --key KEY [--ttl S] [--identity ID] [--grace S]\n"
        "                      [--once] [--wait S [--skip-ok]] [--hold-at-least S]\n"
        "                      [--restart on-failure|always|never]\n"
        "                      [--max-restarts N --max-seconds S]\n"
        "                      [--prefix P] [--log-level LEVEL] -- COMMAND [ARGS...]",
        description="Run COMMAND as a child process while this host holds the lease.",
        epilog=RUN_EPILOG,
        formatter_class=_Formatter,
    )
    _add_common(run, redis_help=f"Redis URL (default: ${REDIS_URL_ENV})")
    _add_lease(run)
    run.add_argument(
        "--ttl", type=float, default=10.0, metavar="S", help="lease ttl, seconds (default: 10)"
    )
    run.add_argument(
        "--identity",
        metavar="ID",
        help="name shown to other hosts (default: <hostname>:<pid>:<random>)",
    )
    _add_run_restart_options(run)
    _add_run_wait_options(run)
    run.add_argument("command", nargs="*", metavar="COMMAND", help=argparse.SUPPRESS)


def _add_run_restart_options(run: argparse.ArgumentParser) -> None:
    """``run``'s options for stopping the command and restarting it when it exits."""
    run.add_argument(
        "--max-restarts",
        type=int,
        metavar="N",
        default=3,
        help="restart the command at most N times within --max-seconds (default: 3)",
    )
    run.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="restart intensity window (default: 5)",
    )
    run.add_argument(
        "--grace",
        type=float,
        metavar="S",
        default=None,
        help="seconds between SIGTERM and SIGKILL when stopping the command (default: 30%% "
        "of --ttl); must fit in the lease: ttl/3 + grace + margin < ttl",
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="run the command once: the run ends when it exits, with its exit status "
        "(implies --restart never unless given)",
    )
    run.add_argument(
        "--restart",
        choices=RESTART_POLICIES,
        default=None,
        metavar="POLICY",
        help="when the command exits on its own: on-failure (restart unless it exited 0; "
        "the default), always (an exit 0 is restarted after 1 s), never; restarts after a "
        "failure count against --max-restarts",
    )


def _add_run_wait_options(run: argparse.ArgumentParser) -> None:
    """``run``'s options for giving up on the lease and for holding it after the command."""
    run.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="S",
        help="if the lease is not ours within S seconds, do not run the command: exit "
        f"{EXIT_SKIPPED} (0 with --skip-ok); 0 = one attempt, like flock -n "
        "(default: wait for ever)",
    )
    run.add_argument(
        "--skip-ok",
        action="store_true",
        help="with --wait: a skip (another host has the lease) exits 0",
    )
    run.add_argument(
        "--hold-at-least",
        type=float,
        default=0.0,
        metavar="S",
        help="when the command ended on its own, keep the lease (running nothing) until S "
        "seconds after it started, so late hosts still skip (default: 0)",
    )


def _add_status_parser(commands: Any) -> None:
    """The ``status`` subcommand: show the holder, or ``--check`` the Redis user's rights."""
    status_parser = commands.add_parser(
        "status",
        help="show who holds a lease",
        description="Show who holds the lease, its remaining ttl and the fencing counter.",
        epilog=STATUS_EPILOG,
        formatter_class=_Formatter,
    )
    _add_common(status_parser, redis_help=f"Redis URL (default: ${REDIS_URL_ENV})")
    _add_lease(status_parser)
    status_parser.add_argument("--json", action="store_true", help="print one JSON object")
    status_parser.add_argument(
        "--check",
        action="store_true",
        help="instead, check (without taking the lease) that the Redis user may run the "
        f"lease and use its channels; print what is missing in ACL terms; exit {EXIT_OK} when "
        f"nothing is, {EXIT_PERMISSIONS} when something is, {EXIT_USAGE} on error",
    )


def _add_acl_parser(commands: Any) -> None:
    acl = commands.add_parser(
        "acl",
        help="print the least-privilege Redis ACL of a lease",
        description="Print the ACL rules a Redis user needs for one lease, and nothing more:\n"
        "an ACL SETUSER line for redis-cli, the same for a shell, and a users.acl line.",
        epilog="examples:\n  mutexowner acl --key nightly-backup --user backup-lease\n"
        "  mutexowner status --redis redis://backup-lease:PASSWORD@host:6379/0 "
        "--key nightly-backup --check",
        formatter_class=_Formatter,
    )
    _add_lease(acl)
    acl.add_argument(
        "--user", default="mutexowner", help="the Redis user name (default: mutexowner)"
    )
    acl.add_argument(
        "--db", type=int, default=0, metavar="N", help="database number (non-zero adds +select)"
    )
    acl.add_argument(
        "--sentinel-user",
        metavar="USER",
        help="also print the rules of the user a Sentinel client logs in as on each sentinel",
    )


def _configure_logging(level_name: str) -> None:
    """Log to stderr: the mutexowner loggers at ``level_name``, everything else at WARNING."""
    level = getattr(logging, level_name.upper())
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            _RedactingLogFormatter("%(asctime)s mutexowner[%(process)d] %(levelname)s %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))  # other libraries (transitions): warnings
    logging.getLogger("mutexowner").setLevel(level)


def _redis_url(args: argparse.Namespace) -> Optional[str]:
    url: Optional[str] = args.redis or os.environ.get(REDIS_URL_ENV) or None
    return url


def _redis_source(args: argparse.Namespace) -> str:
    """Where the Redis URL came from, as errors about it name it."""
    return "--redis" if args.redis else f"${REDIS_URL_ENV}"


def _error(err: TextIO, command: str, message: str) -> None:
    err.write(f"mutexowner {command}: {redact_text(message)}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; everything after the first ``--`` is ``run``'s COMMAND.

    Errors exit through argparse (status 2), as do ``--help`` and ``--version`` (status 0).
    """
    tail: Optional[list[str]] = None
    if "--" in argv:
        split = argv.index("--")
        argv, tail = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if tail is not None:
        if args.command_name != "run":
            parser.error(f"{args.command_name or 'mutexowner'} takes no arguments after '--'")
        if args.command:
            parser.error("give COMMAND after '--' only (mutexowner run ... -- COMMAND ARGS)")
        args.command = tail
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    name: Optional[str] = args.command_name
    if name is None:
        build_parser().print_help()
        return EXIT_USAGE
    level = getattr(args, "log_level", None) or DEFAULT_LOG_LEVEL[name]
    _configure_logging(level)
    try:
        if name == "demo":
            return _cmd_demo(args)
        if name == "run":
            return _cmd_run(args)
        if name == "acl":
            return _cmd_acl(args)
        source = _redis_source(args)
        if args.check:
            return check(_redis_url(args), args.key, prefix=args.prefix, source=source)
        return status(
            _redis_url(args), args.key, prefix=args.prefix, as_json=args.json, source=source
        )
    except Exception as exc:
        log.critical("mutexowner %s failed: %s", name, redact_text(repr(exc)), exc_info=True)
        return EXIT_INTERNAL


def _cmd_demo(args: argparse.Namespace) -> int:
    from mutexowner.demo import run_demo

    try:
        result = run_demo(seconds=args.seconds, seed=args.seed, redis_url=args.redis)
    except (TypeError, ValueError) as exc:
        _error(sys.stderr, "demo", str(exc))
        return EXIT_USAGE
    return result.exit_code


def _cmd_run(args: argparse.Namespace) -> int:
    err = sys.stderr
    url = _redis_url(args)
    if url is None:
        _error(err, "run", f"no Redis URL: pass --redis URL or set ${REDIS_URL_ENV}")
        return EXIT_USAGE
    source = _redis_source(args)
    try:
        config = RunConfig(
            key=args.key,
            command=tuple(args.command),
            ttl=args.ttl,
            grace=args.grace,
            identity=args.identity,
            max_restarts=args.max_restarts,
            max_seconds=args.max_seconds,
            once=args.once,
            prefix=args.prefix,
            restart=args.restart,
            wait=args.wait,
            skip_ok=args.skip_ok,
            hold_at_least=args.hold_at_least,
        )
    except (TypeError, ValueError) as exc:
        _error(err, "run", str(exc))
        return EXIT_USAGE
    missing = check_command(config.command)
    if missing is not None:
        what = "command not found" if missing == EXIT_NOT_FOUND else "command not executable"
        _error(err, "run", f"{what}: {config.command[0]}")
        return missing
    try:
        runner = Runner(config, client_from(url, parameter=source))
    except (TypeError, ValueError) as exc:
        _error(err, "run", str(exc))
        return EXIT_USAGE
    return runner.run()


def status(
    redis: Any,
    name: str,
    *,
    prefix: str = "mutexowner",
    as_json: bool = False,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    source: str = "--redis",
) -> int:
    """``mutexowner status``: print lease ``name`` as Redis sees it, and whether this host
    runs the holder; ``STATUS_HELD`` (0) held, ``STATUS_FREE`` (3) free, ``STATUS_ERROR``
    (2) error.

    ``redis`` is a URL or a ``redis.Redis`` client (tests pass a fake one).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if redis is None:
        _error(err, "status", f"no Redis URL: pass --redis URL or set ${REDIS_URL_ENV}")
        return STATUS_ERROR
    where = redact_url(redis) if isinstance(redis, str) else "the given client"
    try:
        reader = LeaseReader(
            redis,
            name,
            prefix=prefix,
            timeout=STATUS_TIMEOUT,
            where=where,
            parameter=source,
            name_parameter="--key",
            prefix_parameter="--prefix",
        )
    except (TypeError, ValueError) as exc:
        _error(err, "status", str(exc))
        return STATUS_ERROR
    try:
        view = reader.read()
    finally:
        reader.close()
    if view.error is not None:
        if as_json:
            out.write(json.dumps(view.as_dict(), sort_keys=True) + "\n")
        _error(err, "status", f"cannot read lease {name!r} on {where}: {view.error}")
        return STATUS_ERROR
    if as_json:
        out.write(json.dumps(view.as_dict(), sort_keys=True) + "\n")
    else:
        out.write(format_view(view))
    return view.exit_code


def _cmd_acl(args: argparse.Namespace) -> int:
    from mutexowner.acl import acl_rules, sentinel_acl_rules

    try:
        rules = acl_rules(args.key, prefix=args.prefix, db=args.db)
    except (TypeError, ValueError) as exc:
        _error(sys.stderr, "acl", str(exc))
        return EXIT_USAGE
    for option, user in (("--user", args.user), ("--sentinel-user", args.sentinel_user)):
        if user is not None and (not user or any(c.isspace() for c in user)):
            _error(sys.stderr, "acl", f"{option} must be a non-empty name without spaces: {user!r}")
            return EXIT_USAGE
    sys.stdout.write(
        _acl_forms(
            args.user,
            rules,
            "redis-cli prompt",
            "users.acl (the aclfile of redis.conf; then ACL LOAD)",
        )
    )
    if args.sentinel_user:
        sys.stdout.write(
            _acl_forms(
                args.sentinel_user,
                sentinel_acl_rules(),
                "on each sentinel, redis-cli prompt",
                "sentinel.conf of each sentinel",
            )
        )
    return EXIT_OK


def _acl_forms(user: str, rules: list[str], where: str, file: str) -> str:
    from mutexowner.acl import acl_setuser, users_acl_line

    shell = " ".join(shlex.quote(part) for part in acl_setuser(user, rules).split(" "))
    return (
        f"# {where} (replace PASSWORD; the user gets nothing else):\n"
        f"{acl_setuser(user, rules)}\n"
        "# from a shell:\n"
        f"redis-cli {shell}\n"
        f"# {file}:\n"
        f"{users_acl_line(user, rules)}\n"
    )


def check(
    redis: Any,
    name: str,
    *,
    prefix: str = "mutexowner",
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    source: str = "--redis",
) -> int:
    """``mutexowner status --check``: 0 every permission granted, 4 some missing, 2 error.

    ``redis`` is a URL or a ``redis.Redis`` client. Nothing is written to the lease keys.
    """
    from mutexowner.acl import check_permissions

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if redis is None:
        _error(err, "status", f"no Redis URL: pass --redis URL or set ${REDIS_URL_ENV}")
        return EXIT_USAGE
    where = redact_url(redis) if isinstance(redis, str) else "the given client"
    try:
        client = derive_lease_client(client_from(redis, parameter=source), timeout=STATUS_TIMEOUT)
        try:
            result = check_permissions(client, name, prefix=prefix)
        finally:
            client.close()
    except Exception as exc:
        _error(err, "status", f"cannot check lease {name!r} on {where}: {redact_text(str(exc))}")
        return EXIT_USAGE
    out.write(f"lease {name!r} on {where}: {result.describe()}\n")
    for note in result.degraded():
        out.write(f"  {note}\n")
    if result.errors:
        return EXIT_USAGE
    if result.ok:
        return EXIT_OK
    out.write(f"  run `mutexowner acl --key {name}` for the rules the lease needs\n")
    return EXIT_PERMISSIONS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
