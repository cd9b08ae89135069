"""Every markdown table in the docs and committed bench results renders: a separator row under its header,
and the header's number of columns in every row (a table regenerated from a bench run once lost both)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/*.md"), *ROOT.glob("bench/results/*.md")])
SEPARATOR = re.compile(r"\|(\s*:?-+:?\s*\|)+")


def columns(row: str) -> int:
    row = re.sub(r"`[^`]*`", "x", row).replace("\\|", "x")  # a | inside code or escaped is no column
    return row.strip().strip("|").count("|") + 1


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, rows) of each table outside fenced code."""
    found, rows, start, fenced = [], [], 0, False
    for number, line in enumerate([*text.splitlines(), ""], 1):
        fenced ^= line.startswith("```")
        if line.startswith("|") and not fenced:
            start = start if rows else number
            rows.append(line)
        elif rows:
            found.append((start, rows))
            rows = []
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_render(path: Path) -> None:
    for start, rows in tables(path.read_text(encoding="utf-8")):
        assert len(rows) >= 2 and SEPARATOR.fullmatch(rows[1].strip()), f"{path.name}:{start}: no separator row"
        width = columns(rows[0])
        wrong = [start + i for i, row in enumerate(rows) if columns(row) != width]
        assert not wrong, f"{path.name}: rows {wrong} do not have the header's {width} columns"


def test_the_check_catches_a_missing_separator_and_a_stray_column() -> None:
    (start, rows), = tables("text\n\n| a | b |\n| 1 | 2 |\n")
    assert start == 3 and not SEPARATOR.fullmatch(rows[1])
    (_, rows), = tables("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n```\n| in code |\n```\n")
    assert [columns(row) for row in rows] == [2, 2, 3]
    assert columns("| `a | b` | c \\| d |") == 2
