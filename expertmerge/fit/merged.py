"""`MergedModel`: the base architecture run on `theta_p = theta0_p + sum_k c[k, p] tau[k, p]`, built per forward.

It holds the frozen base model, the task vectors of the tensors with coefficients (resident, streamed or
sharded by decoder layer), the experts' FFN task vectors in fused-MoE mode, and the coefficients. The merged
tensors are built from them in each forward and the base module is run on them with `functional_call`, so no
merged copy of the model is ever kept. The Lightning module, the FSDP path, Symphony's learned backbone, the
evaluation and the exports all read the merge through this one class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from expertmerge.coefficients import MergeCoefficients, TaskVectors
from expertmerge.fit.sharding import ShardedMerge, sharded_merge
from expertmerge.streaming import StreamedTaskVectors

BASE_EXPERT = "base"  # oracle routing to the base FFN (a task the base teaches)
RowCoefficients = Callable[[int], torch.Tensor]  # tensor index -> [N, rows] coefficients


class MergedModel(nn.Module):
    """The merged model: frozen base + task vectors, learnable coefficients, oracle routing in MoE mode.

    Args:
        model: the base model (its learned tensors are the merge's theta0; the unlearned ones are merged into
            it already, at the start value).
        expert_names: the experts, in the coefficients' order.
        coefficient_names: the tensors with learned coefficients (parameter names of `model`).
        task_vectors: their task vectors, `[N, *shape]` per tensor.
        ffn_names / ffn_vectors: in MoE mode the FFN tensors and their task vectors (each expert's own FFN).
        task_experts: per task the index of the expert that teaches it, None for the base (oracle routing).
        moe: fused-MoE mode (oracle routing of the FFN tensors).
    """

    def __init__(
        self,
        model: nn.Module,
        expert_names: Sequence[str],
        coefficient_names: Sequence[str],
        task_vectors: TaskVectors | StreamedTaskVectors | ShardedMerge,
        ffn_names: Sequence[str] = (),
        ffn_vectors: TaskVectors | None = None,
        task_experts: Mapping[str, int | None] | None = None,
        moe: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.expert_names = list(expert_names)
        self.coefficient_names = list(coefficient_names)
        self.task_vectors = task_vectors
        self.ffn_names = list(ffn_names)
        self.ffn_vectors = (
            ffn_vectors if ffn_vectors is not None else TaskVectors([], len(expert_names), torch.float32)
        )
        self.task_experts = dict(task_experts or {})
        self.moe = moe
        self.coefficients: MergeCoefficients | None = None
        self.start_alpha: float | list[float] = (
            0.3  # the start the coefficients learn from (set by the start)
        )
        self.start_merge = "task_arithmetic"  # the training-free merge that start is
        self.learned_shapes = [model.get_parameter(n).shape for n in self.coefficient_names]
        self.stage = 1  # 2: Expert Merging++'s chunk-wise stage
        self.stage1_values: dict[str, torch.Tensor] | None = None  # layer-wise result, [N] per tensor
        # Stage-1 coefficients per tensor beyond one (`expert_axis`: one per routed expert of a fused tensor).
        self.stage1_chunks: dict[str, int] = {}
        self.chunk_allocation: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        if self.coefficients is not None:
            return self.coefficients.alpha0.device
        return next(iter(self.model.buffers()), next(self.model.parameters())).device

    @property
    def layer_sharded(self) -> bool:
        return isinstance(self.task_vectors, ShardedMerge)

    @property
    def rows(self) -> list[int]:
        """Output rows of each tensor with coefficients."""
        return [shape[0] for shape in self.learned_shapes]

    def start_coefficients(self, alpha: float | list[float]) -> None:
        """Fresh stage-1 coefficients, every one at `alpha` (on the merge's device): one per tensor and expert
        model, or one per routed expert too where `stage1_chunks` says so."""
        device = self.device
        self.coefficients = MergeCoefficients(
            self.coefficient_names,
            self.rows,
            len(self.expert_names),
            alpha0=alpha,
            chunks=self.stage1_chunks or None,
        ).to(device)

    # ------------------------------------------------------------------------------------ the merge
    def merged_parameters(
        self, coefficients: RowCoefficients | None = None, oracle_expert: int | str | None = None
    ) -> dict[str, torch.Tensor]:
        """theta_p = theta0_p + sum_k c[k,p] tau[k,p] for every tensor with coefficients.

        `coefficients(index) -> [N, rows]` overrides the learned ones (e.g. alpha0 for task arithmetic).
        In MoE mode the FFN tensors are expert `oracle_expert`'s own (oracle routing; `"base"`: the base FFN), or
        task arithmetic at alpha0 when no expert is named (the dense view of the same merge).
        """
        assert self.coefficients is not None
        merged = {}
        for index, name in enumerate(self.ffn_names):
            base, tau = self.model.get_parameter(name), self.ffn_vectors[index]
            if oracle_expert == BASE_EXPERT:
                merged[name] = base  # the base FFN, the MoE's generalist expert
            elif oracle_expert is not None:
                merged[name] = base + tau[oracle_expert].float()
            else:
                alpha = self.coefficients.alpha0.to(base.device).view(-1, *([1] * (tau.dim() - 1)))
                merged[name] = base + (tau.float() * alpha).sum(0)
        if self.layer_sharded:
            merged.update(sharded_merge(self, coefficients))
            return merged
        for index, name in enumerate(self.coefficient_names):
            base = self.model.get_parameter(name)
            if coefficients is None:
                merged[name] = self.coefficients.merged_tensor(
                    index, base, self.task_vectors.for_merge(index)
                )
            else:
                tau = self.task_vectors[index]
                row_c = coefficients(index).to(base.device)
                view = (tau.shape[0], tau.shape[1]) + (1,) * (tau.dim() - 2)
                merged[name] = base + (tau.float() * row_c.view(view)).sum(0)
        return merged

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        coefficients: RowCoefficients | None = None,
        output_hidden_states: bool = True,
        oracle_expert: int | str | None = None,
    ) -> Any:
        return functional_call(
            self.model,
            self.merged_parameters(coefficients, oracle_expert),
            args=(),
            kwargs={
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "output_hidden_states": output_hidden_states,
                "use_cache": False,
            },
        )

    def oracle_expert(self, task: str) -> int | str | None:
        """In MoE mode, the expert whose FFN serves `task` (oracle routing; `"base"` for a task the base
        teaches); None for a dense merge."""
        if not self.moe:
            return None
        expert = self.task_experts[task]
        return BASE_EXPERT if expert is None else expert

    def alpha0_coefficients(self, index: int) -> torch.Tensor:
        """Task arithmetic at the start value, as per-row coefficients."""
        return self.coefficients.alpha0.view(-1, 1).expand(-1, self.rows[index])

    def layerwise_coefficients(self, values: Mapping[str, torch.Tensor]) -> RowCoefficients:
        """Per-row coefficients from one value per (expert, tensor), e.g. the stage-1 result."""

        def rows(index: int) -> torch.Tensor:
            value = values[self.coefficient_names[index]].to(self.coefficients.alpha0.device)
            return value.view(-1, 1).expand(-1, self.rows[index])

        return rows

    def stage1_snapshot(self) -> dict[str, torch.Tensor]:
        """The layer-wise coefficients, [N] per tensor, on the CPU."""
        values = self.coefficients.layerwise_values()
        return {name: values[:, i].detach().cpu() for i, name in enumerate(self.coefficient_names)}
