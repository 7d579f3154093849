"""Figures measured by the real-Redis tests, shown at the end of the pytest run.

pytest captures ``print()``; these figures must reach CI logs whatever the options, so tests
record them here and the ``pytest_terminal_summary`` hooks of ``tests/chaos/conftest.py``
and ``tests/integration/conftest.py`` print one line per test and a summary line. With
``MUTEXOWNER_FIGURES=path`` every record is also appended to that file as a JSON line
(the failure-mode table in docs/safety.md is built from such files:
``python -m tests.chaos.figures FILE...`` prints each figure's range over the runs).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["FIGURES_ENV", "Figure", "format_value", "lines", "record", "recorded", "summarize"]

FIGURES_ENV = "MUTEXOWNER_FIGURES"


@dataclass(frozen=True)
class Figure:
    """Everything one test measured."""

    suite: str
    test: str
    values: dict[str, Any]


_RECORDED: list[Figure] = []


def record(suite: str, test: str, **values: Any) -> None:
    """Keep one test's figures for the end-of-run summary (and ``$MUTEXOWNER_FIGURES``)."""
    figure = Figure(suite, test, dict(values))
    _RECORDED.append(figure)
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            line = {"suite": suite, "test": test, **values}
            out.write(json.dumps(line, default=str) + "\n")


def recorded(suite: str) -> list[Figure]:
    return [figure for figure in _RECORDED if figure.suite == suite]


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def lines(suite: str) -> list[str]:
    """One line per test: ``test: name=value ...``."""
    out = []
    for figure in recorded(suite):
        values = " ".join(f"{k}={format_value(v)}" for k, v in figure.values.items())
        out.append(f"{figure.test}: {values}")
    return out


def summarize(paths: list[str]) -> list[str]:
    """Per test, each numeric figure's range (and each flag's count of True) over every run
    recorded in ``paths``."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    flags: dict[tuple[str, str], dict[str, list[bool]]] = {}
    runs: dict[tuple[str, str], int] = {}
    for path in paths:
        with open(path, encoding="utf-8") as lines_in:
            for line in lines_in:
                record = json.loads(line)
                key = (record.pop("suite"), record.pop("test"))
                runs[key] = runs.get(key, 0) + 1
                figures = values.setdefault(key, {})
                for name, value in record.items():
                    if isinstance(value, bool):
                        flags.setdefault(key, {}).setdefault(name, []).append(value)
                        continue
                    items = value if isinstance(value, list) else [value]
                    for item in items:
                        if isinstance(item, (int, float)) and not isinstance(item, bool):
                            figures.setdefault(name, []).append(float(item))
    out = []
    for (suite, test), figures in sorted(values.items()):
        ranges = " ".join(
            f"{name}={min(v):.3f}" + (f"..{max(v):.3f}" if max(v) != min(v) else "")
            for name, v in figures.items()
        )
        for name, seen in flags.get((suite, test), {}).items():
            ranges += f" {name}={sum(seen)}/{len(seen)}"
        out.append(f"{suite} {test} ({runs[(suite, test)]} runs): {ranges}")
    return out


if __name__ == "__main__":
    # python -m tests.chaos.figures FILE...: ranges of the figures of several runs.
    print("\n".join(summarize(sys.argv[1:])))
