"""`--trainer.strategy fsdp` for the learned merge: Lightning's DDP processes without the DDP wrapper.

The merge shards its own frozen tensors by decoder layer (`expertmerge.fit.sharding`) and averages the
replicated coefficients' gradients itself, so the strategy only launches the ranks and gives the collectives
(gloo on CPU, NCCL on GPU). Lightning's own `fsdp` (FSDP1) refuses the CPU and `ModelParallelStrategy` expects
the module to shard everything, coefficients included.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.strategies import DDPStrategy
from torch import nn


class LayerShardedStrategy(DDPStrategy):
    """DDP's processes and collectives, no DDP wrapper: the merge shards its frozen tensors itself
    (`ShardedMerge`) and averages the coefficients' gradients (`all_reduce_gradients`)."""

    strategy_name = "fsdp"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return model

    def _register_ddp_hooks(self) -> None:
        pass  # no DDP wrapper, so no DDP communication hooks


def is_layer_sharded(trainer: Any) -> bool:
    """Whether `trainer` (or None: no Trainer) runs the layer-sharded strategy."""
    return trainer is not None and isinstance(getattr(trainer, "strategy", None), LayerShardedStrategy)
