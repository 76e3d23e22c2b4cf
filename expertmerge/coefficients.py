"""Learnable merge coefficients over frozen task vectors.

One logit tensor [N, m_p] per merged tensor p (N experts, m_p chunks along the output rows; m_p = 1 is the
layer-wise Expert Merging, m_p > 1 the chunk-wise Expert Merging++, m_p = 0 a fixed coefficient that is not
trained). Coefficients are `sigmoid(logit)`, so they always lie in (0, 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from expertmerge.errors import ExpertMergeError


def logit(value: torch.Tensor | float, eps: float = 1e-4) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32).clamp(eps, 1 - eps)
    return torch.log(value) - torch.log1p(-value)


def chunk_sizes(rows: int, chunks: int) -> list[int]:
    """Split `rows` output rows into `chunks` contiguous chunks whose sizes differ by at most one."""
    if chunks < 1 or chunks > rows:
        raise ValueError(f"cannot cut {rows} rows into {chunks} chunks")
    base, extra = divmod(rows, chunks)
    return [base + 1 if i < extra else base for i in range(chunks)]


def _weighted_sum(
    base: torch.Tensor, row_coefficients: torch.Tensor, task_vectors: torch.Tensor
) -> torch.Tensor:
    # row_coefficients: [N, rows] fp32; task_vectors: [N, rows, ...] (bf16 or fp32); base: [rows, ...]
    view = (row_coefficients.shape[1],) + (1,) * (base.dim() - 1)
    merged = base.to(torch.float32, copy=True)
    for k in range(task_vectors.shape[0]):
        # one fused multiply-add reading bf16 directly: no fp32 copy of tau_k and no product tensor
        merged.addcmul_(task_vectors[k], row_coefficients[k].view(view))
    return merged


def _coefficient_grads(grad_merged: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
    """d loss / d c[k, row] = <d loss / d theta[row], tau[k, row]>, one expert at a time: [N, rows]."""
    rows = grad_merged.shape[0]
    flat_grad = grad_merged.reshape(rows, -1)
    grads = [
        torch.linalg.vecdot(flat_grad, task_vectors[k].reshape(rows, -1).to(torch.float32))
        for k in range(task_vectors.shape[0])
    ]
    return torch.stack(grads)


class _WeightedSum(torch.autograd.Function):
    """base + sum_k c[k, row] * tau[k, row, ...] without keeping fp32 copies of the task vectors alive.

    Autograd's default would save an fp32 copy of every (bf16) task vector for backward, i.e. N extra fp32
    models; here backward re-reads the frozen task vectors instead, one expert at a time.
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, row_coefficients: torch.Tensor, task_vectors: torch.Tensor):
        ctx.save_for_backward(task_vectors)
        return _weighted_sum(base, row_coefficients, task_vectors)

    @staticmethod
    def backward(ctx, grad_merged: torch.Tensor):
        (task_vectors,) = ctx.saved_tensors
        return None, _coefficient_grads(grad_merged, task_vectors), None


class _StreamedWeightedSum(torch.autograd.Function):
    """The same sum over task vectors that are read, not held: `read()` gives them in forward and again in
    backward (`streaming.StreamedTaskVectors`), so no step keeps a reference to them in between."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, row_coefficients: torch.Tensor, read: Callable[[], torch.Tensor]):
        ctx.read = read
        return _weighted_sum(base, row_coefficients, read())

    @staticmethod
    def backward(ctx, grad_merged: torch.Tensor):
        return None, _coefficient_grads(grad_merged, ctx.read()), None


class MergeCoefficients(nn.Module):
    """c[k, p, chunk] for the tensors that get learned coefficients.

    Args:
        tensor_names: the merged tensors, in a fixed order.
        row_counts: output rows of each tensor (its first dimension): chunks cut along them.
        num_experts: N.
        alpha0: start value, one for all experts or one per expert; also the regulariser's anchor.
        chunks: chunk count per tensor (default 1 = layer-wise); 0 keeps that tensor's coefficient fixed.
        start: optional start values per tensor, [N] or [N, m] (e.g. stage-1 values for stage 2);
            when given they are also the regulariser's anchor ("keep coefficients near their start").
    """

    def __init__(
        self,
        tensor_names: Sequence[str],
        row_counts: Sequence[int],
        num_experts: int,
        alpha0: float | Sequence[float] = 0.3,
        chunks: Mapping[str, int] | None = None,
        start: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if len(tensor_names) != len(row_counts):
            raise ValueError("tensor_names and row_counts differ in length")
        alpha = torch.as_tensor(alpha0, dtype=torch.float32).flatten()
        if alpha.numel() == 1:
            alpha = alpha.expand(num_experts)
        if alpha.numel() != num_experts:
            raise ExpertMergeError(
                f"model.alpha0 has {alpha.numel()} values but there are {num_experts} experts: give one value or one per expert."
            )
        if not bool(((alpha > 0) & (alpha < 1)).all()):
            raise ExpertMergeError(
                f"model.alpha0 must lie strictly between 0 and 1 (sigmoid range), got {alpha.tolist()}."
            )
        self.tensor_names = list(tensor_names)
        self.num_experts = num_experts
        self.register_buffer("alpha0", alpha.clone(), persistent=False)
        chunks = dict(chunks or {})
        self.chunk_counts: list[int] = []
        self.chunk_sizes: list[list[int]] = []
        self.logits = nn.ParameterList()
        self._trainable_index: list[int | None] = []
        for name, rows in zip(self.tensor_names, row_counts, strict=True):
            count = int(chunks.get(name, 1))
            count = min(count, rows)
            initial = self._start_value(name, start, alpha, max(count, 1))
            if count == 0:
                self.register_buffer(self._fixed_name(name), initial.clone())
                self._trainable_index.append(None)
                sizes = [rows]
            else:
                self._trainable_index.append(len(self.logits))
                self.logits.append(nn.Parameter(logit(initial)))
                sizes = chunk_sizes(rows, count)
            self.register_buffer(self._anchor_name(name), initial.clone(), persistent=False)
            self.chunk_counts.append(count)
            self.chunk_sizes.append(sizes)
        self._size_tensors = [torch.tensor(s) for s in self.chunk_sizes]

    @staticmethod
    def _fixed_name(name: str) -> str:
        return "fixed__" + name.replace(".", "__")

    @staticmethod
    def _anchor_name(name: str) -> str:
        return "anchor__" + name.replace(".", "__")

    def _start_value(
        self, name: str, start: Mapping[str, torch.Tensor] | None, alpha: torch.Tensor, count: int
    ) -> torch.Tensor:
        if start is None or name not in start:
            return alpha.view(-1, 1).expand(self.num_experts, count).clone()
        value = torch.as_tensor(start[name], dtype=torch.float32)
        if value.dim() == 1:
            value = value.view(-1, 1)
        if value.shape[1] == count:
            return value.clone()
        if value.shape[1] == 1:  # layer-wise start for a chunked tensor: every chunk starts equal
            return value.expand(self.num_experts, count).clone()
        raise ExpertMergeError(
            f"start coefficients of '{name}' have shape {tuple(value.shape)}, expected [N, {count}]."
        )

    def __len__(self) -> int:
        return len(self.tensor_names)

    def values(self, index: int) -> torch.Tensor:
        """Coefficients of tensor `index`: [N, m] in (0, 1)."""
        slot = self._trainable_index[index]
        if slot is None:
            return getattr(self, self._fixed_name(self.tensor_names[index]))
        return torch.sigmoid(self.logits[slot])

    def anchor(self, index: int) -> torch.Tensor:
        return getattr(self, self._anchor_name(self.tensor_names[index]))

    def row_coefficients(self, index: int) -> torch.Tensor:
        """Per-row coefficients [N, rows] (each chunk's value repeated over its rows)."""
        values = self.values(index)
        sizes = self._size_tensors[index]
        if values.shape[1] == 1:
            return values.expand(-1, int(sizes.sum()))
        return torch.repeat_interleave(values, sizes.to(values.device), dim=1)

    def merged_tensor(
        self, index: int, base: torch.Tensor, task_vectors: torch.Tensor | Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """theta_p = theta0_p + sum_k c[k, p] * tau[k, p]  (fp32).

        `task_vectors` is `[N, rows, ...]`, or a function that reads it (streamed: read again in backward).
        """
        if callable(task_vectors):
            return _StreamedWeightedSum.apply(base, self.row_coefficients(index), task_vectors)
        return _WeightedSum.apply(base, self.row_coefficients(index), task_vectors)

    def regularizer(self) -> torch.Tensor:
        """mean |c - start| over every trainable coefficient."""
        total, count = None, 0
        for index, slot in enumerate(self._trainable_index):
            if slot is None:
                continue
            deviation = (self.values(index) - self.anchor(index)).abs().sum()
            total = deviation if total is None else total + deviation
            count += self.logits[slot].numel()
        if total is None:
            return torch.zeros(())
        return total / count

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.logits)

    @torch.no_grad()
    def to_dict(self, expert_names: Sequence[str]) -> dict[str, dict[str, list[float]]]:
        """{tensor: {expert: [chunk values]}} for coefficients.json."""
        return {
            name: {
                expert: [round(float(v), 6) for v in row]
                for expert, row in zip(expert_names, self.values(i), strict=True)
            }
            for i, name in enumerate(self.tensor_names)
        }

    @torch.no_grad()
    def layerwise_values(self) -> torch.Tensor:
        """[N, P]: each tensor's coefficient averaged over its chunks, weighted by chunk size."""
        columns = []
        for index, sizes in enumerate(self._size_tensors):
            weights = sizes.to(torch.float32) / sizes.sum()
            values = self.values(index)
            columns.append(values @ weights if values.shape[1] == len(sizes) else values[:, 0])
        return torch.stack(columns, dim=1)


class TaskVectors(nn.Module):
    """tau[k, p] for the tensors with learned coefficients, as non-persistent buffers (never checkpointed)."""

    def __init__(self, shapes: Sequence[torch.Size], num_experts: int, dtype: torch.dtype) -> None:
        super().__init__()
        for index, shape in enumerate(shapes):
            self.register_buffer(
                f"t{index}", torch.zeros((num_experts, *shape), dtype=dtype), persistent=False
            )
        self._count = len(shapes)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return getattr(self, f"t{index}")

    def shape(self, index: int) -> torch.Size:
        return self[index].shape

    def for_merge(self, index: int) -> torch.Tensor:
        """What `MergeCoefficients.merged_tensor` takes: the resident tensor itself."""
        return self[index]


DEFAULT_LEARN_INCLUDE = (r"\.\d+\.",)  # tensors inside repeated blocks: layers.3., h.3., blocks.3.


def learns_coefficients(
    name: str,
    tensor: torch.Tensor,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    matrices_only: bool = True,
    routed_experts: int | None = None,
) -> bool:
    """Whether tensor `name` gets learned coefficients: it matches an `include` pattern (default: inside the
    repeated blocks) and no `exclude` one, and is a matrix unless `matrices_only` is off (`re.search`). A stack
    of matrices, one per routed expert (an MoE's fused expert weights: 3-D, `routed_experts` first), counts as
    matrices."""
    stacked = tensor.dim() == 3 and routed_experts is not None and tensor.shape[0] == routed_experts
    if matrices_only and tensor.dim() != 2 and not stacked:
        return False
    if not any(re.search(p, name) for p in (include if include is not None else DEFAULT_LEARN_INCLUDE)):
        return False
    return not any(re.search(p, name) for p in exclude or ())
