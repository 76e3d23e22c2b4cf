"""Router tuning for the fused MoE: only the gates learn, so each token goes where its expert's output is matched.

The MoE (a real `transformers` Mixtral / Qwen-MoE model) runs over the mixed calibration set; the loss is the
T^2 * KL from each sample's own expert (the cached teacher targets) to the MoE, plus a load-balancing term
(the model's own auxiliary loss), so the router learns which expert serves which tokens without collapsing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from expertmerge.losses import kl_to_teacher, logit_kl_loss
from expertmerge.teachers import TeacherTargets

GATE_PATTERN = re.compile(r"\.mlp\.gate\.weight$")  # the router of Mixtral / Qwen2-MoE / Qwen3-MoE layers


def gate_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    gates = {name: p for name, p in model.named_parameters() if GATE_PATTERN.search(name)}
    if not gates:
        raise ValueError(f"{type(model).__name__} has no '*.mlp.gate.weight' router parameters.")
    return gates


class RouterTuningModule(pl.LightningModule):
    """Trains the router gates of `moe` (everything else frozen) against the experts' targets.

    Args:
        moe: the fused MoE model (`output_router_logits` is requested per forward).
        targets: (task, "train") -> cached targets of that task's own expert.
        task_names: task order of the batches' `task_index`.
        temperature: T of the T^2 * KL.
        lr: Adam learning rate of the gates.
        balance: weight of the load-balancing auxiliary loss.
    """

    def __init__(
        self,
        moe: nn.Module,
        targets: dict[tuple[str, str], TeacherTargets],
        task_names: Sequence[str],
        temperature: float = 1.0,
        lr: float = 0.01,
        balance: float = 0.01,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.targets = targets
        self.task_names = list(task_names)
        self.temperature = temperature
        self.lr = lr
        self.balance = balance
        for parameter in self.moe.parameters():
            parameter.requires_grad_(False)
        self.gates = gate_parameters(self.moe)
        for parameter in self.gates.values():
            parameter.requires_grad_(True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        task = self.task_names[int(batch["task_index"])]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = self.targets[(task, "train")].rows(batch["sample_index"], ids.shape[1], ids.device)
        out = self.moe(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        kl = logit_kl_loss(kl_to_teacher(out.logits, targets, self.temperature), mask, self.temperature)
        aux = (
            out.aux_loss if getattr(out, "aux_loss", None) is not None else torch.zeros((), device=kl.device)
        )
        loss = kl + self.balance * aux
        size = ids.shape[0]
        self.log(f"router/kl/{task}", kl, batch_size=size)
        self.log("router/balance", aux, batch_size=size)
        self.log("router/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.gates.values()), lr=self.lr)
