"""One fused-MoE tensor plan for every writer of a fused MoE (the fit's export, mergekit-moe).

The plan is what the installed `transformers` loads (see `expertmerge.moe.formats`): the dense shared tensors under
their own names; per layer the router `[E, hidden]`, the routed experts' `gate_up_proj` `[E, 2 * I, hidden]`
(expert by expert: its gate, then its up) and `down_proj` `[E, hidden, I]`; for Qwen2-MoE the shared expert and its
gate. Names, shapes, dtypes and the stacking live here; where the values come from (a learned merge or a donor
model, scaled or noised FFNs, routers known now or computed later) is the caller's, given as `MoeSources`. Every
value is computed when the writer reaches its tensor. The file holds what `save_pretrained` writes for the family
(`MoePlan.write` through `io/layout.saved_layout`): each layer's fused experts are built when their first expert's
tensor is written and split into one tensor per routed expert, so memory stays near one layer's experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertmerge.io.layout import meta_model, saved_layout
from expertmerge.io.reader import natural_key
from expertmerge.io.support import copy_support_files
from expertmerge.io.writer import PlannedTensor, WrittenWeights, write_safetensors
from expertmerge.moe.formats import DenseLayout, MoeFormat, expected_tensors, moe_layer_names
from expertmerge.pool import ExpertPool

PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class MoeSources:
    """Where a fused MoE's values come from. Each function returns its tensor in the output dtype, except `shared`,
    whose floating tensors the plan casts."""

    shared: Callable[[str], torch.Tensor]  # a dense shared tensor (attention, norms, embeddings, head)
    routed_ffn: Callable[[int, str, str], torch.Tensor]  # (routed expert e, "gate"|"up"|"down", dense name)
    router: Callable[[int], torch.Tensor]  # layer -> its `[E, hidden]` router
    # Qwen2-MoE only: (projection, the base's dense name, shape) -> the shared expert's matrix; layer -> its
    # `[1, hidden]` sigmoid gate.
    shared_ffn: Callable[[str, str, tuple[int, int]], torch.Tensor] | None = None
    shared_expert_gate: Callable[[int], torch.Tensor] | None = None


@dataclass
class MoePlan:
    """A fused MoE's output: its `transformers` config and its tensors in file order, for the one writer."""

    fmt: MoeFormat
    config: Any
    dtype: torch.dtype  # of the floating tensors
    tensors: list[PlannedTensor]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    def mismatch(self, expected: Mapping[str, tuple[int, ...]] | None = None) -> LayoutMismatch | None:
        """How the plan differs from what the installed `transformers` builds for `config` (`expected`, if the
        caller has it already), or None."""
        expected = expected_tensors(self.config) if expected is None else expected
        planned = {tensor.name: tensor.shape for tensor in self.tensors}
        found = LayoutMismatch(
            unexpected=sorted(set(planned) - set(expected), key=natural_key),
            lacking=sorted(set(expected) - set(planned), key=natural_key),
            wrong=[
                (n, planned[n], expected[n])
                for n in planned
                if n in expected and tuple(expected[n]) != tuple(planned[n])
            ],
        )
        return found if found.unexpected or found.lacking or found.wrong else None

    def write(self, folder: Path, max_shard: int, support_dir: Path, **callbacks: Any) -> WrittenWeights:
        """Weights, config and the support files (tokenizer, ...) of `support_dir` into `folder`. The weights
        are written as `save_pretrained` writes this family: one tensor per routed expert under the family's
        checkpoint names (the fused 3-D tensors of the plan are split as they are written)."""
        stored = saved_layout(meta_model(self.config), self.tensors)
        written = write_safetensors(folder, stored, max_shard, **callbacks)
        self.config.dtype = self.dtype  # what the weights are: transformers loads converted tensors in it
        self.config.save_pretrained(folder)
        copy_support_files(support_dir, folder)
        return written


@dataclass
class LayoutMismatch:
    """Planned tensors the model does not have, its tensors not planned, and (name, planned, its) shapes."""

    unexpected: list[str]
    lacking: list[str]
    wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __str__(self) -> str:
        return f"unexpected {self.unexpected[:4]}, missing {self.lacking[:4]}, wrong shape {self.wrong[:4]}"


def plan_moe(
    pool: ExpertPool,
    layout: DenseLayout,
    fmt: MoeFormat,
    config: Any,
    sources: MoeSources,
    *,
    dtype: torch.dtype,
    num_routed: int,
    shared_names: Sequence[str],
    shared_width: int | None = None,
    zeros: Mapping[str, tuple[int, ...]] | None = None,
) -> MoePlan:
    """The plan of the MoE of `num_routed` routed experts of `pool`'s `layout` in format `fmt` (its `transformers`
    config: `config`), floating tensors in `dtype`.

    `shared_names`: the dense tensors kept (the caller may leave some out); `zeros`: tensors of the output that the
    dense model lacks, written as zeros (name -> shape); `shared_width`: Qwen2-MoE's shared expert width (default:
    the dense FFN's).
    """
    intermediate, hidden = pool.shape(layout.ffn[0]["gate"])
    width = shared_width or intermediate
    tensors = [_shared(pool, name, dtype, sources.shared) for name in shared_names]
    tensors += [_zeros(name, tuple(shape), dtype) for name, shape in (zeros or {}).items()]
    for layer, projections in layout.ffn.items():
        names = moe_layer_names(fmt, layout.mlp_prefix[layer])
        routed = _routed(projections, num_routed, sources.routed_ffn)
        tensors += [
            PlannedTensor(names.router, (num_routed, hidden), dtype, _call(sources.router, layer)),
            PlannedTensor(names.gate_up, (num_routed, 2 * intermediate, hidden), dtype, routed["gate_up"]),
            PlannedTensor(names.down, (num_routed, hidden, intermediate), dtype, routed["down"]),
        ]
        if fmt.shared_expert:
            assert sources.shared_ffn is not None and sources.shared_expert_gate is not None
            shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
            named = {"gate": names.shared_gate, "up": names.shared_up, "down": names.shared_down}
            for projection in PROJECTIONS:
                shape = shapes[projection]
                produce = _call(sources.shared_ffn, projection, projections[projection], shape)
                tensors.append(PlannedTensor(str(named[projection]), shape, dtype, produce))
            gate = _call(sources.shared_expert_gate, layer)
            tensors.append(PlannedTensor(str(names.shared_expert_gate), (1, hidden), dtype, gate))
    tensors.sort(key=lambda tensor: natural_key(tensor.name))
    return MoePlan(fmt, config, dtype, tensors)


def _call(function: Callable[..., torch.Tensor], *args: Any) -> Callable[[], torch.Tensor]:
    """`function(*args)`, later: when the writer reaches the tensor."""
    return lambda: function(*args)


def _shared(
    pool: ExpertPool, name: str, dtype: torch.dtype, shared: Callable[[str], torch.Tensor]
) -> PlannedTensor:
    stored = pool.stored_dtype(name)

    def produce() -> torch.Tensor:
        tensor = shared(name)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    return PlannedTensor(name, pool.shape(name), dtype if stored.is_floating_point else stored, produce)


def _zeros(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> PlannedTensor:
    return PlannedTensor(name, shape, dtype, lambda: torch.zeros(shape, dtype=dtype))


def _routed(
    projections: Mapping[str, str], count: int, ffn: Callable[[int, str, str], torch.Tensor]
) -> dict[str, Callable[[], Iterator[torch.Tensor]]]:
    """One layer's stacked experts, streamed one expert matrix at a time: gate then up of each expert; down."""

    def gate_up() -> Iterator[torch.Tensor]:
        for expert in range(count):
            yield ffn(expert, "gate", projections["gate"])
            yield ffn(expert, "up", projections["up"])

    def down() -> Iterator[torch.Tensor]:
        for expert in range(count):
            yield ffn(expert, "down", projections["down"])

    return {"gate_up": gate_up, "down": down}
