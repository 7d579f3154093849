"""Command-line entry point (``mutexowner``).

Only the skeleton exists for now: the ``run``, ``status`` and ``demo`` commands
come with a later issue. ``main`` returns the process exit code instead of
calling ``sys.exit`` so that it can be tested directly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from mutexowner import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the ``mutexowner`` command."""
    parser = argparse.ArgumentParser(
        prog="mutexowner",
        description=(
            "Run worker threads in exactly one process of a fleet, "
            "guarded by a lease held in Redis."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), print the help text, return 0."""
    parser = build_parser()
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
