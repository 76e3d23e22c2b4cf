"""ExpertMergingModule: Lightning's view of a learned merge (`expertmerge.fit`): hooks, logging, optimiser,
checkpoints.

Only the coefficients are trainable. The merge itself (`MergedModel`), the objective, the start and the
stages live in `expertmerge.fit`; this module prepares a `FitRun` where the Trainer runs it (after the ranks
exist), hands each batch to the objective and logs what it returns.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn

from expertmerge.chunking import allocation_table
from expertmerge.console import make_console
from expertmerge.fit.learned import COEFFICIENTS_PREFIX, LearnedMerge
from expertmerge.fit.options import FitOptions, flat_docs, flat_parameters
from expertmerge.fit.run import FitRun
from expertmerge.fit.sharding import all_reduce_gradients
from expertmerge.io.fit_checkpoint import check_same_models
from lightning_modules.strategy import is_layer_sharded

_MERGED_PREFIX = "merged."  # where the coefficients sit in this module's own state_dict


class ExpertMergingModule(pl.LightningModule):
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.run = FitRun(FitOptions.from_flat(**options))
        self.save_hyperparameters(self.run.options.to_flat())
        self.strict_loading = False  # checkpoints hold the coefficients only

    @classmethod
    def for_run(cls, run: FitRun) -> ExpertMergingModule:
        """The module over an existing run (its options; its merge, when prepared, is reused)."""
        # The flat signature is generated (see the end of this file), so Lightning cannot read the hyperparameters
        # from __init__'s frame; they are given, as LightningCLI gives them when it builds the module.
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters_context

        flat = run.options.to_flat()
        with _given_hyperparameters_context(flat, f"{cls.__module__}.{cls.__qualname__}"):
            module = cls(**flat)
        module.run = run
        if run.learned is not None:
            module._attach(run.learned)
        return module

    @property
    def learned(self) -> LearnedMerge:
        if self.run.learned is None:
            raise RuntimeError("the merge is prepared when the Trainer sets the module up")
        return self.run.learned

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self.run.learned is None:
            if self.run.datamodule is None:
                self.run.datamodule = self.trainer.datamodule
            shard = self.trainer.strategy.root_device if is_layer_sharded(self._trainer) else None
            self.run.prepare(shard_device=shard, announce=self.trainer.is_global_zero)
        self._attach(self.learned)

    def _attach(self, learned: LearnedMerge) -> None:
        self.merged = learned.merged  # registered: Lightning moves it, DDP sees its coefficients

        def per_task() -> nn.ModuleDict:
            return nn.ModuleDict({t: torchmetrics.MeanMetric() for t in learned.task_names})

        self.val_kl = per_task()
        self.val_top1 = per_task()

    def on_train_start(self) -> None:
        self.learned.before_training()
        if self.merged.stage == 2 and self.trainer.is_global_zero:
            make_console().print(allocation_table(self.merged.chunk_allocation))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if (
            self.merged.layer_sharded
        ):  # no DDP wrapper under FSDP: average the replicated coefficients' gradients
            all_reduce_gradients(list(self.merged.coefficients.parameters()))

    @property
    def progress_label(self) -> str:
        """What the progress bar counts: the stage's steps when the fit has two stages."""
        return f"stage {self.merged.stage} step" if self.run.options.chunking.enabled else "step"

    # ------------------------------------------------------------------------------------ the steps
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.merged(*args, **kwargs)

    def training_step(self, batch: dict[str, Any] | list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        # A batch is one task's samples, or a round with one sub-batch per task (one step sees every task).
        task_batches = batch if isinstance(batch, list) else [batch]
        loss, parts, regularizer = self.learned.objective.training_loss(task_batches)
        for task_batch in task_batches:
            task = self.learned.task_names[int(task_batch["task_index"])]
            size = task_batch["input_ids"].shape[0]
            for term in ("ce", "kl", "mse", "top1"):
                if term in parts[task]:
                    self.log(f"train/{term}/{task}", parts[task][term], batch_size=size)
        self.learned.step_losses.append(loss.detach())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/reg", regularizer)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            values = self.merged.coefficients.layerwise_values()  # [N, P]
            for k, expert in enumerate(self.merged.expert_names):
                self.log(f"coef/mean/{expert}", values[k].mean())
                self.log(f"coef/min/{expert}", values[k].min())
                self.log(f"coef/max/{expert}", values[k].max())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        task = self.learned.task_names[int(batch["task_index"])]
        parts = self.learned.objective.task_losses(batch, split="eval")
        tokens = batch["attention_mask"].sum()
        self.val_kl[task].update(parts["kl"], tokens)
        self.val_top1[task].update(parts["top1"], tokens)

    def on_validation_epoch_end(self) -> None:
        kls = []
        for task in self.learned.task_names:
            if self.val_kl[task].update_count == 0:
                continue
            kl = self.val_kl[task].compute()
            kls.append(kl)
            self.log(f"val/kl/{task}", kl)
            self.log(f"val/top1/{task}", self.val_top1[task].compute())
            self.val_kl[task].reset()
            self.val_top1[task].reset()
        if kls:
            self.log("val/kl_mean", torch.stack(kls).mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        options = self.run.options
        if self.merged.stage == 2:
            lr, total = (
                (options.chunking.stage2_lr or options.optimiser.lr),
                int(options.chunking.stage2_steps),
            )
        else:
            lr, total = options.optimiser.lr, int(self.trainer.max_steps)
            if total < 0:
                total = int(self.trainer.estimated_stepping_batches)
        optimizer = torch.optim.Adam(self.merged.coefficients.parameters(), lr=lr)
        total = max(1, total)
        warmup = max(0, int(options.optimiser.warmup_steps))
        constant = options.optimiser.scheduler == "constant"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if constant:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item()) * 0.9 + 0.1

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The base model and task vectors are inputs, not results: keep checkpoints to the coefficients.
        coefficients = self.merged.coefficients.state_dict()
        checkpoint["state_dict"] = {COEFFICIENTS_PREFIX + k: v for k, v in coefficients.items()}
        checkpoint["expertmerge"] = self.learned.checkpoint_section()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        learned = self.learned
        # The CLIs compared already, before any model loaded; Lightning's "last" / "best" names not.
        path = str(getattr(self._trainer, "ckpt_path", None) or "being loaded")
        folders = {"base": learned.pool.base_dir, **learned.pool.expert_dirs}
        check_same_models(checkpoint, learned.pool.content_hashes(), folders, path, "--ckpt_path")
        learned.restore(checkpoint.get("expertmerge", {}))
        checkpoint["state_dict"] = {_MERGED_PREFIX + k: v for k, v in checkpoint["state_dict"].items()}


# jsonargparse reads the options from this signature and their help from the docstring: both come from the
# option groups of `expertmerge.fit.options`, where each default and each choice is written once.
ExpertMergingModule.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *flat_parameters()]
)
ExpertMergingModule.__doc__ = (
    "Expert Merging (arXiv 2509.25712): coefficients over frozen task vectors, aligned to the experts.\n\n"
    + flat_docs()
)
