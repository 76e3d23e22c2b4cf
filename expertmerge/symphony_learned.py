"""The learned Symphony backbone (**ours**): the fit's fused-MoE merge, run over the aligned experts.

Symphony-MoE fuses the shared (non-FFN) tensors by layer-aware SLERP. Once the experts are aligned they share
the reference's coordinates, so their differences from the reference are task vectors like any fine-tune's
(`tau_k = aligned_k - aligned_reference`, the reference's own is zero), and the learned merge of `fit` with
`model.moe` applies unchanged: each task's batches run through its own expert's FFN (oracle routing) and only
the shared tensors' coefficients learn to match every expert's logits (and hidden state) on its own data.

The fit reads models from folders, so the aligned experts are first written, lazily tensor by tensor through
the one writer, to a scratch folder (one checkpoint per expert; the aligned reference is the fit's `base`).
Their teacher targets are computed again from those folders: the alignment keeps every output, but the cache
is keyed by the weights' content.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from expertmerge.moe.formats import split_dense_names
from expertmerge.symphony import SymphonyPool, write_dense_folder


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


def write_aligned_experts(pool: SymphonyPool, folder: Path) -> dict[str, Path]:
    """Every aligned expert (the reference too) as a dense model folder under `folder`; returns the folders."""
    folders = {}
    for expert in pool.expert_names:
        folders[expert] = write_dense_folder(
            pool, folder / expert, lambda name, expert=expert: pool.expert_tensor(expert, name)
        )
    return folders


@contextlib.contextmanager
def _quiet_trainer() -> Iterator[None]:
    """Lightning's device inventory and tips say nothing to a symphony user: hide them for this fit only."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def learned_backbone(
    pool: SymphonyPool,
    datamodule: Any,
    options: LearnedBackboneOptions | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The shared tensors learned with oracle routing over `pool`'s experts as aligned now, and a report
    (steps, first / last loss, the learned coefficients' mean per expert).

    `datamodule` is the run's calibration data (set up; its tasks name the pool's experts).
    """
    import pytorch_lightning as pl  # here, not at import: the training-free backbones need no Lightning

    from lightning_modules.merging import ExpertMergingModule
    from lightning_modules.progress import StepProgressBar

    options = options or LearnedBackboneOptions()
    experts = pool.expert_names
    alpha0 = options.alpha0 if options.alpha0 is not None else 1.0 / len(experts)
    with tempfile.TemporaryDirectory(prefix="symphony-aligned-") as scratch:
        folders = write_aligned_experts(pool, Path(scratch))
        module = ExpertMergingModule(
            base=str(folders[pool.reference]),  # tau of the reference is zero: its coefficients do nothing
            experts={name: str(folder) for name, folder in folders.items()},
            alpha0=alpha0,
            gamma=options.gamma,
            mu=options.mu,
            hidden_loss=options.hidden_loss,
            task_balance=options.task_balance,
            ce_weight=options.ce_weight,
            lr=options.lr,
            learn_include=options.learn_include,
            moe=True,
        )
        module.distinct_experts = False  # the reference expert is the base here, by design
        losses = _loss_log(pl)
        with _quiet_trainer():  # the Trainer announces the devices when it is built
            trainer = pl.Trainer(
                max_steps=options.steps,
                accumulate_grad_batches=len(datamodule.task_names),  # one step sees one batch of every task
                limit_val_batches=0,
                num_sanity_val_steps=0,
                enable_checkpointing=False,
                enable_model_summary=False,
                logger=False,
                use_distributed_sampler=False,
                enable_progress_bar=progress,
                callbacks=[losses, *([StepProgressBar()] if progress else [])],
                accelerator="auto",
                devices=1,
            )
            trainer.fit(module, datamodule=datamodule)
        module.to("cpu")
        with torch.no_grad():  # the learned tensors; the others were merged at alpha0 into the base model
            merged = module.merged_parameters()
        keys = module.pool.parameter_keys(module.model)
        shared_names = set(split_dense_names(pool.tensor_names).shared)
        shared = {
            keys[name]: merged.get(name, parameter).detach().clone()
            for name, parameter in module.model.named_parameters()
            if keys[name] in shared_names
        }
        module.pool.close()
    values = module.coefficients.layerwise_values().detach()
    tasks = len(datamodule.task_names)  # one optimiser step: one batch of every task
    report = {
        "steps": int(trainer.global_step),
        "loss_first": sum(losses.losses[:tasks]) / tasks,
        "loss_last": sum(losses.losses[-tasks:]) / tasks,
        "learned_tensors": len(module.coefficient_names),
        "coefficient_mean": {
            name: float(values[k].mean()) for k, name in enumerate(experts) if name != pool.reference
        },
    }
    return shared, report


def _loss_log(pl: Any) -> Any:
    """A callback keeping every batch's training loss (Lightning's logger is off)."""

    class LossLog(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, index: int) -> None:
            self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    return LossLog()
