"""`python -m expertmerge sweep`: fit one config once per weight of one task and show the trade-off.

    python -m expertmerge sweep --config configs/sweep_demo.yaml --task_weights code=0.5,1,2,4

Everything expensive happens once: the module is prepared by the first fit (base, task vectors, teacher targets
from the cache or one teacher pass) and every later weight refits fresh coefficients on it, so it runs no teacher
forward at all (the table's "teacher forwards" column shows it). The output folder (atomic) gets `tradeoff.png`,
`sweep.json` and `sweep.csv`; no model is exported (fit the chosen weight with `fit`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from types import SimpleNamespace

# The sweep scores every fit itself: the fit's own validation, checkpoints and logs would only cost time.
_LEAN_TRAINER = (
    "--trainer.limit_val_batches",
    "0",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.logger",
    "false",
)


def sweep_main(argv: Sequence[str]) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from calib_data.tasks import base_task_names
    from expertmerge.cli.fit import _fit_cli, _fit_inputs, _quiet_lightning, run_stages, select_stage2
    from expertmerge.io.folder import atomic_output_dir, check_output_dir
    from expertmerge.plots import plot_tradeoff
    from expertmerge.sweep import (
        SweepPoint,
        check_swept_task,
        complete_point,
        held_out_scores,
        parse_task_weights,
        reset_coefficients,
        sweep_table,
        teacher_scores,
        write_results,
    )
    from expertmerge.teachers import teacher_forwards

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge sweep",
        description="Fit a config once per weight of one task; plot and tabulate each domain's gain retained "
        "and the general-text KL against that weight. Other options (--trainer.max_steps 20, --model.lr 0.2, "
        "...) go to the fit config.",
    )
    parser.add_argument("--config", required=True, help="a fit config (Expert Merging)")
    parser.add_argument(
        "--task_weights",
        required=True,
        help="TASK=W1,W2,...: the task to sweep and its weights, e.g. code=0.5,1,2,4",
    )
    parser.add_argument(
        "--output_dir", default="outputs/sweep", help="folder for tradeoff.png, sweep.json/.csv"
    )
    parser.add_argument("--force", action="store_true", help="replace --output_dir if it exists")
    options, overrides = parser.parse_known_args(argv)
    task, weights = parse_task_weights(options.task_weights)
    console = Console()

    with _quiet_lightning():
        cli = _fit_cli(["--config", options.config, *_LEAN_TRAINER, *overrides], run=False)
    module, datamodule = cli.model, cli.datamodule
    from lightning_modules.merging import ExpertMergingModule

    if not isinstance(module, ExpertMergingModule):
        from expertmerge.errors import ExpertMergeError

        raise ExpertMergeError(
            f"sweep needs an Expert Merging config; '{options.config}' fits {type(module).__name__}."
        )
    configured = dict(module.hparams.task_weights or {})
    check_swept_task(task, weights, datamodule.tasks, configured)
    inputs, _ = _fit_inputs(cli.config.model, datamodule)
    check_output_dir(options.output_dir, options.force, inputs)  # before any work
    base_tasks = base_task_names(datamodule.tasks)

    points: list[SweepPoint] = []
    base = teachers = None
    for index, weight in enumerate(weights):
        console.print(f"[bold]sweep {index + 1}/{len(weights)}[/bold]: {escape(task)} weight {weight:g}")
        module.hparams.task_weights = {**configured, task: weight}
        if module.model is not None:
            reset_coefficients(module)
        forwards, started = teacher_forwards(), time.perf_counter()
        with _quiet_lightning():  # the Trainer's device inventory and tips are noise here
            trainer = cli.instantiate_trainer()
            stages = SimpleNamespace(trainer=trainer, instantiate_trainer=cli.instantiate_trainer)
            trainers = run_stages(stages, module, datamodule=datamodule)
        if trainers[-1].interrupted:
            return 1
        seconds = time.perf_counter() - started
        module.to(trainers[-1].strategy.root_device)
        select_stage2(module)
        if base is None:  # once: the base's and the teachers' own scores
            import torch
            from transformers import AutoModelForCausalLM

            plain = AutoModelForCausalLM.from_pretrained(str(module.pool.base_dir), dtype=torch.float32)
            base = held_out_scores(module, plain.eval().to(module.device))
            del plain
            teachers = teacher_scores(module)
        point = SweepPoint(weight, held_out_scores(module), teacher_forwards() - forwards, seconds)
        points.append(complete_point(point, base, teachers, base_tasks))
        kl = ", ".join(f"{escape(name)} KL to base {value:.4f}" for name, value in point.base_kl.items())
        gains = ", ".join(f"{escape(name)} {value:+.3f}" for name, value in point.gains.items())
        console.print(f"  gain retained: {gains} (mean {point.mean_gain:+.3f})" + (f"; {kl}" if kl else ""))
    console.print(sweep_table(task, points, base_tasks))

    with atomic_output_dir(options.output_dir, options.force, inputs, command="sweep") as tmp:
        written = write_results(tmp, task, points, base, teachers, base_tasks, options.config)
        gain_tasks = list(points[0].gains)
        plot = plot_tradeoff(
            weights,
            {name: [p.gains[name] for p in points] for name in gain_tasks},
            {name: [p.base_kl[name] for p in points] for name in base_tasks},
            task,
            tmp / "tradeoff.png",
        )
    summary = Table(title="expertmerge sweep", show_header=False)
    summary.add_row("output", escape(str(options.output_dir)))
    summary.add_row("files", ", ".join(p.name for p in [*written, *([plot] if plot else [])]))
    summary.add_row("swept", f"{escape(task)}: {', '.join(f'{w:g}' for w in weights)}")
    summary.add_row("teacher forwards per fit", " / ".join(str(p.teacher_forwards) for p in points))
    summary.add_row("fit wall time", f"{sum(p.fit_seconds for p in points):.1f} s")
    console.print(summary)
    return 0
