"""docs/ARCHITECTURE.md stays true to the tree: every library file is named in its file table, and every file
or folder it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
LIBRARY = ("expertmerge", "lightning_modules", "calib_data")


def named_paths() -> set[str]:
    """Every backquoted path in the document that starts with a top-level package."""
    roots = (*LIBRARY, "expertmerge_zoos", "tests", "docs", "benchmarks", "configs")
    return {
        token
        for token in re.findall(r"`([^`\s]+)`", DOC.read_text())
        if token.split("/")[0] in roots and "/" in token
    }


def table_paths() -> set[str]:
    """The paths named in the file table's first column."""
    text = DOC.read_text()
    table = text[text.index("## File → its one job") :].split("\n## ")[0]
    paths: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            paths |= set(re.findall(r"`([^`]+)`", line.split(" | ")[0]))
    return paths


def library_files() -> set[str]:
    return {
        str(path.relative_to(REPO))
        for package in LIBRARY
        for path in (REPO / package).rglob("*.py")
        if "__pycache__" not in path.parts and path.name != "__init__.py"
    } | {"expertmerge/__init__.py"}


def test_every_library_file_is_in_the_file_table() -> None:
    missing = library_files() - table_paths()
    assert not missing, f"docs/ARCHITECTURE.md names no job for {sorted(missing)}"


def test_every_path_the_document_names_exists() -> None:
    gone = sorted(path for path in named_paths() if not (REPO / path).exists())
    assert not gone, f"docs/ARCHITECTURE.md names files that do not exist: {gone}"
    assert len(named_paths()) > 50  # the table really was read
