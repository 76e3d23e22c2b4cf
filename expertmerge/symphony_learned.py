"""The learned Symphony backbone (**ours**): the fit's fused-MoE merge, run over the aligned experts.

Symphony-MoE fuses the shared (non-FFN) tensors by layer-aware SLERP. Once the experts are aligned they share
the reference's coordinates, so their differences from the reference are task vectors like any fine-tune's
(`tau_k = aligned_k - aligned_reference`, the reference's own is zero), and the learned merge of `fit` with
`model.moe` applies unchanged: each task's batches run through its own expert's FFN (oracle routing) and only
the shared tensors' coefficients learn to match every expert's logits (and hidden state) on its own data.

The fit reads the aligned tensors straight from the `SymphonyPool` (no aligned copy is written): the task
vectors, and the base model (the aligned reference). The teachers are the experts' own folders: the alignment
keeps every output, so their cached targets serve as they are.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from expertmerge.fit.options import (
    FitOptions,
    LossOptions,
    MoEOptions,
    OptimiserOptions,
    StartOptions,
    TensorOptions,
)
from expertmerge.fit.run import FitRun, TrainerFactory, run_fit
from expertmerge.moe.formats import split_dense_names
from expertmerge.symphony import SymphonyPool


class LearnedBackboneOptions(BaseModel):
    """`backbone.learned` of the symphony config: the learned merge's settings (the fit's `model.*` keys)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no option means anything at NaN or inf

    steps: int = Field(60, ge=1)  # optimiser steps; each sees one batch of every task
    lr: float = Field(0.1, gt=0)
    # Start of every coefficient; default 1 / number of experts: the linear average of the aligned experts.
    alpha0: float | None = Field(None, gt=0, lt=1)
    gamma: float = Field(0.05, ge=0)  # weight of mean |c - alpha0|
    mu: float = Field(1.0, ge=0)  # weight of the hidden-state term
    hidden_loss: Literal["mse", "normalized_mse", "cosine"] = (
        "normalized_mse"  # scale-free: the aligned experts' hidden norms differ
    )
    # The fit's default objective divides each task by its expert's gain over the base; here the "base" is the
    # aligned reference expert (its own task has no gain), and the backbone is judged by KL to each expert:
    # plain alignment, with the texts' own loss at weight 1 (what benchmarks/SYMPHONY.md measured).
    task_balance: Literal["none", "start_kl", "expert_gain"] = "none"
    ce_weight: float = Field(1.0, ge=0)
    # Regexes of the tensors with coefficients: the blocks' matrices, and (unlike the fit's default) the
    # embeddings and head, which differ between models from different inits as much as the attention does
    # (measured on the diffinit zoo: mean held-out KL 0.389 -> 0.322, router tuned; benchmarks/SYMPHONY.md).
    learn_include: list[str] = [r"\.\d+\.", r"(?:^|\.)embed_tokens\.", r"(?:^|\.)lm_head\."]


def learned_backbone(
    pool: SymphonyPool,
    datamodule: Any,
    trainer_factory: TrainerFactory,
    options: LearnedBackboneOptions | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The shared tensors learned with oracle routing over `pool`'s experts as aligned now, and a report
    (steps, first / last loss, the learned coefficients' mean per expert).

    `datamodule` is the run's calibration data (its tasks name the pool's experts); `trainer_factory` trains
    (`lightning_modules.trainer.plain_trainers`); every optimiser step sees one batch of every task.
    """
    options = options or LearnedBackboneOptions()
    experts = pool.expert_names
    alpha0 = options.alpha0 if options.alpha0 is not None else 1.0 / len(experts)
    fit_options = FitOptions(
        base=str(pool.base_dir),  # the reference: its task vector is zero, its coefficients do nothing
        experts={name: str(folder) for name, folder in pool.expert_dirs.items()},
        start=StartOptions(alpha0=alpha0),
        loss=LossOptions(
            gamma=options.gamma,
            mu=options.mu,
            hidden_loss=options.hidden_loss,
            task_balance=options.task_balance,
            ce_weight=options.ce_weight,
        ),
        tensors=TensorOptions(learn_include=options.learn_include),
        optimiser=OptimiserOptions(lr=options.lr),
        moe=MoEOptions(moe=True),
    )
    tasks = len(datamodule.task_names)  # one optimiser step: one batch of every task
    run = FitRun(fit_options, datamodule, pool=pool, distinct=False)

    def stage_trainer(**settings: Any) -> Any:
        return trainer_factory(**{"max_steps": options.steps, "accumulate_grad_batches": tasks, **settings})

    result = run_fit(run, stage_trainer)
    learned = result.learned
    merged = learned.merged
    merged.to("cpu")
    with torch.no_grad():  # the learned tensors; the others were merged at alpha0 into the base model
        tensors = merged.merged_parameters()
    keys = pool.parameter_keys(merged.model)
    shared_names = set(split_dense_names(pool.tensor_names).shared)
    shared = {
        keys[name]: tensors.get(name, parameter).detach().clone()
        for name, parameter in merged.model.named_parameters()
        if keys[name] in shared_names
    }
    values = merged.coefficients.layerwise_values().detach()
    losses = [float(loss) for loss in learned.step_losses]
    report = {
        "steps": int(result.trainers[-1].global_step),
        "loss_first": sum(losses[:tasks]) / tasks,
        "loss_last": sum(losses[-tasks:]) / tasks,
        "learned_tensors": len(merged.coefficient_names),
        "coefficient_mean": {
            name: float(values[k].mean()) for k, name in enumerate(experts) if name != pool.reference
        },
    }
    return shared, report
