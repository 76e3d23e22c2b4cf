"""Router initialisation for the fused MoE: pure functions from calibration statistics to gate matrices.

A router of layer l computes logits `x @ W_l.T` on the state `x` after layer l's post-attention norm. All
initialisers return `[layers, experts, hidden]` (row e of layer l: expert e's gate row), rows of norm `scale`:

- `hidden` (`router_from_hidden`): each task's mean of exactly that state (`collect_router_inputs`, run on the
  merged dense model with the shared tensors the MoE will have), normalised. A token is sent to the experts whose
  task mean it points at most.
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

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from expertmerge.errors import ExpertMergeError

ROUTER_METHODS = ("hidden", "cheap_embed", "random")
DEGENERATE_COSINE = 0.98

Batch = tuple[torch.Tensor, torch.Tensor | None]  # (input_ids [B, S], attention_mask [B, S] or None)

_POST_ATTENTION_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.post_attention_layernorm$")


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


# --------------------------------------------------------------------------------------------- statistics
def _masks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise ExpertMergeError(f"input_ids must be [batch, sequence], got {list(input_ids.shape)}.")
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ExpertMergeError(
            f"attention_mask {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}."
        )
    return attention_mask.to(input_ids.device) != 0


def mean_token_embeddings(
    embedding: torch.Tensor, batches_per_task: Mapping[str, Sequence[Batch]]
) -> torch.Tensor:
    """Per task (in mapping order), the mean of `embedding[token]` over its non-padding tokens: `[tasks, hidden]`."""
    weight = embedding.detach()
    means = []
    for task, batches in batches_per_task.items():
        total = torch.zeros(weight.shape[1], dtype=torch.float64)
        count = 0
        for input_ids, attention_mask in batches:
            mask = _masks(input_ids, attention_mask).cpu()
            tokens = input_ids.cpu()[mask]
            total += weight[tokens.to(weight.device)].double().sum(0).cpu()
            count += int(tokens.numel())
        if count == 0:
            raise ExpertMergeError(f"Task '{task}' has no non-padding tokens.")
        means.append((total / count).float())
    if not means:
        raise ExpertMergeError("batches_per_task is empty.")
    return torch.stack(means)


def router_input_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's post-attention norm (whose output is what the layer's router sees), in layer order."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        match = _POST_ATTENTION_NORM.search(name)
        if match:
            found[int(match.group(1))] = module
    if not found:
        raise ExpertMergeError(
            f"{type(model).__name__} has no 'layers.N.post_attention_layernorm' modules; cannot collect router inputs."
        )
    if sorted(found) != list(range(len(found))):
        raise ExpertMergeError(f"post_attention_layernorm layers are not numbered 0..N-1: {sorted(found)}.")
    return [found[layer] for layer in range(len(found))]


def collect_router_inputs(
    model: torch.nn.Module, batches_per_task: Mapping[str, Sequence[Batch]]
) -> torch.Tensor:
    """Per task and layer, the mean router input over non-padding tokens: `[tasks, layers, hidden]` (fp32).

    Runs `model` (a `transformers` causal LM, dense or MoE) over each task's batches with forward hooks on every
    layer's `post_attention_layernorm`; tokens where `attention_mask == 0` count nowhere (their states may even be
    NaN, e.g. rows that are all padding). Tasks come in mapping order. Means are over tokens, not batches.
    """
    norms = router_input_modules(model)
    if not batches_per_task:
        raise ExpertMergeError("batches_per_task is empty.")
    device = next(model.parameters()).device
    captured: list[torch.Tensor | None] = [None] * len(norms)

    def hook_for(layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [norm.register_forward_hook(hook_for(layer)) for layer, norm in enumerate(norms)]
    was_training = model.training
    model.eval()
    means = []
    try:
        with torch.no_grad():
            for task, batches in batches_per_task.items():
                total: torch.Tensor | None = None
                count = 0
                for input_ids, attention_mask in batches:
                    mask = _masks(input_ids, attention_mask).to(device)
                    if not mask.any():
                        continue
                    model(
                        input_ids=input_ids.to(device),
                        attention_mask=mask.long(),
                        use_cache=False,
                    )
                    per_layer = []
                    for layer, state in enumerate(captured):
                        if state is None:
                            raise ExpertMergeError(f"Layer {layer}'s post_attention_layernorm did not run.")
                        state = state.to(torch.float64)
                        per_layer.append(torch.where(mask[..., None], state, 0.0).sum((0, 1)))
                    batch_sum = torch.stack(per_layer)
                    total = batch_sum if total is None else total + batch_sum
                    count += int(mask.sum())
                    captured[:] = [None] * len(norms)
                if total is None:
                    raise ExpertMergeError(f"Task '{task}' has no non-padding tokens.")
                means.append((total / count).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.stack(means)
