"""The chaos ledger: what each owner process did and when, one JSON line per record.

Every owner process appends to its own file ``<identity>.jsonl``. A record is written with
one ``os.write`` on an ``O_APPEND`` descriptor, so a SIGKILLed process leaves every record
it wrote (the kernel keeps written data of a dead process; fsync would only matter if the
machine itself crashed) and at worst no partial line. Times are ``time.monotonic()``, which
on Linux is one system-wide clock, so records of different processes compare directly.

Records (``ev``), all with ``id`` (identity), ``pid`` and ``t``:

- ``proc_start`` / ``ready`` / ``proc_exit`` (``code``, ``owner_alive``, ``state``);
- ``owner``: an owner ``Event`` (``kind``, ``state``, ``prev``, ``token``, ``reason``,
  ``error_kind``), ``t`` = the event's time;
- ``run_start``: a worker run passed its first ``ensure_held()`` at ``t`` (``run``, ``token``);
- ``beat``: a later ``ensure_held()`` passed at ``t`` (the moment the worker believed it held);
- ``fence``: the fenced write that followed a beat: ``ok`` true/false (null: store error),
  ``t_check`` (the beat's time), ``t`` when the store answered;
- ``lease_lost``: ``ensure_held()`` raised at ``t`` (``stopping``: the stop flag was set);
- ``run_end``: the run ended (``last_ok``: its last passed check, ``reason``);
- ``self_freeze``: the worker stopped its own process between a check and its write;
- ``stuck`` (the stuck-worker policy fired), ``thread_exception``, ``log`` (WARNING+).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["Ledger", "LedgerWriter", "Run", "read_records"]

SUFFIX = ".jsonl"


class LedgerWriter:
    """Appends records to one process's ledger file; safe from any thread."""

    def __init__(self, directory: Path, identity: str) -> None:
        self.identity = identity
        self.pid = os.getpid()
        self.path = Path(directory) / f"{identity}{SUFFIX}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, ev: str, t: Optional[float] = None, **fields: Any) -> None:
        record = {"ev": ev, "id": self.identity, "pid": self.pid}
        record["t"] = time.monotonic() if t is None else t
        record.update(fields)
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """All complete records of one ledger file (a torn last line is ignored)."""
    records = []
    with open(path, "rb") as ledger:
        for line in ledger:
            if not line.endswith(b"\n"):
                break
            records.append(json.loads(line))
    return records


@dataclass
class Run:
    """One run of the worker in one process: from its first to its last passed check."""

    identity: str
    pid: int
    run: int
    token: int
    start: float
    end: float
    beats: int = 1
    end_reason: Optional[str] = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.run)


@dataclass
class Ledger:
    """Every record of every process in one directory, re-read incrementally on `refresh`."""

    directory: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    _offsets: dict[Path, int] = field(default_factory=dict)

    def refresh(self) -> Ledger:
        """Read whatever the processes appended since the last call."""
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            offset = self._offsets.get(path, 0)
            with open(path, "rb") as ledger:
                ledger.seek(offset)
                data = ledger.read()
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                self.records.append(json.loads(line))
            self._offsets[path] = offset + end
        return self

    def events(self, ev: str, identity: Optional[str] = None) -> Iterator[dict[str, Any]]:
        for record in self.records:
            if record["ev"] == ev and (identity is None or record["id"] == identity):
                yield record

    def owner_events(self, kind: str, identity: Optional[str] = None) -> Iterator[dict[str, Any]]:
        for record in self.events("owner", identity):
            if record["kind"] == kind:
                yield record

    def runs(self) -> list[Run]:
        """Worker runs, ordered by start time."""
        return build_runs(self.records)

    def last_check(self) -> Optional[dict[str, Any]]:
        """The most recent passed check (run_start or beat) of any process."""
        best = None
        for record in self.records:
            if record["ev"] in ("run_start", "beat") and (best is None or record["t"] > best["t"]):
                best = record
        return best

    def first_check_after(
        self, after: float, exclude: Iterable[str] = ()
    ) -> Optional[dict[str, Any]]:
        """The earliest passed check at or after ``after``, ignoring identities in ``exclude``."""
        excluded = set(exclude)
        best = None
        for record in self.records:
            if record["ev"] not in ("run_start", "beat") or record["id"] in excluded:
                continue
            if record["t"] >= after and (best is None or record["t"] < best["t"]):
                best = record
        return best


def build_runs(records: Iterable[dict[str, Any]]) -> list[Run]:
    """Fold run_start/beat records into runs: [first passed check, last passed check]."""
    runs: dict[tuple[int, int], Run] = {}
    for record in records:
        ev = record["ev"]
        if ev in ("run_start", "beat"):
            key = (record["pid"], record["run"])
            run = runs.get(key)
            if run is None:
                runs[key] = Run(
                    identity=record["id"],
                    pid=record["pid"],
                    run=record["run"],
                    token=int(record["token"]),
                    start=record["t"],
                    end=record["t"],
                )
            else:
                run.start = min(run.start, record["t"])
                run.end = max(run.end, record["t"])
                run.beats += 1
        elif ev == "run_end":
            key = (record["pid"], record["run"])
            if key in runs:
                runs[key].end_reason = record.get("reason")
    return sorted(runs.values(), key=lambda run: run.start)
