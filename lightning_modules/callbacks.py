"""Callbacks of the fit: at its end, compare the merges per task and export the learned one."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM

from expertmerge.evaluate import (
    TaskScores,
    expert_scores,
    mean_scores,
    score_task,
    scores_table,
    scores_to_json,
)
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir
from expertmerge.io.reader import Checkpoint, weights_bytes
from expertmerge.io.support import copy_support_files, write_config
from expertmerge.io.writer import write_state_dict
from expertmerge.plots import write_plots


@dataclass
class ExportSettings:
    """Where and how the fit writes its merged model.

    Args:
        output_dir: the merged model folder (written atomically at the end of the fit).
        force: replace `output_dir` if it exists.
        evaluate: print (and save as eval.json) the per-task table base / task arithmetic / learned / expert.
        moe_output_dir: where the fused MoE goes when `model.moe` is on (default: `output_dir` + "-moe").
    """

    output_dir: str = "outputs/expert-merging"
    force: bool = False
    evaluate: bool = True
    moe_output_dir: str | None = None

    def moe_dir(self) -> str:
        return self.moe_output_dir or self.output_dir.rstrip("/") + "-moe"


def _stored_dtype(folder: Path) -> torch.dtype:
    dtype = getattr(AutoConfig.from_pretrained(str(folder)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def evaluate_fit(module: Any, include_base: bool = True) -> dict[str, dict[str, TaskScores]]:
    """Per-task scores of base, task arithmetic at alpha0, the learned merge and the experts (held-out split)."""
    datamodule = module.datamodule
    device = module.device
    rows: dict[str, dict[str, TaskScores]] = {}
    temperature = module.hparams.temperature

    def score(forward) -> dict[str, TaskScores]:
        """`forward(ids, mask, task)`: the model's logits on that task's samples."""
        result = {}
        for task in module.task_names:
            samples = datamodule.task_samples(task, "eval")
            result[task] = score_task(
                lambda ids, mask, task=task: forward(ids, mask, task),
                samples.input_ids,
                samples.attention_mask,
                module.targets[(task, "eval")],
                temperature,
                device=device,
            )
        return result

    module.eval()
    if include_base:
        base = (
            AutoModelForCausalLM.from_pretrained(str(module.pool.base_dir), dtype=torch.float32)
            .eval()
            .to(device)
        )
        rows["base"] = score(
            lambda ids, mask, task: base(input_ids=ids, attention_mask=mask, use_cache=False).logits
        )
        del base

    def merged(coefficients=None, oracle: bool = False):
        def forward(ids, mask, task):
            expert = module.oracle_expert(task) if oracle else None
            return module(
                ids, mask, coefficients=coefficients, output_hidden_states=False, oracle_expert=expert
            ).logits

        return forward

    rows["task arithmetic (alpha0)"] = score(merged(module.alpha0_coefficients))
    if module.stage1_values is not None:
        stage1 = module.layerwise_coefficients(module.stage1_values)
        rows["expert merging (layer-wise)"] = score(merged(stage1))
        rows["expert merging++ (chunk-wise)"] = score(merged())
    else:
        rows["expert merging"] = score(merged())
    if module.hparams.moe:
        # the learned shared backbone with each task's own expert FFN: the MoE with a perfect router
        rows["MoE backbone, oracle routing"] = score(merged(oracle=True))
    rows["experts"] = {
        task: expert_scores(
            datamodule.task_samples(task, "eval").attention_mask, module.targets[(task, "eval")]
        )
        for task in module.task_names
    }
    return rows


@torch.no_grad()
def save_merged_weights(module: Any, folder: Path, dtype: torch.dtype) -> None:
    """The learned merge as a plain model folder, in `dtype`; the module itself is left as it was.

    The tensor names are the base checkpoint's: what `save_pretrained` wrote there (a tied `lm_head` is not
    written twice), so the folder reloads as the merged model. Streamed through the one writer, tensor by
    tensor, each checked to be finite.
    """
    pool = module.pool
    state = module.model.state_dict()
    merged = module.merged_parameters()
    missing = [name for name in pool.tensor_names if name not in merged and name not in state]
    if missing:
        raise RuntimeError(f"the fitted model lacks tensors of the base checkpoint: {missing[:5]}")
    write_state_dict(folder, {name: merged.get(name, state.get(name)) for name in pool.tensor_names}, dtype)
    write_config(pool.base_dir, folder, dtype)


def export_dense(
    module: Any,
    output_dir: str | Path,
    force: bool,
    config_yaml: str | None = None,
    scores: dict[str, dict[str, TaskScores]] | None = None,
) -> Path:
    """Fold the learned coefficients into the base weights and write a Hugging Face model folder."""
    pool = module.pool
    inputs = [pool.base_dir, *pool.expert_dirs.values()]
    with atomic_output_dir(output_dir, force, inputs, weights_bytes(pool.base_dir), command="fit") as tmp:
        save_merged_weights(module, tmp, _stored_dtype(pool.base_dir))
        # A base without a tokenizer still gives usable weights (with the user's own tokenizer).
        copy_support_files(pool.base_dir, tmp)
        coefficients = {
            "experts": module.expert_names,
            "alpha0": module.hparams.alpha0,
            "chunk_counts": dict(
                zip(module.coefficient_names, module.coefficients.chunk_counts, strict=True)
            ),
            "coefficients": module.coefficients.to_dict(module.expert_names),
            "layerwise": {
                name: dict(zip(module.expert_names, [round(float(v), 6) for v in column], strict=True))
                for name, column in zip(
                    module.coefficient_names, module.coefficients.layerwise_values().T, strict=True
                )
            },
        }
        (tmp / "coefficients.json").write_text(json.dumps(coefficients, indent=1))
        if module.chunk_allocation is not None:
            (tmp / "chunk_allocation.json").write_text(json.dumps(module.chunk_allocation, indent=1))
        write_plots(module, tmp)
        if scores:
            (tmp / "eval.json").write_text(json.dumps(scores_to_json(scores), indent=1))
        if config_yaml:
            (tmp / "fit_config.yaml").write_text(config_yaml)
        hashes = pool.content_hashes()
        sections = {}
        if scores:
            lines = [
                "| model | mean perplexity | mean KL to expert | mean top-1 agree |",
                "|---|---|---|---|",
            ]
            for name, per_task in scores.items():
                m = mean_scores(per_task)
                lines.append(f"| {name} | {m.perplexity:.3f} | {m.kl:.4f} | {m.top1:.1%} |")
            sections["Evaluation (held-out calibration samples)"] = "\n".join(lines)
        hp = module.hparams
        write_merge_card(
            tmp,
            title="Expert Merging result",
            method="expert_merging (learned coefficients, arXiv 2509.25712)",
            base=(pool.base_source, hashes["base"]),
            experts={name: (pool.expert_sources[name], hashes[name]) for name in module.expert_names},
            parameters={
                "alpha0": hp.alpha0,
                "gamma": hp.gamma,
                "mu": hp.mu,
                "temperature": hp.temperature,
                "hidden_layers": module.hidden_layers,
                "task_weights": hp.task_weights,
                "tasks": {
                    t: module.expert_names[k]
                    for t, k in zip(module.task_names, module.task_experts, strict=True)
                },
                "learned_tensors": len(module.coefficient_names),
                "chunking": (
                    None
                    if module.chunk_allocation is None
                    else {
                        k: module.chunk_allocation[k]
                        for k in ("budget", "kappa", "total_chunks", "fixed_tensors")
                    }
                ),
                "coefficients": module.coefficients.num_trainable(),
                "steps": module.global_step,
            },
            sections=sections,
        )
    return Path(output_dir)


class ExportMergedModel(pl.Callback):
    """At the end of `fit`: the per-task comparison table, then the merged model written atomically."""

    def __init__(self, settings: ExportSettings, config_yaml: str | None = None) -> None:
        self.settings = settings
        self.config_yaml = config_yaml
        self._started = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._started = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        console = Console()
        scores = None
        if self.settings.evaluate:
            scores = evaluate_fit(pl_module)
        moe_path = None
        if pl_module.hparams.moe:
            moe_path, moe_scores = export_moe(pl_module, self.settings.moe_dir(), self.settings.force, scores)
            scores = moe_scores if scores is not None else None
        if scores is not None:
            console.print(
                scores_table("Held-out calibration samples, per task", scores, pl_module.task_names)
            )
        fit_seconds = time.perf_counter() - self._started
        path = export_dense(
            pl_module, self.settings.output_dir, self.settings.force, self.config_yaml, scores
        )
        summary = Table(title="expertmerge fit", show_header=False)
        summary.add_row("output", str(path))
        if moe_path is not None:
            summary.add_row("fused MoE", f"{moe_path} (router {pl_module.hparams.moe_router})")
        summary.add_row("experts", ", ".join(pl_module.expert_names))
        summary.add_row("tensors with learned coefficients", str(len(pl_module.coefficient_names)))
        summary.add_row("coefficients", str(pl_module.coefficients.num_trainable()))
        summary.add_row("steps", str(trainer.global_step))
        summary.add_row(
            "teacher targets computed / reused",
            f"{pl_module.teacher_stats.computed} / {pl_module.teacher_stats.reused}",
        )
        summary.add_row("fit wall time", f"{fit_seconds:.1f} s")
        console.print(summary)


# --------------------------------------------------------------------------------------- fused MoE export
def _batches(samples: Any, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (samples.input_ids[i : i + batch_size], samples.attention_mask[i : i + batch_size])
        for i in range(0, samples.input_ids.shape[0], batch_size)
    ]


@torch.no_grad()
def _calibrated(rows: torch.Tensor, means: torch.Tensor, gap: float = 4.0) -> torch.Tensor:
    """Scale each layer's unit router rows so a task's mean input prefers its own expert by about `gap` logits."""
    scaled = []
    for layer in range(rows.shape[0]):
        logits = means[:, layer] @ rows[layer].T  # [tasks(=experts), experts]
        experts = logits.shape[0]
        own = logits.diagonal()
        others = (logits.sum(1) - own) / max(1, experts - 1)
        margin = float((own - others).mean())
        scaled.append(rows[layer] * (gap / margin if margin > 1e-6 else 1.0))
    return torch.stack(scaled)


@torch.no_grad()
def router_rows(module: Any, method: str, seed: int = 0) -> torch.Tensor:
    """[layers, experts, hidden] router weights for the fused MoE, from the fit's calibration data."""
    from expertmerge.moe import (
        mean_token_embeddings,
        router_from_embeddings,
        router_from_hidden,
        router_random,
    )

    datamodule, names = module.datamodule, module.expert_names
    config = module.model.config
    layers, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    tasks_of = {
        k: [t for t, e in zip(module.task_names, module.task_experts, strict=True) if e == k]
        for k in range(len(names))
    }
    if method == "random":
        return router_random(len(names), layers, hidden, seed=seed)
    if method == "cheap_embed":
        embedding = module.model.get_input_embeddings().weight
        per_expert = []
        for k in range(len(names)):
            batches = {t: _batches(datamodule.task_samples(t, "train")) for t in tasks_of[k]}
            per_expert.append(mean_token_embeddings(embedding, batches).mean(0))
        return router_from_embeddings(torch.stack(per_expert), layers, center=True, names=names)
    means, within = _router_input_statistics(module, tasks_of)
    centred = means - means.mean(0, keepdim=True)  # [experts, layers, hidden]
    router_from_hidden(means, center=True, names=names)  # warns when two tasks look alike to the router
    rows = []
    for layer in range(layers):
        # Whitened class means (linear discriminant): directions that separate the experts' tokens, not
        # merely point at their means, which matters when tasks share most of their hidden-state mass.
        scatter = within[layer]
        target = centred[:, layer].double()
        if scatter.dim() == 1:  # wide models keep only the variances (see FULL_COVARIANCE_MAX_HIDDEN)
            solve = target / (scatter + 0.1 * scatter.mean())
        else:
            shrink = 0.1 * scatter.diagonal().mean()
            solve = torch.linalg.solve(scatter + shrink * torch.eye(hidden, dtype=scatter.dtype), target.T).T
        rows.append(solve / solve.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return _calibrated(torch.stack(rows).float(), centred.float(), ROUTER_GAP)


FULL_COVARIANCE_MAX_HIDDEN = 2048  # above this, a [layers, hidden, hidden] fp64 scatter costs gigabytes
ROUTER_GAP = 3.0  # logits by which a task's mean router input prefers its own expert after initialisation


@torch.no_grad()
def _router_input_statistics(
    module: Any, tasks_of: dict[int, list[str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert the mean router input [experts, layers, hidden] (through the learned backbone with that
    expert's FFN), and per layer the pooled within-expert covariance [layers, hidden, hidden] (fp64)."""
    from expertmerge.moe import router_input_modules

    datamodule = module.datamodule
    norms = router_input_modules(module.model)
    captured: list[torch.Tensor | None] = [None] * len(norms)

    def hook_for(layer: int):
        def hook(_module: Any, _args: Any, output: Any) -> None:
            captured[layer] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [norm.register_forward_hook(hook_for(i)) for i, norm in enumerate(norms)]
    sums, squares, counts = [], [], []
    try:
        for k, tasks in tasks_of.items():
            total, outer, count = None, None, 0
            for task in tasks:
                for ids, mask in _batches(datamodule.task_samples(task, "train")):
                    ids, mask = ids.to(module.device), mask.to(module.device)
                    module(ids, mask, output_hidden_states=False, oracle_expert=k)
                    keep = mask.bool()
                    states = torch.stack([c[keep] for c in captured]).double()  # [layers, tokens, hidden]
                    total = states.sum(1) if total is None else total + states.sum(1)
                    if states.shape[-1] > FULL_COVARIANCE_MAX_HIDDEN:
                        products = (states * states).sum(1)  # [layers, hidden]: variances only
                    else:
                        products = states.transpose(1, 2) @ states
                    outer = products if outer is None else outer + products
                    count += int(keep.sum())
            sums.append(total)
            squares.append(outer)
            counts.append(count)
    finally:
        for handle in handles:
            handle.remove()
    means = torch.stack([total / count for total, count in zip(sums, counts, strict=True)])

    def centred_scatter(outer: torch.Tensor, count: int, mean: torch.Tensor) -> torch.Tensor:
        if outer.dim() == 2:
            return outer - count * mean * mean
        return outer - count * torch.einsum("lh,lg->lhg", mean, mean)

    within = sum(
        centred_scatter(outer, count, mean) for outer, count, mean in zip(squares, counts, means, strict=True)
    ) / max(1, sum(counts) - len(counts))
    return means.float(), within


def _moe_scores(model: torch.nn.Module, module: Any) -> dict[str, TaskScores]:
    datamodule = module.datamodule
    result = {}
    for task in module.task_names:
        samples = datamodule.task_samples(task, "eval")
        result[task] = score_task(
            lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
            samples.input_ids,
            samples.attention_mask,
            module.targets[(task, "eval")],
            module.hparams.temperature,
            device=module.device,
        )
    return result


def tune_router(module: Any, moe: torch.nn.Module) -> None:
    """Train only the gates of `moe` on the mixed calibration set (a short Lightning fit of its own)."""
    from lightning_modules.router import RouterTuningModule

    hp = module.hparams
    tuner = RouterTuningModule(
        moe, module.targets, module.task_names, hp.temperature, hp.router_lr, hp.router_balance
    )
    trainer = pl.Trainer(
        max_steps=int(hp.router_tuning_steps),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        accelerator="cpu" if module.device.type == "cpu" else "auto",
        devices=1,
        enable_progress_bar=False,  # runs inside the fit's own live progress display
    )
    Console().print(f"router tuning: {hp.router_tuning_steps} steps on the mixed calibration set")
    trainer.fit(tuner, train_dataloaders=module.datamodule.train_dataloader())
    moe.eval()


def export_moe(
    module: Any, output_dir: str | Path, force: bool, scores: dict[str, dict[str, TaskScores]] | None = None
) -> tuple[Path, dict[str, dict[str, TaskScores]]]:
    """Write the fused MoE (learned shared backbone, experts' FFNs, initialised and optionally tuned router)."""
    from expertmerge.moe import write_moe_checkpoint

    hp = module.hparams
    pool = module.pool
    method = hp.moe_router
    rows = router_rows(module, method)
    merged = {name: t.detach() for name, t in module.merged_parameters().items()}
    state = dict(module.model.state_dict())
    out = Path(output_dir)
    parameters = {
        "router_tuning_steps": hp.router_tuning_steps,
        "shared_tensors": "learned coefficients with oracle routing (expertmerge fit, model.moe)",
        "alpha0": hp.alpha0,
        "gamma": hp.gamma,
    }
    write_moe_checkpoint(
        pool,
        out,
        lambda name: merged[name] if name in merged else state[name].detach(),
        rows,
        top_k=hp.moe_top_k,
        include_base_expert=hp.moe_include_base_expert,
        router_method=method,
        force=force,
        card_parameters=parameters,
    )
    scores = dict(scores or {})
    moe = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval().to(module.device)
    scores[f"MoE (router {method}, top-{hp.moe_top_k})"] = _moe_scores(moe, module)
    if hp.router_tuning_steps > 0:
        tune_router(module, moe)
        scores[f"MoE (router tuned, top-{hp.moe_top_k})"] = _moe_scores(moe, module)
        # Replace our own output with the tuned routers: the same files, the weights written again.
        with atomic_output_dir(out, force=True, inputs=[pool.base_dir, *pool.expert_dirs.values()]) as tmp:
            for item in out.iterdir():
                if item.is_file() and not item.name.startswith("model"):
                    shutil.copyfile(item, tmp / item.name)
            tuned = moe.state_dict()  # written under the names the first export planned (no tied copies)
            names = Checkpoint(out, f"MoE output ({out})").names
            write_state_dict(tmp, {name: tuned[name] for name in names}, _stored_dtype(out))
    (out / "eval.json").write_text(json.dumps(scores_to_json(scores), indent=1))
    return out, scores
