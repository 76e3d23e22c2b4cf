"""`python -m expertmerge merge`: a training-free merge from a mergekit-style YAML (the library is `expertmerge.merge`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from expertmerge.io.folder import human_bytes
from expertmerge.merge import DEFAULT_MAX_SHARD_SIZE, MergeSummary, run_merge
from expertmerge.methods import METHODS


def summary_table(summary: MergeSummary) -> Any:
    from rich.table import Table

    table = Table(title="merge summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("method", f"{summary.method} over {summary.num_experts} expert(s)")
    table.add_row(
        "tensors", f"{summary.tensors_merged} merged, {summary.tensors_copied} copied from the base"
    )
    if summary.output_layers is not None:
        table.add_row("layers", f"{summary.output_layers} (from slices)")
    table.add_row(
        "output",
        f"{summary.output} ({human_bytes(summary.output_bytes)}, {summary.num_shards} shard(s))",
    )
    table.add_row("wall time", f"{summary.wall_seconds:.2f} s")
    label = "during the merge" if summary.peak_rss_is_merge_only else "of the process"
    table.add_row(
        "peak memory",
        f"{human_bytes(summary.peak_rss_bytes)} RSS {label}, "
        f"+{human_bytes(max(0, summary.peak_rss_bytes - summary.start_rss_bytes))} over the start; "
        f"one model's weights: {human_bytes(summary.model_bytes)}",
    )
    if summary.health is not None:
        table.add_row("health check", summary.health.summary_row())
    for note in summary.notes:
        table.add_row("note", note)
    return table


def merge_main(argv: Sequence[str]) -> int:
    """`python -m expertmerge merge --config X.yaml --out DIR [--force] [--max-shard-size 5GB]`."""
    from expertmerge.console import make_console

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge merge",
        description=f"Training-free merge ({', '.join(METHODS)}) of experts "
        "fine-tuned from one base, from a mergekit-style YAML; streams tensor by tensor.",
    )
    parser.add_argument(
        "--config", required=True, help="merge YAML (mergekit format), e.g. configs/merge_ties.yaml"
    )
    parser.add_argument("--out", help="output model folder (default: the config's output_dir)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest safetensors shard, e.g. 2GB or 500MB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--strict_health",
        action="store_true",
        help="exit 2 when the output's perplexity on a few texts is far worse than the base's (the output is kept)",
    )
    options = parser.parse_args(list(argv))
    console = make_console()
    summary = run_merge(
        options.config,
        out=options.out,
        force=options.force,
        max_shard_bytes=options.max_shard_size,
        console=console,
        progress=not options.no_progress,
    )
    console.print(summary_table(summary))
    if options.strict_health and summary.health is not None and not summary.health.healthy:
        raise summary.health.error(summary.output)
    return 0
