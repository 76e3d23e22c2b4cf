"""Expert Merging++: which tensors deserve more coefficients, and how many chunks each gets.

importance  I_p = sum_k |c[k,p]| * mean|tau[k,p]| * numel_p, normalised to sum to one over tensors;
allocation  m_p = floor(B * I_p^kappa / sum_q I_q^kappa), capped at the tensor's rows.
The floor leaves up to P chunks of the budget unspent; they go, one each, to the tensors with the largest
fractional remainders (largest-remainder rounding), never past a tensor's row count; the total is B
unless the row caps leave no room, and never more. A tensor whose importance is zero (no task-vector mass) gets no chunks, whatever kappa is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def importance_scores(
    coefficients: torch.Tensor, task_vector_mean_abs: torch.Tensor, numels: Sequence[int]
) -> torch.Tensor:
    """I_p normalised over tensors.

    coefficients: [N, P] learned (layer-wise) coefficients; task_vector_mean_abs: [N, P] mean |tau[k,p]|;
    numels: element count of each tensor.
    """
    numel = torch.as_tensor(numels, dtype=torch.float64)
    raw = (coefficients.double().abs() * task_vector_mean_abs.double()).sum(0) * numel
    total = raw.sum()
    return raw / total if total > 0 else raw


def allocate_chunks(
    importance: torch.Tensor, budget: int, kappa: float = 1.0, rows: Sequence[int] | None = None
) -> list[int]:
    """Chunks per tensor: proportional to importance^kappa, at most `budget` in total, at most `rows[p]` each."""
    importance = importance.double()
    if budget < 0:
        raise ValueError("budget must be >= 0")
    alive = importance > 0
    weights = torch.where(alive, importance.clamp_min(1e-300) ** kappa, torch.zeros_like(importance))
    if not bool(alive.any()) or budget == 0:
        return [0] * importance.numel()
    share = budget * weights / weights.sum()
    chunks = share.floor()
    caps = (
        torch.as_tensor(rows, dtype=torch.float64)
        if rows is not None
        else torch.full_like(share, float("inf"))
    )
    chunks = torch.minimum(chunks, caps)
    leftover = budget - int(chunks.sum())
    remainder = share - chunks
    order = torch.argsort(remainder, descending=True, stable=True)
    # Several passes only when row caps bind: what a capped tensor cannot take goes to the next in line.
    while leftover > 0:
        open_slots = [i for i in order.tolist() if alive[i] and chunks[i] < caps[i]]
        if not open_slots:
            break
        for index in open_slots[:leftover]:
            chunks[index] += 1
            leftover -= 1
    return [int(c) for c in chunks]
