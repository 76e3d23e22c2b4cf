"""Expert Merging++ between its stages: stage-1 values in, the chunk allocation of stage 2 out.

`importance.py` holds the pure formulas; this file applies them to a fit's task vectors, reads the stage-1
result of an earlier fit (`model.stage1_result`) and shows the allocation as a table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from expertmerge.errors import ExpertMergeError
from expertmerge.importance import allocate_chunks, importance_scores


def read_stage1_result(
    reference: str, expert_names: Sequence[str], coefficient_names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Layer-wise values ([N] per tensor) from the `coefficients.json` (or output folder) of an earlier fit.

    A chunk-wise result is read as its mean per (tensor, expert), i.e. as the layer-wise value it stands for.
    """
    path = Path(reference)
    if path.is_dir():
        path = path / "coefficients.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExpertMergeError(
            f"model.stage1_result: cannot read '{path}' ({error}); give the coefficients.json (or the "
            "output folder) of an earlier `fit`."
        ) from error
    if saved.get("experts") != list(expert_names):
        raise ExpertMergeError(
            f"model.stage1_result '{path}' was fitted with experts {saved.get('experts')}, "
            f"this config has {list(expert_names)}: use a result of the same experts, in the same order."
        )
    layerwise = saved.get("layerwise")
    table = layerwise if layerwise is not None else saved.get("coefficients", {})
    missing = [name for name in coefficient_names if name not in table]
    if missing:
        raise ExpertMergeError(
            f"model.stage1_result '{path}' has no coefficients for {missing[:3]} "
            f"({len(missing)} tensors): it was fitted with other learn_include / learn_exclude settings."
        )
    values = {}
    for name in coefficient_names:
        rows = [table[name][expert] for expert in expert_names]
        rows = [r if isinstance(r, list) else [r] for r in rows]
        values[name] = torch.tensor([sum(r) / len(r) for r in rows], dtype=torch.float32)
    return values


@torch.no_grad()
def chunk_allocation(
    values: dict[str, torch.Tensor],
    coefficient_names: Sequence[str],
    task_vectors: Sequence[torch.Tensor],
    budget: int,
    kappa: float,
) -> dict[str, Any]:
    """Importance of every learned tensor from its stage-1 values and task vectors ([N, rows, ...]), then chunks."""
    coefficient_matrix = torch.stack([values[name].float().cpu() for name in coefficient_names], 1)
    mean_abs = torch.stack(
        [torch.stack([tau_k.float().abs().mean() for tau_k in taus]).cpu() for taus in task_vectors], dim=1
    )
    numels = [taus[0].numel() for taus in task_vectors]
    rows = [taus.shape[1] for taus in task_vectors]
    importance = importance_scores(coefficient_matrix, mean_abs, numels)
    if budget < 0:
        raise ExpertMergeError(f"model.chunk_budget must be >= 0, got {budget}.")
    chunks = allocate_chunks(importance, budget, kappa, rows)
    num_experts = coefficient_matrix.shape[0]
    return {
        "budget": budget,
        "kappa": kappa,
        "total_chunks": sum(chunks),
        "layerwise_coefficients": len(coefficient_names) * num_experts,
        "chunkwise_coefficients": sum(chunks) * num_experts,
        "fixed_tensors": sum(1 for c in chunks if c == 0),
        "tensors": {
            name: {"importance": float(importance[i]), "chunks": chunks[i], "rows": rows[i]}
            for i, name in enumerate(coefficient_names)
        },
    }


def allocation_table(allocation: dict[str, Any], top: int = 12) -> Table:
    """The tensors that got the most chunks, with their importance."""
    table = Table(
        title=f"Expert Merging++ chunk allocation (budget {allocation['budget']}, kappa {allocation['kappa']})"
    )
    table.add_column("tensor")
    table.add_column("importance", justify="right")
    table.add_column("chunks", justify="right")
    table.add_column("rows", justify="right")
    ranked = sorted(allocation["tensors"].items(), key=lambda item: -item[1]["importance"])
    for name, info in ranked[:top]:
        table.add_row(name, f"{info['importance']:.3f}", str(info["chunks"]), str(info["rows"]))
    table.caption = (
        f"{allocation['total_chunks']} chunks; {allocation['fixed_tensors']} tensors keep their stage-1 value; "
        f"coefficients {allocation['layerwise_coefficients']} (layer-wise) -> "
        f"{allocation['chunkwise_coefficients']} (chunk-wise)"
    )
    return table
