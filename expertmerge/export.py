"""Writing outputs atomically: a temporary sibling folder, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from expertmerge.errors import ExpertMergeError


def check_output_dir(final: str | Path, force: bool) -> Path:
    """Fail before any work when the output exists and `force` was not given."""
    final = Path(final).expanduser()
    if final.exists() and not force:
        raise ExpertMergeError(
            f"Output folder '{final}' already exists; pass --force to replace it, or choose another folder."
        )
    if final.exists() and not final.is_dir():
        raise ExpertMergeError(f"Output path '{final}' exists and is not a folder.")
    return final


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; move it into place only if the block succeeds.

    On any error the temporary folder is removed, so a failed run never leaves a half-written output.
    """
    final = check_output_dir(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


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
