"""The one training loop of the demo zoos: AdamW with warmup and cosine decay on a causal-LM loss.

The tiny zoo trains its base from scratch and its experts in full with it; the SmolLM2 zoo fine-tunes a
few matrices of the upper layers. They differ only in what they pass: which tensors train (`trains`), the
schedule, and the order the samples are visited in (`random_batches` or `epoch_batches`). Every random
choice draws from the caller's generator in a fixed order, so a rebuild gives the same weights bit for bit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from expertmerge.errors import ExpertMergeError


@dataclass(frozen=True)
class Schedule:
    """`steps` optimiser steps: linear warmup over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`."""

    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.0
    # The two zoos were built with the cosine's phase rounded differently (it differs in the last bit at
    # some steps, and so do the learning rates and weights): the cached zoos stay bit-identical only if
    # each keeps its own order of operations.
    phase_order: Literal["pi*(done/span)", "pi*done/span"] = "pi*(done/span)"

    def factor(self, step: int) -> float:
        """The learning rate of `step` as a multiple of `lr`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        done, span = step - self.warmup_steps, max(1, self.steps - self.warmup_steps)
        phase = math.pi * (done / span) if self.phase_order == "pi*(done/span)" else math.pi * done / span
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(phase))


def random_batches(
    samples: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Row indices of `steps` batches drawn uniformly with replacement (plenty of synthetic samples)."""
    for _ in range(steps):
        yield torch.randint(samples, (batch_size,), generator=generator)


def epoch_batches(
    samples: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Row indices of `steps` batches visiting the samples in seeded random order without repetition until
    the set is used up, then in a new order (few real samples: none is seen twice before all are seen)."""
    # One permutation per step is more than enough epochs; drawing them all up front fixes how far the
    # generator advances, which the next expert's order depends on.
    order = torch.cat([torch.randperm(samples, generator=generator) for _ in range(1 + steps)])
    for step in range(steps):
        yield order[step * batch_size : (step + 1) * batch_size]


def causal_lm_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets for `ids`: padding (mask 0) never counts."""
    return ids.masked_fill(mask == 0, -100)


def train_causal_lm(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    batches: Iterable[torch.Tensor],
    schedule: Schedule,
    *,
    trains: Callable[[str], bool] = lambda name: True,
    pass_attention_mask: bool = True,
) -> list[float]:
    """Train the tensors of `model` named by `trains` in place on right-padded (ids, mask); returns the loss
    of every step. Afterwards the model is in eval mode with no tensor requiring a gradient.

    `batches` yields the row indices of each step (at least `schedule.steps` of them). Each batch is trimmed
    to its longest sample. With `pass_attention_mask=False` the model gets no mask: right padding never
    reaches a real token under causal attention, and the unmasked causal kernel is what the tiny zoo's
    cached weights were trained with.
    """
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trains(name))
        if parameter.requires_grad:
            trained.append(parameter)
    if not trained:
        raise ExpertMergeError("the recipe trains no tensor of this model")
    # weight_decay=0: tensors (or embedding rows) that get no gradient should stay exactly as they were
    optimizer = torch.optim.AdamW(trained, lr=schedule.lr, weight_decay=0.0, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    model.train()
    losses = []
    for rows in itertools.islice(batches, schedule.steps):
        batch_mask = mask[rows]
        used = int(batch_mask.sum(1).max())
        batch, batch_mask = ids[rows, :used], batch_mask[:, :used]
        loss = model(
            input_ids=batch,
            attention_mask=batch_mask if pass_attention_mask else None,
            labels=causal_lm_labels(batch, batch_mask),
            use_cache=False,
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if len(losses) < schedule.steps:
        raise ExpertMergeError(f"training got {len(losses)} batches for {schedule.steps} steps")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return losses
