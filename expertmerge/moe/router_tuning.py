"""Router tuning for the fused MoE: only the gates learn, so each token goes where its expert's output is matched.

The MoE (a real `transformers` Mixtral / Qwen-MoE model) runs over the mixed calibration set; the loss of a batch of
task t is `T^2 * KL(p_expert_t || p_moe)` against the cached targets of task t's own expert (oracle routing), plus
`balance` times the model's own load-balancing auxiliary loss, so the router learns which expert serves which
tokens without collapsing onto one. A plain Adam loop over the gate matrices: every other tensor stays frozen.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from expertmerge.errors import ExpertMergeError
from expertmerge.losses import kl_to_teacher, logit_kl_loss

if TYPE_CHECKING:
    from expertmerge.teachers import TeacherTargets

# The router of Mixtral / Qwen2-MoE / Qwen3-MoE / FlexOlmo layers, and of GraniteMoE's.
GATE_PATTERN = re.compile(r"\.(?:mlp\.gate|block_sparse_moe\.router)\.weight$")

TaskBatch = Mapping[str, Any]  # input_ids, attention_mask, task_index, sample_index (calib_data's collate)


def gate_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The router matrices of `model` by name (`*.mlp.gate.weight`, GraniteMoE: `*.block_sparse_moe.router.weight`);
    the Qwen2-MoE shared-expert gate is not one."""
    gates = {name: p for name, p in model.named_parameters() if GATE_PATTERN.search(name)}
    if not gates:
        raise ExpertMergeError(f"{type(model).__name__} has no '*.mlp.gate.weight' router parameters.")
    return gates


@dataclass(frozen=True)
class RouterTuningLoss:
    """One batch's objective and its parts."""

    loss: torch.Tensor
    kl: torch.Tensor
    balance: torch.Tensor


def router_tuning_loss(
    moe: nn.Module,
    batch: TaskBatch,
    targets: Mapping[tuple[str, str], TeacherTargets],
    task_names: Sequence[str],
    temperature: float = 1.0,
    balance: float = 0.01,
) -> RouterTuningLoss:
    """`T^2 * KL` to the batch's own expert (targets `(task, "train")`) plus `balance` * the MoE's aux loss."""
    task = task_names[int(batch["task_index"])]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expert = targets[(task, "train")].rows(batch["sample_index"], ids.shape[1], ids.device)
    out = moe(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    kl = logit_kl_loss(kl_to_teacher(out.logits, expert, temperature), mask, temperature)
    aux = getattr(out, "aux_loss", None)
    aux = aux if aux is not None else torch.zeros((), device=kl.device)
    return RouterTuningLoss(kl + balance * aux, kl, aux)


def _to_device(batch: TaskBatch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _epochs(batches: Iterable[TaskBatch | list[TaskBatch]]) -> Iterable[TaskBatch | list[TaskBatch]]:
    """The batches over and over; a loader's sampler is told each epoch, as Lightning's loop does."""
    for epoch in itertools.count():
        for owner in (getattr(batches, "sampler", None), getattr(batches, "batch_sampler", None)):
            if callable(getattr(owner, "set_epoch", None)):
                owner.set_epoch(epoch)
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ExpertMergeError("Router tuning got no calibration batches.")


def tune_router(
    moe: nn.Module,
    batches: Iterable[TaskBatch | list[TaskBatch]],
    targets: Mapping[tuple[str, str], TeacherTargets],
    task_names: Sequence[str],
    *,
    steps: int,
    temperature: float = 1.0,
    lr: float = 0.01,
    balance: float = 0.01,
    progress: bool = True,
) -> list[float]:
    """Train only the gates of `moe` for `steps` Adam steps over `batches` (repeated); returns each step's loss.

    `batches`: single-task batches (a `DataLoader` of the calibration data), or rounds (lists of them, one per
    task), whose losses are averaged. The MoE runs in train mode while tuning (as a Lightning fit would) and is
    left in eval mode with every parameter's `requires_grad` as it was.
    """
    if steps < 0:
        raise ExpertMergeError(f"router_tuning_steps must be >= 0, got {steps}.")
    gates = gate_parameters(moe)
    device = next(iter(gates.values())).device
    trainable = {name: p.requires_grad for name, p in moe.named_parameters()}
    for parameter in moe.parameters():
        parameter.requires_grad_(False)
    for parameter in gates.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(list(gates.values()), lr=lr)
    losses: list[float] = []
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        transient=True,
        disable=not progress,
    )
    moe.train()
    try:
        with bar, torch.enable_grad():
            task = bar.add_task("router tuning", total=steps, loss="-")
            for batch in itertools.islice(_epochs(batches), steps):
                rounds = batch if isinstance(batch, list) else [batch]
                optimizer.zero_grad()
                loss = sum(
                    router_tuning_loss(
                        moe, _to_device(part, device), targets, task_names, temperature, balance
                    ).loss
                    for part in rounds
                ) / len(rounds)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
    finally:
        moe.eval()
        for name, parameter in moe.named_parameters():
            parameter.requires_grad_(trainable[name])
    return losses
