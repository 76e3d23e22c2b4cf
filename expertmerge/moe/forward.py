"""The dense backbone run with one expert's FFN swapped in: what the routers of a fused MoE see under oracle
routing (each token through its own expert's FFN), for mergekit-moe's fitted routers and Symphony-MoE's."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from expertmerge.moe.formats import split_dense_names
from expertmerge.pool import ExpertPool


def expert_ffn(pool: ExpertPool, expert: str) -> dict[str, torch.Tensor]:
    """Every FFN tensor (gate/up/down of every layer) of one expert of `pool` (as the pool reads it), fp32."""
    layout = split_dense_names(pool.tensor_names)
    names = [name for projections in layout.ffn.values() for name in projections.values()]
    return {name: pool.expert_tensor(expert, name, torch.float32) for name in names}


def moe_forward(model: Any, ffns: Sequence[Mapping[str, torch.Tensor]], pool: ExpertPool) -> Callable:
    """`forward(e, ids, mask)` running the dense backbone `model` with expert e's FFN (router statistics)."""
    keys = {key: param for param, key in pool.parameter_keys(model).items()}

    def forward(expert: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        swapped = {keys[name]: tensor for name, tensor in ffns[expert].items()}
        return torch.func.functional_call(
            model,
            swapped,
            args=(),
            kwargs={"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False},
            strict=False,
        )

    return forward
