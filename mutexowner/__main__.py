"""``python -m mutexowner``: the ``mutexowner`` command (see ``mutexowner.cli``)."""

from __future__ import annotations

import sys

from mutexowner.cli import main

if __name__ == "__main__":
    sys.exit(main())
