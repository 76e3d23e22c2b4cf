"""Alignment losses between the merged model and an expert. Padding never counts.

The teacher's logits may be stored as top-k values and indices plus the full log-sum-exp; the KL then
treats everything outside the top k as one "tail" bucket, which is exact when k equals the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def aligned_hidden_layers(hidden_layers: list[int] | None, mu: float, num_layers: int) -> list[int]:
    """The `hidden_states` indices the hidden-state term aligns: the ones given, else the middle layer when the
    term is on (`mu` > 0) and none when it is off (then no hidden targets are cached)."""
    if hidden_layers is not None:
        return list(hidden_layers)
    return [num_layers // 2] if mu else []


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, L, ...] over the positions where `mask` [B, L] is 1."""
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    denominator = mask.sum() * (values[0, 0].numel() if values.dim() > 2 else 1)
    return (values * mask).sum() / denominator.clamp_min(1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl_per_token(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p_teacher || p_student) per token [B, L] from the teacher's top-k logits.

    teacher_values/indices: [B, L, K] raw logits of the teacher's top k; teacher_logsumexp: [B, L] the
    log-sum-exp of the teacher's *full* logits divided by `temperature`, so the tail mass is known exactly.
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = teacher_values.float() / temperature - teacher_logsumexp.unsqueeze(-1)
    student_topk = student_log_probs.gather(-1, teacher_indices.long())
    head = (teacher_log_probs.exp() * (teacher_log_probs - student_topk)).sum(-1)
    teacher_tail = _log1mexp(torch.logsumexp(teacher_log_probs, dim=-1))
    student_tail = _log1mexp(torch.logsumexp(student_topk, dim=-1))
    tail = teacher_tail.exp() * (teacher_tail - student_tail)
    # When k = vocabulary the tail carries no mass; exp(log1mexp) is then ~1e-7 and must not add noise.
    has_tail = teacher_indices.shape[-1] < student_logits.shape[-1]
    return head + tail if has_tail else head


def full_kl_per_token(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_teacher || p_student) per token [B, L] from full logits."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)


def kl_to_teacher(
    student_logits: torch.Tensor, targets: Mapping[str, torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) per token [B, L] from cached teacher rows: full `logits`, or top-k values,
    indices and log-sum-exp."""
    if "logits" in targets:
        return full_kl_per_token(student_logits, targets["logits"], temperature)
    return topk_kl_per_token(
        student_logits, targets["topk_values"], targets["topk_indices"], targets["logsumexp"], temperature
    )


def teacher_top1(targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's most likely next token per position [B, L], from full or top-k rows."""
    return targets["logits"].argmax(-1) if "logits" in targets else targets["topk_indices"][..., 0].long()


def logit_kl_loss(per_token_kl: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL averaged over real (non-padding) tokens."""
    return temperature**2 * masked_mean(per_token_kl, mask)


def hidden_mse_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error over real tokens and hidden units."""
    return masked_mean((student_hidden.float() - teacher_hidden.float()).pow(2), mask)


def hidden_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """The hidden-state alignment term, over real tokens.

    `mse`: plain mean squared error, whose size follows the model's hidden-state norm (about 30 on
    SmolLM2's middle layer against a logit KL of about 0.2), so `mu` means something different per model.
    `normalized_mse`: the MSE divided by the teacher state's mean square (a relative error, 1 for a zero
    student, whatever the model's scale). `cosine`: mean of 1 - cos(student, teacher) per token (direction only).
    """
    if kind == "mse":
        return hidden_mse_loss(student_hidden, teacher_hidden, mask)
    if kind == "normalized_mse":
        scale = masked_mean(teacher_hidden.float().pow(2), mask).detach().clamp_min(1e-12)
        return hidden_mse_loss(student_hidden, teacher_hidden, mask) / scale
    if kind == "cosine":
        cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=1e-8)
        return masked_mean(1.0 - cos, mask)
    raise ValueError(f"unknown hidden loss {kind!r}: mse, normalized_mse or cosine")


def next_token_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the next token [B, L-1] and its mask (both positions real)."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    target_mask = mask[:, 1:] * mask[:, :-1]
    return nll, target_mask


def expert_gain_scales(gains: Mapping[str, float | None], floor: float = 0.1) -> dict[str, float]:
    """Per-task loss scales that make the fit's objective the gain retained per task: 1 / gain_t, where gain_t
    is the task's expert's improvement over the base (nats per token), scaled to mean 1 over the expert
    tasks. A gain below `floor` x the largest counts as that (an expert barely better than the base, or worse,
    must not take over the fit); tasks without an expert (None: the base teaches them) get 1."""
    measured = {task: gain for task, gain in gains.items() if gain is not None}
    if not measured:
        return {task: 1.0 for task in gains}
    largest = max(max(measured.values()), 1e-6)
    inverse = {task: 1.0 / max(gain, floor * largest) for task, gain in measured.items()}
    mean_inverse = sum(inverse.values()) / len(inverse)
    return {task: inverse[task] / mean_inverse if task in inverse else 1.0 for task in gains}
