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
from collections.abc import Iterator, Mapping, Sequence

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
    dtype = weights[0].dtype
    shrunk = [shrink_off_diagonal(g.double(), alpha) for g in grams]
    total = sum(shrunk)
    weighted = sum(w.double() @ g for w, g in zip(weights, shrunk, strict=True))
    # W total = weighted  <=>  total^T W^T = weighted^T (total is symmetric)
    merged = torch.linalg.solve(total, weighted.T).T
    return merged.to(dtype)


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
