"""The fit's objective: per task, the merged model against that task's teacher on its calibration samples.

For a batch of task t: `beta_t * (T^2 KL(teacher || merge) + mu * hidden term + ce_weight * the texts' own
next-token loss)`, beta_t = task weight x balance scale; plus `gamma * mean |c - start|` over the
coefficients. The same terms score whole calibration splits (the start search, the stage-2 selection, the
task scales), so the numbers the fit is chosen by are the numbers it trains on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from expertmerge.answers import AnswerStats
from expertmerge.fit.merged import MergedModel
from expertmerge.fit.options import LossOptions
from expertmerge.losses import (
    expert_gain_scales,
    hidden_loss,
    kl_to_teacher,
    logit_kl_loss,
    masked_mean,
    next_token_nll,
    teacher_top1,
)
from expertmerge.teachers import TeacherStats, TeacherTargets


@dataclass
class Calibration:
    """The calibration data as the fit sees it: tasks, their teachers' cached targets, the base's NLL."""

    datamodule: Any  # a set-up `CalibrationDataModule` (task_samples, train_dataloader)
    task_names: list[str]
    task_experts: list[int | None]  # per task its expert's index; None: taught by the base
    targets: dict[tuple[str, str], TeacherTargets] = field(default_factory=dict)
    teacher_stats: TeacherStats = field(default_factory=TeacherStats)
    hidden_layers: list[int] = field(default_factory=list)
    base_nll: dict[str, float] = field(default_factory=dict)  # task_balance expert_gain: the base's NLL
    answer_stats: AnswerStats | None = None  # `answers: expert` tasks: answers written and reused

    def samples(self, task: str, split: str) -> Any:
        return self.datamodule.task_samples(task, split)

    def batches(self, index: int, split: str, size: int, device: torch.device) -> Iterator[dict[str, Any]]:
        """Task `index`'s samples of a split in order, `size` per batch, trimmed to the batch's longest sample."""
        samples = self.samples(self.task_names[index], split)
        for first in range(0, samples.input_ids.shape[0], size):
            rows = torch.arange(first, min(first + size, samples.input_ids.shape[0]))
            mask = samples.attention_mask[rows].to(device)
            length = int(mask.sum(1).max())
            batch = {
                "input_ids": samples.input_ids[rows, :length].to(device),
                "attention_mask": mask[:, :length],
                "task_index": index,
                "sample_index": rows,
            }
            if samples.answer_mask is not None:
                batch["answer_mask"] = samples.answer_mask[rows, :length].to(device)
            yield batch

    def expert_gains(self) -> dict[str, float | None]:
        """Per task its expert's gain over the base on the task's training texts (nats per token, base NLL
        minus the expert NLL cached with the teacher targets); None for tasks the base teaches."""
        gains: dict[str, float | None] = {}
        for task, expert in zip(self.task_names, self.task_experts, strict=True):
            if expert is None:
                gains[task] = None
                continue
            mask = self.samples(task, "train").attention_mask
            nll = self.targets[(task, "train")].tensors["nll"][:, : mask.shape[1]]
            gains[task] = self.base_nll[task] - masked_mean(nll[:, :-1], mask[:, 1:] * mask[:, :-1]).item()
        return gains


class Objective:
    """The loss terms of the merged model on calibration batches, and the objective they make."""

    def __init__(
        self,
        merged: MergedModel,
        calibration: Calibration,
        loss: LossOptions,
        task_scales: dict[str, float] | None = None,
    ) -> None:
        self.merged = merged
        self.calibration = calibration
        self.loss = loss
        self.task_scales = task_scales  # task_balance: per-task scale, mean 1

    @property
    def task_names(self) -> list[str]:
        return self.calibration.task_names

    def token_weights(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per position its weight in the loss terms: 0 on padding, `answer_weight` where the token it predicts
        is an expert-written answer's, else 1. Without answers (or at weight 1) the attention mask itself."""
        mask = batch["attention_mask"]
        answer = batch.get("answer_mask")
        if answer is None or self.loss.answer_weight == 1.0:
            return mask
        # position i predicts token i + 1; the last position predicts none of the answer
        predicts = torch.cat([answer[:, 1:], answer.new_zeros(answer.shape[0], 1)], dim=1)
        return mask * (1.0 + (self.loss.answer_weight - 1.0) * predicts.to(torch.float32))

    def task_losses(self, batch: dict[str, Any], split: str = "train") -> dict[str, torch.Tensor]:
        """KL, hidden term, top-1 agreement (and the texts' own loss) of the merge against the batch's teacher,
        each a mean over positions weighted by `token_weights`."""
        loss = self.loss
        task = self.task_names[int(batch["task_index"])]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        weight = self.token_weights(batch)
        targets = self.calibration.targets[(task, split)].rows(
            batch["sample_index"], ids.shape[1], ids.device
        )
        layers = self.calibration.hidden_layers
        out = self.merged(
            ids, mask, output_hidden_states=bool(layers), oracle_expert=self.merged.oracle_expert(task)
        )
        kl_tokens = kl_to_teacher(out.logits, targets, loss.temperature)
        kl = logit_kl_loss(kl_tokens, weight, loss.temperature)
        terms = [
            hidden_loss(out.hidden_states[layer], targets[f"hidden.{layer}"], weight, loss.hidden_loss)
            for layer in layers
        ]
        mse = torch.stack(terms).mean() if terms else out.logits.new_zeros(())
        agree = (out.logits.argmax(-1) == teacher_top1(targets)).float()
        real = mask.float()
        top1 = (agree * real).sum() / real.sum().clamp_min(1)
        parts = {"kl": kl, "mse": mse, "top1": top1, "kl_tokens": kl_tokens}
        if loss.ce_weight:
            nll, next_mask = next_token_nll(out.logits, ids, mask)
            parts["ce"] = masked_mean(nll, next_mask if weight is mask else next_mask * weight[:, :-1])
            if loss.kl_where == "expert_better":
                # 1 where the expert predicts the next token better; positions without one keep their KL
                behind = (targets["nll"][:, :-1] < nll.detach()).to(kl_tokens.dtype)
                behind_weight = torch.cat([behind, behind.new_ones(behind.shape[0], 1)], dim=1)
                parts["kl_fit"] = logit_kl_loss(kl_tokens * behind_weight, weight, loss.temperature)
        return parts

    def task_objective(self, parts: dict[str, Any]) -> Any:
        """One task's alignment loss from its terms: KL + mu * hidden term + ce_weight * text loss."""
        value = parts.get("kl_fit", parts["kl"]) + self.loss.mu * parts["mse"]
        if "ce" in parts:
            value = value + self.loss.ce_weight * parts["ce"]
        return value

    def weights(self) -> dict[str, float]:
        """Per task its weight in the fit objective: its task weight times its balance scale."""
        scales = self.task_scales or {}
        weights = self.loss.task_weights or {}
        return {t: float(weights.get(t, 1.0)) * scales.get(t, 1.0) for t in self.task_names}

    def training_loss(
        self, task_batches: Sequence[dict[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]], torch.Tensor]:
        """The step's loss over one batch per task in `task_batches` (their weighted mean plus the regulariser),
        each task's terms, and the regulariser."""
        weights = self.weights()
        alignment: Any = 0.0
        parts_by_task = {}
        for task_batch in task_batches:
            task = self.task_names[int(task_batch["task_index"])]
            parts = self.task_losses(task_batch)
            alignment = alignment + weights[task] * self.task_objective(parts)
            parts_by_task[task] = parts
        regularizer = self.merged.coefficients.regularizer()
        loss = alignment / len(task_batches) + self.loss.gamma * regularizer
        return loss, parts_by_task, regularizer

    @torch.no_grad()
    def split_losses(self, split: str = "train") -> dict[str, dict[str, float]]:
        """Per task its loss terms (token-weighted means) for the current coefficients over every calibration
        sample of the task's `split` (the same on every rank)."""
        means = {}
        size = max(1, int(self.loss.teacher_batch_size))
        for index, task in enumerate(self.task_names):
            totals: dict[str, float] = {}
            tokens = 0.0
            for batch in self.calibration.batches(index, split, size, self.merged.device):
                count = float(self.token_weights(batch).sum())
                for part, value in self.task_losses(batch, split).items():
                    if part != "kl_tokens":
                        totals[part] = totals.get(part, 0.0) + float(value) * count
                tokens += count
            means[task] = {part: total / max(tokens, 1.0) for part, total in totals.items()}
        return means

    @torch.no_grad()
    def split_objective(self, split: str) -> float:
        """The fit objective of the current coefficients over every sample of a calibration split: each task's
        `task_objective` (token-weighted) weighted by its task weight and balance scale, as a weighted mean."""
        weights = self.weights()
        losses = self.split_losses(split)
        total = sum(weights[t] * self.task_objective(losses[t]) for t in losses)
        return float(total / sum(weights[t] for t in losses))

    @torch.no_grad()
    def sample_objectives(self, split: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per task, each sample's fit objective (`task_objective` of its own terms) for the current
        coefficients on a calibration split, and its real-token count (float64 [n] each)."""
        result = {}
        for index, task in enumerate(self.task_names):
            values, tokens = [], []
            for batch in self.calibration.batches(index, split, 1, self.merged.device):
                values.append(float(self.task_objective(self.task_losses(batch, split))))
                tokens.append(float(self.token_weights(batch).sum()))
            result[task] = (
                torch.tensor(values, dtype=torch.float64),
                torch.tensor(tokens, dtype=torch.float64),
            )
        return result

    def start_task_scales(self, balance: str) -> dict[str, float]:
        """Per task 1 / (its KL at the start point) (`start_kl`) or 1 / (its expert's gain over the base on its
        calibration texts) (`expert_gain`), scaled to mean 1. Measured on every training sample of the task
        (the same on every rank), before the first step."""
        if balance == "expert_gain":
            return expert_gain_scales(self.calibration.expert_gains())
        kls = {task: max(parts["kl"], 1e-6) for task, parts in self.split_losses().items()}
        inverse = {task: 1.0 / kl for task, kl in kls.items()}
        mean_inverse = sum(inverse.values()) / len(inverse)
        return {task: value / mean_inverse for task, value in inverse.items()}
