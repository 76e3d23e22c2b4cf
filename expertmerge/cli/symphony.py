"""`python -m expertmerge symphony`: one MoE (or dense model) from experts with no common base.

A command of its own rather than a fit option: the fit's model needs a base for its task vectors, while this
pipeline has none, takes no Trainer and is training-free up to a short router tuning (the library is
`expertmerge.symphony_run`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from expertmerge.symphony_run import SymphonySummary, run_symphony


def summary_table(summary: SymphonySummary) -> Any:
    from rich.table import Table

    table = Table(title="symphony summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output", f"{summary.output} ({summary.kind})")
    table.add_row("experts", f"{', '.join(summary.experts)} (reference: {summary.reference})")
    for expert, report in summary.alignment.items():
        parts = []
        if "residual_cosine_after" in report:
            parts.append(
                f"residual cosine {report['residual_cosine_before']:.3f} -> {report['residual_cosine_after']:.3f}"
            )
        if "ffn_correlation_after" in report:
            parts.append(
                f"FFN unit correlation {report['ffn_correlation_before']:.3f} -> "
                f"{report['ffn_correlation_after']:.3f}"
            )
        table.add_row(f"aligned {expert}", "; ".join(parts) or "not aligned")
    fit = summary.backbone
    if fit.get("method") == "learned":
        table.add_row(
            "learned backbone",
            f"{fit['steps']} steps over {fit['learned_tensors']} tensors, loss {fit['loss_first']:.4f} -> "
            f"{fit['loss_last']:.4f}",
        )
    elif fit:
        table.add_row("backbone", str(fit["method"]))
    if summary.router_losses:
        table.add_row(
            "router tuning",
            f"{len(summary.router_losses)} steps, loss {summary.router_losses[0]:.4f} -> "
            f"{summary.router_losses[-1]:.4f}",
        )
    for task, kl in summary.heldout_kl.items():
        table.add_row(f"held-out KL {task}", f"{kl:.4f} (to its own expert)")
    table.add_row("wall time", f"{summary.wall_seconds:.1f} s")
    return table


def symphony_main(argv: Sequence[str]) -> int:
    """`python -m expertmerge symphony --config C.yaml [--out DIR] [--force]`."""
    from expertmerge.console import make_console

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge symphony",
        description="Symphony-MoE: align experts pretrained apart (same architecture and tokenizer, no "
        "shared base) to a reference, fuse a shared backbone, and write one MoE or a dense model.",
    )
    parser.add_argument("--config", required=True, help="symphony YAML, e.g. configs/symphony_diffinit.yaml")
    parser.add_argument("--out", help="output model folder (default: the config's output_dir)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    options = parser.parse_args(list(argv))
    from lightning_modules.trainer import plain_trainers

    progress = not options.no_progress
    summary = run_symphony(
        options.config,
        out=options.out,
        force=options.force,
        progress=progress,
        trainer_factory=plain_trainers(progress=progress),
    )
    make_console().print(summary_table(summary))
    return 0
