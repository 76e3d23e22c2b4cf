"""Test helper: force every MoE layer of a loaded `transformers` MoE to route to one expert (oracle routing).

The proof of a fused-MoE export: with routing forced to expert k it reproduces expert k's dense logits where the
shared tensors equal that expert's (see `expertmerge.moe.formats` on why the forcing is exact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from expertmerge.errors import ExpertMergeError


def router_of(module: torch.nn.Module) -> torch.nn.Module | None:
    """The router of a sparse MoE block (`gate`; GraniteMoE: `router`) with its `[E, hidden]` weight, or None."""
    for name in ("gate", "router"):
        router = getattr(module, name, None)
        weight = getattr(router, "weight", None)
        if isinstance(router, torch.nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return router
    return None


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks of a loaded model, in layer order: modules with a router next to `experts`."""
    blocks = [module for module in model.modules() if hasattr(module, "experts") and router_of(module)]
    if not blocks:
        raise ExpertMergeError(
            f"{type(model).__name__} has no sparse MoE blocks (a 'gate' or 'router' next to 'experts')."
        )
    return blocks


@contextlib.contextmanager
def forced_routing(model: torch.nn.Module, expert: int, logit: float = 1e4) -> Iterator[torch.nn.Module]:
    """Route every token of every MoE layer to routed expert `expert` (oracle routing), inside the `with` block.

    Each router is given a fixed probe input (first coordinate 1, the rest 0) and rows that give `expert` the logit
    `logit` and every other expert 0, so the format's own softmax / top-k / renormalisation yields weight exactly 1
    for `expert` and exactly 0 for any other selected expert (fp32 `exp(-1e4)` is 0). The experts still see the
    real hidden states. Router weights are restored on exit, also on error.
    """
    blocks = moe_blocks(model)
    saved: list[tuple[torch.nn.Module, torch.Tensor]] = []
    handles = []

    def probe(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]
        replaced = torch.zeros_like(hidden)
        replaced[..., 0] = 1
        return (replaced, *args[1:]), kwargs

    try:
        for block in blocks:
            gate = router_of(block)
            assert gate is not None
            num_experts = gate.weight.shape[0]
            if not 0 <= expert < num_experts:
                raise ExpertMergeError(
                    f"Expert index {expert} is out of range; the MoE has {num_experts} routed experts."
                )
            forced = torch.zeros_like(gate.weight)
            forced[expert, 0] = logit
            saved.append((gate, gate.weight.data))
            gate.weight.data = forced
            handles.append(gate.register_forward_pre_hook(probe, with_kwargs=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for gate, weight in saved:
            gate.weight.data = weight
