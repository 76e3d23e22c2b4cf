"""`python -m expertmerge zoo [--name tiny] [--force] [--out DIR]`: build or find a zoo, show its losses.

The zoos themselves come from the registry (`expertmerge.zoo_registry`): the demo zoos `tiny` and `smollm2`
are registered through the `expertmerge.zoos` entry points of pyproject.toml.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError
from expertmerge.io.folder import MANIFEST, OLD_TAG, check_output_place, usual_permissions, write_manifest
from expertmerge.zoo_registry import (
    MANIFEST_NAME,
    ensure_zoo,
    is_current,
    read_manifest,
    zoo_builder,
    zoo_names,
)


def loss_table(manifest: dict[str, Any]) -> Table:
    """Held-out loss per task (rows) for the base and every expert (columns); the task's own expert in bold."""
    tasks = list(manifest["tasks"])
    table = Table(title=f"zoo '{manifest['name']}': held-out loss (nats/token), lower is better")
    table.add_column("task")
    table.add_column("base", justify="right")
    for task in tasks:
        table.add_column(f"expert {task}", justify="right")
    table.add_column("own vs base", justify="right")
    for task in tasks:
        row = manifest["heldout_loss"][task]
        cells = [f"[bold green]{row[t]:.3f}[/]" if t == task else f"{row[t]:.3f}" for t in tasks]
        table.add_row(task, f"{row['base']:.3f}", *cells, f"{row[task] / row['base'] - 1:+.0%}")
    return table


def _build_into(folder: Path, name: str, force: bool, seed: int) -> None:
    """Build zoo `name` into a folder of the user's choice; replace only a zoo this tool wrote there.

    A current zoo is reused. A zoo of another builder version, or any zoo with `--force`, is rebuilt only if it
    carries our folder manifest (`expertmerge.json`, written after every `zoo --out` build): a folder of
    anything else is never removed. The old zoo moves aside while the new one builds (the builder itself stages
    its build and renames it in), and is removed once the new one is in place; a failed build puts it back.
    """
    given = folder
    builder = zoo_builder(name)
    folder = check_output_place(folder, kind="zoo --out")
    if folder.exists() and not folder.is_dir():
        raise ExpertMergeError(f"zoo --out '{given}' is a file, not a folder; choose another folder.")
    old = None
    if folder.is_dir() and any(folder.iterdir()):
        manifest = read_manifest(folder)
        if manifest is None or not (folder / MANIFEST).is_file():
            raise ExpertMergeError(
                f"zoo --out '{given}' exists and was not written by `expertmerge zoo` (no {MANIFEST_NAME} and "
                f"{MANIFEST} in it); it is never replaced: remove it yourself or choose another folder."
            )
        current = manifest.get("name") == name and is_current(folder, name)
        if current and not force:
            return
        if not force:
            raise ExpertMergeError(
                f"zoo --out '{given}' holds zoo '{manifest.get('name')}' of builder version "
                f"{manifest.get('builder_version')}, not zoo '{name}' of version {builder.version}; pass --force "
                "to replace it, or choose another folder."
            )
        old = folder.parent / f".{folder.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.rename(old)
    elif folder.is_dir():
        folder.rmdir()  # an empty folder: the builder wants to create it
    try:
        builder.build(folder, seed=seed)
        write_manifest(folder, "zoo")
        usual_permissions(folder)
    except BaseException:
        if old is not None and not folder.exists():
            old.rename(folder)
        raise
    if old is not None:
        sys.stderr.write(f"expertmerge: replaced the zoo at '{given}'\n")
        shutil.rmtree(old, ignore_errors=True)


def zoo_main(argv: list[str]) -> int:
    names = ", ".join(zoo_names()) or "none registered"
    parser = argparse.ArgumentParser(
        prog="python -m expertmerge zoo",
        description="Build (or find) an offline demo zoo: a base model and experts fine-tuned from it.",
    )
    parser.add_argument("--name", default="tiny", help=f"which zoo ({names})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a current zoo exists")
    parser.add_argument("--out", help="build into this folder instead of the cache")
    parser.add_argument("--seed", type=int, default=0, help="seed of a build into --out")
    options = parser.parse_args(argv)
    if options.out is None:
        folder = ensure_zoo(options.name, force=options.force)
    else:
        folder = Path(options.out)
        _build_into(folder, options.name, options.force, options.seed)
    manifest = read_manifest(folder)
    assert manifest is not None
    console = make_console()
    if "heldout_loss" in manifest:  # a zoo of experts; a reference model (a mixture fine-tune) has none
        console.print(loss_table(manifest))
    console.print(f"zoo folder: {escape(str(folder.resolve()))}  (built in {manifest['build_seconds']} s)")
    return 0
