"""Router initialisation for the fused MoE: pure functions from calibration statistics to gate matrices.

A router of layer l computes logits `x @ W_l.T` on the state `x` after layer l's post-attention norm. All
initialisers return `[layers, experts, hidden]` (row e of layer l: expert e's gate row), rows of norm `scale`
(the discriminant's are scaled by their margin instead). No I/O and no model here: the statistics come from
`expertmerge.moe.router_inputs`.

- `hidden` (`router_from_hidden`): each task's mean of exactly that state (`router_input_statistics` in
  `router_inputs`, run on the merged dense model with the shared tensors the MoE will have), normalised. A token is
  sent to the experts whose task mean it points at most. The fit's `hidden` router goes one step further
  (`router_from_discriminant`): it whitens the centred means by the pooled within-expert scatter (a linear
  discriminant), so the rows separate the experts' tokens rather than merely point at their means, and
  `calibrate_margin` scales each layer so a task's mean input prefers its own expert by `ROUTER_GAP` logits.
- `cheap_embed` (`router_from_embeddings`): each task's mean token embedding (`mean_token_embeddings`), the same
  for every layer; no forward pass at all.
- `random` (`router_random`): seeded Gaussian rows, normalised.

`center=True` subtracts the mean over tasks before normalising. Softmax and top-k ignore anything added to every
row alike, so centering keeps the ranking of experts for a token and only sharpens it: the rows' common part
(large in LLM hidden states) no longer takes up their unit norm.

Rows of two experts that point the same way cannot be told apart by the router: `hidden` and `cheap_embed` warn
(`DegenerateRouterWarning`) when the cosine of two tasks' (uncentered) means exceeds `threshold` in some layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertmerge.errors import ExpertMergeError

ROUTER_METHODS = ("hidden", "cheap_embed", "random")
DEGENERATE_COSINE = 0.98
ROUTER_GAP = 3.0  # logits by which a task's mean router input prefers its own expert after initialisation
SCATTER_SHRINKAGE = 0.1  # ridge added to the within-expert scatter, relative to its mean variance


class DegenerateRouterWarning(UserWarning):
    """Two experts' router rows point (almost) the same way: the router cannot tell their tasks apart."""


@dataclass(frozen=True)
class RouterDegeneracy:
    """The most similar pair of experts' rows over all layers."""

    max_cosine: float
    layer: int
    experts: tuple[int, int]

    def is_degenerate(self, threshold: float = DEGENERATE_COSINE) -> bool:
        return self.max_cosine > threshold


def router_degeneracy(rows: torch.Tensor) -> RouterDegeneracy | None:
    """Largest cosine between two experts' rows in any layer (`rows`: `[layers, experts, hidden]`).

    None for a single expert (nothing to tell apart). A zero row counts as cosine 0 with every other.
    """
    _check_rows(rows)
    layers, experts, _ = rows.shape
    if experts < 2:
        return None
    unit = torch.nn.functional.normalize(rows.double(), dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    upper = torch.triu(torch.ones(experts, experts, dtype=torch.bool), diagonal=1)
    cosine = cosine.masked_fill(~upper, float("-inf"))
    flat = int(cosine.reshape(-1).argmax())
    layer, rest = divmod(flat, experts * experts)
    first, second = divmod(rest, experts)
    return RouterDegeneracy(float(cosine[layer, first, second]), layer, (first, second))


def warn_if_degenerate(
    rows: torch.Tensor, threshold: float = DEGENERATE_COSINE, names: Sequence[str] | None = None
) -> RouterDegeneracy | None:
    """`router_degeneracy(rows)`, warning with `DegenerateRouterWarning` when its cosine exceeds `threshold`."""
    report = router_degeneracy(rows)
    if report is not None and report.is_degenerate(threshold):
        first, second = (names[i] if names else f"expert {i}" for i in report.experts)
        warnings.warn(
            f"Router rows of {first} and {second} have cosine {report.max_cosine:.4f} > {threshold} in layer "
            f"{report.layer}: the router can hardly tell their tasks apart. Use more distinct calibration data, "
            "center=True, or router tuning.",
            DegenerateRouterWarning,
            stacklevel=3,
        )
    return report


def router_from_hidden(
    means: torch.Tensor,
    scale: float = 1.0,
    *,
    center: bool = False,
    threshold: float = DEGENERATE_COSINE,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """`hidden` init: per-task mean router inputs `[experts, layers, hidden]` -> rows `[layers, experts, hidden]`.

    Each row is the task's mean normalised to norm `scale` (after subtracting the mean over tasks if `center`).
    Warns when two tasks' means are nearly parallel in some layer (see module docs); `names` label the tasks.
    """
    if means.dim() != 3:
        raise ExpertMergeError(f"means must be [experts, layers, hidden], got {list(means.shape)}.")
    rows = means.detach().to(torch.float32).transpose(0, 1).contiguous()
    return _normalised_rows(rows, scale, center, threshold, names)


def router_from_embeddings(
    mean_embeddings: torch.Tensor,
    num_layers: int,
    scale: float = 1.0,
    *,
    center: bool = False,
    threshold: float = DEGENERATE_COSINE,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """`cheap_embed` init: per-task mean token embeddings `[experts, hidden]`, the same rows for every layer."""
    if mean_embeddings.dim() != 2:
        raise ExpertMergeError(
            f"mean_embeddings must be [experts, hidden], got {list(mean_embeddings.shape)}."
        )
    if num_layers < 1:
        raise ExpertMergeError(f"num_layers must be positive, got {num_layers}.")
    rows = mean_embeddings.detach().to(torch.float32)[None].expand(num_layers, -1, -1).contiguous()
    return _normalised_rows(rows, scale, center, threshold, names)


def router_random(
    num_experts: int, num_layers: int, hidden_size: int, seed: int = 0, scale: float = 1.0
) -> torch.Tensor:
    """`random` init: seeded Gaussian rows of norm `scale`, `[layers, experts, hidden]` (same seed, same rows)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_layers, num_experts, hidden_size, generator=generator)
    return torch.nn.functional.normalize(rows, dim=-1) * scale


def add_generalist_row(rows: torch.Tensor) -> torch.Tensor:
    """Append a row for a generalist expert (e.g. the base FFN): the experts' mean direction, at their mean norm."""
    _check_rows(rows)
    direction = torch.nn.functional.normalize(torch.nn.functional.normalize(rows, dim=-1).mean(1), dim=-1)
    norm = rows.norm(dim=-1).mean(1, keepdim=True)
    return torch.cat([rows, (direction * norm)[:, None]], dim=1)


def _check_rows(rows: torch.Tensor) -> None:
    if rows.dim() != 3:
        raise ExpertMergeError(f"router rows must be [layers, experts, hidden], got {list(rows.shape)}.")


def _normalised_rows(
    rows: torch.Tensor, scale: float, center: bool, threshold: float, names: Sequence[str] | None
) -> torch.Tensor:
    if not torch.isfinite(rows).all():
        raise ExpertMergeError("Router statistics hold NaN or Inf.")
    warn_if_degenerate(rows, threshold, names)
    if center:
        rows = rows - rows.mean(1, keepdim=True)
    return torch.nn.functional.normalize(rows, dim=-1) * scale


# ------------------------------------------------------------------------------------- linear discriminant
def pooled_within_scatter(products: torch.Tensor, counts: Sequence[int], means: torch.Tensor) -> torch.Tensor:
    """The pooled within-group covariance per layer, from per-group sums of outer products (fp64).

    `products`: `[groups, layers, hidden, hidden]` sums of `x x^T` (or `[groups, layers, hidden]` sums of `x * x`,
    the variances only); `counts`: tokens per group; `means`: `[groups, layers, hidden]`. Returns
    `[layers, hidden, hidden]` (or `[layers, hidden]`), normalised by `sum(counts) - groups` (unbiased).
    """
    if products.dim() not in (3, 4) or means.dim() != 3 or len(counts) != means.shape[0]:
        raise ExpertMergeError(
            f"products {list(products.shape)}, means {list(means.shape)} and {len(counts)} counts do not match."
        )
    means = means.double()
    scatter = torch.zeros(products.shape[1:], dtype=torch.float64)
    for group, count in enumerate(counts):
        mean = means[group]
        if products.dim() == 3:
            scatter = scatter + (products[group] - count * mean * mean)
        else:
            scatter = scatter + (products[group] - count * torch.einsum("lh,lg->lhg", mean, mean))
    return scatter / max(1, sum(counts) - len(counts))


@torch.no_grad()
def calibrate_margin(rows: torch.Tensor, means: torch.Tensor, gap: float = ROUTER_GAP) -> torch.Tensor:
    """Scale each layer's router rows so a task's mean input prefers its own expert by about `gap` logits.

    `rows`: `[layers, experts, hidden]`; `means`: `[experts, layers, hidden]` (row e: expert e's mean router
    input). The margin is own logit minus the mean of the other experts' logits, averaged over experts; a layer
    whose margin is not positive keeps its rows (scaling cannot make it prefer the right expert).
    """
    _check_rows(rows)
    scaled = []
    for layer in range(rows.shape[0]):
        logits = means[:, layer] @ rows[layer].T  # [tasks(=experts), experts]
        experts = logits.shape[0]
        own = logits.diagonal()
        others = (logits.sum(1) - own) / max(1, experts - 1)
        margin = float((own - others).mean())
        scaled.append(rows[layer] * (gap / margin if margin > 1e-6 else 1.0))
    return torch.stack(scaled)


@torch.no_grad()
def router_from_discriminant(
    means: torch.Tensor,
    within: torch.Tensor,
    *,
    gap: float = ROUTER_GAP,
    shrinkage: float = SCATTER_SHRINKAGE,
    threshold: float = DEGENERATE_COSINE,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """`hidden` init of the fit: whitened class means (a linear discriminant), margin-calibrated.

    `means`: per-expert mean router inputs `[experts, layers, hidden]`; `within`: the pooled within-expert scatter
    `[layers, hidden, hidden]`, or `[layers, hidden]` (variances only, for wide models). Row e of layer l is
    `(S_l + shrinkage * mean variance * I)^-1 (mu_e - mean_f mu_f)`, normalised, then each layer is scaled by
    `calibrate_margin(gap)`. Whitening matters when tasks share most of their hidden-state mass: the rows then
    point along the directions that tell the experts' tokens apart, not at their (nearly parallel) means.
    Warns when two experts' uncentered means are nearly parallel (see module docs).
    """
    if means.dim() != 3:
        raise ExpertMergeError(f"means must be [experts, layers, hidden], got {list(means.shape)}.")
    experts, layers, hidden = means.shape
    if within.shape not in ((layers, hidden, hidden), (layers, hidden)):
        raise ExpertMergeError(
            f"within must be [layers={layers}, hidden={hidden}(, hidden)], got {list(within.shape)}."
        )
    means = means.to(torch.float32)
    if not (torch.isfinite(means).all() and torch.isfinite(within).all()):
        raise ExpertMergeError("Router statistics hold NaN or Inf.")
    warn_if_degenerate(means.transpose(0, 1), threshold, names)
    centred = means - means.mean(0, keepdim=True)
    rows = []
    for layer in range(layers):
        scatter = within[layer].double()
        target = centred[:, layer].double()
        if scatter.dim() == 1:
            solve = target / (scatter + shrinkage * scatter.mean())
        else:
            ridge = shrinkage * scatter.diagonal().mean()
            eye = torch.eye(hidden, dtype=scatter.dtype)
            solve = torch.linalg.solve(scatter + ridge * eye, target.T).T
        rows.append(solve / solve.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return calibrate_margin(torch.stack(rows).float(), centred, gap)
