"""Merges that decide how far to move from the base: Model Stock, NearSwap, Arcee Fusion (mergekit 0.1.5).

- `model_stock` (Jang et al., 2024): with the average angle theta between the models' task vectors, the
  result is t * mean(models) + (1 - t) * base, t = N cos(theta) / (1 + (N - 1) cos(theta)); over the whole
  tensor, or per row (`filter_wise`). Where 1 + (N - 1) cos(theta) is ~0 the base is kept.
- `nearswap`: per entry, moves the base to the other model with weight clamp(t / |base - model|, 0, 1):
  entries that differ by less than `t` are swapped entirely, far ones barely move.
- `arcee_fusion`: keeps the model's change only where its importance |delta| * KL(softmax(model) ||
  softmax(base)) (per row) reaches median + 1.5 IQR of all importances; elsewhere the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmerge.methods.base import TensorMethod
from expertmerge.methods.parameters import Parameter

# mergekit estimates arcee_fusion's quantiles from this many entries (drawn with replacement) on larger tensors.
_QUANTILE_SAMPLE = 1_000_000


def model_stock(base: torch.Tensor, experts: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock's interpolation between the mean of the experts and the base."""
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base, experts = base.unsqueeze(0), [e.unsqueeze(0) for e in experts]
    else:
        base, experts = base.reshape(-1), [e.reshape(-1) for e in experts]
    offsets = [e - base for e in experts]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(experts)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(experts) / count
    return (t * average + (1 - t) * base).reshape(shape)


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """Entry-wise interpolation with weight clamp(t / |base - model|, 0, 1) towards `model`."""
    weight = (t / torch.abs(base - model).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * model + (1 - weight) * base


def arcee_fusion(
    base: torch.Tensor, model: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The base plus the model's change where its importance passes the outlier threshold.

    Tensors above a million entries get their quantiles from a random sample, as in mergekit; `generator`
    draws it (mergekit uses torch's global RNG).
    """
    eps = 1e-8
    p = F.softmax(model, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    importance = (model - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLE:
        device = generator.device if generator is not None else flat.device
        picks = torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=generator, device=device)
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    positions = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[positions.to(ordered.device)]
    threshold = median + 1.5 * (q3 - q1)
    return base + (model - base) * (importance >= threshold).to(base.dtype)


def _model_stock(base, experts, model_values, global_values, generator):
    return model_stock(base, list(experts), bool(global_values.get("filter_wise", False)))


def _nearswap(base, experts, model_values, global_values, generator):
    return nearswap(base, experts[0], float(global_values["t"]))


def _arcee_fusion(base, experts, model_values, global_values, generator):
    return arcee_fusion(base, experts[0], generator)


ANCHORED_METHODS = (
    TensorMethod(
        "model_stock",
        True,
        "Interpolate between the models' mean and the base by the angle between their task vectors "
        "(Jang et al., 2024).",
        (Parameter("filter_wise", "global", bool, False, "one angle per row instead of per tensor"),),
        _model_stock,
        min_experts=2,
    ),
    TensorMethod(
        "nearswap",
        True,
        "Take the other model's value where it is within `t` of the base's, interpolate towards it elsewhere.",
        (Parameter("t", "global", float, None, "distance below which an entry is swapped entirely"),),
        _nearswap,
        min_experts=1,
        max_experts=1,
    ),
    TensorMethod(
        "arcee_fusion",
        True,
        "Keep the model's changes whose importance (|delta| x KL of the softmaxed rows) is an outlier.",
        (),
        _arcee_fusion,
        min_experts=1,
        max_experts=1,
    ),
)
