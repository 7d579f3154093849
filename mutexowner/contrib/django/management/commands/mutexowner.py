"""``python manage.py mutexowner``: run the singleton workers in this process (recommended).

Every node runs the command; one holds the lease and runs ``MUTEXOWNER["WORKERS"]``, the
others wait on standby. SIGTERM or Ctrl-C stops the workers, releases the lease (a standby
takes over within milliseconds) and exits 0.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from mutexowner.contrib._runtime import (
    check_report,
    configure_logging,
    lease_report,
    run_foreground,
)
from mutexowner.contrib.django import _holder
from mutexowner.contrib.django.conf import get_settings


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type hints
    help = (
        "Run the MUTEXOWNER workers in this process while it holds the Redis lease, until "
        "SIGTERM or SIGINT; then stop them, release the lease and exit 0."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--check",
            action="store_true",
            help="print settings.MUTEXOWNER (password hidden), test that Redis answers and "
            "runs the lease scripts (PING, SCRIPT EXISTS, a read-only script) and exit: 0 ok, "
            "2 Redis failed",
        )
        parser.add_argument(
            "--status",
            action="store_true",
            help="print the lease as Redis sees it (holder, its host, ttl, fencing token; "
            "never a token) and exit 0 held, 3 free, 2 Redis error (as `mutexowner status`)",
        )
        parser.add_argument(
            "--json", action="store_true", help="with --status or --check: print JSON"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings = get_settings()
        if options["check"]:
            code = check_report(settings, self.stdout, as_json=options["json"])
            if code:
                raise SystemExit(code)
            return
        if options["status"]:
            code = lease_report(settings, self.stdout, as_json=options["json"])
            if code:
                raise SystemExit(code)
            return
        configure_logging(int(options.get("verbosity", 1)))
        if not settings.workers:
            self.stderr.write('mutexowner: MUTEXOWNER["WORKERS"] is empty: holding the lease only')
        code = run_foreground(_holder, self.stdout)
        if code:
            raise SystemExit(code)
