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
from typing import Any

# The sweep scores every fit itself: the fit's own validation, checkpoints and logs would only cost time.
_LEAN_TRAINER = (
    "--trainer.limit_val_batches",
    "0",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.logger",
    "false",
)


def _parser() -> argparse.ArgumentParser:
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
    return parser


def sweep_main(argv: Sequence[str]) -> int:
    from calib_data.tasks import base_task_names
    from expertmerge.cli.fit import read_fit_config
    from expertmerge.cli.fit_steps import fit_inputs
    from expertmerge.errors import ExpertMergeError
    from expertmerge.io.folder import check_output_dir
    from expertmerge.sweep import check_swept_task, parse_task_weights
    from lightning_modules.merging import ExpertMergingModule

    options, overrides = _parser().parse_known_args(argv)
    task, weights = parse_task_weights(options.task_weights)
    fit_config = read_fit_config(options.config, [*_LEAN_TRAINER, *overrides])
    module, datamodule = fit_config.model, fit_config.datamodule
    if not isinstance(module, ExpertMergingModule):
        raise ExpertMergeError(
            f"sweep needs an Expert Merging config; '{options.config}' fits {type(module).__name__}."
        )
    module.run.datamodule = datamodule
    check_swept_task(task, weights, datamodule.tasks, module.run.options.loss.task_weights)
    inputs, _ = fit_inputs(fit_config.config.model, datamodule)
    check_output_dir(options.output_dir, options.force, inputs)  # before any work
    module.run.pool = module.run.make_pool()
    base_tasks = base_task_names(datamodule.tasks)
    fitted = _fit_points(module, fit_config.instantiate_trainer, task, weights, base_tasks)
    if fitted is None:
        return 1
    _write_outputs(options, inputs, task, weights, base_tasks, *fitted)
    return 0


def _fit_points(
    module: Any, make_trainer: Any, task: str, weights: list[float], base_tasks: list[str]
) -> Any:
    """One fit per weight on the module's one prepared merge; the points, and the base's and teachers' scores
    (None when a fit was interrupted)."""
    from rich.markup import escape

    from expertmerge.cli.fit import quiet_lightning
    from expertmerge.console import make_console
    from expertmerge.fit.run import run_fit
    from expertmerge.sweep import SweepPoint, complete_point, held_out_scores, sweep_table, teacher_scores
    from expertmerge.teachers import teacher_forwards
    from lightning_modules.trainer import lightning_trainers

    console = make_console()
    run = module.run
    configured = dict(run.options.loss.task_weights or {})
    points: list[SweepPoint] = []
    base = teachers = None
    for index, weight in enumerate(weights):
        console.print(f"[bold]sweep {index + 1}/{len(weights)}[/bold]: {escape(task)} weight {weight:g}")
        # the base, task vectors and targets stay; the coefficients start afresh
        run.restart(run.options.replace(task_weights={**configured, task: weight}))
        forwards, started = teacher_forwards(), time.perf_counter()
        with quiet_lightning():  # the Trainer's device inventory and tips are noise here
            result = run_fit(run, lightning_trainers(module, make_trainer))
        if result.interrupted:
            return None
        seconds = time.perf_counter() - started
        learned = result.learned
        if base is None:  # once: the base's and the teachers' own scores
            plain = learned.pool.load_model()
            base = held_out_scores(learned, plain.to(learned.merged.device))
            del plain
            teachers = teacher_scores(learned)
        point = SweepPoint(weight, held_out_scores(learned), teacher_forwards() - forwards, seconds)
        points.append(complete_point(point, base, teachers, base_tasks))
        kl = ", ".join(f"{escape(name)} KL to base {value:.4f}" for name, value in point.base_kl.items())
        gains = ", ".join(f"{escape(name)} {value:+.3f}" for name, value in point.gains.items())
        console.print(f"  gain retained: {gains} (mean {point.mean_gain:+.3f})" + (f"; {kl}" if kl else ""))
    console.print(sweep_table(task, points, base_tasks))
    return points, base, teachers


def _write_outputs(
    options: Any,
    inputs: list[str],
    task: str,
    weights: list[float],
    base_tasks: list[str],
    points: list[Any],
    base: Any,
    teachers: Any,
) -> None:
    """The atomic output folder (JSON, CSV, tradeoff.png) and the summary table."""
    from rich.markup import escape
    from rich.table import Table

    from expertmerge.console import make_console
    from expertmerge.io.folder import atomic_output_dir
    from expertmerge.plots import plot_tradeoff
    from expertmerge.sweep import write_results

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
    make_console().print(summary)
