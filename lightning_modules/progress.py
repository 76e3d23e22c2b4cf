"""The fit's progress: optimiser steps out of `max_steps`, labelled with the module's stage; a bar on a terminal,
plain lines in a log file."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.text import Text


def step_rate(seconds_per_step: float | None) -> str:
    """`0.5` -> `2.0 steps/s`, `1.3` -> `1.3 s/step`: whichever reads without leading zeros."""
    if seconds_per_step is None or not math.isfinite(seconds_per_step) or seconds_per_step <= 0:
        return "-- s/step"
    if seconds_per_step >= 1:
        return f"{seconds_per_step:.1f} s/step"
    return f"{1 / seconds_per_step:.1f} steps/s"


class StepRateColumn(ProgressColumn):
    """The step bar's speed in optimiser steps (its `completed` is the optimiser step, never a micro-batch);
    other bars (validation) count batches."""

    def __init__(self, bar: StepProgressBar, style: str) -> None:
        self.bar = bar
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        if task.id != self.bar.train_progress_bar_id:
            return Text(f"{task.speed or 0:.1f} batches/s", style=self.style)
        return Text(step_rate(1 / task.speed if task.speed else None), style=self.style)


class StepProgressBar(RichProgressBar):
    """One bar over the whole fit, e.g. "stage 1 step 12/60", instead of Lightning's per-epoch bar.

    Our fits are sized in optimiser steps (`trainer.max_steps`) and cycle the small calibration set for as
    many epochs as that takes, so Lightning's "Epoch 14/-2 ... 12/4" (batches of an epoch, max_epochs -1)
    says nothing useful; and its bar counts micro-batches, so under gradient accumulation the count (and the
    rate) would run ahead of the steps. Here the bar's count is `trainer.global_step`, the only training bar
    made is this one, and the metrics shown change once per optimiser step: a `train/...` metric is its mean
    over the step's micro-batches (one per task under accumulation, so the shown loss does not jump from task
    to task). The label comes from the module's `progress_label` when it has one.

    When standard output is not a terminal (a log file, a pipe), a live bar shows nothing until the end; then
    a plain line is printed every `plain_every_steps` steps (default: a tenth of the fit), at least every
    `plain_every_seconds`, and at the first and the last step, e.g. `step 20/60, 1.3 s/step, train/loss 0.123`.
    """

    def __init__(
        self,
        *args: Any,
        plain_every_steps: int | None = None,
        plain_every_seconds: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.plain_every_steps = plain_every_steps
        self.plain_every_seconds = plain_every_seconds
        self._plain = False
        self._started: tuple[float, int] | None = None  # (time, global_step) when training began
        self._last_line: tuple[float, int] | None = None  # (time, global_step) of the last plain line
        self._step_values: dict[str, list[float]] = {}  # train metrics of the current step's micro-batches
        self._shown_step = -1
        self._step_means: dict[str, float] = {}  # of the last complete step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._plain = not Console(**self._console_kwargs).is_terminal
        if self._plain:
            self.disable()  # no live display at all: it would print nothing until the fit ends

    def configure_columns(self, trainer: pl.Trainer) -> list:
        columns = super().configure_columns(trainer)
        return [*columns[:-1], StepRateColumn(self, style=self.theme.processing_speed)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        now = time.perf_counter()
        self._started = (now, trainer.global_step)
        self._last_line = (now, trainer.global_step)
        self._shown_step = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._show_steps(trainer, pl_module)  # Lightning's would add an "Epoch 0/-2" bar or reset ours

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        for name, value in metrics.items():
            if name.startswith("train/") and isinstance(value, float):
                self._step_values.setdefault(name, []).append(value)
        if trainer.global_step == self._shown_step:
            return  # a micro-batch inside an optimiser step
        self._shown_step = trainer.global_step
        self._step_means = {name: sum(v) / len(v) for name, v in self._step_values.items()}
        self._step_values = {}
        self._update_metrics(trainer, pl_module)
        self._show_steps(trainer, pl_module)
        if self._plain and trainer.is_global_zero:
            self._print_line(trainer, pl_module, {**metrics, **self._step_means})

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The logged progress-bar metrics, without Lightning's `v_num` (the log folder's version number)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _update_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled and self._metric_component is not None:
            self._metric_component.update({**self.get_metrics(trainer, pl_module), **self._step_means})

    def _total(self, trainer: pl.Trainer) -> int:
        return int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)

    def _description(self, pl_module: pl.LightningModule) -> str:
        label = str(getattr(pl_module, "progress_label", "step"))
        style = self.theme.description
        return f"[{style}]{label}" if style else label

    def _show_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self.progress.add_task(
                self._description(pl_module), total=self._total(trainer), completed=trainer.global_step
            )
        self.progress.update(
            self.train_progress_bar_id,
            completed=trainer.global_step,
            total=self._total(trainer),
            description=self._description(pl_module),
            visible=True,
        )
        self.refresh()

    def _print_line(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, Any]
    ) -> None:
        assert self._started is not None and self._last_line is not None
        step, total, now = trainer.global_step, self._total(trainer), time.perf_counter()
        last_time, last_step = self._last_line
        every = self.plain_every_steps or max(1, math.ceil(total / 10))
        first = last_step == self._started[1]
        if not (
            first or step >= total or step - last_step >= every or now - last_time >= self.plain_every_seconds
        ):
            return
        started_time, started_step = self._started
        parts = [
            f"{getattr(pl_module, 'progress_label', 'step')} {step}/{total}",
            step_rate((now - started_time) / (step - started_step)),
        ]
        for name, value in metrics.items():
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        sys.stdout.write(", ".join(parts) + "\n")
        sys.stdout.flush()
        self._last_line = (now, step)
