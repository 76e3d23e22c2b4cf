"""Peak memory of a fit step with resident vs streamed task vectors, as the number of experts grows.

    python benchmarks/stream_memory.py                          # tiny zoo, 2 and 8 experts
    python benchmarks/stream_memory.py --model smollm2 --experts 2 8 --threads 1

Each row is a fresh process: libraries and calibration data loaded, then the RSS is read ("runtime"); then
`FitRun.prepare` (teacher targets from the cache, task vectors read from the pool), glibc's free
heap returned and the peak reset, then `--steps` fit steps (the fit's loss `Objective.training_loss` + backward + Adam). "held MB" is the
RSS after the steps and "peak MB" the peak RSS during them, both over the runtime: what the fit itself holds
and needs, whatever the set-up did. On the CPU the compute device's memory is the process's memory, so the
streamed rows use the disk store (`model.task_vector_store: auto`): the process holds the base, one merged
copy of the learned tensors, activations and two decoder layers of task vectors, whatever N is.

The children run with `MALLOC_MMAP_THRESHOLD_=131072` (unless `--glibc-default`): glibc then maps every block
over 128 KiB on its own and unmaps it when freed, so the RSS follows the live tensors. With glibc's default
(a threshold that rises to 32 MiB after the first large free) freed tensors stay in the heap and the next
step does not fit into the holes: on SmolLM2 the second step's peak was 544 MiB above the first's with the
same live tensors, which the planner (live tensors only, what a GPU's allocator holds) cannot predict.

"plan MB" is `expertmerge.plan`'s estimate of the same quantity (base + task vectors on the device + merged
copy + activations + the loss over the logits), for the comparison the planner promises (within 15%).

Every row fits on the same two calibration tasks (the first two experts' own); the other experts have no task,
so rows differ only by how many experts' task vectors are merged. Experts beyond the model's real ones are
synthetic (copies with small random deltas, see speed.py); memory does not depend on what the deltas mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import (  # noqa: E402 - the sibling benchmark's set-up and probes
    MB,
    RESULT_TAG,
    _datamodule,
    _first_round,
    _quiet,
    build_models,
    peak_rss_bytes,
    release_and_reset_peak,
    rss_bytes,
)

REPO = Path(__file__).resolve().parents[1]
TASKS = 2  # calibration tasks in every row, whatever the number of experts


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    _quiet()
    from expertmerge.fit import FitOptions, FitRun

    # The same data for every row: the first two experts' tasks; the other experts have none (a dense fit
    # allows that), so a row differs from another only by the number of experts whose task vectors it merges.
    spec = dict(spec, tasks=spec["tasks"][:TASKS])
    datamodule = _datamodule(spec)
    batches = _first_round(datamodule)
    release_and_reset_peak()
    runtime = rss_bytes()
    options = FitOptions.from_flat(
        base=spec["base"],
        experts=spec["experts"],
        lr=0.1,
        scheduler="constant",
        task_vectors=spec["mode"],
    )
    learned = FitRun(options, datamodule).prepare()
    merged = learned.merged
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=0.1)
    release_and_reset_peak()
    for step in range(spec["steps"]):
        loss, _, _ = learned.objective.training_loss([batches[step % len(batches)]])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak, held = peak_rss_bytes(), rss_bytes()
    from expertmerge.plan import estimate_fit

    batch = batches[0]["input_ids"]
    estimate = estimate_fit(
        merged.model,
        len(spec["experts"]),
        merged.coefficient_names,
        batch_size=batch.shape[0],
        seq_len=batch.shape[1],
        logit_topk=options.loss.logit_topk,
        hidden_layers=len(learned.calibration.hidden_layers),
    )
    strategy = "resident" if spec["mode"] == "resident" else "streamed"
    return {
        "peak": peak - runtime,
        "held": held - runtime,
        "plan": estimate[strategy].total,
        "coefficients": merged.coefficients.num_trainable(),
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(spec["threads"]))
    if not spec.get("glibc_default"):
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # RSS follows live tensors (module docstring)
    process = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise SystemExit(f"child failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--modes", nargs="+", default=["resident", "streamed"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS keeps freed heap)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    from rich.console import Console
    from rich.table import Table

    from expertmerge.paths import cache_dir

    workdir = args.workdir or cache_dir() / "bench"
    max_length = args.max_length or (64 if args.model == "tiny" else 128)
    rows = []
    for experts in args.experts:
        models = build_models(args.model, experts, workdir)
        for mode in args.modes:
            spec = dict(
                models,
                mode=mode,
                steps=args.steps,
                threads=args.threads,
                samples_per_task=args.batch_size,
                batch_size=args.batch_size,
                max_length=max_length,
                glibc_default=args.glibc_default,
            )
            result = run_child(spec)
            rows.append({"experts": experts, "mode": mode, **result})
            print(f"{args.model} {experts} experts {mode}: {result}", flush=True)
    table = Table(title=f"fit step memory vs experts: {args.model} (process RSS over the runtime)")
    for column in (
        "experts",
        "task vectors",
        "held MB",
        "peak MB",
        f"peak / {min(args.experts)}-expert peak",
        "plan MB",
        "plan / peak",
    ):
        table.add_column(column, justify="right" if column != "task vectors" else "left")
    smallest = min(args.experts)
    for row in rows:
        first = next(r for r in rows if r["mode"] == row["mode"] and r["experts"] == smallest)
        table.add_row(
            str(row["experts"]),
            row["mode"],
            f"{row['held'] / MB:.1f}",
            f"{row['peak'] / MB:.1f}",
            f"{row['peak'] / first['peak']:.3f}",
            f"{row['plan'] / MB:.1f}",
            f"{row['plan'] / row['peak']:.2f}",
        )
    console = Console(width=140)
    console.print(table)
    console.print(
        f"{platform.processor() or platform.machine()}, torch threads {args.threads}; batch {args.batch_size} x "
        f"<= {max_length} tokens; {args.steps} steps per row; streamed rows: disk store (no GPU here)."
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
