"""The start of the coefficients: a training-free merge, chosen on calibration data before the first step.

Candidates are (merge, value) pairs: task arithmetic or RegMean (`expertmerge.regmean`) at each start value.
Each is scored by the fit's own objective (`Objective.split_objective`) on the training (or held-out)
calibration samples; the best one is folded into the base model: the tensors without coefficients at task
arithmetic `value`, and for RegMean each learned linear weight's base moved by `value` x its RegMean offset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from rich.progress import Progress
from rich.table import Table
from torch import nn

from expertmerge.fit.merged import MergedModel
from expertmerge.fit.objective import Objective
from expertmerge.fit.options import StartOptions


class StartPoint:
    """Moves the base model between start candidates: what was folded so far, and what each move adds.

    Args:
        fixed_deltas: per unlearned tensor the sum of its task vectors (merged at the chosen value).
        regmean_offsets: per learned linear weight its RegMean offset in units of the start value.
    """

    def __init__(
        self, fixed_deltas: dict[str, torch.Tensor], regmean_offsets: dict[str, torch.Tensor]
    ) -> None:
        self.fixed_deltas = fixed_deltas
        self.regmean_offsets = regmean_offsets
        self.applied = (0.0, 0.0)  # (fixed tensors, RegMean offsets) already moved

    @torch.no_grad()
    def move(self, model: nn.Module, merge: str, value: float) -> None:
        """Put `model` at start candidate (merge, value)."""
        fixed, offset = self.applied
        target = (value, value if merge == "regmean" else 0.0)
        for name, delta in self.fixed_deltas.items():
            model.get_parameter(name).add_(delta, alpha=target[0] - fixed)
        for name, delta in self.regmean_offsets.items():
            parameter = model.get_parameter(name)
            parameter.add_(delta.to(parameter.device, parameter.dtype), alpha=target[1] - offset)
        self.applied = target


def start_candidates(options: StartOptions, num_experts: int) -> list[tuple[str, float]]:
    """(merge, value) pairs the start search scores: every start merge at every `alpha0_search` value (or
    at `alpha0`), and plain RegMean (1/N) when RegMean is searched."""
    values = [float(v) for v in (options.alpha0_search or [options.alpha0])]
    candidates = [(merge, value) for merge in options.merges for value in values]
    plain = 1.0 / num_experts
    searched = "regmean" in options.merges and options.alpha0_search
    if searched and not any(abs(value - plain) < 1e-9 for value in values):
        candidates.append(("regmean", plain))
    return candidates


@torch.no_grad()
def search_start(
    merged: MergedModel,
    objective: Objective,
    point: StartPoint,
    candidates: Sequence[tuple[str, float]],
    split: str,
) -> tuple[tuple[str, float], dict[tuple[str, float], float]]:
    """The candidate with the lowest fit objective on `split` (task weights and balance scales applied), and
    every candidate's score; the model is left at the best one."""
    scores: dict[tuple[str, float], float] = {}
    with Progress(transient=True) as progress:
        bar = progress.add_task("start search", total=len(candidates))
        for merge, value in candidates:
            point.move(merged.model, merge, value)
            merged.start_coefficients(value)
            scores[(merge, value)] = objective.split_objective(split)
            progress.advance(bar)
    best = min(scores, key=scores.__getitem__)
    point.move(merged.model, *best)
    merged.coefficients = None
    return best, scores


def start_table(scores: dict[tuple[str, float], float], best: tuple[str, float], split: str) -> Table:
    where = "held-out" if split == "eval" else "training"
    table = Table(title=f"start search: training-free merges on the {where} calibration samples")
    table.add_column("start", justify="left")
    table.add_column("alpha0", justify="right")
    table.add_column("objective", justify="right")
    for (merge, value), score in scores.items():
        chosen = " (chosen)" if (merge, value) == best else ""
        table.add_row(merge + chosen, f"{value:.4g}", f"{score:.4f}")
    return table


def scores_json(scores: dict[tuple[str, float], float]) -> dict[str, dict[str, float]] | None:
    """The start search's objectives as {merge: {value: objective}} (None when nothing was searched)."""
    if not scores:
        return None
    result: dict[str, dict[str, float]] = {}
    for (merge, value), score in scores.items():
        result.setdefault(merge, {})[f"{value:.6g}"] = round(float(score), 6)
    return result


def regmean_offsets(
    base_model: nn.Module,
    learned: Sequence[str],
    load_expert: Callable[[int], nn.Module],
    samples: list[list[tuple[torch.Tensor, torch.Tensor]]],
    alpha: float,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """`start_merges: regmean`: per learned linear weight, RegMean's offset from the average in units of the
    start value (`expertmerge.regmean.regmean_start_offsets`), from each expert's input Grams on `samples[k]`
    (its tasks' training texts). Loads each expert once."""
    from expertmerge.regmean import regmean_start_offsets

    wanted = set(learned)
    names = [
        name
        for name, module in base_model.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.weight" in wanted
    ]
    if not names:
        return {}
    with Progress(transient=True) as progress:
        bar = progress.add_task("RegMean start: experts' input Grams", total=len(samples))
        return regmean_start_offsets(
            base_model,
            [lambda k=k: load_expert(k) for k in range(len(samples))],
            samples,
            names,
            alpha=alpha,
            batch_size=batch_size,
            on_expert=lambda: progress.advance(bar),
        )
