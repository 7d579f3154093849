"""The documentation cannot rot: its runnable examples run, its state machine is the code's,
its links resolve, and the README stays short (conventions: CONTRIBUTING.md, "Documentation").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mutexowner import machine

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STATE_MACHINE = ROOT / "docs" / "state-machine.md"

#: Every page whose links are checked and whose ``python runnable`` blocks are run.
PAGES = sorted(
    [
        README,
        ROOT / "CONTRIBUTING.md",
        ROOT / "benchmarks" / "README.md",
        ROOT / "examples" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)

#: Info string of a fenced block the tests execute.
RUNNABLE = "python runnable"
#: Seconds one runnable block may take (they take about one).
BLOCK_TIMEOUT = 60.0
README_MAX_LINES = 260


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


# -- a small Markdown reader -----------------------------------------------------------------

FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def parse(text: str, path: Path = ROOT / "x.md") -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``text`` (outermost only, as CommonMark nests them) and its
    lines outside any fence."""
    blocks: list[Block] = []
    prose: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            prose.append(lines[i])
            i += 1
            continue
        fence, info = opening.group(1), opening.group(2).strip()
        indent = len(lines[i]) - len(lines[i].lstrip())
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing is not None
                and closing.group(1)[0] == fence[0]
                and len(closing.group(1)) >= len(fence)
                and not closing.group(2).strip()
            ):
                break
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        else:
            raise AssertionError(f"{rel(path)}:{i + 1}: unclosed code fence")
        blocks.append(Block(path, i + 1, info, "\n".join(body) + "\n"))
        prose.append("")  # keeps paragraphs apart
        i = j + 1
    return blocks, prose


CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def without_code_spans(line: str) -> str:
    return CODE_SPAN.sub("code", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, links reduced to their text, punctuation
    other than '-' and '_' dropped, spaces turned into '-'."""
    text = LINK.sub(lambda m: m.group(1), heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = parse(path.read_text(encoding="utf-8"), path)
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose:
        m = HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link of ``path`` outside code."""
    text = path.read_text(encoding="utf-8")
    blocks, _ = parse(text, path)
    in_block = set()
    for block in blocks:
        in_block.update(range(block.line, block.line + block.code.count("\n") + 1))
    found = []
    for number, line in enumerate(text.split("\n"), start=1):
        if number in in_block:
            continue
        for m in LINK.finditer(without_code_spans(line)):
            found.append((number, m.group(2)))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{rel(path)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {rel(dest)}")
    return problems


def runnable_blocks() -> list[Block]:
    return [
        block
        for page in PAGES
        for block in parse(page.read_text(encoding="utf-8"), page)[0]
        if block.info == RUNNABLE
    ]


# -- runnable examples --------------------------------------------------------------------


def run_block(block: Block, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        return subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{block.id}: still running after {BLOCK_TIMEOUT:g} s") from exc


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda block: block.id)
def test_runnable_block_succeeds(block: Block, tmp_path: Path) -> None:
    result = run_block(block, tmp_path)
    assert result.returncode == 0, (
        f"{block.id} exited {result.returncode}\n--- stdout\n{result.stdout}"
        f"\n--- stderr\n{result.stderr}"
    )
    if block.path == README:
        # The README's example shows workers running: it must have printed a tick.
        assert "tick, fencing token" in result.stdout, result.stdout


def test_the_readme_example_and_several_doc_examples_are_runnable() -> None:
    blocks = runnable_blocks()
    assert [b for b in blocks if b.path == README], "the README's main example must be runnable"
    pages = {b.path for b in blocks if b.path.parent.name == "docs"}
    assert len(pages) >= 3, sorted(map(rel, pages))


def test_a_failing_runnable_block_fails(tmp_path: Path) -> None:
    block = Block(README, 1, RUNNABLE, "assert 1 + 1 == 3\n")
    assert run_block(block, tmp_path).returncode != 0


def test_fences_nest_and_only_marked_blocks_are_runnable() -> None:
    text = (
        "intro\n"
        "```python\nprint('plain')\n```\n"
        "````markdown\n```python runnable\nraise SystemExit(1)\n```\n````\n"
        "  ```python runnable\n  x = 1\n    y = 2\n  ```\n"
    )
    blocks, prose = parse(text)
    assert [(b.info, b.code) for b in blocks] == [
        ("python", "print('plain')\n"),
        ("markdown", "```python runnable\nraise SystemExit(1)\n```\n"),
        ("python runnable", "x = 1\n  y = 2\n"),
    ]
    assert prose[0] == "intro"


# -- the state machine ---------------------------------------------------------------------


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row is ``header``."""
    lines = text.split("\n")
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_state_diagram_is_generated_from_the_machine() -> None:
    text = STATE_MACHINE.read_text(encoding="utf-8")
    assert "```mermaid\n" + machine.mermaid() + "\n```" in text


def test_state_table_lists_the_machines_states_and_where_workers_run() -> None:
    rows = table_rows(STATE_MACHINE.read_text(encoding="utf-8"), "| state | meaning | workers |")
    documented = {names(state)[0]: workers for state, _meaning, workers in rows}
    assert len(documented) == len(rows)
    assert set(documented) == set(machine.STATES)
    for state, workers in documented.items():
        assert (workers == "not running") == (state not in machine.WORKER_STATES), state


def test_transition_table_is_the_machines() -> None:
    rows = table_rows(STATE_MACHINE.read_text(encoding="utf-8"), "| trigger | from | to | when |")
    documented = [(names(t)[0], frozenset(names(src)), names(dst)[0]) for t, src, dst, _ in rows]
    actual = [(t["trigger"], frozenset(t["source"]), t["dest"]) for t in machine.TRANSITIONS]
    assert documented == actual


# -- links ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_slugs_follow_githubs_rules() -> None:
    assert slug("The guard: the command never outlives its lease") == (
        "the-guard-the-command-never-outlives-its-lease"
    )
    assert slug('`outage="keep_running"`') == "outagekeep_running"
    assert slug("Checking a deployment: `mutexowner status --check`") == (
        "checking-a-deployment-mutexowner-status---check"
    )
    assert slug("[Safety](docs/safety.md): the argument") == "safety-the-argument"


def test_broken_links_and_anchors_are_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Part two\n\n## Part two\n", encoding="utf-8")
    page.write_text(
        "# Page\n\n[ok](other.md#part-two-1) [ok](#page) [web](https://example.com/x)\n"
        "`[not a link](missing.md)`\n```\n[in code](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#part-three) [self](#nowhere)\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md: no such file",
        "other.md#part-three: no heading with anchor #part-three in other.md",
        "#nowhere: no heading with anchor #nowhere in page.md",
    ]


# -- the README ----------------------------------------------------------------------------


def test_readme_stays_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move a section to docs/"


def test_readme_keeps_the_quick_start_commands_and_shows_the_cron_recipe_early() -> None:
    blocks, _ = parse(README.read_text(encoding="utf-8"), README)
    shell = [b.code for b in blocks if b.info == "sh"]
    for command in (
        "python -m pip install '.[demo]' && mutexowner demo",
        "python -m pip install -e '.[test]' && python -m pytest",
    ):
        assert any(code.startswith(command) for code in shell), command
    lines = README.read_text(encoding="utf-8").split("\n")
    cron = next(n for n, line in enumerate(lines) if "--once --wait 0" in line)
    assert cron < 60, "the run-once recipe is what many users come for: keep it near the top"
