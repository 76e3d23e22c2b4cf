"""Tables in a log file keep one line per row: rich's consoles fall back to 80 columns when the output is no
terminal; ours are `LOG_WIDTH` wide there, unless `COLUMNS` or an explicit width says otherwise."""

from __future__ import annotations

import io

from rich.table import Table

from expertmerge.console import LOG_WIDTH, make_console


def _table_lines(width_of_row: int, **options) -> list[str]:
    table = Table("name", "value")
    table.add_row("health check", "x" * width_of_row)
    out = io.StringIO()
    make_console(file=out, **options).print(table)
    return out.getvalue().splitlines()


def test_a_console_writing_to_a_file_is_log_width_wide_and_keeps_a_row_on_one_line(monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console(file=io.StringIO()).width == LOG_WIDTH == 160
    lines = _table_lines(120)
    widest = 120 + len("health check") + 7  # the two cells, 3 borders and 4 spaces of padding
    assert len(lines) == 5 and max(len(line) for line in lines) == widest


def test_columns_and_an_explicit_width_still_decide(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console(file=io.StringIO()).width == 100
    monkeypatch.delenv("COLUMNS")
    assert make_console(file=io.StringIO(), width=90).width == 90
    assert make_console(stderr=True).stderr
