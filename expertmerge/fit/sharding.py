"""`--trainer.strategy fsdp`: the base and the task vectors of the learned tensors sharded by decoder layer.

FSDP shards parameters, and in the resident fit the task vectors are buffers and the base's learned tensors
live inside the model, outside any forward that FSDP could wrap. So under this strategy they move into a
`ShardedMerge`: one `LayerShard` per decoder layer holding that layer's base tensors (fp32) and task vectors
(`[N, *shape]`, bf16) as frozen parameters, each layer `fully_shard`ed (FSDP2) over all ranks. The merge runs
*inside* each layer's forward: FSDP all-gathers the layer's shards before it, `MergeCoefficients.merged_tensor`
builds the merged tensors from the gathered ones (the very op of the resident fit), and FSDP frees the gathered
copy after it (reshard after forward) and gathers it again before that layer's backward, where the saved task
vectors are read for d loss / d c. A rank therefore holds 1/D of the base and task vectors plus one gathered
layer, and the merged tensors (as in every fit).

The coefficients are not sharded: every rank holds all of them, starts from the same values and applies the
same update, because `all_reduce_gradients` averages their gradients over the ranks before every optimiser step
(what DDP does; the strategy does not wrap the module in DDP). `gather_to_resident` undoes the sharding layer
by layer at the end of the fit, so rank 0 evaluates and exports with the resident code and the one writer.

The Lightning side (`lightning_modules/strategy.py`, `LayerShardedStrategy`) launches the ranks; this file is
the maths and the collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from expertmerge.streaming import layer_groups

Merge = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class LayerShard(nn.Module):
    """One decoder layer's learned tensors: `base[j]` and `tau[j]` (`[N, *shape]`) as frozen parameters."""

    def __init__(
        self, indices: Sequence[int], bases: Sequence[torch.Tensor], taus: Sequence[torch.Tensor]
    ) -> None:
        super().__init__()
        self.indices = list(indices)
        self.base = nn.ParameterList([nn.Parameter(b, requires_grad=False) for b in bases])
        self.tau = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in taus])

    def forward(self, merge: Merge) -> list[torch.Tensor]:
        # Inside the forward the parameters are the gathered full tensors (FSDP's pre-forward all-gather).
        return [merge(i, b, t) for i, b, t in zip(self.indices, self.base, self.tau, strict=True)]


class ShardedMerge(nn.Module):
    """The learned tensors' base and task vectors, sharded by decoder layer; `self(merge)` gives the merged
    tensors by index. Indexing gives a task vector gathered in full (a collective: every rank must ask for the
    same indices in the same order), so the chunk allocation reads it as it reads the resident ones."""

    def __init__(self, layers: Sequence[LayerShard], count: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._count = count
        self._where = {i: (g, j) for g, layer in enumerate(layers) for j, i in enumerate(layer.indices)}

    def forward(self, merge: Merge) -> dict[int, torch.Tensor]:
        merged: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            merged.update(zip(layer.indices, layer(merge), strict=True))
        return merged

    def __len__(self) -> int:
        return self._count

    def _full(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._count:
            raise IndexError(index)
        g, j = self._where[index]
        return self._full(self.layers[g].tau[j].detach())

    def full_layer(self, group: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(index, base, task vectors) of one layer, gathered in full (a collective)."""
        layer = self.layers[group]
        return [
            (i, self._full(b.detach()), self._full(t.detach()))
            for i, b, t in zip(layer.indices, layer.base, layer.tau, strict=True)
        ]


def shard_by_layer(
    names: Sequence[str],
    read: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> ShardedMerge:
    """Build and shard the learned tensors one decoder layer at a time: `read(index) -> (base, tau)` gives
    full tensors, which are dropped as soon as the layer's shards are made, so no rank holds more than one
    full layer at a time."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = []
    for group in layer_groups(names):
        pairs = [read(i) for i in group]
        layer = LayerShard(group, [p[0] for p in pairs], [p[1] for p in pairs])
        del pairs
        fully_shard(layer, mesh=mesh)  # the full tensors are replaced by this rank's shards
        layers.append(layer)
    root = ShardedMerge(layers, len(names))
    fully_shard(root, mesh=mesh)  # one root, so every layer reshards after its forward
    return root


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter `name` of `model` by a frozen `value` (a placeholder, a bf16 copy, a gathered one)."""
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))


def shard_learned(
    names: Sequence[str],
    num_experts: int,
    pool: Any,
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
) -> ShardedMerge:
    """The learned tensors' base and task vectors into a `ShardedMerge`, one decoder layer at a time, read from
    the pool; the model keeps an empty placeholder for each (the merged tensor replaces it in
    `functional_call`)."""
    keys = pool.parameter_keys(model)

    @torch.no_grad()
    def read(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = model.get_parameter(names[index]).detach()
        tau = torch.empty((num_experts, *base.shape), dtype=dtype)
        for k, tau_k in enumerate(pool.iter_task_vectors(keys[names[index]], dtype)):
            tau[k].copy_(tau_k)
        set_parameter(model, names[index], torch.empty(0, dtype=base.dtype))
        return base, tau

    return shard_by_layer(names, read, device)


def sharded_merge(merged: Any, coefficients: Callable[[int], torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The merged tensors under FSDP, built inside each sharded layer's forward from its gathered base and task
    vectors by the resident fit's own ops: the learned coefficients, or `coefficients(index) -> [N, rows]`."""

    def merge(index: int, base: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if coefficients is None:
            return merged.coefficients.merged_tensor(index, base, tau)
        row_c = coefficients(index).to(base.device)
        return base + (tau.float() * row_c.view((*row_c.shape, *([1] * (tau.dim() - 2))))).sum(0)

    tensors = merged.task_vectors(merge)
    return {merged.coefficient_names[index]: tensor for index, tensor in tensors.items()}


@torch.no_grad()
def gather_to_resident(merged: Any, keep: bool) -> None:
    """Undo the sharding one decoder layer at a time (a collective: every rank calls it). The ranks with `keep`
    get the resident form back (base tensors in the model, `TaskVectors`), so evaluation and export run the
    resident code and the one writer; the others drop what they gather."""
    from expertmerge.coefficients import TaskVectors

    sharded = merged.task_vectors
    if not isinstance(sharded, ShardedMerge):
        return
    dtype = sharded.layers[0].tau[0].dtype
    resident = TaskVectors(merged.learned_shapes, len(merged.expert_names), dtype) if keep else None
    for group in range(len(sharded.layers)):
        for index, base, tau in sharded.full_layer(group):
            if resident is not None:
                resident[index].copy_(tau)
                set_parameter(merged.model, merged.coefficient_names[index], base.clone())
    merged.task_vectors = resident.to(merged.device) if resident is not None else None


def all_reduce_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Average the (replicated) coefficients' gradients over the ranks, as DDP would."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is None:  # every rank must join every all-reduce
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad.div_(world)
