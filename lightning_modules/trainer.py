"""The Lightning trainer for `expertmerge.fit.run_fit`: each stage is a `pl.Trainer` fit of one
`ExpertMergingModule` over the run's merge."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl

from expertmerge.fit.run import FitRun, StageTrainer, TrainerFactory
from expertmerge.fit.sharding import gather_to_resident
from lightning_modules.merging import ExpertMergingModule


class LightningStage:
    """One stage of a fit run by a `pl.Trainer` (a `StageTrainer`)."""

    def __init__(self, trainer: pl.Trainer, module: ExpertMergingModule) -> None:
        self.trainer = trainer
        self.module = module

    @property
    def interrupted(self) -> bool:
        return bool(self.trainer.interrupted)

    @property
    def global_step(self) -> int:
        return int(self.trainer.global_step)

    @property
    def max_steps(self) -> int:
        return int(self.trainer.max_steps)

    def fit(self, run: FitRun, ckpt_path: str | None = None) -> None:
        # Checkpoints are plain data: never unpickle other objects.
        self.trainer.fit(self.module, datamodule=run.datamodule, ckpt_path=ckpt_path, weights_only=True)

    def finish(self, run: FitRun) -> bool:
        trainer, module = self.trainer, self.module
        if not trainer.interrupted and run.learned is not None and run.learned.merged.layer_sharded:
            # FSDP: every rank takes part in gathering the sharded tensors back; rank 0 keeps them
            module.to(trainer.strategy.root_device)
            gather_to_resident(run.learned.merged, keep=trainer.is_global_zero)
        if trainer.interrupted or not trainer.is_global_zero:
            leave_process_group(trainer)
            return False
        # Lightning hands the module back on the CPU; the evaluation and exports run where the fit ran.
        module.to(trainer.strategy.root_device)
        return True


def lightning_trainers(
    module: ExpertMergingModule, make_trainer: Callable[..., pl.Trainer], first: pl.Trainer | None = None
) -> TrainerFactory:
    """Stage trainers over `module`: `first` (already built, e.g. by LightningCLI) for stage 1, and
    `make_trainer(**settings)` for every other stage."""
    unused = [first] if first is not None else []

    def factory(**settings: Any) -> StageTrainer:
        if not settings and unused:
            return LightningStage(unused.pop(), module)
        return LightningStage(make_trainer(**settings), module)

    return factory


def plain_trainers(progress: bool = False, **defaults: Any) -> TrainerFactory:
    """Stage trainers for a library fit (Symphony's learned backbone): one device, no validation, checkpoints or
    logs (the caller reports), `defaults` and each stage's settings on top; the module is made for the run."""
    from lightning_modules.progress import StepProgressBar

    modules: dict[int, ExpertMergingModule] = {}

    class Stage(LightningStage):
        def fit(self, run: FitRun, ckpt_path: str | None = None) -> None:
            self.module = modules.setdefault(id(run), ExpertMergingModule.for_run(run))
            with quiet_trainer():
                super().fit(run, ckpt_path)

    def factory(**settings: Any) -> StageTrainer:
        options = {
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "logger": False,
            "use_distributed_sampler": False,
            "enable_progress_bar": progress,
            "callbacks": [StepProgressBar()] if progress else [],
            "accelerator": "auto",
            "devices": 1,
            **defaults,
            **settings,
        }
        with quiet_trainer():  # the Trainer announces the devices when it is built
            return Stage(pl.Trainer(**options), None)  # type: ignore[arg-type]

    return factory


@contextlib.contextmanager
def quiet_trainer() -> Iterator[None]:
    """Lightning's device inventory and tips say nothing to a library user: hide them for this fit only."""
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


def leave_process_group(trainer: Any) -> None:
    """A rank with nothing left to do (rank 0 evaluates and exports alone) leaves the process group now: left
    to the interpreter's exit, gloo's teardown can abort the rank while rank 0 is still at work, and Lightning
    then kills rank 0 too."""
    import torch.distributed as dist

    if (
        trainer.world_size > 1
        and not trainer.is_global_zero
        and dist.is_available()
        and dist.is_initialized()
    ):
        dist.destroy_process_group()
