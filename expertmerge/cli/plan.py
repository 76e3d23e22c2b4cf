"""`python -m expertmerge plan --config C.yaml [--devices 8 --device_memory 80GB]`: will this fit fit?

Reads the fit config (model.base's `config.json` only: no weights are read or needed), builds the model on the
meta device and prints what each strategy needs per device (`expertmerge/plan.py`) and whether it fits.
"""

from __future__ import annotations

import argparse

from rich.table import Table

from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError
from expertmerge.io.folder import human_bytes
from expertmerge.io.writer import parse_size
from expertmerge.plan import STRATEGIES, describe, fits, inputs_from_fit_config, plan, to_json

DEFAULT_DEVICE_MEMORY = "80GB"  # one H100 / A100-80GB


def plan_table(estimates: dict, devices: int, device_memory: int, title: str) -> Table:
    table = Table(title=title)
    table.add_column("per device")
    for strategy in STRATEGIES:
        label = f"fsdp ({devices} device{'s' if devices > 1 else ''})" if strategy == "fsdp" else strategy
        table.add_column(label, justify="right")
    parts = list(estimates["resident"].parts)
    for part in parts:
        table.add_row(part, *(human_bytes(estimates[s].parts[part]) for s in STRATEGIES))
    table.add_row("[bold]fit step[/]", *(f"[bold]{human_bytes(estimates[s].total)}[/]" for s in STRATEGIES))
    table.add_row("training-free merge", *(human_bytes(estimates[s].training_free_merge) for s in STRATEGIES))
    table.add_row("off the device (host / disk)", *(human_bytes(estimates[s].host) for s in STRATEGIES))
    table.add_row(
        "set-up on the host (teachers)", *(human_bytes(estimates[s].teacher_pass) for s in STRATEGIES)
    )
    verdicts = []
    for strategy in STRATEGIES:
        usable = devices if strategy == "fsdp" else 1
        # FSDP on one device runs (nothing is sharded): the verdict is the estimate's, and the note says why
        # the column is no smaller than `resident` (it once said "does not fit" for a 2 GB step on 80 GB).
        verdict = "[green]fits[/]" if fits(estimates[strategy], device_memory) else "[red]does not fit[/]"
        note = " (unsharded)" if strategy == "fsdp" and devices == 1 else ""
        verdicts.append(f"{verdict} on {usable} x {human_bytes(device_memory)}{note}")
    table.add_row("[bold]verdict[/]", *verdicts)
    return table


def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m expertmerge plan",
        description="Estimate per-device memory of a fit (resident, streamed, FSDP) from config.json alone.",
    )
    parser.add_argument("--config", required=True, help="fit config YAML (model.base, model.experts, data.*)")
    parser.add_argument("--devices", type=int, default=1, help="devices for the FSDP column (default 1)")
    parser.add_argument(
        "--device_memory",
        default=DEFAULT_DEVICE_MEMORY,
        help=f"memory of one device, a number with a unit: 24GB, 80GB, 40GiB (default {DEFAULT_DEVICE_MEMORY})",
    )
    parser.add_argument("--experts", type=int, default=None, help="plan for this many experts instead")
    parser.add_argument(
        "--model_config", default=None, help="a config.json (or folder) instead of model.base's"
    )
    parser.add_argument("--batch_size", type=int, default=None, help="instead of data.batch_size")
    parser.add_argument("--max_length", type=int, default=None, help="instead of data.max_length")
    parser.add_argument("--json", action="store_true", help="print the estimates as JSON (bytes)")
    options = parser.parse_args(argv)
    if options.devices < 1:
        raise ExpertMergeError(f"plan: --devices must be at least 1, got {options.devices}.")
    device_memory = parse_size(options.device_memory, "plan: --device_memory")
    if device_memory <= 0:
        raise ExpertMergeError(f"plan: --device_memory must be positive, got {options.device_memory!r}.")
    for flag in ("experts", "batch_size", "max_length"):
        value = getattr(options, flag)
        if value is not None and value < 1:  # a count of 0 or less plans nothing, and everything "fits"
            raise ExpertMergeError(f"plan: --{flag} must be at least 1, got {value}.")
    inputs = inputs_from_fit_config(options.config, options.model_config)
    if options.experts is not None:
        inputs.num_experts = options.experts
    if options.batch_size is not None:
        inputs.batch_size = options.batch_size
    if options.max_length is not None:
        inputs.seq_len = options.max_length
    model, learned, estimates = plan(inputs, options.devices)
    if options.json:
        print(to_json(estimates))
        return 0
    info = describe(model)
    title = (
        f"plan: {info['type']} {info['parameters'] / 1e9:.2f}B parameters, {info['layers']} layers, "
        f"{len(learned)} learned tensors, {inputs.num_experts} experts; batch {inputs.batch_size} x "
        f"{inputs.seq_len} tokens"
    )
    console = make_console()
    console.print(plan_table(estimates, options.devices, device_memory, title))
    default = options.device_memory == DEFAULT_DEVICE_MEMORY
    console.print(
        f"device memory: {human_bytes(device_memory)} per device"
        + (" (the default; set yours with --device_memory, e.g. 24GB)" if default else "")
        + f"; fsdp over {options.devices} device{'s' if options.devices > 1 else ''}"
        + (" (shards nothing; plan with --devices N)" if options.devices == 1 else "")
    )
    return 0
