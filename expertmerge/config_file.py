"""Reading a YAML config file the user named: every command's `--config` goes through `read_config_file`, so a
missing, binary, malformed, empty or non-mapping file is one line naming the file (and the line), before work.

No torch here: the commands call it before their heavy imports.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from expertmerge.errors import ExpertMergeError


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a regular file (or a link to one). A folder, a device such as /dev/zero or a
    named pipe would hang a read or fail deep inside a parser, so each is refused by what it is."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ExpertMergeError(f"{what} '{path}' does not exist; fix the path.") from None
    except OSError as error:
        raise ExpertMergeError(f"{what} '{path}' cannot be read: {error.strerror or error}.") from None
    if stat.S_ISREG(mode):
        return path
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a named pipe"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a file"
    )
    raise ExpertMergeError(f"{what} '{path}' is {kind}, not a regular file; give a file.")


def read_config_file(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """The mapping at the top of the YAML file `path`; `what` names it in errors (e.g. "fit --config")."""
    import yaml

    path = check_regular_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ExpertMergeError(f"{what} '{path}' cannot be read: {error.strerror or error}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ExpertMergeError(
            f"{what} '{path}' is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "give a YAML file saved as UTF-8."
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ExpertMergeError(f"{what} '{path}': {_yaml_problem(error)}") from None
    if data is None:
        raise ExpertMergeError(
            f"{what} '{path}' is empty; write its keys (see the configs/ folder for examples)."
        )
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single {type(data).__name__} value"
        raise ExpertMergeError(
            f"{what} '{path}' holds {kind} at the top level; it must be a mapping of keys (`key: value` lines)."
        )
    return data


def _yaml_problem(error: Exception) -> str:
    """PyYAML's error as 'line L, column C: <problem> (<context> at line ...)'; lines and columns from 1."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    said = f"not valid YAML, {problem}"
    if context and context_mark is not None:
        said += f" ({context} at line {context_mark.line + 1})"
    return f"{where}{said}; fix the YAML there (indentation, brackets, quotes)."
