"""The merge card: README.md saying how a model was made (method, inputs with content hashes, parameters)."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path


def write_merge_card(
    folder: Path,
    *,
    title: str,
    method: str,
    base: tuple[str, str] | None,
    experts: Mapping[str, tuple[str, str]],
    parameters: Mapping[str, object],
    sections: Mapping[str, str] | None = None,
) -> None:
    """README.md describing how the model was made: method, inputs with content hashes, parameters.

    `base` and each expert are given as (path or hub id, content hash).
    """
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, expertmerge]",
        "---",
        f"# {title}",
        "",
        f"Made with expertmerge on {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"**Method:** `{method}`",
        "",
        "## Inputs",
        "",
        "| role | name | source | content hash |",
        "|---|---|---|---|",
    ]
    if base is not None:
        lines.append(f"| base | base | `{base[0]}` | `{base[1]}` |")
    for name, (source, digest) in experts.items():
        lines.append(f"| expert | {name} | `{source}` | `{digest}` |")
    lines += ["", "## Parameters", "", "```json", json.dumps(parameters, indent=2, default=str), "```", ""]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", body.rstrip(), ""]
    (folder / "README.md").write_text("\n".join(lines))
