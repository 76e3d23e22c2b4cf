"""RegMean (Jin et al., ICLR 2023): a closed-form merge of linear layers from their input Gram matrices.

For a linear layer `y = W x` (torch layout: W is [out, in]) and expert k with inputs X_k [n_k, in] on its
calibration texts, the merged W minimises sum_k ||X_k W^T - X_k W_k^T||^2, whose solution is

    W = (sum_k W_k G_k) (sum_k G_k)^-1,     G_k = X_k^T X_k.

RegMean regularises towards the simple average by scaling the off-diagonal entries of every G_k by `alpha`
(alpha = 1: the exact least-squares merge; alpha = 0: a per-input-feature weighted average). Tensors that
are not inputs of a linear layer (embeddings, norms) are averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from expertmerge.errors import ExpertMergeError


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """`gram` with its off-diagonal entries multiplied by `alpha` (the diagonal kept)."""
    diagonal = torch.diag(torch.diagonal(gram))
    return alpha * gram + (1.0 - alpha) * diagonal


def regmean_weight(
    weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9
) -> torch.Tensor:
    """The RegMean merge of one linear layer's weights [out, in] given each expert's input Gram [in, in]."""
    if len(weights) != len(grams) or not weights:
        raise ExpertMergeError(
            f"RegMean needs one Gram matrix per weight (got {len(weights)} / {len(grams)})"
        )
    shrunk = [shrink_off_diagonal(g.double(), alpha) for g in grams]
    weighted = sum(w.double() @ g for w, g in zip(weights, shrunk, strict=True))
    return _solve(weighted, sum(shrunk)).to(weights[0].dtype)


def _solve(weighted: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """W with `W total = weighted` (fp64): `sum_k W_k G_k` over `sum_k G_k`, G_k already shrunk."""
    # W total = weighted  <=>  total^T W^T = weighted^T (total is symmetric)
    return torch.linalg.solve(total, weighted.double().T).T


@contextlib.contextmanager
def record_grams(
    model: nn.Module, names: Sequence[str], mask: list[torch.Tensor]
) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward pass of `model` adds X^T X of the named linear modules' inputs (rows
    where `mask[0]` is 1, i.e. real tokens; the caller sets `mask[0]` before each batch) to the yielded dict."""
    modules = dict(model.named_modules())
    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            x = x.reshape(-1, x.shape[-1])[mask[0].reshape(-1).bool()]
            gram = x.T @ x
            grams[name] = grams[name] + gram if name in grams else gram

        return hook

    for name in names:
        if not isinstance(modules.get(name), nn.Linear):
            raise ExpertMergeError(f"RegMean: '{name}' is not a linear layer of the model")
        hooks.append(modules[name].register_forward_pre_hook(hook_for(name)))
    try:
        yield grams
    finally:
        for handle in hooks:
            handle.remove()


@torch.no_grad()
def input_grams(
    model: nn.Module, names: Sequence[str], ids: torch.Tensor, attention: torch.Tensor, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Input Gram matrices of the named linear layers of `model` over right-padded (ids, attention)."""
    current: list[torch.Tensor] = [attention]
    with record_grams(model, names, current) as grams:
        for start in range(0, len(ids), batch_size):
            rows = slice(start, start + batch_size)
            used = int(attention[rows].sum(1).max())
            current[0] = attention[rows, :used]
            model(input_ids=ids[rows, :used], attention_mask=attention[rows, :used], use_cache=False)
    return grams


def linear_weight_names(model: nn.Module, include: str = "layers.") -> list[str]:
    """Names of the linear modules whose weights RegMean merges (the decoder layers'; the tied LM head is
    the embedding, which is averaged)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and include in n]


def regmean_state_dict(
    states: Sequence[Mapping[str, torch.Tensor]],
    grams: Sequence[Mapping[str, torch.Tensor]],
    alpha: float = 0.9,
) -> dict[str, torch.Tensor]:
    """Merged tensors: `<module>.weight` of every module with Gram matrices by RegMean, the rest averaged."""
    merged: dict[str, torch.Tensor] = {}
    linear = set(grams[0])
    for name in states[0]:
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in linear:
            merged[name] = regmean_weight([s[name] for s in states], [g[module] for g in grams], alpha)
        else:
            merged[name] = sum(s[name].double() for s in states).div(len(states)).to(states[0][name].dtype)
    return merged


def regmean_start_offsets(
    base: nn.Module,
    experts: Sequence[Callable[[], nn.Module]],
    samples: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    names: Sequence[str],
    alpha: float = 0.9,
    batch_size: int = 8,
    on_expert: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """What a RegMean start adds to the base, per learned linear weight, in units of the start value.

    For linear weight p with base W0, experts' weights W_k = W0 + tau_k and their RegMean merge W_R (each
    expert's input Grams on its own calibration texts), returns `R = N (W_R - W0) - sum_k tau_k`. A fit whose
    base tensor is `W0 + lam * R` and whose coefficients all equal `lam` then starts at
    `W0 + N lam (W_R - W0)`: RegMean's merge scaled like task arithmetic (plain RegMean at lam = 1/N; R = 0
    where RegMean equals the average).

    `experts[k]()` loads expert k (one at a time; each is dropped before the next); `samples[k]` is its list of
    right-padded (input_ids, attention_mask) sets. `names` are module names (`<name>.weight` is the tensor).
    Memory: one fp64 [in, in] sum and one fp32 [out, in] sum per name, never N of them.
    """
    if len(experts) != len(samples) or not experts:
        raise ExpertMergeError("RegMean start: one calibration set per expert is needed")
    modules = dict(base.named_modules())
    numerators: dict[str, torch.Tensor] = {}
    denominators: dict[str, torch.Tensor] = {}
    tau_sums: dict[str, torch.Tensor] = {}
    for load, sets in zip(experts, samples, strict=True):
        model = load()
        grams: dict[str, torch.Tensor] = {}
        for ids, attention in sets:
            for name, gram in input_grams(model, names, ids, attention, batch_size).items():
                grams[name] = grams[name] + gram if name in grams else gram
        for name in names:
            weight = model.get_submodule(name).weight.detach().float()
            base_weight = modules[name].weight.detach().float().to(weight.device)
            gram = shrink_off_diagonal(grams.pop(name), alpha)
            numerators[name] = numerators.get(name, 0) + (weight.double() @ gram).float()
            denominators[name] = denominators.get(name, 0) + gram
            tau_sums[name] = tau_sums.get(name, 0) + (weight - base_weight)
        del model, grams
        if on_expert is not None:
            on_expert()
    count = len(experts)
    offsets = {}
    for name in names:
        base_weight = modules[name].weight.detach().float()
        try:
            merged = _solve(numerators.pop(name), denominators.pop(name)).float()
        except torch.linalg.LinAlgError:
            merged = None
        if merged is None or not bool(torch.isfinite(merged).all()):
            raise ExpertMergeError(
                f"RegMean start: the input Gram of '{name}' is singular on the calibration texts (an input "
                "feature no calibration token uses); give more or more varied calibration texts, or drop regmean "
                "from model.start_merges."
            )
        offsets[f"{name}.weight"] = count * (merged.to(base_weight.device) - base_weight) - tau_sums.pop(
            name
        ).to(base_weight.device)
    return offsets
