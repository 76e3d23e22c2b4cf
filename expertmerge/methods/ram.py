"""Task-vector merges that look at where experts overlap: RAM, RAM+ (tensor-local) and SCE (mergekit 0.1.5).

- `ram` (Reinforced Agent Merging): an entry that only one expert changed (|tau| > `epsilon`) takes that
  change in full; an entry several experts changed takes their mean change. No weights.
- `ramplus_tl`: as `ram`, but each expert's unique entries are scaled by 1 + r * clamp(rho, 0, alpha), rho
  its count of shared over unique changed entries in this tensor.
- `sce` (Select, Calculate, Erase): optionally keeps only the `select_topk` fraction of entries with the
  largest variance across experts (of the entries whose variance is non-zero), weights each expert by its
  mean squared task vector, erases entries that disagree with the elected sign (TIES's 'sum' election),
  and averages the rest by those weights.
"""

from __future__ import annotations

import torch

from expertmerge.methods.base import TensorMethod
from expertmerge.methods.parameters import Parameter
from expertmerge.methods.sparsification import sign_consensus


def _overlap(experts: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """Flat task vectors, where each is non-zero, how many experts changed each entry, and the masks of
    entries changed by several / by exactly one expert."""
    flat = torch.stack([e - base for e in experts], dim=0).view(len(experts), -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return flat, changed, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, experts: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    flat, changed, counts, shared, unique = _overlap(experts, base, epsilon)
    kept = flat * changed
    merged = (kept * unique + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(
    base: torch.Tensor, experts: list[torch.Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    flat, changed, counts, shared, unique = _overlap(experts, base, epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    kept = flat * changed
    merged = (kept * unique * boost.unsqueeze(-1) + kept * shared / counts.clamp(min=1)).sum(
        dim=0, keepdim=True
    )
    return base + merged.reshape_as(base)


def sce_select(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """0/1 mask (the task vectors' dtype) of the `int(nonzero * fraction)` entries of largest variance
    across experts, `nonzero` the count of entries whose variance is not 0; ties as mergekit's topk."""
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    # A tensor times a float, as mergekit computes it (float32, not Python's double).
    keep = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if keep == 0:
        return mask
    mask.view(-1)[torch.topk(variance.abs().view(-1), k=keep, largest=True).indices] = 1
    return mask


def sce(base: torch.Tensor, experts: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    task_vectors = torch.stack([e - base for e in experts], dim=0)
    if select_topk < 1:
        task_vectors = task_vectors * sce_select(task_vectors, select_topk).unsqueeze(0)
    agree = torch.stack(sign_consensus(list(task_vectors)), dim=0)
    weights = task_vectors.square().reshape(len(experts), -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / len(experts) if abs(total) < 1e-6 else weights / total
    weights = weights.view(-1, *([1] * (task_vectors.dim() - 1))) * agree
    return base + (task_vectors * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)


def _ram(base, experts, model_values, global_values, generator):
    return ram(base, list(experts), float(global_values.get("epsilon", 1e-5)))


def _ramplus_tl(base, experts, model_values, global_values, generator):
    return ramplus_tl(
        base,
        list(experts),
        float(global_values.get("r", 0.1)),
        float(global_values.get("alpha", 0.2)),
        float(global_values.get("epsilon", 1e-5)),
    )


def _sce(base, experts, model_values, global_values, generator):
    return sce(base, list(experts), float(global_values.get("select_topk", 1.0)))


_EPSILON = Parameter(
    "epsilon", "global", float, 1e-5, "a task-vector entry counts as changed above this", low=0.0
)

OVERLAP_METHODS = (
    TensorMethod(
        "ram",
        True,
        "Entries one expert changed take that change, entries several changed take their mean "
        "(Reinforced Agent Merging).",
        (_EPSILON,),
        _ram,
    ),
    TensorMethod(
        "ramplus_tl",
        True,
        "RAM with each expert's unique changes boosted by its shared/unique overlap ratio (tensor-local RAM+).",
        (
            Parameter("r", "global", float, 0.1, "boost per unit of overlap ratio"),
            Parameter("alpha", "global", float, 0.2, "the overlap ratio is clamped to [0, alpha]"),
            _EPSILON,
        ),
        _ramplus_tl,
    ),
    TensorMethod(
        "sce",
        True,
        "Select high-variance entries, weight experts by their mean squared task vector, erase sign "
        "conflicts, average (Wan et al., 2024).",
        (
            Parameter(
                "int8_mask",
                "global",
                bool,
                False,
                "mergekit's memory saving for the masks; no numeric effect",
            ),
            Parameter(
                "select_topk",
                "global",
                float,
                1.0,
                "fraction of highest-variance entries kept",
                low=0.0,
                high=1.0,
            ),
        ),
        _sce,
    ),
)
