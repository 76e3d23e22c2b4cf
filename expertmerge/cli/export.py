"""`python -m expertmerge export`: write the merged model (dense, fused MoE or sequence MoE) of a fit checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console

from expertmerge.cli.fit import _configured
from expertmerge.errors import ExpertMergeError


def export_main(argv: Sequence[str]) -> int:
    import torch

    from expertmerge.io.folder import check_output_dir
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
    check_output_dir(options.out, options.force, inputs=[options.config, options.ckpt_path])
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
