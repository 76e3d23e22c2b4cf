"""`python -m expertmerge fit`: a LightningCLI over the learned-merge (or sequence-MoE) module and the calibration data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SEQUENCE_MOE_CLASS = "lightning_modules.sequence_moe.SequenceMoEModule"


def _names_sequence_moe(args: Sequence[str]) -> bool:
    """Whether the fit is the sequence-level MoE: its config's `model.class_path` (or a `--model` argument)
    names `SequenceMoEModule`. Any other fit is Expert Merging, whose configs have no class_path."""
    import yaml

    for index, arg in enumerate(args):
        value = args[index + 1] if index + 1 < len(args) else ""
        if arg.startswith("--model=") or arg.startswith("--model.class_path="):
            value, arg = arg.split("=", 1)[1], "--model"
        if arg in ("--model", "--model.class_path") and value.endswith("SequenceMoEModule"):
            return True
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else value
            try:
                with open(path) as handle:
                    config = yaml.safe_load(handle) or {}
            except (OSError, yaml.YAMLError):
                continue  # LightningCLI reports unreadable configs itself
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and str(model.get("class_path", "")).endswith("SequenceMoEModule"):
                return True
    return False


def _first_value(mapping: dict) -> str | None:
    return next(iter(mapping.values()), None) if mapping else None


def _fit_inputs(model: Any, datamodule: Any) -> tuple[list[str], int]:
    """The fit's input paths (base, experts, calibration sources), which its outputs may not replace, and the
    base's weight bytes (the dense output's size) when the base is a local folder."""
    from pathlib import Path

    from expertmerge.io.reader import weights_bytes

    args = getattr(model, "init_args", None) or model
    experts = getattr(args, "experts", None) or {}
    base = getattr(args, "base", None)
    inputs = [base, *(experts.values() if isinstance(experts, dict) else experts)]
    for task in getattr(datamodule, "tasks", None) or []:
        inputs += list(getattr(task, "sources", None) or [])
    inputs = [str(item) for item in inputs if isinstance(item, str | Path)]
    estimate = weights_bytes(Path(base)) if isinstance(base, str) and Path(base).is_dir() else 0
    return inputs, estimate


def _fit_cli(args: Sequence[str], run: bool = True):
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.cli import LightningCLI

    from calib_data import CalibrationDataModule
    from expertmerge.io.folder import check_output_dir
    from lightning_modules.callbacks import ExportMergedModel, ExportSettings
    from lightning_modules.merging import ExpertMergingModule

    sequence_moe = _names_sequence_moe(args)

    class ExpertMergeCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(ExportSettings, "export")
            if sequence_moe:  # the experts share a tokenizer (checked): the first expert's
                parser.link_arguments("model.init_args.experts", "data.tokenizer", compute_fn=_first_value)
            else:  # the experts share the base's tokenizer
                parser.link_arguments("model.base", "data.tokenizer")

        def before_fit(self) -> None:
            settings = ExportSettings(**self.config_dump_section("export"))
            inputs, estimate = _fit_inputs(self.config[self.subcommand].model, self.datamodule)
            check_output_dir(settings.output_dir, settings.force, inputs, estimate)  # now, not after the fit
            config_yaml = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
            if sequence_moe:
                from lightning_modules.sequence_moe import ExportSequenceMoE

                self.trainer.callbacks.append(ExportSequenceMoE(settings, config_yaml))
                return
            if self.config[self.subcommand].model.moe:
                check_output_dir(settings.moe_dir(), settings.force, inputs, estimate)
            self.trainer.callbacks.append(ExportMergedModel(settings, config_yaml))

        def _instantiate_trainer(self, config: dict, callbacks: list):
            # The rich bar is our default, not a requirement: `--trainer.enable_progress_bar false` turns it off
            # (a bar in trainer_defaults would make Lightning refuse that flag).
            if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, RichProgressBar) for c in [*callbacks, *(config.get("callbacks") or [])]
            ):
                callbacks = [*callbacks, RichProgressBar()]
            return super()._instantiate_trainer(config, callbacks)

        def config_dump_section(self, key: str) -> dict:
            config = self.config[self.subcommand] if self.subcommand else self.config
            return dict(vars(config[key])) if hasattr(config[key], "__dict__") else dict(config[key])

    trainer_defaults = {
        "max_steps": 60,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
        "use_distributed_sampler": False,  # the calibration batch sampler shards itself across ranks
        "log_every_n_steps": 5,
        "default_root_dir": "outputs/fit-logs",
    }
    import pytorch_lightning as pl

    # The sequence MoE config names its module: `model: {class_path: ..., init_args: {...}}`.
    return ExpertMergeCLI(
        pl.LightningModule if sequence_moe else ExpertMergingModule,
        CalibrationDataModule,
        subclass_mode_model=sequence_moe,
        args=list(args),
        run=run,
        seed_everything_default=0,
        trainer_defaults=trainer_defaults,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m expertmerge fit"} if run else None,
    )


def fit_main(argv: Sequence[str]) -> int:
    import warnings

    # Lightning suggests TensorBoard when it falls back to its CSV logger; the CSV logs are what we want.
    warnings.filterwarnings("ignore", message=r".*tensorboardX.*")
    # `argv` is the process's own command line; sys.argv must stay intact (DDP re-launches ranks from it).
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
    # Raised inside Lightning by newer torch versions; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # The sequence MoE has nothing to validate during the fit (it is evaluated at the end).
    warnings.filterwarnings("ignore", message=r".*val_dataloader.* but have no `validation_step`.*")
    _fit_cli(["fit", *argv])
    return 0


def _configured(config: str, overrides: Sequence[str]):
    """Model (not yet prepared) and datamodule of a fit config, without running anything."""
    cli = _fit_cli(["--config", config, *overrides], run=False)
    return cli.model, cli.datamodule
