"""`python -m expertmerge <command>`: fit / merge / evaluate / export / zoo.

`fit` is a LightningCLI (`--config`, `--model.*`, `--data.*`, `--trainer.*`, `--print_config`); the other
commands are small argparse programs over the same library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from expertmerge.errors import ExpertMergeError

USAGE = """usage: python -m expertmerge <command> [options]

commands:
  fit        learn merge coefficients on calibration data (Expert Merging), export the merged model
  merge      training-free merge (average, task_arithmetic, ties, dare_linear, dare_ties) from a mergekit-style YAML
  evaluate   score model folders against the experts on the held-out calibration samples of a fit config
  export     write the merged model of a saved fit checkpoint
  zoo        build (or locate) the offline demo zoo of a base model and experts

`python -m expertmerge <command> --help` describes each command's options.
"""


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


def _fit_cli(args: Sequence[str], run: bool = True):
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.cli import LightningCLI

    from calib_data import CalibrationDataModule
    from expertmerge.export import check_output_dir
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
            check_output_dir(settings.output_dir, settings.force)  # fail now, not after the fit
            config_yaml = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
            if sequence_moe:
                from lightning_modules.sequence_moe import ExportSequenceMoE

                self.trainer.callbacks.append(ExportSequenceMoE(settings, config_yaml))
                return
            if self.config[self.subcommand].model.moe:
                check_output_dir(settings.moe_dir(), settings.force)
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


def export_main(argv: Sequence[str]) -> int:
    import torch

    from expertmerge.export import check_output_dir
    from lightning_modules.callbacks import export_dense

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge export", description="Export the merged model of a fit checkpoint."
    )
    parser.add_argument("--config", required=True, help="the fit config the checkpoint was made with")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `fit` (.ckpt)")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--moe",
        action="store_true",
        help="write the fused MoE (experts' FFNs as MoE experts, learned shared tensors, router from the "
        "calibration data; model.moe_* and model.router_* keys of the config apply)",
    )
    options, overrides = parser.parse_known_args(argv)
    check_output_dir(options.out, options.force)
    try:
        checkpoint = torch.load(options.ckpt_path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as error:
        raise ExpertMergeError(f"Cannot read checkpoint '{options.ckpt_path}': {error}") from error
    module, datamodule = _configured(options.config, overrides)
    module.prepare(datamodule)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    from lightning_modules.sequence_moe import SequenceMoEModule

    if isinstance(module, SequenceMoEModule):
        path = module.export(options.out, options.force)
    elif options.moe:
        from expertmerge.evaluate import scores_table
        from lightning_modules.callbacks import evaluate_fit, export_moe

        path, scores = export_moe(
            module, options.out, options.force, evaluate_fit(module, include_base=False)
        )
        Console().print(scores_table("Held-out calibration samples, per task", scores, module.task_names))
    else:
        path = export_dense(module, options.out, options.force)
    Console().print(f"[green]exported[/green] {path}")
    return 0


def evaluate_main(argv: Sequence[str]) -> int:
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from expertmerge.evaluate import expert_scores, score_task, scores_table, scores_to_json
    from expertmerge.paths import resolve_path
    from expertmerge.pool import ExpertPool
    from expertmerge.teachers import TeacherJob, TeacherSettings, collect_targets

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge evaluate",
        description="Score model folders on a fit config's held-out samples.",
    )
    parser.add_argument("--config", required=True, help="a fit config: its tasks, data and experts are used")
    parser.add_argument(
        "--model", action="append", default=[], help="model folder to score (repeatable); NAME=PATH names it"
    )
    parser.add_argument("--json", help="also write the scores to this JSON file")
    options, overrides = parser.parse_known_args(argv)
    module, datamodule = _configured(options.config, overrides)
    hp = module.hparams
    named = {}
    for item in ["base=" + hp.base, *options.model]:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        named[name or path] = resolve_path(path)
    pool = ExpertPool(hp.base, hp.experts, trust_remote_code=hp.trust_remote_code)
    pool.validate()
    datamodule.check(module.expert_names)
    datamodule.setup("validate")
    experts_of = {spec.name: spec.expert for spec in datamodule.tasks}
    jobs = [
        TeacherJob(
            task,
            "eval",
            experts_of[task],
            s.input_ids,
            s.attention_mask,
            datamodule.fingerprint(task, "eval"),
        )
        for task in datamodule.task_names
        for s in [datamodule.task_samples(task, "eval")]
    ]
    settings = TeacherSettings(hidden_layers=(), logit_topk=hp.logit_topk, temperature=hp.temperature)
    targets, _ = collect_targets(
        jobs,
        pool.content_hashes(),
        lambda name: AutoModelForCausalLM.from_pretrained(
            str(pool.expert_dirs[name]), dtype=torch.float32
        ).eval(),
        settings,
        module.expert_names,
    )
    rows = {}
    for name, path in named.items():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=hp.trust_remote_code
        ).eval()
        rows[name] = {
            task: score_task(
                lambda ids, mask, m=model: m(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                datamodule.task_samples(task, "eval").input_ids,
                datamodule.task_samples(task, "eval").attention_mask,
                targets[(task, "eval")],
                hp.temperature,
            )
            for task in datamodule.task_names
        }
        del model
    rows["experts"] = {
        task: expert_scores(datamodule.task_samples(task, "eval").attention_mask, targets[(task, "eval")])
        for task in datamodule.task_names
    }
    Console().print(scores_table("Held-out calibration samples, per task", rows, datamodule.task_names))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(scores_to_json(rows), handle, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    console = Console(stderr=True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own rich progress bars cover the long steps
    try:
        if command == "fit":
            return fit_main(rest)
        if command == "merge":
            from expertmerge.merge import merge_main

            return merge_main(rest)
        if command == "zoo":
            from expertmerge.zoo import zoo_main

            return zoo_main(rest)
        if command == "evaluate":
            return evaluate_main(rest)
        if command == "export":
            return export_main(rest)
    except Exception as error:
        # Our errors can arrive wrapped (jsonargparse re-raises what a module's __init__ raised as a ValueError).
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ExpertMergeError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        console.print(f"[bold red]error:[/bold red] {cause}")
        return 2
    console.print(f"[bold red]error:[/bold red] unknown command '{command}'.\n{USAGE}")
    return 2
