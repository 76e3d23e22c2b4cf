"""`python -m expertmerge export`: write the merged model (dense, fused MoE or sequence MoE) of a fit checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from rich.markup import escape

from expertmerge.cli.fit import read_fit_config
from expertmerge.cli.fit_steps import check_pool_matches, fit_inputs
from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError

# What decides the shape of a checkpoint's tensors: a checkpoint made with other values cannot be loaded.
_STRUCTURE_KEYS = ("learn_include", "learn_exclude", "learn_matrices_only", "moe", "embeddings")


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at `path` as plain data, or one clear error when it is missing, empty, not a `fit`
    checkpoint or holds other Python objects (never unpickled: they could run code)."""
    from expertmerge.io.fit_checkpoint import load_fit_checkpoint

    return load_fit_checkpoint(path, "export --ckpt_path")


def check_checkpoint_matches(checkpoint: dict[str, Any], module: Any, path: str, config: str) -> None:
    """Refuse a checkpoint made with another config (other experts, other learned tensors, other module)."""
    saved = checkpoint.get("hyper_parameters") or {}
    current = dict(module.hparams)
    fix = f"pass the --config the checkpoint '{path}' was made with"
    # Expert Merging checkpoints carry their own section (coefficient names, stage); sequence-MoE ones do not.
    if ("expertmerge" in checkpoint) != ("base" in current) or "experts" not in saved:
        raise ExpertMergeError(
            f"export: the checkpoint '{path}' was made by another kind of fit than '{config}'; {fix}."
        )
    if list(saved["experts"]) != list(current["experts"]):
        raise ExpertMergeError(
            f"export: the checkpoint '{path}' has experts {list(saved['experts'])}, '{config}' has "
            f"{list(current['experts'])}; {fix}."
        )
    for key in _STRUCTURE_KEYS:
        if key in current and key in saved and saved[key] != current[key]:
            raise ExpertMergeError(
                f"export: the checkpoint '{path}' has model.{key} = {saved[key]!r}, '{config}' has "
                f"{current[key]!r}; {fix}."
            )
    if "expertmerge" in checkpoint:
        module.run.pool = module.run.make_pool()  # the merge is prepared on this pool later
        check_pool_matches(checkpoint, module.run.pool, path, "export")


def export_main(argv: Sequence[str]) -> int:
    from expertmerge.config_file import read_config_file
    from expertmerge.io.folder import check_output_dir

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
    read_config_file(options.config, "--config")  # a broken config is named before the checkpoint is read
    inputs = [options.config, options.ckpt_path]
    check_output_dir(options.out, options.force, inputs)
    fit_config = read_fit_config(options.config, overrides)
    module, datamodule = fit_config.model, fit_config.datamodule
    # The config's base, experts and calibration files are inputs too: checked before any model loads.
    check_output_dir(options.out, options.force, [*inputs, *fit_inputs(module.hparams, datamodule)[0]])
    checkpoint = read_checkpoint(options.ckpt_path)
    check_checkpoint_matches(checkpoint, module, options.ckpt_path, options.config)  # before any model loads
    from lightning_modules.sequence_moe import SequenceMoEModule

    health = None
    if isinstance(module, SequenceMoEModule):
        module.prepare(datamodule)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        path = module.export(options.out, options.force)
    else:
        from expertmerge.fit.outputs import evaluate_fit, export_dense, export_moe, fit_health

        module.run.datamodule = datamodule
        learned = module.run.prepare()
        learned.restore(checkpoint.get("expertmerge", {}))
        learned.load_coefficients(checkpoint["state_dict"])
        if options.moe:
            from expertmerge.evaluate import scores_table

            path, scores, health = export_moe(
                learned, options.out, options.force, evaluate_fit(learned, include_base=False)
            )
            make_console().print(
                scores_table("Held-out calibration samples, per task", scores, learned.task_names)
            )
        else:
            health = fit_health(learned)
            path = export_dense(learned, options.out, options.force, health=health)
    make_console().print(f"[green]exported[/green] {escape(str(path))}")
    if health is not None:
        make_console().print(f"health check: {health.summary_row()}")
    return 0
