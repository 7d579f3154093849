#!/usr/bin/env bash
# Benchmarks of mutexowner against other Python Redis locks (see benchmarks/README.md).
#
#   bash benchmarks/run.sh            # all four benchmarks, tables and a summary (< 5 min)
#   bash benchmarks/run.sh --json     # one JSON document instead
#   bash benchmarks/run.sh --help     # round counts, --only, --seed, --log-dir
#
# Builds a virtualenv (default benchmarks/.venv, or $BENCH_VENV) with mutexowner installed
# editable and the peers from requirements.txt, then runs run_all.py, which starts its own
# redis-server on a free 127.0.0.1 port (--save "" --appendonly no). No other network use.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${BENCH_VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"

if ! command -v "${MUTEXOWNER_REDIS_SERVER:-redis-server}" >/dev/null 2>&1; then
    echo "redis-server not found on PATH (Debian: apt-get install redis-server)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e "$REPO" -r "$HERE/requirements.txt" >&2
exec "$VENV/bin/python" "$HERE/run_all.py" "$@"
