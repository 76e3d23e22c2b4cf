"""Router initialisation for the fused MoE: pure functions from calibration statistics to gate matrices.

A router of layer l computes logits `x @ W_l.T` on the state `x` after layer l's post-attention norm; there is no
bias. All initialisers return `[layers, experts, hidden]` (row e of layer l: expert e's gate row). No I/O and no
model here: the statistics come from `expertmerge.moe.router_inputs`.

- `hidden`, as the fit builds it (`router_from_discriminant`): from each expert's mean router input (uncentred,
  exactly what the exported router sees, measured on the merged dense model with that expert's FFN) and the
  pooled within-expert covariance, the rows that give every expert's mean input its own expert by exactly
  `ROUTER_GAP` logits over each other expert, with the least within-expert variance of the logits
  (`margin_rows`: a linear discriminant without bias). `router_from_hidden` is the plain variant: each task's
  mean, normalised to norm `scale`; a token goes to the experts whose mean it points at most.
- `cheap_embed` (`router_from_embeddings`): each task's mean token embedding (`mean_token_embeddings`), the same
  for every layer, normalised; no forward pass at all.
- `random` (`router_random`): seeded Gaussian rows, normalised.

`center=True` (plain variants) subtracts the mean over tasks before normalising. Softmax and top-k ignore anything
added to every row alike, so centering keeps the ranking of experts for a token and only sharpens it: the rows'
common part (large in LLM hidden states) no longer takes up their unit norm.

Rows of two experts that point the same way cannot be told apart by the router: `hidden` and `cheap_embed` warn
(`DegenerateRouterWarning`) when the cosine of two tasks' (uncentred) means exceeds `threshold` in some layer.
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
    """Append a row for a generalist expert (e.g. the base FFN) that has no calibration data of its own.

    Its row is the mean of the experts' rows, so on every input its logit is the mean of the experts' logits:
    never the first choice on an input that clearly prefers one expert, ahead of the experts that input does not
    want. For the discriminant's rows (which sum to zero) that row is zero: on expert k's mean input the
    generalist's logit 0 sits `gap (K-1)/K` below expert k's and `gap/K` above every other expert's, so with
    top-2 routing the generalist is the second choice there. (A task with `expert: base` gives the generalist
    real data instead: it is then one more class of the discriminant.)
    """
    _check_rows(rows)
    return torch.cat([rows, rows.mean(1, keepdim=True)], dim=1)


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


def own_expert_margins(rows: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Per layer, how far each class mean prefers its own expert: `[layers, classes, experts]`.

    `rows`: `[layers, experts, hidden]`; `means`: `[classes, layers, hidden]`, class c's own expert being expert c
    (the first `classes` experts; a generalist row after them counts as one of the others). Entry `[l, c, e]` is
    the logit of expert c minus that of expert e on mean c, exactly as the exported router computes it (no
    centring, no bias); the diagonal is 0.
    """
    _check_rows(rows)
    classes = means.shape[0]
    logits = torch.einsum("clh,leh->lce", means.to(rows.dtype), rows)  # [layers, classes, experts]
    own = logits[:, torch.arange(classes), torch.arange(classes)]
    return own[:, :, None] - logits


@torch.no_grad()
def margin_rows(
    means: torch.Tensor, metric: torch.Tensor, gap: float = ROUTER_GAP
) -> tuple[torch.Tensor, float]:
    """One layer's discriminant rows: least within-class logit variance, margin `gap` on the uncentred means.

    `means`: `[experts, hidden]`, row k the mean router input of expert k's tokens, as the exported router sees
    it; `metric`: `[hidden, hidden]` (or `[hidden]`, a diagonal) positive definite, the regularised pooled
    within-expert covariance A. The router has no bias, so the rows W must satisfy on the means themselves

        (W mu_k)_k - (W mu_k)_e = gap   for every expert e != k,

    and among all such W we take the one whose logits vary least within the experts' token clouds,
    `min sum_e w_e^T A w_e`. A part common to all rows only shifts every logit of a token alike (softmax and
    top-k ignore it) and costs variance, so the optimum has `sum_e w_e = 0`; the constraints then read
    `W M^T = gap * C` with `C = I - 11^T / K` (own logit `gap (K-1)/K`, every other `-gap/K`), and the least-A-norm
    solution row by row is

        W = gap * C (M A^-1 M^T)^-1 M A^-1,

    rows in the span of the whitened means A^-1 mu_k (Fisher's discriminant directions). A mean that is a linear
    combination of the others (e.g. two parallel means, or a zero mean) cannot get its margin from a bias-free
    router: the pseudo-inverse then gives the least-squares compromise, and the returned residual (the largest
    absolute error of the margins, in logits) says how far it is off; 0 up to rounding otherwise.
    """
    means = means.double()
    experts = means.shape[0]
    if metric.dim() == 1:
        whitened = means / metric.double()  # M A^-1
    else:
        whitened = torch.linalg.solve(metric.double(), means.T).T
    gram = means @ whitened.T  # M A^-1 M^T, [K, K], symmetric positive semi-definite
    centring = torch.eye(experts, dtype=torch.float64) - 1.0 / experts
    inverse = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10)
    rows = gap * centring @ inverse @ whitened
    residual = float((rows @ means.T - gap * centring).abs().max()) if experts > 1 else 0.0
    return rows, residual


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
    """`hidden` init of the fit: per layer, `margin_rows` of the experts' mean router inputs.

    `means`: per-expert mean router inputs `[experts, layers, hidden]` (uncentred: what the router sees);
    `within`: the pooled within-expert scatter `[layers, hidden, hidden]`, or `[layers, hidden]` (variances only,
    for wide models). The metric is `A = S + shrinkage * mean variance * I` (a ridge, so that directions the
    calibration tokens never vary along do not get infinite weight). Each expert's mean input then prefers its
    own expert over every other one by exactly `gap` logits, with the exported router's bias-free logits `W x`,
    and the rows are those of least within-expert logit variance (see `margin_rows`), so the margin is large
    relative to how much the tokens of one expert spread. Rows of one layer sum to zero. Warns when two experts'
    uncentred means are nearly parallel (see module docs), and when some layer cannot reach the margin (means
    linearly dependent).
    """
    if means.dim() != 3:
        raise ExpertMergeError(f"means must be [experts, layers, hidden], got {list(means.shape)}.")
    experts, layers, hidden = means.shape
    if within.shape not in ((layers, hidden, hidden), (layers, hidden)):
        raise ExpertMergeError(
            f"within must be [layers={layers}, hidden={hidden}(, hidden)], got {list(within.shape)}."
        )
    if not (torch.isfinite(means).all() and torch.isfinite(within).all()):
        raise ExpertMergeError("Router statistics hold NaN or Inf.")
    warn_if_degenerate(means.float().transpose(0, 1), threshold, names)
    rows, worst = [], (0.0, 0)
    for layer in range(layers):
        scatter = within[layer].double()
        variance = scatter if scatter.dim() == 1 else scatter.diagonal()
        ridge = shrinkage * variance.mean().clamp_min(1e-12)
        metric = scatter + ridge if scatter.dim() == 1 else scatter + ridge * torch.eye(hidden).double()
        layer_rows, residual = margin_rows(means[:, layer], metric, gap)
        rows.append(layer_rows)
        worst = max(worst, (residual, layer))
    if worst[0] > 1e-3 * gap:
        warnings.warn(
            f"Router layer {worst[1]}: the experts' mean inputs are linearly dependent, so no bias-free router "
            f"gives each its own expert by {gap:g} logits (off by up to {worst[0]:.3g}); router tuning can help.",
            DegenerateRouterWarning,
            stacklevel=2,
        )
    return torch.stack(rows).float()
