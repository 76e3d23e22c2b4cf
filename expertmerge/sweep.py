"""A sweep of one task's weight: the trade-off between the experts' domains and what the base could do.

`python -m expertmerge sweep` fits the same config once per weight of one task (`model.task_weights`), on ONE
prepared module: the base, the task vectors and the teacher targets are loaded or computed once (the first fit)
and reused by every later one, whose coefficients start afresh. After each fit the merge is scored on the
held-out calibration samples of every task (`expertmerge.evaluate`):

- an expert's task: *gain retained* `(loss_base - loss_merge) / (loss_base - loss_expert)` (held-out loss in
  nats per token, the log of the perplexity), 1 = as good as the expert, 0 = no better than the base;
- a task taught by the base (`expert: base`, general text): the KL from the base to the merge, 0 = nothing of
  the base's general behaviour lost.

This file holds the numbers and their files (table, JSON, CSV); the command in `expertmerge/cli/sweep.py` runs
the fits and `expertmerge/plots.py` draws `tradeoff.png`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.table import Table

from expertmerge.errors import ExpertMergeError
from expertmerge.evaluate import TaskScores, expert_scores, gain_retained, score_task
from expertmerge.validation import non_negative

if TYPE_CHECKING:
    from expertmerge.fit.learned import LearnedMerge


@dataclass
class SweepPoint:
    """One weight's fit: its per-task scores, and what it cost."""

    weight: float
    scores: dict[str, TaskScores]
    teacher_forwards: int  # teacher batches run during this fit (0: every target came from memory or cache)
    fit_seconds: float
    gains: dict[str, float] = field(default_factory=dict)  # expert tasks: gain retained
    base_kl: dict[str, float] = field(default_factory=dict)  # base tasks: KL(base || merge)

    @property
    def mean_gain(self) -> float:
        return sum(self.gains.values()) / len(self.gains) if self.gains else math.nan


def parse_task_weights(text: str) -> tuple[str, list[float]]:
    """`"code=0.5,1,2,4"` -> `("code", [0.5, 1.0, 2.0, 4.0])`; each weight finite and >= 0, no repeats."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise ExpertMergeError(
            f"--task_weights {text!r}: write TASK=W1,W2,... e.g. 'code=0.5,1,2,4' (one task, its weights)."
        )
    weights = []
    for item in values.split(","):
        try:
            number = float(item)
        except ValueError:
            raise ExpertMergeError(f"--task_weights {text!r}: {item.strip()!r} is not a number.") from None
        weights.append(non_negative(f"--task_weights {name}", number))
    if len(set(weights)) != len(weights):
        raise ExpertMergeError(f"--task_weights {text!r} repeats a weight; give each weight once.")
    return name, weights


def check_swept_task(
    task: str, weights: Sequence[float], tasks: Sequence[Any], configured: Mapping[str, float] | None
) -> None:
    """The swept task exists, and no weight silences every task (the others keep `configured` weights)."""
    from expertmerge.validation import weights as check_weights

    names = [spec.name for spec in tasks]
    if task not in names:
        raise ExpertMergeError(
            f"--task_weights names task '{task}', which is not in the config's data.tasks: {', '.join(names)}."
        )
    for weight in weights:
        check_weights(
            f"--task_weights {task}={weight:g} with model.task_weights",
            {**(configured or {}), task: weight},
            names,
        )


@torch.no_grad()
def held_out_scores(learned: LearnedMerge, model: Any | None = None) -> dict[str, TaskScores]:
    """Every task's held-out scores of the learned merge (its dense merge; in MoE mode the backbone with each
    task's own FFN), or of a plain `transformers` model `model` (e.g. the base)."""
    merged, calibration = learned.merged, learned.calibration
    merged.eval()
    result = {}
    for task in learned.task_names:
        samples = calibration.samples(task, "eval")
        if model is None:
            expert = merged.oracle_expert(task)

            def forward(ids: torch.Tensor, mask: torch.Tensor, expert: Any = expert) -> torch.Tensor:
                return merged(ids, mask, output_hidden_states=False, oracle_expert=expert).logits

        else:

            def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        result[task] = score_task(
            forward,
            samples.input_ids,
            samples.attention_mask,
            calibration.targets[(task, "eval")],
            learned.options.loss.temperature,
            device=merged.device,
        )
    return result


def teacher_scores(learned: LearnedMerge) -> dict[str, TaskScores]:
    """Each task's teacher (its expert, or the base) against itself, from the cached targets."""
    calibration = learned.calibration
    return {
        task: expert_scores(
            calibration.samples(task, "eval").attention_mask, calibration.targets[(task, "eval")]
        )
        for task in learned.task_names
    }


def complete_point(
    point: SweepPoint,
    base: Mapping[str, TaskScores],
    teachers: Mapping[str, TaskScores],
    base_tasks: Sequence[str],
) -> SweepPoint:
    """Fill in the gains (expert tasks) and the KL to the base (base tasks) of `point`."""
    for task, scores in point.scores.items():
        if task in base_tasks:
            point.base_kl[task] = scores.kl
        else:
            point.gains[task] = gain_retained(base[task], scores, teachers[task])
    return point


# ------------------------------------------------------------------------------------------- the outputs
def sweep_table(task: str, points: Sequence[SweepPoint], base_tasks: Sequence[str]) -> Table:
    """One row per weight: each expert task's gain retained, their mean, each base task's KL, the fit's cost."""
    gain_tasks = list(points[0].gains) if points else []
    table = Table(title=f"Sweep of the weight of task '{task}' (held-out calibration samples)")
    table.add_column(f"{task} weight", justify="right")
    for name in gain_tasks:
        table.add_column(f"{name} gain", justify="right")
    table.add_column("mean gain", justify="right", style="bold")
    for name in base_tasks:
        table.add_column(f"{name} KL to base", justify="right")
    table.add_column("teacher forwards", justify="right")
    table.add_column("fit s", justify="right")
    for point in points:
        table.add_row(
            f"{point.weight:g}",
            *(f"{point.gains[name]:+.3f}" for name in gain_tasks),
            f"{point.mean_gain:+.3f}",
            *(f"{point.base_kl[name]:.4f}" for name in base_tasks),
            str(point.teacher_forwards),
            f"{point.fit_seconds:.1f}",
        )
    return table


def write_results(
    folder: Path,
    task: str,
    points: Sequence[SweepPoint],
    base: Mapping[str, TaskScores],
    teachers: Mapping[str, TaskScores],
    base_tasks: Sequence[str],
    config: str,
) -> list[Path]:
    """`sweep.json` (everything) and `sweep.csv` (one row per weight) into `folder`."""
    summary = {
        "task": task,
        "config": config,
        "held_out": "the held-out calibration samples of each task (data.eval_samples_per_task)",
        "gain": "(loss_base - loss_merge) / (loss_base - loss_expert), loss = log perplexity",
        "base_tasks": list(base_tasks),
        "base": {name: asdict(s) for name, s in base.items()},
        "teachers": {name: asdict(s) for name, s in teachers.items()},
        "points": [
            {
                "weight": p.weight,
                "gains": p.gains,
                "mean_gain": p.mean_gain,
                "kl_to_base": p.base_kl,
                "scores": {name: asdict(s) for name, s in p.scores.items()},
                "teacher_forwards": p.teacher_forwards,
                "fit_seconds": round(p.fit_seconds, 2),
            }
            for p in points
        ],
    }
    json_path, csv_path = folder / "sweep.json", folder / "sweep.csv"
    json_path.write_text(json.dumps(summary, indent=1))
    tasks = list(points[0].scores) if points else []
    columns = (
        ["weight"]
        + [f"gain/{t}" for t in points[0].gains]
        + ["mean_gain"]
        + [f"kl/{t}" for t in tasks]
        + [f"perplexity/{t}" for t in tasks]
        + ["teacher_forwards", "fit_seconds"]
        if points
        else ["weight"]
    )
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for p in points:
            writer.writerow(
                [p.weight, *p.gains.values(), p.mean_gain]
                + [p.scores[t].kl for t in tasks]
                + [p.scores[t].perplexity for t in tasks]
                + [p.teacher_forwards, round(p.fit_seconds, 2)]
            )
    return [json_path, csv_path]
