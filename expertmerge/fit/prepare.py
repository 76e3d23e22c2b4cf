"""Set up a learned merge: check the inputs, load the base, read the task vectors, get the teacher targets,
choose the start. Everything the fit's steps need is then in one `LearnedMerge`; nothing here runs Lightning.

The order matters for the user: every check that needs no model runs before the base loads, and the task
vectors are read before any teacher runs (a broken expert fails on its tensors, before its targets are
computed).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch import nn

from expertmerge.answers import expert_answers
from expertmerge.chunking import read_stage1_result
from expertmerge.coefficients import TaskVectors, learns_coefficients
from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError
from expertmerge.fit.learned import LearnedMerge
from expertmerge.fit.merged import MergedModel
from expertmerge.fit.objective import Calibration, Objective
from expertmerge.fit.options import FitOptions
from expertmerge.fit.sharding import set_parameter, shard_learned
from expertmerge.fit.start import StartPoint, regmean_offsets, search_start, start_candidates, start_table
from expertmerge.io.model_config import routed_expert_count
from expertmerge.io.reader import DTYPES  # the one table of dtype names
from expertmerge.losses import aligned_hidden_layers
from expertmerge.pool import BASE as BASE_TEACHER  # a task's `expert: base`: the base teaches it
from expertmerge.streaming import streamed_task_vectors
from expertmerge.teachers import TeacherSettings, mean_next_token_nll, teacher_dirs, teacher_targets
from expertmerge.validation import weights


def prepare_fit(
    options: FitOptions,
    datamodule: Any,
    pool: Any | None = None,
    shard_device: torch.device | None = None,
    distinct: bool = True,
    announce: bool = True,
) -> LearnedMerge:
    """A learned merge ready for its first step.

    Args:
        options: the merge's options.
        datamodule: the calibration data (a `CalibrationDataModule`; set up here).
        pool: the base and experts (an `ExpertPool`); default: the options' `base` and `experts` folders.
        shard_device: shard the learned tensors by decoder layer over the ranks (FSDP) onto this device.
        distinct: refuse an expert identical to the base (False where that is meant: Symphony's reference).
        announce: print the start search's table (rank 0 only).
    """
    started = time.perf_counter()
    if pool is None:
        pool = make_pool(options, distinct)
    calibration = _calibration(options, datamodule)
    _check_storage(options, shard_device)
    if datamodule.answer_tasks:  # before the base loads: one model in memory at a time
        answers, calibration.answer_stats = expert_answers(
            datamodule, pool, batch_size=options.loss.teacher_batch_size, expert_hashes=pool.content_hashes()
        )
        datamodule.attach_answers(answers)
    model = pool.load_model()  # an `ExpertPool`'s base; a `SymphonyPool`'s aligned reference
    calibration.hidden_layers = _hidden_layers(options, model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if options.loss.task_balance == "expert_gain":  # the pure base, before any tensor is merged into it
        calibration.base_nll = {
            t: mean_next_token_nll(
                model, datamodule.task_samples(t, "train"), options.loss.teacher_batch_size
            )
            for t in calibration.task_names
        }
    merged = _merged_model(options, model, calibration, resident=shard_device is None)
    point = read_task_vectors(options, pool, merged)
    if "regmean" in options.start.merges:  # from the fp32 base, before any storage change
        point.regmean_offsets = _regmean_offsets(options, pool, merged, calibration)
    _store(options, pool, merged, shard_device)
    settings = TeacherSettings(
        hidden_layers=tuple(calibration.hidden_layers),
        logit_topk=options.loss.logit_topk,
        temperature=options.loss.temperature,
        batch_size=options.loss.teacher_batch_size,
    )
    calibration.targets, calibration.teacher_stats = teacher_targets(
        datamodule,
        teacher_dirs(pool.base_dir, pool.expert_dirs, datamodule.tasks),
        settings,
        expert_hashes=pool.content_hashes(),
        trust_remote_code=options.trust_remote_code,
    )
    gc.collect()
    objective = Objective(merged, calibration, options.loss)
    learned = LearnedMerge(options, pool, calibration, merged, objective)
    if (
        options.loss.task_balance == "expert_gain"
    ):  # start-independent: known before the start search uses them
        objective.task_scales = objective.start_task_scales("expert_gain")
    _choose_start(learned, point, announce)
    merged.start_coefficients(merged.start_alpha)
    if options.chunking.stage1_result:
        stage1 = read_stage1_result(
            options.chunking.stage1_result, merged.expert_names, merged.coefficient_names
        )
        learned.enter_stage2(stage1)
    learned.prepare_seconds = time.perf_counter() - started
    return learned


def make_pool(options: FitOptions, distinct: bool = True) -> Any:
    """The options' base and experts as an `ExpertPool`, resolved (a `zoo://` reference built) and checked;
    no model loads."""
    from expertmerge.pool import ExpertPool

    pool = ExpertPool(
        options.base, options.experts, trust_remote_code=options.trust_remote_code, distinct=distinct
    ).validate()
    routed = routed_expert_count(pool.config)
    if options.moe.moe and routed:
        raise ExpertMergeError(
            f"model.moe: the base ({pool.config.model_type}) is already an MoE with {routed} routed experts, and "
            "fused-MoE mode builds an MoE out of dense experts. Leave model.moe off: the learned merge of MoE "
            "fine-tunes is an MoE of the same architecture (model.expert_axis: true gives each routed expert "
            "its own coefficients)."
        )
    return pool


def _calibration(options: FitOptions, datamodule: Any) -> Calibration:
    """The data's tasks checked against the experts and the options that name tasks; the data set up."""
    experts = options.expert_names
    datamodule.check([*experts, BASE_TEACHER])  # `expert: base`: the base teaches that task
    datamodule.setup("fit")
    task_names = list(datamodule.task_names)
    teacher_of = {spec.name: spec.expert for spec in datamodule.tasks}
    # None: a task taught by the base (its batches see the base FFN in MoE mode).
    task_experts = [
        None if teacher_of[t] == BASE_TEACHER else experts.index(teacher_of[t]) for t in task_names
    ]
    moe = options.moe
    if moe.moe and None in task_experts and not moe.moe_include_base_expert:
        raise ExpertMergeError(
            f"model.moe: tasks {[t for t, k in zip(task_names, task_experts, strict=True) if k is None]} are taught "
            "by the base (`expert: base`), "
            "but no MoE expert is the base FFN: set model.moe_include_base_expert true (their batches then "
            "run through the base FFN) or drop those tasks."
        )
    untaught = [name for k, name in enumerate(experts) if k not in task_experts]
    if "regmean" in options.start.merges and untaught:
        raise ExpertMergeError(
            "model.start_merges: a regmean start needs every expert's input Grams from its own calibration "
            f"texts, but experts {untaught} teach no task; give each a task in data.tasks or drop regmean "
            "from start_merges."
        )
    if moe.moe and untaught:
        raise ExpertMergeError(
            f"model.moe: experts {untaught} have no calibration task; every MoE expert needs one (its data "
            "initialises its router row)."
        )
    unknown = set(options.loss.task_weights or {}) - set(task_names)
    if unknown:
        raise ExpertMergeError(
            f"model.task_weights names unknown tasks {sorted(unknown)}; tasks are {task_names}."
        )
    weights("model.task_weights", options.loss.task_weights or {}, task_names)  # not every task at 0
    if options.loss.answer_weight != 1.0 and not datamodule.answer_tasks:
        raise ExpertMergeError(
            f"model.answer_weight is {options.loss.answer_weight}, but no task has expert-written answers to "
            "weigh; set `answers: expert` on the tasks whose prompts their experts should answer, or drop it."
        )
    return Calibration(datamodule, task_names, task_experts)


def _check_storage(options: FitOptions, shard_device: torch.device | None) -> None:
    if options.tensors.task_vectors == "streamed" and shard_device is not None:
        raise ExpertMergeError(
            "model.task_vectors: streamed and trainer.strategy: fsdp do not combine (FSDP already spreads "
            "the task vectors over the ranks); set model.task_vectors resident or use another strategy."
        )
    if shard_device is not None and "regmean" in options.start.merges:
        raise ExpertMergeError(
            "model.start_merges: a regmean start and trainer.strategy: fsdp do not combine (the base tensors "
            "it moves are sharded); drop regmean from start_merges or use ddp / one device."
        )


def _hidden_layers(options: FitOptions, model: nn.Module) -> list[int]:
    num_layers = int(getattr(model.config, "num_hidden_layers", 2))
    layers = aligned_hidden_layers(options.loss.hidden_layers, options.loss.mu, num_layers)
    for layer in layers:
        if not -num_layers - 1 <= layer <= num_layers:
            raise ExpertMergeError(
                f"model.hidden_layers: {layer} is out of range for a {num_layers}-layer model."
            )
    return [layer % (num_layers + 1) for layer in layers]


def _merged_model(
    options: FitOptions, model: nn.Module, calibration: Calibration, resident: bool
) -> MergedModel:
    """The tensors with coefficients (and the FFN tensors in MoE mode), with empty task-vector buffers (none
    for the learned tensors unless they stay `resident`: streamed or sharded ones are read later)."""
    params = dict(model.named_parameters())
    ffn_names: list[str] = []
    if options.moe.moe:
        from expertmerge.moe import moe_format_for, split_dense_names

        moe_format_for(getattr(model.config, "model_type", None))  # unsupported family: fail now
        layout = split_dense_names(list(params))
        ffn_names = [name for layer in layout.ffn.values() for name in layer.values()]
    ffn_set = set(ffn_names)
    tensors = options.tensors
    routed = routed_expert_count(model.config)
    names = [
        name
        for name in params
        if name not in ffn_set
        and learns_coefficients(
            name,
            params[name],
            tensors.learn_include,
            tensors.learn_exclude,
            tensors.learn_matrices_only,
            routed,
        )
    ]
    if not names:
        raise ExpertMergeError(
            "No tensor matches model.learn_include / learn_exclude: nothing would be learned. "
            f"Tensor names look like '{next(iter(params))}'."
        )
    num_experts = len(options.experts)
    dtype = DTYPES[tensors.task_vector_dtype]
    resident = resident and tensors.task_vectors == "resident"
    shapes = [params[n].shape for n in names]
    merged = MergedModel(
        model,
        options.expert_names,
        names,
        TaskVectors(shapes if resident else [], num_experts, dtype),
        ffn_names,
        TaskVectors([params[n].shape for n in ffn_names], num_experts, dtype),
        dict(zip(calibration.task_names, calibration.task_experts, strict=True)),
        moe=options.moe.moe,
    )
    if tensors.expert_axis:
        merged.stage1_chunks = {
            name: routed for name in names if params[name].dim() == 3 and params[name].shape[0] == routed
        }
    return merged


@torch.no_grad()
def read_task_vectors(options: FitOptions, pool: Any, merged: MergedModel) -> StartPoint:
    """tau_k = theta_k - theta_0 from the checkpoints, tensor by tensor (no expert model is built).

    Learned and FFN tensors keep theirs in the buffers; every other parameter is merged into the base now, by
    task arithmetic at alpha0 (or left at the base, `fixed_tensors: base`), so its task vectors are never held.
    With a start search the sum of its task vectors is kept instead, to be merged at the chosen value.
    """
    searches = options.start.searches
    alpha = (
        torch.as_tensor(options.start.alpha0, dtype=torch.float32).flatten().expand(len(merged.expert_names))
    )
    buffers = {}
    if len(merged.task_vectors):  # resident: read now (streamed or sharded ones are read by their store)
        buffers = {name: merged.task_vectors[i] for i, name in enumerate(merged.coefficient_names)}
    buffers.update({name: merged.ffn_vectors[i] for i, name in enumerate(merged.ffn_names)})
    learned = set(merged.coefficient_names)  # streamed: their task vectors go to the store, not here
    keys = pool.parameter_keys(merged.model)
    fixed: dict[str, torch.Tensor] = {}
    for name, parameter in merged.model.named_parameters():
        if name in buffers:
            for k, tau in enumerate(pool.iter_task_vectors(keys[name], buffers[name].dtype)):
                buffers[name][k].copy_(tau)
        elif name not in learned and options.start.fixed_tensors == "alpha0":
            delta = torch.zeros_like(parameter)
            for k, tau in enumerate(pool.iter_task_vectors(keys[name], torch.float32)):
                delta.add_(tau, alpha=1.0 if searches else float(alpha[k]))
            if not searches:
                parameter.add_(delta)
            elif bool(delta.any()):  # merged once the start value is chosen
                fixed[name] = delta
    return StartPoint(fixed, {})


def _regmean_offsets(
    options: FitOptions, pool: Any, merged: MergedModel, calibration: Calibration
) -> dict[str, torch.Tensor]:
    """RegMean's offsets of the learned linear weights, from each expert's Grams on the tasks it teaches."""
    train = {t: calibration.samples(t, "train") for t in calibration.task_names}
    samples = [
        [
            (train[t].input_ids, train[t].attention_mask)
            for t, e in zip(calibration.task_names, calibration.task_experts, strict=True)
            if e == k
        ]
        for k in range(len(merged.expert_names))
    ]
    return regmean_offsets(
        merged.model,
        merged.coefficient_names,
        lambda k: pool.load_model(merged.expert_names[k]),
        samples,
        alpha=float(options.start.regmean_alpha),
        batch_size=int(options.loss.teacher_batch_size),
    )


def _store(options: FitOptions, pool: Any, merged: MergedModel, shard_device: torch.device | None) -> None:
    """The learned tensors' storage: streamed task vectors, a bf16 base, or FSDP shards by decoder layer."""
    tensors = options.tensors
    dtype = DTYPES[tensors.task_vector_dtype]
    names = merged.coefficient_names
    num_experts = len(merged.expert_names)
    if tensors.task_vectors == "streamed":
        keys = pool.parameter_keys(merged.model)
        merged.task_vectors = streamed_task_vectors(
            pool,
            [keys[n] for n in names],
            names,
            [(num_experts, *shape) for shape in merged.learned_shapes],
            dtype,
            tensors.task_vector_store,
        )
    if tensors.base_dtype != "float32":
        with torch.no_grad():
            for name in names:
                value = merged.model.get_parameter(name).detach().to(DTYPES[tensors.base_dtype])
                set_parameter(merged.model, name, value)
    if shard_device is not None:
        merged.task_vectors = shard_learned(names, num_experts, pool, merged.model, dtype, shard_device)


def _choose_start(learned: LearnedMerge, point: StartPoint, announce: bool) -> None:
    """The start the coefficients learn from: searched among candidates, or the one configured."""
    options, merged = learned.options, learned.merged
    merged.start_alpha = options.start.alpha0
    if options.start.searches:
        split = options.start.start_search_split
        candidates = start_candidates(options.start, len(merged.expert_names))
        best, learned.start_scores = search_start(merged, learned.objective, point, candidates, split)
        merged.start_merge, merged.start_alpha = best
        if announce:
            make_console().print(start_table(learned.start_scores, best, split))
    elif point.regmean_offsets:  # one start, RegMean at alpha0; the unlearned tensors are folded already
        point.move(merged.model, "regmean", float(options.start.alpha0))
        merged.start_merge = "regmean"
