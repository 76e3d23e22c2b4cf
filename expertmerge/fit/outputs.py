"""After a fit: compare the merges per task, check the merge's health, export the dense merge and the fused MoE.

Each step reads the prepared `LearnedMerge` (on the device it was fitted on); none needs Lightning.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from expertmerge.accuracy import TaskAccuracy, merge_accuracy_json
from expertmerge.console import make_console
from expertmerge.evaluate import (
    TaskScores,
    card_evaluation_lines,
    expert_scores,
    score_model_tasks,
    score_task,
    scores_to_json,
)
from expertmerge.fit.learned import LearnedMerge
from expertmerge.health import (
    BUILTIN_SOURCE,
    BUILTIN_TEXTS,
    HealthCheck,
    check_folder,
    check_model,
    samples_from_ids,
)
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir, replace_file
from expertmerge.io.layout import TensorLayout, meta_model
from expertmerge.io.reader import Checkpoint, weights_bytes
from expertmerge.io.support import copy_support_files, support_bytes, write_config
from expertmerge.io.writer import write_state_dict
from expertmerge.plots import write_plots
from expertmerge.pool import BASE as BASE_TEACHER  # a task's `expert: base`: the base teaches it


@dataclass
class ExportSettings:
    """Where and how the fit writes its merged model.

    Args:
        output_dir: the merged model folder (written atomically at the end of the fit).
        force: replace `output_dir` if it exists.
        evaluate: print (and save as eval.json) the per-task table base / task arithmetic / learned / expert.
        moe_output_dir: where the fused MoE goes when `model.moe` is on (default: `output_dir` + "-moe").
        strict_health: fail (exit 2, the output kept) when the merged model's perplexity on a few held-out
            calibration samples is far worse than the base's (`expertmerge.health`); by default a warning.
    """

    output_dir: str = "outputs/expert-merging"
    force: bool = False
    evaluate: bool = True
    moe_output_dir: str | None = None
    strict_health: bool = False

    def moe_dir(self) -> str:
        return self.moe_output_dir or self.output_dir.rstrip("/") + "-moe"


def _stored_dtype(folder: Path) -> torch.dtype:
    dtype = getattr(AutoConfig.from_pretrained(str(folder)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


START_ROWS = {"task_arithmetic": "task arithmetic (alpha0)", "regmean": "RegMean (alpha0)"}


def start_row_name(rows: Mapping[str, Any]) -> str:
    """Which row of `evaluate_fit`'s result (or its eval.json) is the start merge (task arithmetic or RegMean
    at the start value)."""
    (name,) = [n for n in START_ROWS.values() if n in rows]
    return name


def start_row(rows: Mapping[str, Any]) -> Any:
    """The start merge's row of `evaluate_fit`'s result."""
    return rows[start_row_name(rows)]


def evaluate_fit(learned: LearnedMerge, include_base: bool = True) -> dict[str, dict[str, TaskScores]]:
    """Per-task scores of base, task arithmetic at alpha0, the learned merge and the experts (held-out split)."""
    datamodule = learned.calibration.datamodule
    device = learned.merged.device
    rows: dict[str, dict[str, TaskScores]] = {}
    temperature = learned.options.loss.temperature

    def score(forward) -> dict[str, TaskScores]:
        """`forward(ids, mask, task)`: the model's logits on that task's samples."""
        result = {}
        for task in learned.task_names:
            samples = datamodule.task_samples(task, "eval")
            result[task] = score_task(
                lambda ids, mask, task=task: forward(ids, mask, task),
                samples.input_ids,
                samples.attention_mask,
                learned.calibration.targets[(task, "eval")],
                temperature,
                device=device,
            )
        return result

    learned.merged.eval()
    if include_base:
        base = learned.pool.load_model().to(device)
        rows["base"] = score(
            lambda ids, mask, task: base(input_ids=ids, attention_mask=mask, use_cache=False).logits
        )
        del base

    def merged(coefficients=None, oracle: bool = False):
        def forward(ids, mask, task):
            expert = learned.merged.oracle_expert(task) if oracle else None
            return learned.merged(
                ids, mask, coefficients=coefficients, output_hidden_states=False, oracle_expert=expert
            ).logits

        return forward

    rows[START_ROWS[learned.merged.start_merge]] = score(merged(learned.merged.alpha0_coefficients))
    if learned.merged.stage1_values is not None:
        stage1 = learned.merged.layerwise_coefficients(learned.merged.stage1_values)
        rows["expert merging (layer-wise)"] = score(merged(stage1))
        rows["expert merging++ (chunk-wise)"] = score(merged())
    else:
        rows["expert merging"] = score(merged())
    if learned.options.moe.moe:
        # the learned shared backbone with each task's own expert FFN: the MoE with a perfect router
        rows["MoE backbone, oracle routing"] = score(merged(oracle=True))
    rows["experts"] = {
        task: expert_scores(
            datamodule.task_samples(task, "eval").attention_mask, learned.calibration.targets[(task, "eval")]
        )
        for task in learned.task_names
    }
    return rows


@torch.no_grad()
def fit_accuracy(learned: LearnedMerge) -> dict[str, dict[str, TaskAccuracy]]:
    """Accuracy by generation on the tasks whose held-out records name reference answers (`answer_field`): the
    base, the start merge, the learned merge and each task's own teacher; {} without such tasks.

    A merge generates as a plain model: a copy of the fitted model with the merged tensors written in (one more
    model in memory, only while it generates)."""
    import copy

    from expertmerge.accuracy import accuracy_tasks, experts_accuracy, model_accuracy

    datamodule = learned.calibration.datamodule
    if not getattr(datamodule, "scored_task_names", None):
        return {}
    tasks, tokenizer, device = accuracy_tasks(datamodule), datamodule.tokenizer, learned.merged.device

    def load(folder: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval().to(device)

    base = load(learned.pool.base_dir)
    rows = {"base": model_accuracy(base, tokenizer, tasks, "base")}
    del base
    merges = {
        START_ROWS[learned.merged.start_merge]: learned.merged.alpha0_coefficients,
        "expert merging": None,
    }
    for name, coefficients in merges.items():
        model = copy.deepcopy(learned.merged.model).eval()
        model.load_state_dict(learned.merged.merged_parameters(coefficients), strict=False)
        rows[name] = model_accuracy(model, tokenizer, tasks, name)
        del model
    teachers = {"base": learned.pool.base_dir, **learned.pool.expert_dirs}
    rows["experts"] = experts_accuracy(
        tasks,
        {spec.name: spec.expert for spec in datamodule.tasks},
        lambda teacher: load(teachers[teacher]),
        tokenizer,
        known={BASE_TEACHER: rows["base"]},
    )
    return rows


@torch.no_grad()
def save_merged_weights(learned: LearnedMerge, folder: Path, dtype: torch.dtype) -> None:
    """The learned merge as a plain model folder, in `dtype`; the merge itself is left as it was.

    The tensor names and layout are the base checkpoint's: what `save_pretrained` wrote there (a tied `lm_head`
    is not written twice; fused MoE experts go back to the checkpoint's per-expert tensors where it has them),
    so the folder reloads as the merged model. Streamed through the one writer, tensor by tensor, each checked
    to be finite.
    """
    pool = learned.pool
    state = dict(learned.merged.model.state_dict())
    state.update(learned.merged.merged_parameters())
    stored = pool.layout.to_checkpoint(state)
    write_state_dict(folder, {name: stored[name] for name in pool.tensor_names if name in stored}, dtype)
    write_config(pool.base_dir, folder, dtype)


def health_samples(learned: LearnedMerge) -> Any:
    """A few held-out calibration samples, taken from every task in turn (the built-in texts without any)."""
    from expertmerge.health import MAX_TEXTS, encode_texts
    from expertmerge.io.tokenizer import load_tokenizer

    splits = [learned.calibration.datamodule.task_samples(task, "eval") for task in learned.task_names]
    picked = [
        (split.input_ids[i], split.attention_mask[i])
        for i in range(MAX_TEXTS)
        for split in splits
        if i < split.input_ids.shape[0]
    ][:MAX_TEXTS]
    if not picked:
        return encode_texts(load_tokenizer(learned.pool.base_dir), BUILTIN_TEXTS, BUILTIN_SOURCE)
    ids, masks = zip(*picked, strict=True)  # tasks differ in padded length: rows, not one tensor
    return samples_from_ids(list(ids), list(masks), "held-out calibration samples")


@torch.no_grad()
def fit_health(learned: LearnedMerge) -> HealthCheck:
    """The learned merge in memory (as exported, before any file is renamed into place) against the base."""
    learned.merged.eval()
    return check_model(
        lambda ids, mask: (
            learned.merged(
                ids.to(learned.merged.device), mask.to(learned.merged.device), output_hidden_states=False
            ).logits
        ),
        int(learned.merged.model.get_input_embeddings().weight.shape[0]),
        learned.pool.base_dir,
        health_samples(learned),
        learned.merged.device,
    )


def export_dense(
    learned: LearnedMerge,
    output_dir: str | Path,
    force: bool,
    config_yaml: str | None = None,
    scores: dict[str, dict[str, TaskScores]] | None = None,
    health: HealthCheck | None = None,
    steps: int | None = None,
    force_flag: str = "--force",
    accuracy: dict[str, dict[str, TaskAccuracy]] | None = None,
) -> Path:
    """Fold the learned coefficients into the base weights and write a Hugging Face model folder.

    `health` (`fit_health(learned)`) goes into the merge card; `steps` (the stages' steps) too. `force_flag`:
    how the calling command is told to replace an existing output. `accuracy` (`fit_accuracy`) joins the
    scores in eval.json."""
    pool = learned.pool
    inputs = [pool.base_dir, *pool.expert_dirs.values()]
    estimate = weights_bytes(pool.base_dir) + support_bytes(pool.base_dir)
    with atomic_output_dir(output_dir, force, inputs, estimate, command="fit", force_flag=force_flag) as tmp:
        save_merged_weights(learned, tmp, _stored_dtype(pool.base_dir))
        # A base without a tokenizer still gives usable weights (with the user's own tokenizer).
        copy_support_files(pool.base_dir, tmp)
        (tmp / "coefficients.json").write_text(json.dumps(coefficients_json(learned), indent=1))
        if learned.merged.chunk_allocation is not None:
            (tmp / "chunk_allocation.json").write_text(json.dumps(learned.merged.chunk_allocation, indent=1))
        write_plots(learned.merged, tmp)
        if scores:
            evaluation = merge_accuracy_json(scores_to_json(scores), accuracy or {})
            (tmp / "eval.json").write_text(json.dumps(evaluation, indent=1))
        if config_yaml:
            (tmp / "fit_config.yaml").write_text(config_yaml)
        sections = {}
        if scores:
            sections["Evaluation (held-out calibration samples)"] = "\n".join(card_evaluation_lines(scores))
        if health is not None:
            sections["Health check"] = health.card_section()
        hashes = pool.content_hashes()
        write_merge_card(
            tmp,
            title="Expert Merging result",
            method="expert_merging (learned coefficients, arXiv 2509.25712)",
            base=(pool.base_source, hashes["base"]),
            experts={name: (pool.expert_sources[name], hashes[name]) for name in learned.expert_names},
            parameters=card_parameters(learned, steps),
            sections=sections,
        )
    return Path(output_dir)


def coefficients_json(learned: LearnedMerge) -> dict[str, Any]:
    """`coefficients.json`: the start, the chunk counts, every coefficient, and the layer-wise view."""
    merged, experts = learned.merged, learned.expert_names
    layerwise = merged.coefficients.layerwise_values().T
    return {
        "experts": experts,
        "alpha0": merged.start_alpha,  # alpha0_search: the value it chose
        "start_merge": merged.start_merge,  # the training-free merge the coefficients learn over
        "chunk_counts": dict(zip(merged.coefficient_names, merged.coefficients.chunk_counts, strict=True)),
        "coefficients": merged.coefficients.to_dict(experts),
        "layerwise": {
            name: dict(zip(experts, [round(float(v), 6) for v in column], strict=True))
            for name, column in zip(merged.coefficient_names, layerwise, strict=True)
        },
    }


def card_parameters(learned: LearnedMerge, steps: int | None) -> dict[str, Any]:
    """What the merge card lists under its parameters: the start, the objective, the tasks, the structure."""
    merged, loss = learned.merged, learned.options.loss
    allocation = merged.chunk_allocation
    return {
        "alpha0": merged.start_alpha,
        "start_merge": merged.start_merge,
        "start_search": learned.start_scores_json(),
        "stage2_choice": learned.stage2_choice,
        "gamma": loss.gamma,
        "mu": loss.mu,
        "temperature": loss.temperature,
        "hidden_layers": learned.calibration.hidden_layers,
        "task_weights": loss.task_weights,
        "ce_weight": loss.ce_weight,
        "task_balance": loss.task_balance,
        "task_scales": learned.task_scales,
        "tasks": {
            t: BASE_TEACHER if k is None else learned.expert_names[k]
            for t, k in zip(learned.task_names, learned.calibration.task_experts, strict=True)
        },
        "learned_tensors": len(merged.coefficient_names),
        "chunking": (
            None
            if allocation is None
            else {k: allocation[k] for k in ("budget", "kappa", "total_chunks", "fixed_tensors")}
        ),
        "coefficients": merged.coefficients.num_trainable(),
        "steps": steps,
    }


# --------------------------------------------------------------------------------------- fused MoE export
def moe_router_rows(learned: LearnedMerge, method: str, seed: int = 0) -> torch.Tensor:
    """[layers, experts, hidden] initial routers of the fused MoE, from the fit's calibration data (train split).

    The `hidden` router sees each expert's tasks through the learned backbone with that expert's FFN (oracle
    routing), exactly as the exported MoE's routers will see them. Tasks taught by the base (`expert: base`)
    are the routed base expert's data (its row, the last); with the base as a shared expert (Qwen2-MoE, always
    on) or no base expert they route nothing, and the base row, if any, is the experts' mean row.
    """
    from expertmerge.moe import moe_format_for
    from expertmerge.moe.router_inputs import initial_router_rows, split_batches

    experts = len(learned.expert_names)
    routed_base = (
        learned.options.moe.moe_include_base_expert
        and None in learned.calibration.task_experts
        and not moe_format_for(getattr(learned.merged.model.config, "model_type", None)).shared_expert
    )
    groups: list[dict[str, list]] = [{} for _ in range(experts + int(routed_base))]
    for task, k in zip(learned.task_names, learned.calibration.task_experts, strict=True):
        if k is None and not routed_base:
            continue
        samples = learned.calibration.datamodule.task_samples(task, "train")
        groups[experts if k is None else k][task] = split_batches(samples.input_ids, samples.attention_mask)
    return initial_router_rows(
        method,
        learned.merged.model,
        groups,
        forward=lambda k, ids, mask: learned.merged(
            ids, mask, output_hidden_states=False, oracle_expert=BASE_TEACHER if k == experts else k
        ),
        names=[*learned.expert_names, BASE_TEACHER][: len(groups)],
        seed=seed,
    )


def _moe_scores(model: torch.nn.Module, learned: LearnedMerge) -> dict[str, TaskScores]:
    return score_model_tasks(
        model,
        learned.calibration.datamodule,
        learned.calibration.targets,
        learned.options.loss.temperature,
        device=learned.merged.device,
    )


def export_moe(
    learned: LearnedMerge,
    output_dir: str | Path,
    force: bool,
    scores: dict[str, dict[str, TaskScores]] | None = None,
    force_flag: str = "--force",
) -> tuple[Path, dict[str, dict[str, TaskScores]], HealthCheck | None]:
    """Write the fused MoE (learned shared backbone, experts' FFNs, initialised and optionally tuned router);
    returns its folder, the scores and its health check (of the tuned routers, when tuned)."""
    from expertmerge.moe import write_moe_checkpoint

    hp = learned.options.moe
    pool = learned.pool
    method = hp.moe_router
    rows = moe_router_rows(learned, method)
    merged = {name: t.detach() for name, t in learned.merged.merged_parameters().items()}
    state = dict(learned.merged.model.state_dict())
    out = Path(output_dir)
    parameters = {
        "router_tuning_steps": hp.router_tuning_steps,
        "shared_tensors": "learned coefficients with oracle routing (expertmerge fit, model.moe)",
        "alpha0": learned.merged.start_alpha,
        "gamma": learned.options.loss.gamma,
    }
    samples = health_samples(learned)
    settings = {  # the MoE's shape, and how the export is told to replace and describe its output
        "top_k": hp.moe_top_k,
        "include_base_expert": hp.moe_include_base_expert,
        "router_method": method,
        "force": force,
        "force_flag": force_flag,
        "card_parameters": parameters,
        "health_samples": samples,
    }

    def read(name: str) -> torch.Tensor:
        return merged[name] if name in merged else state[name].detach()

    written = write_moe_checkpoint(pool, out, read, rows, **settings)
    health = written.health
    scores = dict(scores or {})
    moe = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval().to(learned.merged.device)
    scores[f"MoE (router {method}, top-{hp.moe_top_k})"] = _moe_scores(moe, learned)
    if hp.router_tuning_steps > 0:
        from expertmerge.moe.router_tuning import tune_router

        losses = tune_router(
            moe,
            learned.calibration.datamodule.train_dataloader(),
            learned.calibration.targets,
            learned.task_names,
            steps=int(hp.router_tuning_steps),
            temperature=learned.options.loss.temperature,
            lr=hp.router_lr,
            balance=hp.router_balance,
        )
        make_console().print(
            f"router tuning: {len(losses)} steps on the mixed calibration set, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        )
        scores[f"MoE (router tuned, top-{hp.moe_top_k})"] = _moe_scores(moe, learned)
        # Replace our own output with the tuned routers: the same files, the weights written again.
        with atomic_output_dir(out, force=True, inputs=[pool.base_dir, *pool.expert_dirs.values()]) as tmp:
            for item in out.iterdir():
                # everything but the weights (model*.safetensors and their index); a model card (.md) too
                if item.is_file() and (not item.name.startswith("model") or item.suffix == ".md"):
                    shutil.copyfile(item, tmp / item.name)
            # written under the names and layout the first export wrote (per routed expert, no tied copies)
            written = Checkpoint(out, f"MoE output ({out})")
            layout = TensorLayout(
                meta_model(moe.config), {name: written.shape(name) for name in written.names}, written.label
            )
            tuned = layout.to_checkpoint(moe.state_dict())
            write_state_dict(tmp, {name: tuned[name] for name in written.names}, _stored_dtype(out))
            untuned, health = health, check_folder(tmp, pool.base_dir, samples=samples)
            card = tmp / "README.md"
            if untuned is not None and card.is_file():
                card.write_text(card.read_text().replace(untuned.card_section(), health.card_section()))
    replace_file(out / "eval.json", json.dumps(scores_to_json(scores), indent=1))
    return out, scores, health
