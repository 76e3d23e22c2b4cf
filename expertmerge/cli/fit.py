"""`python -m expertmerge fit`: a LightningCLI over the learned-merge (or sequence-MoE) module and the data.

The command runs its steps in order: the layer-wise fit (stage 1), for Expert Merging++ the chunk-wise fit
(stage 2, a fresh Trainer and optimiser over the chunk-wise coefficients, same module: nothing is loaded
twice), then on rank 0 the evaluation table, the exports and the summary.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

EXPERT_MERGING_CLASS = "lightning_modules.merging.ExpertMergingModule"
SEQUENCE_MOE_CLASS = "lightning_modules.sequence_moe.SequenceMoEModule"
PROG = "python -m expertmerge"
FORCE_FLAG = "--export.force true"  # how a fit is told to replace its output folder

# Lightning messages that are noise for this command: warnings nobody running `fit` can act on ...
_QUIET_WARNINGS = (
    r".*tensorboardX.*",  # Lightning suggests TensorBoard when it falls back to its CSV logger; we want CSV
    r".*LightningCLI's args parameter is intended.*",  # argv is ours; sys.argv stays intact for DDP ranks
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # raised inside Lightning by newer torch
    r".*val_dataloader.* but have no `validation_step`.*",  # the sequence MoE is evaluated after the fit
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen base runs in eval mode on purpose
)
# ... and info lines: the litlogger/litmodels tips and the device inventory (which repeats for stage 2).
_QUIET_INFO = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",  # every fit seeds (seed_everything 0)
    "`Trainer.fit` stopped:",  # the progress bar already shows the last step of max_steps
)

# The loggers those lines come from: Lightning's rank-zero messages, and the seed ("Seed set to 0").
_QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_QUIET_INFO)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the lines above for the duration of the command only (no process-wide filters)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    drop = _DropLines()
    with warnings.catch_warnings():
        for message in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def _tokenizer_of(model: Any) -> str | None:
    """data.tokenizer: the base's (Expert Merging), or the first expert's (the sequence MoE's experts share
    one tokenizer, checked when it is built)."""
    init = getattr(model, "init_args", model)
    base = getattr(init, "base", None)
    if base:
        return base
    experts = getattr(init, "experts", None) or {}
    return next(iter(experts.values()), None)


def fit_inputs(model: Any, datamodule: Any) -> tuple[list[str], int]:
    """The fit's input paths (base, experts, calibration sources), which its outputs may not replace, and the
    base's weight bytes (the dense output's size) when the base is a local folder."""
    from pathlib import Path

    from expertmerge.io.reader import weights_bytes
    from expertmerge.io.support import support_bytes

    args = getattr(model, "init_args", None) or model
    experts = getattr(args, "experts", None) or {}
    base = getattr(args, "base", None)
    inputs = [base, *(experts.values() if isinstance(experts, dict) else experts)]
    for task in getattr(datamodule, "tasks", None) or []:
        inputs += list(getattr(task, "sources", None) or [])
    inputs = [str(item) for item in inputs if isinstance(item, str | Path)]
    local = isinstance(base, str) and Path(base).is_dir()
    estimate = weights_bytes(Path(base)) + support_bytes(base) if local else 0
    return inputs, estimate


def _config_files(args: Sequence[str]) -> list[str]:
    """The files given as `--config F` / `--config=F` (jsonargparse reads them in order, later ones win)."""
    files = []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            files.append(args[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def _fit_cli(args: Sequence[str], run: bool = True):
    """The `fit` LightningCLI over `args` (`run=False`: parsed and instantiated, nothing run)."""
    from argparse import ArgumentError

    from expertmerge.cli.fit_cli import build_fit_cli
    from expertmerge.config_file import read_config_file
    from expertmerge.errors import ExpertMergeError

    # jsonargparse's own messages for a binary, malformed, empty or non-mapping file name no file (or raise).
    configs = {path: read_config_file(path, "--config") for path in _config_files(args)}
    try:
        return build_fit_cli(args, run)
    except ArgumentError as error:
        message = _unknown_key_message(" ".join(str(error).split()), configs)
        if message is None:
            raise
        raise ExpertMergeError(message) from error


def _unknown_key_message(message: str, configs: dict[str, Any]) -> str | None:
    """jsonargparse's report of a key the model class does not take, buried in a failed Union of classes, as
    one line: the key, where it was written (which --config file, or the command line), the closest valid key."""
    import difflib
    import importlib
    import inspect
    import re

    found = re.search(
        r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes.*?'
        r"Problem with given class_path '([\w.]+)': Option '([\w.]+)' is not accepted",
        message,
    )
    if not found:
        return None
    group, class_path, option = found[1], found[2], found[3]
    module_name, _, class_name = class_path.rpartition(".")
    try:
        init = getattr(importlib.import_module(module_name), class_name).__init__
        valid = [
            name
            for name, p in inspect.signature(init).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (ImportError, AttributeError, TypeError, ValueError):
        valid = []
    where = "on the command line"
    for path, data in reversed(configs.items()):  # the last file that sets it is the one that counts
        block = data.get(group) if isinstance(data, dict) else None
        if isinstance(block, dict) and (option in block or option in (block.get("init_args") or {})):
            where = f"in '{path}'"
            break
    close = difflib.get_close_matches(option, valid, n=1)
    hint = (
        f'did you mean "{group}.{close[0]}"?' if close else f"`--{group}.help {class_name}` lists its keys."
    )
    return f'unknown key "{group}.{option}" {where} ({class_name} takes no `{option}`); {hint}'


_DESCRIPTION = (
    "Learn merge coefficients on calibration data (Expert Merging) and export the merged model. "
    "`--model.help ExpertMergingModule` lists the model options; a sequence-MoE config names "
    f"`model.class_path: {SEQUENCE_MOE_CLASS}`."
)


def check_pool_matches(checkpoint: dict[str, Any], options: Any, path: str, label: str) -> None:
    """Refuse an Expert Merging checkpoint learned on other weights of the same-named base or experts than
    the options' (`FitOptions`; content hashes, read from cache, no model loads)."""
    from expertmerge.io.fit_checkpoint import check_same_models
    from expertmerge.pool import BASE, ExpertPool

    pool = ExpertPool(options.base, options.experts, trust_remote_code=options.trust_remote_code)
    folders = {BASE: pool.base_dir, **pool.expert_dirs}
    check_same_models(checkpoint, pool.content_hashes(), folders, path, label)


def read_resume_checkpoint(config: Any) -> dict[str, Any] | None:
    """`fit --ckpt_path` (from the command line or the config) read as plain data, before Lightning or any
    model touches it: a missing, empty, foreign or crafted file is one clear error. None: no checkpoint, or a
    name Lightning resolves itself ("last", "best"), which it loads weights-only too."""
    from expertmerge.io.fit_checkpoint import is_lightning_checkpoint_name, load_fit_checkpoint

    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or is_lightning_checkpoint_name(str(ckpt_path)):
        return None
    return load_fit_checkpoint(str(ckpt_path), "--ckpt_path")


def export_expert_merging(result: Any, settings: Any, config_yaml: str) -> None:
    """After the fits (`FitResult`): the per-task comparison, the fused MoE (with router tuning), the dense
    merge, a summary."""
    from rich.markup import escape
    from rich.table import Table

    from expertmerge.console import make_console
    from expertmerge.evaluate import scores_table
    from expertmerge.fit.outputs import evaluate_fit, export_dense, export_moe, fit_health

    learned = result.learned
    merged, options = learned.merged, learned.options
    console = make_console()
    scores = evaluate_fit(learned) if settings.evaluate else None
    moe_path, moe_health = None, None
    if options.moe.moe:
        moe_path, moe_scores, moe_health = export_moe(
            learned, settings.moe_dir(), settings.force, scores, force_flag=FORCE_FLAG
        )
        scores = moe_scores if scores is not None else None
    if scores is not None:
        console.print(scores_table("Held-out calibration samples, per task", scores, learned.task_names))
    health = fit_health(learned)
    last_steps = result.trainers[-1].global_step
    path = export_dense(
        learned, settings.output_dir, settings.force, config_yaml, scores, health, last_steps, FORCE_FLAG
    )
    summary = Table(title="expertmerge fit", show_header=False)
    summary.add_row("output", escape(str(path)))  # paths are not rich markup
    if moe_path is not None:
        summary.add_row("fused MoE", f"{escape(str(moe_path))} (router {options.moe.moe_router})")
    summary.add_row("experts", escape(", ".join(learned.expert_names)))
    summary.add_row("tensors with learned coefficients", str(len(merged.coefficient_names)))
    summary.add_row("coefficients", str(merged.coefficients.num_trainable()))
    summary.add_row("steps", result.steps)
    if learned.start_scores or merged.start_merge != "task_arithmetic":
        summary.add_row("start", f"{merged.start_merge} at alpha0 {merged.start_alpha:.4g}")
    if learned.stage2_choice is not None:
        choice = learned.stage2_choice
        verdict = "kept" if choice["kept"] else "reverted to layer-wise"
        summary.add_row(
            "chunk-wise stage (held-out objective)",
            f"{verdict}: {choice['objective_chunk_wise']:.4f} vs layer-wise {choice['objective_layer_wise']:.4f}"
            f" (standard error {choice['standard_error']:.4f})",
        )
    if learned.task_scales:
        scales = ", ".join(f"{t} {v:.2f}" for t, v in learned.task_scales.items())
        summary.add_row(f"task scales ({options.loss.task_balance})", escape(scales))
    stats = learned.calibration.teacher_stats
    summary.add_row("teacher targets computed / reused", f"{stats.computed} / {stats.reused}")
    summary.add_row(
        "set-up wall time (base, task vectors, teachers, start)", f"{learned.prepare_seconds:.1f} s"
    )
    summary.add_row("fit wall time", f"{result.seconds - learned.prepare_seconds:.1f} s")
    summary.add_row("health check", health.summary_row())
    if moe_health is not None:
        summary.add_row("fused MoE health check", moe_health.summary_row())
    console.print(summary)
    if settings.strict_health:
        for folder, check in ((path, health), (moe_path, moe_health)):
            if check is not None and not check.healthy:
                raise check.error(folder)


def export_sequence_moe(module: Any, settings: Any, config_yaml: str) -> None:
    """After the fit: the per-task table and the routing accuracy, then the atomic export."""
    from rich.markup import escape

    from expertmerge.console import make_console
    from expertmerge.evaluate import scores_table
    from lightning_modules.sequence_moe import routing_table

    console = make_console()
    rows, accuracy = module.evaluate() if settings.evaluate else (None, None)
    if rows is not None:
        console.print(scores_table("Held-out calibration samples, per task", rows, module.task_names))
        console.print(routing_table(accuracy, module.task_names))
    path = module.export(settings.output_dir, settings.force, rows, accuracy, config_yaml)
    console.print(f"[green]exported[/green] {escape(str(path))}")


def fit_main(argv: Sequence[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):  # ours: the merge's options; Lightning's on --help-all
        from expertmerge.cli.fit_help import fit_help

        print(fit_help())
        return 0
    argv = ["--help" if arg == "--help-all" else arg for arg in argv]
    with quiet_lightning():
        _fit_cli(["fit", *argv])
    return 0


def read_fit_config(config: str, overrides: Sequence[str] = ()) -> Any:
    """A fit config, parsed and checked, nothing run: `.model` (the Lightning module, not prepared),
    `.datamodule`, `.config` (the parsed namespace) and `.instantiate_trainer(**settings)` (a Trainer of the
    config's settings)."""
    with quiet_lightning():
        return _fit_cli(["--config", config, *overrides], run=False)
