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
import sys
from typing import Any, Optional, TextIO

from mutexowner import __version__
from mutexowner.connection import client_from, redact_text, redact_url
from mutexowner.inspection import STATUS_ERROR, LeaseReader, format_view
from mutexowner.runner import (
    EXIT_GAVE_UP,
    EXIT_INTERNAL,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_STATUS_FREE,
    EXIT_STUCK,
    EXIT_USAGE,
    RunConfig,
    Runner,
    check_command,
)

__all__ = ["build_parser", "main", "parse_args", "status"]

log = logging.getLogger("mutexowner.cli")

#: Environment variable read when ``--redis`` is not given (run, status).
REDIS_URL_ENV = "REDIS_URL"
#: Socket timeout of the ``status`` round trip (seconds).
STATUS_TIMEOUT = 2.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Log level per command when --log-level is not given.
DEFAULT_LOG_LEVEL = {"run": "info", "status": "warning", "demo": "error"}

EXIT_CODES = f"""\
exit status:
  {EXIT_OK:<4} success (run: --once command exited 0, or stopped while no command ran);
       status: the lease is held
  {EXIT_INTERNAL:<4} internal error (the traceback is logged)
  {EXIT_USAGE:<4} usage or configuration error; status: error (Redis unreachable...)
  {EXIT_STATUS_FREE:<4} status: the lease is free
  {EXIT_GAVE_UP:<4} run: gave up, the command exited more than --max-restarts times
       within --max-seconds
  {EXIT_STUCK:<4} run: the lease was lost and the command could not be stopped (never
       expected: SIGKILL is sent after --grace)
  {EXIT_NOT_EXECUTABLE:<4} run: the command is not executable
  {EXIT_NOT_FOUND:<4} run: the command was not found
  N    run stopped by SIGTERM/SIGINT: the command's own exit status
       (128+S when the command died from signal S, e.g. 143 for SIGTERM)
"""

MAIN_EPILOG = f"""\
examples:
  mutexowner demo                      # three owners, one lease, no Redis needed
  mutexowner run --redis redis://localhost:6379/0 --key nightly-backup -- /usr/bin/backup --all
  mutexowner status --key nightly-backup --json     # Redis URL from $REDIS_URL

{EXIT_CODES}"""

DEMO_EPILOG = """\
examples:
  mutexowner demo                      # about 15 s on an embedded fake Redis
  mutexowner demo --seconds 8 --seed 1 # shorter, reproducible choices
  mutexowner demo --redis redis://localhost:6379/15   # on a real server (no outage phase)

The demo prints a timeline (time, owner, state change, fencing token, whose workers are
running) and a summary line; it exits 0 when every phase completed and no two workers ever
ran at the same time, 1 otherwise, 2 when it cannot start.
"""

RUN_EPILOG = f"""\
examples:
  mutexowner run --redis redis://localhost:6379/0 --key report -- python make_report.py
  REDIS_URL=redis://:secret@redis:6379/0 mutexowner run --key consumer --ttl 15 --grace 5 \\
      -- ./consume --queue jobs
  mutexowner run --key nightly --once -- /usr/bin/backup --all   # one successful run, then exit

Run the same command on every host: one holds the lease and runs COMMAND; the others wait
and take over within a ttl when it dies, at once when it stops cleanly. COMMAND runs in its
own process group with MUTEXOWNER_FENCING_TOKEN, MUTEXOWNER_KEY and MUTEXOWNER_IDENTITY set.
When the lease is lost it gets SIGTERM, then SIGKILL after --grace; the whole group goes
with it. If `mutexowner run` itself is killed (even kill -9), a guard process kills the
command's process group. A command that exits is restarted (at most --max-restarts times
within --max-seconds); with --once, exit status 0 ends the run. On SIGTERM/SIGINT the
command is stopped, the lease released, and mutexowner exits with the command's status
(a second signal skips the rest of --grace).

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

    run = commands.add_parser(
        "run",
        help="run a command on exactly one host of the fleet",
        usage="mutexowner run [--redis URL] --key KEY [--ttl S] [--identity ID]\n"
        "                      [--max-restarts N --max-seconds S] [--grace S] [--once]\n"
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
        "--once", action="store_true", help="end the run when the command exits with status 0"
    )
    run.add_argument("command", nargs="*", metavar="COMMAND", help=argparse.SUPPRESS)

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
    return parser


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
        return status(_redis_url(args), args.key, prefix=args.prefix, as_json=args.json)
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
        runner = Runner(config, client_from(url, parameter="--redis"))
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
            parameter="--redis",
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
