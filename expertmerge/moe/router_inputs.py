"""What the fused MoE's routers see, measured on calibration data, and the initial router rows made from it.

A router of layer l reads the input of layer l's FFN block (`layers.l.mlp`, GraniteMoE's `block_sparse_moe`): the
output of the post-attention norm in most families, the residual stream itself in OLMo2 / FlexOlmo (post-norm
layers). `router_input_statistics` is the one place that collects it: forward pre-hooks on those blocks, one pass
over each group's batches (a group is a task, or
all tasks of one expert), padding excluded, sums kept in fp64. `initial_router_rows` turns a method name
(`hidden`, `cheap_embed`, `random`) and per-expert calibration batches into `[layers, experts, hidden]` rows
with the pure maths of `expertmerge.moe.router`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.io.model_config import layer_count, text_config
from expertmerge.moe.router import (
    ROUTER_METHODS,
    pooled_within_scatter,
    router_from_discriminant,
    router_from_embeddings,
    router_random,
)

Batch = tuple[torch.Tensor, torch.Tensor | None]  # (input_ids [B, S], attention_mask [B, S] or None)
# Runs the model for one group's batch (e.g. with that expert's FFN); the hooks capture what its routers see.
GroupForward = Callable[[Any, torch.Tensor, torch.Tensor], object]

FULL_COVARIANCE_MAX_HIDDEN = 2048  # above this, a [layers, hidden, hidden] fp64 scatter costs gigabytes

_FFN_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)$")


def token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The boolean mask of real (non-padding) tokens, `[batch, sequence]`; all True without a mask."""
    if input_ids.dim() != 2:
        raise ExpertMergeError(f"input_ids must be [batch, sequence], got {list(input_ids.shape)}.")
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ExpertMergeError(
            f"attention_mask {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}."
        )
    return attention_mask.to(input_ids.device) != 0


def split_batches(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int = 8
) -> list[Batch]:
    """Rows of a tokenised split in batches of `batch_size` (the last may be short)."""
    return [
        (
            input_ids[i : i + batch_size],
            None if attention_mask is None else attention_mask[i : i + batch_size],
        )
        for i in range(0, input_ids.shape[0], batch_size)
    ]


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
            mask = token_mask(input_ids, attention_mask).cpu()
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
    """Each decoder layer's FFN block, dense or MoE (whose input is what the layer's router sees), in layer order."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        match = _FFN_BLOCK.search(name)
        if match:
            found[int(match.group(1))] = module
    if not found:
        raise ExpertMergeError(
            f"{type(model).__name__} has no 'layers.N.mlp' (or 'layers.N.block_sparse_moe') modules; cannot collect "
            "router inputs."
        )
    if sorted(found) != list(range(len(found))):
        raise ExpertMergeError(f"FFN blocks are not numbered 0..N-1: {sorted(found)}.")
    return [found[layer] for layer in range(len(found))]


@dataclass(frozen=True)
class RouterInputs:
    """Sums of the router inputs per group (in the order given), over non-padding tokens, in fp64.

    `sums`: `[groups, layers, hidden]`; `products`: sums of `x x^T` `[groups, layers, hidden, hidden]`, or of
    `x * x` `[groups, layers, hidden]` for models wider than `FULL_COVARIANCE_MAX_HIDDEN`, or None when not asked
    for; `counts`: tokens per group.
    """

    groups: list[Hashable]
    sums: torch.Tensor
    counts: list[int]
    products: torch.Tensor | None = None

    @property
    def means(self) -> torch.Tensor:
        """Per group and layer, the mean router input `[groups, layers, hidden]` (fp64)."""
        return self.sums / torch.tensor(self.counts, dtype=torch.float64)[:, None, None]

    def within_scatter(self) -> torch.Tensor:
        """The pooled within-group covariance per layer (see `pooled_within_scatter`)."""
        if self.products is None:
            raise ExpertMergeError("Router inputs were collected without covariance=True.")
        return pooled_within_scatter(self.products, self.counts, self.means)


@torch.no_grad()
def router_input_statistics(
    model: torch.nn.Module,
    batches_per_group: Mapping[Hashable, Sequence[Batch]],
    *,
    forward: GroupForward | None = None,
    covariance: bool = False,
) -> RouterInputs:
    """Per group, the sums of what every layer's router sees over the group's non-padding tokens.

    Hooks the input of every FFN block of `model` (a `transformers` causal LM, dense or MoE) and runs each
    group's batches through `forward(group, input_ids, attention_mask)` (default: `model` itself), in eval mode.
    `forward` may run `model`'s modules with other weights (e.g. `torch.func.functional_call` with a learned
    merge and one expert's FFN): the hooks sit on the modules, so they see that run. Tokens with
    `attention_mask == 0` count nowhere (their states may even be NaN, e.g. rows that are all padding).
    """
    blocks = router_input_modules(model)
    if not batches_per_group:
        raise ExpertMergeError("batches_per_group is empty.")
    device = next(model.parameters()).device
    if forward is None:

        def forward(group: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    captured: list[torch.Tensor | None] = [None] * len(blocks)

    def hook_for(layer: int):
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured[layer] = (args[0] if args else next(iter(kwargs.values()))).detach()

        return hook

    handles = [
        block.register_forward_pre_hook(hook_for(layer), with_kwargs=True)
        for layer, block in enumerate(blocks)
    ]
    was_training = model.training
    model.eval()
    sums, products, counts = [], [], []
    try:
        for group, batches in batches_per_group.items():
            total: torch.Tensor | None = None
            outer: torch.Tensor | None = None
            count = 0
            for input_ids, attention_mask in batches:
                keep = token_mask(input_ids, attention_mask).to(device)
                if not keep.any():
                    continue
                captured[:] = [None] * len(blocks)
                forward(group, input_ids.to(device), keep.long())
                missing = [layer for layer, state in enumerate(captured) if state is None]
                if missing:
                    raise ExpertMergeError(f"Layer {missing[0]}'s FFN block did not run.")
                states = torch.stack([state[keep] for state in captured]).double()  # [layers, tokens, hidden]
                total = states.sum(1) if total is None else total + states.sum(1)
                if covariance:
                    if states.shape[-1] > FULL_COVARIANCE_MAX_HIDDEN:
                        squares = (states * states).sum(1)  # [layers, hidden]: variances only
                    else:
                        squares = states.transpose(1, 2) @ states
                    outer = squares if outer is None else outer + squares
                count += int(keep.sum())
            if total is None:
                raise ExpertMergeError(f"Group '{group}' has no non-padding tokens.")
            sums.append(total.cpu())
            products.append(None if outer is None else outer.cpu())
            counts.append(count)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return RouterInputs(
        groups=list(batches_per_group),
        sums=torch.stack(sums),
        counts=counts,
        products=torch.stack(products) if covariance else None,
    )


@torch.no_grad()
def initial_router_rows(
    method: str,
    model: torch.nn.Module,
    tasks_per_expert: Sequence[Mapping[str, Sequence[Batch]]],
    *,
    forward: GroupForward | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """`[layers, experts, hidden]` router rows of the fused MoE, by `method` (one of `ROUTER_METHODS`).

    `tasks_per_expert[e]`: expert e's calibration batches, per task. `hidden` runs each expert's batches through
    `forward(e, input_ids, attention_mask)` (the shared backbone with expert e's FFN; default `model`), pools its
    tasks' tokens and builds the bias-free discriminant whose rows give each expert's mean input (uncentred) its
    own expert by `ROUTER_GAP` logits (`router_from_discriminant`);
    `cheap_embed` averages the task means of `model`'s input embeddings (centred rows); `random` is seeded.
    """
    if method not in ROUTER_METHODS:
        raise ExpertMergeError(f"Router method '{method}' is not one of {', '.join(ROUTER_METHODS)}.")
    if not tasks_per_expert or any(not tasks for tasks in tasks_per_expert):
        raise ExpertMergeError("Every expert needs calibration batches of at least one task.")
    config = model.config
    layers, hidden = layer_count(config), int(text_config(config).hidden_size)
    experts = len(tasks_per_expert)
    if method == "random":
        return router_random(experts, layers, hidden, seed=seed)
    if method == "cheap_embed":
        embedding = model.get_input_embeddings().weight
        per_expert = torch.stack(
            [mean_token_embeddings(embedding, tasks).mean(0) for tasks in tasks_per_expert]
        )
        return router_from_embeddings(per_expert, layers, center=True, names=names)
    pooled = {
        e: [batch for batches in tasks.values() for batch in batches]
        for e, tasks in enumerate(tasks_per_expert)
    }
    inputs = router_input_statistics(model, pooled, forward=forward, covariance=True)
    return router_from_discriminant(inputs.means, inputs.within_scatter(), names=names)
