"""`python -m expertmerge moe`: a mergekit-moe YAML, unchanged, to a fused MoE checkpoint (`expertmerge.moe.mergekit_moe`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from expertmerge.io.folder import human_bytes
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE


def summary_table(summary: Any, peak_rss: int) -> Any:
    from rich.table import Table

    table = Table(title="moe summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("format", f"{summary.architecture} ({summary.format})")
    table.add_row("experts", f"{len(summary.experts)} routed, top-{summary.top_k}")
    if summary.shared_expert:
        table.add_row("shared expert", summary.shared_expert)
    table.add_row("gate mode", summary.gate_mode)
    if summary.router:
        table.add_row("router", summary.router)
    if summary.router_kl:
        scores = " -> ".join(f"{name} {kl:.4f}" for name, kl in summary.router_kl.items())
        table.add_row("held-out KL", f"{scores} (to each text's own expert, mean over tasks)")
    table.add_row(
        "output",
        f"{summary.output} ({human_bytes(summary.output_bytes)}, {summary.num_tensors} tensors, "
        f"{summary.num_shards} shard(s), {summary.dtype})",
    )
    table.add_row("wall time", f"{summary.wall_seconds:.2f} s")
    table.add_row("peak memory", f"{human_bytes(peak_rss)} RSS of the process")
    if summary.health is not None:
        table.add_row("health check", summary.health.summary_row())
    for note in summary.notes:
        table.add_row("note", note)
    return table


def moe_main(argv: Sequence[str]) -> int:
    """`python -m expertmerge moe --config moe.yaml --out DIR [--force]`."""
    from calib_data.datamodule import CalibrationDataModule
    from calib_data.tasks import TaskSpec
    from expertmerge.console import make_console
    from expertmerge.merge import peak_rss_bytes
    from expertmerge.moe.mergekit_moe_build import build_mergekit_moe
    from expertmerge.moe.mergekit_moe_router import CalibrationReader

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge moe",
        description="Fused MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) from a mergekit-moe YAML, read unchanged: shared "
        "tensors from base_model, each expert's FFN as one routed expert, routers by gate_mode.",
    )
    parser.add_argument(
        "--config", required=True, help="mergekit-moe YAML, e.g. configs/mergekit_moe_clowncar.yaml"
    )
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists (and expertmerge wrote it)"
    )
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest safetensors shard, e.g. 2GB or 500MB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        dest="allow_all_same",
        action="store_true",
        help="allow experts that are all the same model (mergekit's flag of the same name)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--strict_health",
        action="store_true",
        help="exit 2 when the output's perplexity on a few texts is far worse than the base's (the output is kept)",
    )
    options = parser.parse_args(list(argv))
    console = make_console()
    started = time.perf_counter()
    summary = build_mergekit_moe(
        options.config,
        options.out,
        force=options.force,
        allow_all_same=options.allow_all_same,
        max_shard_size=options.max_shard_size,
        console=console,
        progress=not options.no_progress,
        calibration=CalibrationReader(TaskSpec, CalibrationDataModule),
    )
    summary.wall_seconds = time.perf_counter() - started
    console.print(summary_table(summary, peak_rss_bytes()))
    if options.strict_health and summary.health is not None and not summary.health.healthy:
        raise summary.health.error(summary.output)
    return 0
