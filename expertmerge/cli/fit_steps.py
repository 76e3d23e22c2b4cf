"""The `fit` command's steps around the Lightning fit: its inputs and output checks, the resume checkpoint, and
after the fit the evaluation table, the exports and the summary (`ExpertMergeCLI` in `fit_cli.py` calls them)."""

from __future__ import annotations

from typing import Any

EXPERT_MERGING_CLASS = "lightning_modules.merging.ExpertMergingModule"
SEQUENCE_MOE_CLASS = "lightning_modules.sequence_moe.SequenceMoEModule"
PROG = "python -m expertmerge"
FORCE_FLAG = "--export.force true"  # how a fit is told to replace its output folder


def tokenizer_of(model: Any) -> str | None:
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


DESCRIPTION = (
    "Learn merge coefficients on calibration data (Expert Merging) and export the merged model. "
    "`--model.help ExpertMergingModule` lists the model options; a sequence-MoE config names "
    f"`model.class_path: {SEQUENCE_MOE_CLASS}`."
)


def check_pool_matches(checkpoint: dict[str, Any], pool: Any, path: str, label: str) -> None:
    """Refuse an Expert Merging checkpoint learned on other weights of the same-named base or experts than
    the pool's (content hashes, read from cache, no model loads)."""
    from expertmerge.io.fit_checkpoint import check_same_models
    from expertmerge.pool import BASE

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

    from expertmerge.accuracy import accuracy_table
    from expertmerge.console import make_console
    from expertmerge.evaluate import scores_table
    from expertmerge.fit.outputs import evaluate_fit, export_dense, export_moe, fit_accuracy, fit_health

    learned = result.learned
    options = learned.options
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
    accuracy = fit_accuracy(learned) if settings.evaluate else {}
    if accuracy:
        title = "Accuracy by greedy generation on the held-out records, per task"
        console.print(accuracy_table(title, accuracy, list(accuracy["base"])))
    health = fit_health(learned)
    last_steps = result.trainers[-1].global_step
    path = export_dense(
        learned,
        settings.output_dir,
        settings.force,
        config_yaml,
        scores,
        health,
        last_steps,
        FORCE_FLAG,
        accuracy,
    )
    console.print(_summary(result, path, moe_path, health, moe_health))
    if settings.strict_health:
        for folder, check in ((path, health), (moe_path, moe_health)):
            if check is not None and not check.healthy:
                raise check.error(folder)


def _summary(result: Any, path: Any, moe_path: Any, health: Any, moe_health: Any) -> Any:
    """The fit's closing table: outputs, what was learned from where, the costs, the health checks."""
    from rich.markup import escape
    from rich.table import Table

    learned = result.learned
    merged, options = learned.merged, learned.options
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
    answers = learned.calibration.answer_stats
    if answers is not None:
        counts = ", ".join(
            f"{t} {c['prompts']} ({c['empty']} empty, {c['cut']} cut)" for t, c in answers.counts.items()
        )
        summary.add_row(
            "expert answers written / reused (splits)",
            escape(f"{answers.computed} / {answers.reused}: {counts}"),
        )
    summary.add_row(
        "set-up wall time (base, task vectors, teachers, start)", f"{learned.prepare_seconds:.1f} s"
    )
    summary.add_row("fit wall time", f"{result.seconds - learned.prepare_seconds:.1f} s")
    summary.add_row("health check", health.summary_row())
    if moe_health is not None:
        summary.add_row("fused MoE health check", moe_health.summary_row())
    return summary


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
