"""The README a newcomer follows: its two commands are the ones CI runs, its links lead somewhere, its methods
table names every method the command line offers, and it stays short (the narratives live in docs/).

The notebook example of the README is run by test_case.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from SegXAILib.methods import EXPLAINERS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def bash_blocks(markdown: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", markdown, re.S)]


def section(markdown: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of the same level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"README.md lost its section '{heading}'"
    return match.group(1)


def ci_commands(script: str) -> list[str]:
    """The commands under each ``# README command N`` comment of .ci/run, continuation lines joined.

    ``-qq`` is dropped: it only quietens apt-get's output in the CI log. The ``SUDO=...`` line that .ci/run
    runs before the first command is the first command's prefix in the README.
    """
    joined = script.replace("\\\n", " ")
    sudo = re.search(r"^(SUDO=.*)$", joined, re.M).group(1)
    blocks = re.findall(r"^# README command \d+[^\n]*\n(.*?)(?=^#|\Z)", joined, re.S | re.M)
    commands = [" ".join(block.replace(" -qq", "").split()) for block in blocks]
    commands[0] = f"{sudo}; {commands[0]}"
    return commands


def test_the_two_commands_are_what_ci_runs():
    two_commands = section(README.read_text(encoding="utf-8"), "Two commands")
    readme_commands = [" ".join(c.split()) for c in bash_blocks(two_commands)]
    assert readme_commands == ci_commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert len(readme_commands) == 2


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings outside code blocks: lower case, punctuation dropped, spaces as '-'."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    headings = re.findall(r"^#+ (.+)$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    prose = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", prose) if not re.match(r"[a-z]+:", t)]
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path) if path else page
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text(encoding="utf-8")):
            broken.append(link)
    assert broken == []


def test_the_methods_table_names_every_method():
    table = section(README.read_text(encoding="utf-8"), "Methods")
    named = set(re.findall(r"\(`([a-z-]+)`\)", table))
    assert named == set(EXPLAINERS)


def test_the_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 300
