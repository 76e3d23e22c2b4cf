"""Held-out losses and task-vector statistics of a zoo's models, for its manifest and the quality benchmark.

The SmolLM2 experts differ from the base only in the upper layers, so `heldout_loss_table` runs the lower
layers once per domain (in the base) and only the upper layers per expert.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from expertmerge_zoos.training import causal_lm_labels


def token_nll_sum(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, start: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed next-token NLL (nats) over real targets, and their count; with `start` [B], only the tokens
    at positions >= start[row] count (the prefix before them is context only)."""
    targets = causal_lm_labels(ids, mask)[:, 1:]
    if start is not None:
        position = torch.arange(1, ids.shape[1], device=ids.device)
        targets = targets.masked_fill(position[None, :] < start[:, None], -100)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return float(nll), int((targets != -100).sum())


@contextlib.contextmanager
def _only_layers(model: Any, start: int) -> Iterator[None]:
    """Run `model` from decoder layer `start` on: its input is then passed as `inputs_embeds`."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = inner.layers
    inner.layers = torch.nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        inner.layers = layers


def shares_lower_layers(model: Any, base: Any, start: int) -> bool:
    """Whether every tensor of `model` outside decoder layers >= `start` (and the final norm / head) is the base's."""
    base_params = dict(base.named_parameters())
    for name, parameter in model.named_parameters():
        match = re.search(r"layers\.(\d+)\.", name)
        if match and int(match.group(1)) >= start:
            continue
        if "layers." not in name and not name.startswith(("model.embed_tokens", "embed_tokens")):
            continue  # final norm, lm_head: run in the upper part anyway
        if name not in base_params or not torch.equal(parameter, base_params[name]):
            return False
    return True


@torch.no_grad()
def heldout_loss_table(
    base: Any,
    load_model: Callable[[str], Any],
    model_names: Sequence[str],
    encoded: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    shared_layers: int,
    batch_size: int = 8,
    score_from: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean held-out next-token loss (nats/token) of the base and each named model on each domain.

    `score_from[domain]` ([rows], optional): score each text only from that token position on.

    The base runs in full once per domain and keeps the input of layer `shared_layers`; a model whose lower
    layers are the base's runs only from there on (a model that is not runs in full).
    """
    table: dict[str, dict[str, float]] = {domain: {} for domain in encoded}
    boundary: dict[str, list[torch.Tensor]] = {}
    captured: list[torch.Tensor] = []
    layers = (base.get_decoder() if hasattr(base, "get_decoder") else base.model).layers
    use_boundary = 0 < shared_layers < len(layers)
    hook = (
        layers[shared_layers].register_forward_pre_hook(
            lambda module, args, kwargs: captured.append(
                (args[0] if args else kwargs["hidden_states"]).detach().clone()
            ),
            with_kwargs=True,
        )
        if use_boundary
        else None
    )
    try:
        for domain, (ids, mask) in encoded.items():
            total, count = 0.0, 0
            boundary[domain] = []
            for start in range(0, len(ids), batch_size):
                used = int(mask[start : start + batch_size].sum(1).max())
                b_ids, b_mask = (
                    ids[start : start + batch_size, :used],
                    mask[start : start + batch_size, :used],
                )
                logits = base(input_ids=b_ids, attention_mask=b_mask, use_cache=False).logits
                starts = None if score_from is None else score_from[domain][start : start + batch_size]
                nll, n = token_nll_sum(logits, b_ids, b_mask, starts)
                total, count = total + nll, count + n
                if use_boundary:
                    boundary[domain].append(captured.pop())
            table[domain]["base"] = total / count
    finally:
        if hook is not None:
            hook.remove()
    for name in model_names:
        model = load_model(name)
        from_boundary = use_boundary and shares_lower_layers(model, base, shared_layers)
        for domain, (ids, mask) in encoded.items():
            total, count = 0.0, 0
            for batch_index, start in enumerate(range(0, len(ids), batch_size)):
                used = int(mask[start : start + batch_size].sum(1).max())
                b_ids, b_mask = (
                    ids[start : start + batch_size, :used],
                    mask[start : start + batch_size, :used],
                )
                if from_boundary:
                    with _only_layers(model, shared_layers):
                        logits = model(
                            inputs_embeds=boundary[domain][batch_index],
                            attention_mask=b_mask,
                            use_cache=False,
                        ).logits
                else:
                    logits = model(input_ids=b_ids, attention_mask=b_mask, use_cache=False).logits
                starts = None if score_from is None else score_from[domain][start : start + batch_size]
                nll, n = token_nll_sum(logits, b_ids, b_mask, starts)
                total, count = total + nll, count + n
            table[domain][name] = total / count
        del model
    return table


@torch.no_grad()
def task_vector_stats(base: Any, experts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Relative norms ||tau_k|| / ||theta_0|| over the fine-tuned tensors, and pairwise cosines of the tau_k."""
    base_params = dict(base.named_parameters())
    names = sorted(next(iter(experts.values())))
    base_norm = torch.sqrt(sum((base_params[n].double() ** 2).sum() for n in names))
    flat = {
        task: torch.cat([(tensors[n].double() - base_params[n].double()).flatten() for n in names])
        for task, tensors in experts.items()
    }
    tasks = list(flat)
    return {
        "relative_norm": {task: float(v.norm() / base_norm) for task, v in flat.items()},
        "cosine": {
            f"{a}|{b}": float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0))
            for i, a in enumerate(tasks)
            for b in tasks[i + 1 :]
        },
    }
