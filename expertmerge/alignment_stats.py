"""The statistics pass of the functional alignment: what each model computes on the same calibration tokens.

The reference runs once and its activations are kept (padding removed, fp32 on the CPU): the residual stream
entering every decoder layer, and every FFN's intermediate activation `act(gate(x)) * up(x)` (the input of
`down_proj`, captured with a forward pre-hook). Each other expert then runs over the same batches, one expert
in memory at a time, and only the paired sums (`CrossMoments`, the residual cross moments) are kept. The maths
that turns them into an `Alignment` is in `expertmerge.alignment`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertmerge.alignment import Alignment, CrossMoments, match_units, procrustes_rotation
from expertmerge.errors import ExpertMergeError

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [B, S], attention_mask [B, S]
_DOWN = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")


@dataclass
class Activations:
    """One batch's activations at real tokens: `residual` `[layers, tokens, hidden]` (each token's state
    scaled to unit norm, so a few huge states do not decide the rotation) and `ffn` `[layers, tokens, inter]`."""

    residual: torch.Tensor
    ffn: torch.Tensor


def _down_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    found = {int(m[1]): module for name, module in model.named_modules() if (m := _DOWN.search(name))}
    if not found or sorted(found) != list(range(len(found))):
        raise ExpertMergeError(
            f"{type(model).__name__} has no 'layers.N.mlp.down_proj' modules numbered 0..N-1; "
            "only Llama-style FFNs (gate/up/down) can be aligned."
        )
    return [found[layer] for layer in range(len(found))]


@torch.no_grad()
def model_activations(model: torch.nn.Module, batches: Sequence[Batch]) -> list[Activations]:
    """`Activations` of `model` (eval mode) for every batch, in order."""
    downs = _down_projections(model)
    captured: list[torch.Tensor | None] = [None] * len(downs)

    def hook_for(layer: int):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            captured[layer] = args[0].detach()

        return hook

    handles = [down.register_forward_pre_hook(hook_for(layer)) for layer, down in enumerate(downs)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for input_ids, attention_mask in batches:
            keep = attention_mask.to(device) != 0
            result = model(
                input_ids=input_ids.to(device),
                attention_mask=keep.long(),
                output_hidden_states=True,
                use_cache=False,
            )
            # hidden_states[l] enters layer l (l < layers); the last one is already normed, so left out.
            states = torch.stack([h[keep] for h in result.hidden_states[: len(downs)]]).float()
            states = torch.nn.functional.normalize(states, dim=-1)
            ffn = torch.stack([c[keep] for c in captured]).float()
            out.append(Activations(states.cpu(), ffn.cpu()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return out


@torch.no_grad()
def alignment_to_reference(
    reference: Sequence[Activations],
    model: torch.nn.Module,
    batches: Sequence[Batch],
    *,
    residual: bool = True,
    ffn: bool = True,
) -> tuple[Alignment, dict[str, float]]:
    """The `Alignment` of `model` to the reference whose `reference` activations came from `batches`.

    Returns it with a few diagnostics: the mean correlation of FFN units before (identity) and after matching,
    and the mean cosine of the residual states before and after the rotation.
    """
    if not residual and not ffn:
        return Alignment(), {}
    own = model_activations(model, batches)
    if len(own) != len(reference):
        raise ExpertMergeError("the reference activations came from other batches")
    layers = reference[0].ffn.shape[0]
    moments = [CrossMoments() for _ in range(layers)]
    cross = torch.zeros(reference[0].residual.shape[-1], own[0].residual.shape[-1], dtype=torch.float64)
    for ref, mine in zip(reference, own, strict=True):
        for layer in range(layers):
            moments[layer].add(ref.ffn[layer], mine.ffn[layer])
        cross += torch.einsum("lth,ltg->hg", ref.residual.double(), mine.residual.double())
    report: dict[str, float] = {}
    rotation = None
    if residual:
        rotation = procrustes_rotation(cross)
        tokens = sum(r.residual.shape[0] * r.residual.shape[1] for r in reference)
        report["residual_cosine_before"] = float(cross.trace()) / tokens
        report["residual_cosine_after"] = float((rotation.double() * cross).sum()) / tokens
    perms = {}
    if ffn:
        before, after = [], []
        for layer in range(layers):
            correlation = moments[layer].correlation()
            perm = match_units(correlation)
            perms[layer] = perm
            before.append(float(correlation.diagonal().mean()))
            after.append(float(correlation[torch.arange(len(perm)), perm].mean()))
        report["ffn_correlation_before"] = sum(before) / layers
        report["ffn_correlation_after"] = sum(after) / layers
    return Alignment(residual=rotation, ffn=perms), report
