"""The fit's progress bar: optimiser steps out of `max_steps`, labelled with the module's stage."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """One bar over the whole fit, e.g. "stage 1 step 12/60", instead of Lightning's per-epoch bar.

    Our fits are sized in optimiser steps (`trainer.max_steps`) and cycle the small calibration set for as
    many epochs as that takes, so Lightning's "Epoch 14/-2 ... 12/4" (batches of an epoch, max_epochs -1)
    says nothing useful. The label comes from the module's `progress_label` when it has one.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_progress_bar_id is None:  # first epoch: let Lightning create the bar, then relabel it
            super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_steps(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The logged progress-bar metrics, without Lightning's `v_num` (the log folder's version number)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _show_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        label = str(getattr(pl_module, "progress_label", "step"))
        style = self.theme.description
        self.progress.update(
            self.train_progress_bar_id,
            completed=trainer.global_step,
            total=total,
            description=f"[{style}]{label}" if style else label,
            visible=True,
        )
        self.refresh()
