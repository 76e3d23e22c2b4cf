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

from expertmerge.alignment import Alignment, CrossMoments, match_heads, match_units, procrustes_rotation
from expertmerge.errors import ExpertMergeError

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [B, S], attention_mask [B, S]
_DOWN = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")
_O_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj$")


@dataclass
class Activations:
    """One batch's activations at real tokens: `residual` `[layers, tokens, hidden]` (each token's state
    scaled to unit norm, so a few huge states do not decide the rotation) and `ffn` `[layers, tokens, inter]`."""

    residual: torch.Tensor
    ffn: torch.Tensor
    heads: torch.Tensor | None = None  # [layers, tokens, heads, hidden]: each head's write to the residual


def _down_projections(model: torch.nn.Module, pattern: re.Pattern = _DOWN) -> list[torch.nn.Module]:
    found = {int(m[1]): module for name, module in model.named_modules() if (m := pattern.search(name))}
    if not found or sorted(found) != list(range(len(found))):
        raise ExpertMergeError(
            f"{type(model).__name__} has no 'layers.N.mlp.down_proj' modules numbered 0..N-1; "
            "only Llama-style FFNs (gate/up/down) can be aligned."
        )
    return [found[layer] for layer in range(len(found))]


@torch.no_grad()
def model_activations(
    model: torch.nn.Module, batches: Sequence[Batch], heads: bool = False
) -> list[Activations]:
    """`Activations` of `model` (eval mode) for every batch, in order (with each head's write if `heads`)."""
    downs = _down_projections(model)
    captured: list[torch.Tensor | None] = [None] * len(downs)
    written: list[torch.Tensor | None] = [None] * len(downs)
    num_heads = int(model.config.num_attention_heads)

    def hook_for(layer: int):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            captured[layer] = args[0].detach()

        return hook

    def head_hook_for(layer: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            per_head = x.reshape(*x.shape[:-1], num_heads, -1)  # [B, S, heads, head_dim]
            weight = module.weight.detach().reshape(module.weight.shape[0], num_heads, -1)
            written[layer] = torch.einsum("bshd,khd->bshk", per_head, weight)

        return hook

    handles = [down.register_forward_pre_hook(hook_for(layer)) for layer, down in enumerate(downs)]
    if heads:
        outs = _down_projections(model, _O_PROJ)
        handles += [o.register_forward_pre_hook(head_hook_for(layer)) for layer, o in enumerate(outs)]
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
            writes = torch.stack([w[keep] for w in written]).float().cpu() if heads else None
            out.append(Activations(states.cpu(), ffn.cpu(), writes))
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
    heads: bool = False,
) -> tuple[Alignment, dict[str, float]]:
    """The `Alignment` of `model` to the reference whose `reference` activations came from `batches`.

    Returns it with a few diagnostics: the mean correlation of FFN units before (identity) and after matching,
    and the mean cosine of the residual states before and after the rotation.
    """
    if not residual and not ffn and not heads:
        return Alignment(), {}
    if heads and reference[0].heads is None:
        raise ExpertMergeError(
            "head alignment needs the reference's head writes (model_activations heads=True)"
        )
    own = model_activations(model, batches, heads=heads)
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
    query, kv = {}, {}
    if heads:
        kv_heads = int(getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads)
        similarity = head_similarity(reference, own, rotation)
        before, after = [], []
        for layer, matrix in enumerate(similarity):
            query[layer], kv[layer] = match_heads(matrix, kv_heads)
            before.append(float(matrix.diagonal().mean()))
            after.append(float(matrix[torch.arange(len(query[layer])), query[layer]].mean()))
        report["head_similarity_before"] = sum(before) / len(before)
        report["head_similarity_after"] = sum(after) / len(after)
    return Alignment(residual=rotation, ffn=perms, heads=query, kv_heads=kv), report


def head_similarity(
    reference: Sequence[Activations], own: Sequence[Activations], rotation: torch.Tensor | None
) -> list[torch.Tensor]:
    """Per layer `[heads, heads]`: the cosine, over all tokens, of reference head i's and (rotated) expert
    head j's writes to the residual stream."""
    layers = reference[0].heads.shape[0]
    result = []
    for layer in range(layers):
        dots, ref_sq, own_sq = 0.0, 0.0, 0.0
        for ref, mine in zip(reference, own, strict=True):
            a = ref.heads[layer].double()  # [tokens, heads, hidden]
            b = mine.heads[layer].double()
            if rotation is not None:
                b = b @ rotation.double().T
            dots = dots + torch.einsum("thk,tgk->hg", a, b)
            ref_sq = ref_sq + (a * a).sum((0, 2))
            own_sq = own_sq + (b * b).sum((0, 2))
        result.append(dots / (ref_sq[:, None] * own_sq[None, :]).sqrt().clamp_min(1e-12))
    return result
