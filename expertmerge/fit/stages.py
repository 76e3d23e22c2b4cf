"""Expert Merging++: from the layer-wise result to chunk-wise coefficients, and back when they do not help.

`enter_stage2` allocates chunks by importance (`expertmerge.chunking`) and starts every chunk at its tensor's
stage-1 value; `select_stage2` (`stage2_select: held_out`) keeps the chunk-wise coefficients only when they
beat the layer-wise ones on the held-out calibration samples by more than one standard error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from expertmerge.chunking import chunk_allocation
from expertmerge.coefficients import MergeCoefficients
from expertmerge.fit.merged import MergedModel
from expertmerge.fit.objective import Objective
from expertmerge.fit.options import ChunkingOptions


def enter_stage2(
    merged: MergedModel, stage1_values: dict[str, torch.Tensor], options: ChunkingOptions
) -> None:
    """Chunk-wise coefficients that start from (and stay near) the stage-1 values.

    Called between fits (never inside a running one): the stage-2 Trainer then builds its optimiser, and under
    DDP its reducer, over these new parameters.
    """
    names = merged.coefficient_names
    budget = len(names) if options.chunk_budget is None else int(options.chunk_budget)
    # a sequence: streamed task vectors are read layer by layer, not all at once
    merged.chunk_allocation = chunk_allocation(
        stage1_values, names, merged.task_vectors, budget, options.chunk_kappa
    )
    merged.stage1_values = {name: value.detach().float().cpu() for name, value in stage1_values.items()}
    chunks_at_stage1(merged)
    merged.stage = 2


def chunks_at_stage1(merged: MergedModel) -> None:
    """Fresh chunk-wise coefficients (the allocation's chunks) with every chunk at its tensor's stage-1 value,
    where the previous coefficients were."""
    tensors = merged.chunk_allocation["tensors"]
    merged.coefficients = MergeCoefficients(
        merged.coefficient_names,
        [info["rows"] for info in tensors.values()],
        len(merged.expert_names),
        alpha0=merged.start_alpha,
        chunks={name: info["chunks"] for name, info in tensors.items()},
        start={name: value.view(-1, 1) for name, value in merged.stage1_values.items()},
    ).to(merged.coefficients.alpha0.device)


@torch.no_grad()
def select_stage2(merged: MergedModel, objective: Objective) -> dict[str, Any]:
    """The one-standard-error rule: keep the chunk-wise coefficients only when they lower the fit objective on
    the held-out calibration samples by more than one standard error of the per-sample difference; otherwise
    go back to the simpler layer-wise result (as chunk-wise coefficients, each chunk at its tensor's stage-1
    value). Returns what it found."""
    learned = {k: v.detach().clone() for k, v in merged.coefficients.state_dict().items()}
    chunk_wise = objective.sample_objectives("eval")
    chunks_at_stage1(merged)  # the layer-wise result, in stage 2's chunks
    layer_wise = objective.sample_objectives("eval")
    before, after, error = paired_objectives(layer_wise, chunk_wise, objective.weights())
    kept = after < before - error
    if kept:
        merged.coefficients.load_state_dict(learned)
    return {
        "kept": bool(kept),
        "objective_layer_wise": round(before, 6),
        "objective_chunk_wise": round(after, 6),
        "standard_error": round(error, 6),
    }


def paired_objectives(
    before: dict[str, tuple[torch.Tensor, torch.Tensor]],
    after: dict[str, tuple[torch.Tensor, torch.Tensor]],
    weights: dict[str, float],
) -> tuple[float, float, float]:
    """Two states' objectives on the same samples (`sample_objectives`), as the fit weighs them (tokens within a
    task, `weights` across tasks, a weighted mean), and the standard error of their difference (the per-sample
    differences' spread within each task, samples independent)."""
    total = sum(weights[t] for t in before)
    mean_before = mean_after = variance = 0.0
    for task, (values, tokens) in before.items():
        share = tokens / tokens.sum()
        factor = weights[task] / total * share
        difference = after[task][0] - values
        mean_before += float((factor * values).sum())
        mean_after += float((factor * after[task][0]).sum())
        count = len(values)
        if count > 1:
            centred = difference - (share * difference).sum()
            variance += float((factor**2 * centred**2).sum()) * count / (count - 1)
    return mean_before, mean_after, variance**0.5


def checkpoint_stage(path: str | Path) -> int | None:
    """The stage (1 layer-wise, 2 chunk-wise) a fit checkpoint was saved in; None when `path` is no file
    (Lightning's "last" / "best" names, resolved by the Trainer itself)."""
    from expertmerge.io.fit_checkpoint import load_fit_checkpoint

    if not Path(path).is_file():
        return None
    checkpoint = load_fit_checkpoint(path, "--ckpt_path")
    return int(checkpoint.get("expertmerge", {}).get("stage", 1))
