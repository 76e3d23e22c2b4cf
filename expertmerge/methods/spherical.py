"""Merges on the hypersphere: slerp, nuslerp, multislerp and the Karcher mean (mergekit 0.1.5's meanings).

Each is a pure function on one tensor, written to follow mergekit's arithmetic step by step (same
reductions, same fallbacks, same constants), so results agree to float32 rounding:

- `slerp`: the base and one model, the whole tensor as one vector, `t` the fraction of the way to the
  model. Nearly colinear or antipodal vectors (|cos| > 0.9995) fall back to linear interpolation.
- `nuslerp`: two models by their weights (t = w1 / (w0 + w1), 0.5 if the weights sum to ~0), spherical
  on the whole tensor (`nuslerp_flatten`, the default) or on each row (`nuslerp_row_wise`) or each
  column; with a base, on the task vectors.
- `multislerp`: any number of models, barycentric on the sphere via the tangent space at their weighted
  mean direction; the norm is the weighted mean of the norms; with a base, on the task vectors.
- `karcher`: the weighted Riemannian (Karcher) mean of the directions, `max_iter` fixed-point steps until
  the tangent step is below `tol`, scaled by the mean norm; every model counts equally.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.methods.base import TensorMethod
from expertmerge.methods.parameters import Parameter

# mergekit computes slerp's norms and dot product in chunks of this many entries.
_SLERP_CHUNK = 1024 * 1024


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation from `v0` (t=0) to `v1` (t=1), both tensors taken as one flat vector."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    t_ = torch.tensor(float(t), dtype=a.dtype, device=a.device)
    if a.numel() == 0:
        return ((1 - t_) * a + t_ * b).reshape(v0.shape)
    starts = range(0, a.numel(), _SLERP_CHUNK)
    # Norms of chunk norms, then the dot of the normalised vectors chunk by chunk, as mergekit does.
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[s : s + _SLERP_CHUNK]) for s in starts])
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[s : s + _SLERP_CHUNK]) for s in starts])
    )
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack(
        [((a[s : s + _SLERP_CHUNK] / norm_a) * (b[s : s + _SLERP_CHUNK] / norm_b)).sum() for s in starts]
    )
    dot = dot.sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8, flatten: bool = False
):
    """Spherical interpolation of the slices of `v0` and `v1` along `dim` (or of the whole, `flatten`);
    slices whose directions are colinear (1 - cos^2 <= eps^2) are interpolated linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def multislerp(
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere of the experts (their task vectors, with a base)."""
    if len(experts) == 1:
        return experts[0]  # mergekit returns the single model itself, base or not
    stacked = torch.stack(list(experts), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ExpertMergeError(
                "multislerp: the weighted directions of the models cancel out (antipodal tensors with "
                "balancing weights); change the weights."
            )
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


def karcher(tensors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int = 10, tol: float = 1e-5):
    """Weighted Karcher mean on the unit hypersphere, scaled by sum_k alpha_k |x_k|.

    Models whose norm is at most `tol` drop out of the direction (their alphas are renormalised away)
    but still count in the scale, as in mergekit.
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    directions = [units[i] for i in valid]
    mean = torch.zeros_like(directions[0])
    for weight, unit in zip(weights, directions, strict=True):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = directions[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, directions, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True)) * mean


# ---------------------------------------------------------------- the registry's entries


def _slerp(base, experts, model_values, global_values, generator):
    return slerp(global_values["t"], base, experts[0])


def _two_weights(model_values: Sequence[Mapping[str, Any]]) -> float:
    w0, w1 = (float(v["weight"]) for v in model_values)
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _nuslerp(base, experts, model_values, global_values, generator):
    t = _two_weights(model_values)
    dim = 0 if global_values.get("nuslerp_row_wise", False) else -1
    flatten = global_values.get("nuslerp_flatten", True)
    if base is None:
        return nuslerp(t, experts[0], experts[1], dim=dim, flatten=flatten)
    return base + nuslerp(t, experts[0] - base, experts[1] - base, dim=dim, flatten=flatten)


def _multislerp(base, experts, model_values, global_values, generator):
    weights = [float(v["weight"]) for v in model_values]
    normalize = global_values.get("normalize_weights", True)
    if normalize and math.isclose(sum(weights), 0.0, abs_tol=0.0):
        raise ExpertMergeError("multislerp with normalize_weights divides by the sum of weights, which is 0.")
    return multislerp(experts, weights, base, normalize, global_values.get("eps", 1e-8))


def _karcher(base, experts, model_values, global_values, generator):
    alphas = [1.0 / len(experts)] * len(experts)
    return karcher(
        experts, alphas, int(global_values.get("max_iter", 10)), float(global_values.get("tol", 1e-5))
    )


T = Parameter("t", "global", float, None, "interpolation factor: 0 is the base, 1 the other model")
WEIGHT = Parameter("weight", "model", float, None, "the model's share of the interpolation")

SPHERICAL_METHODS = (
    TensorMethod(
        "slerp",
        True,
        "Spherical interpolation between the base (t=0) and one model (t=1), over the whole tensor.",
        (T,),
        _slerp,
        min_experts=1,
        max_experts=1,
    ),
    TensorMethod(
        "nuslerp",
        False,
        "Spherical interpolation of two models by their weights, on the task vectors when a base is given.",
        (
            WEIGHT,
            Parameter(
                "nuslerp_row_wise", "global", bool, False, "interpolate rows (not columns) when not flattened"
            ),
            Parameter("nuslerp_flatten", "global", bool, True, "interpolate the whole tensor as one vector"),
        ),
        _nuslerp,
        policy="optional",
        min_experts=2,
        max_experts=2,
    ),
    TensorMethod(
        "multislerp",
        False,
        "Barycentric spherical interpolation of any number of models (of task vectors, with a base).",
        (
            WEIGHT,
            Parameter("normalize_weights", "global", bool, True, "divide the weights by their sum"),
            Parameter("eps", "global", float, 1e-8, "numerical floor for norms", low=0.0),
        ),
        _multislerp,
        policy="optional",
    ),
    TensorMethod(
        "karcher",
        False,
        "Karcher (Riemannian) mean of the models' directions on the hypersphere, scaled by their mean norm.",
        (
            Parameter("max_iter", "global", int, 10, "fixed-point iterations at most", low=0),
            Parameter("tol", "global", float, 1e-5, "stop when the tangent step is below this", low=0.0),
        ),
        _karcher,
        policy="ignored",
    ),
)
