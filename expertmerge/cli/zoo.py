"""`python -m expertmerge zoo [--name tiny] [--force] [--out DIR]`: build or find a zoo, show its losses.

The zoos themselves come from the registry (`expertmerge.zoo_registry`): the demo zoos `tiny` and `smollm2`
are registered through the `expertmerge.zoos` entry points of pyproject.toml.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from expertmerge.errors import ExpertMergeError
from expertmerge.zoo_registry import ensure_zoo, is_current, read_manifest, zoo_builder, zoo_names


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
    """Build zoo `name` into a folder of the user's choice, replacing only an outdated zoo there."""
    builder = zoo_builder(name)
    if folder.exists() and (force or not is_current(folder, name)):
        if read_manifest(folder) is None and any(folder.iterdir()):
            raise ExpertMergeError(f"'{folder}' exists and is not a zoo; refusing to replace it.")
        shutil.rmtree(folder)
    if not folder.exists():
        builder.build(folder, seed=seed)


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
    console = Console()
    if "heldout_loss" in manifest:  # a zoo of experts; a reference model (a mixture fine-tune) has none
        console.print(loss_table(manifest))
    console.print(f"zoo folder: {escape(str(folder.resolve()))}  (built in {manifest['build_seconds']} s)")
    return 0
