"""The `fit` command's LightningCLI: the config's classes, the output checks before work, then `run_fit` and the
end-of-fit steps (`expertmerge.cli.fit`). Imported only when a fit config is parsed: it starts Lightning."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.cli import LightningCLI

from calib_data import CalibrationDataModule
from expertmerge.cli.fit_steps import (
    DESCRIPTION,
    EXPERT_MERGING_CLASS,
    FORCE_FLAG,
    PROG,
    check_pool_matches,
    export_expert_merging,
    export_sequence_moe,
    fit_inputs,
    read_resume_checkpoint,
    tokenizer_of,
)
from expertmerge.fit.outputs import ExportSettings
from expertmerge.io.folder import check_output_dir
from expertmerge.pool import BASE  # a task's `expert: base`
from lightning_modules.merging import ExpertMergingModule
from lightning_modules.progress import StepProgressBar

TRAINER_DEFAULTS = {
    "max_steps": 60,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "use_distributed_sampler": False,  # the calibration batch sampler shards itself across ranks
    "log_every_n_steps": 5,
    "default_root_dir": "outputs/fit-logs",
}


class ExpertMergeCLI(LightningCLI):
    """LightningCLI with the fit's own steps: the export settings, checks before work, and `run_fit`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `fit` is the one subcommand we run; building the parsers of validate/test/predict costs seconds.
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(ExportSettings, "export")
        # Expert Merging configs name no class (`model: {base: ..., experts: ...}`); the sequence MoE's does.
        parser.set_defaults({"model": {"class_path": EXPERT_MERGING_CLASS}})
        parser.link_arguments("model", "data.tokenizer", compute_fn=tokenizer_of)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """A Trainer of this config; `kwargs` override its settings (stage 2 gets its own max_steps).

        Each Trainer gets fresh copies of the configured callbacks (a callback keeps state from the fit it
        ran in), and our progress bar unless one is configured or `trainer.enable_progress_bar` is false
        (a bar in trainer_defaults would make Lightning refuse that flag).
        """
        config = self.config_init[self.subcommand].trainer if self.subcommand else self.config_init.trainer
        if not hasattr(self, "_configured_callbacks"):
            self._configured_callbacks = copy.deepcopy(list(config.get("callbacks") or []))
        callbacks = copy.deepcopy(self._configured_callbacks)
        if {**config, **kwargs}.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(StepProgressBar())
        if {**config, **kwargs}.get("strategy") == "fsdp" and isinstance(self.model, ExpertMergingModule):
            from lightning_modules.strategy import LayerShardedStrategy

            kwargs = {**kwargs, "strategy": LayerShardedStrategy()}  # Lightning's fsdp refuses the CPU
        return super().instantiate_trainer(**{**kwargs, "callbacks": callbacks})

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Before Lightning reads the checkpoint's hyperparameters into the config (it would fail there with
        # a traceback) and before any model loads.
        subcommand = self.config.get("subcommand")
        self.resume_checkpoint = read_resume_checkpoint(self.config[subcommand]) if subcommand else None

    def before_instantiate_classes(self) -> None:
        from expertmerge.validation import positive_int

        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        accumulate = trainer.get("accumulate_grad_batches")
        if accumulate is not None:  # Lightning divides by it mid-fit (ZeroDivisionError at step 0)
            positive_int("trainer.accumulate_grad_batches", accumulate)

    def before_fit(self) -> None:
        self.export_settings = ExportSettings(**vars(self.config.fit.export))
        if isinstance(self.model, ExpertMergingModule):
            # The data (and the base, as the tokenizer's folder: a missing one is named as `model.base`), then the
            # pool (a zoo:// reference built), checked now: before any output is promised, outside the timings.
            self.datamodule.check([*self.model.run.options.expert_names, BASE])
            self.model.run.pool = self.model.run.make_pool()
            if self.resume_checkpoint is not None:
                check_pool_matches(
                    self.resume_checkpoint,
                    self.model.run.pool,
                    self.config.fit.ckpt_path,
                    "--ckpt_path",
                )
        inputs, estimate = fit_inputs(self.config.fit.model, self.datamodule)
        settings = self.export_settings
        folders = [
            settings.output_dir,
            *([settings.moe_dir()] if getattr(self.model.hparams, "moe", False) else []),
        ]
        for folder in folders:  # before any work
            check_output_dir(folder, settings.force, inputs, estimate, force_flag=FORCE_FLAG)
        self.config_yaml = self._parser(self.subcommand).dump(self.config.fit, skip_none=False)

    def fit(self, model: pl.LightningModule, **kwargs: Any) -> None:
        """The command's steps (LightningCLI runs this method in place of `Trainer.fit`)."""
        if isinstance(model, ExpertMergingModule):
            from expertmerge.fit.run import run_fit
            from lightning_modules.trainer import lightning_trainers

            model.run.datamodule = self.datamodule
            trainers = lightning_trainers(model, self.instantiate_trainer, first=self.trainer)
            result = run_fit(model.run, trainers, ckpt_path=kwargs.get("ckpt_path"))
            if result.main_process and not result.interrupted:
                export_expert_merging(result, self.export_settings, self.config_yaml)
            return
        from lightning_modules.trainer import leave_process_group

        # Checkpoints are plain data: never unpickle other objects (`--weights_only false` included).
        self.trainer.fit(model, **{**kwargs, "weights_only": True})
        if self.trainer.interrupted or not self.trainer.is_global_zero:
            leave_process_group(self.trainer)
            return
        model.to(self.trainer.strategy.root_device)
        export_sequence_moe(model, self.export_settings, self.config_yaml)


def build_fit_cli(args: Sequence[str], run: bool = True) -> ExpertMergeCLI:
    """The CLI over `args`; with `run` it runs the fit (`ExpertMergeCLI.fit`)."""
    # The fit subcommand's usage then reads "python -m expertmerge fit [options]"; a bad value raises (the CLI
    # prints it as one line) instead of printing the whole usage and exiting.
    fit_parser = {
        "prog": f"{PROG} fit",
        "usage": f"{PROG} fit [options]",
        "description": DESCRIPTION,
        "exit_on_error": False,
    }
    return ExpertMergeCLI(
        pl.LightningModule,
        CalibrationDataModule,
        subclass_mode_model=True,
        args=list(args),
        run=run,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, **({"prog": PROG, "fit": fit_parser} if run else {})},
    )
