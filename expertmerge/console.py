"""The one way this tool makes a rich console: as wide as the terminal, and wide in a log file too.

Rich falls back to 80 columns when its output is not a terminal, so a `fit ... > fit.log` wrapped every table
row over two or three lines. `COLUMNS`, when set, still decides (rich reads it), as does an explicit `width`.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

LOG_WIDTH = 160  # columns of a console that writes to a file or a pipe (no terminal to measure)


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A `rich.console.Console` (`options` as its own) whose width is the terminal's, or `LOG_WIDTH` when it
    writes to no terminal and neither `COLUMNS` nor `width` says otherwise."""
    console = Console(stderr=stderr, **options)
    if "width" not in options and not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = LOG_WIDTH
    return console
