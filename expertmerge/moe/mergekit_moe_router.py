"""`expertmerge: {router: ...}` of a mergekit-moe config: routers fitted to calibration data, then tuned.

mergekit's `hidden` gates are one vector per expert (the mean state of a few prompts, taken where the layer starts,
not where its router reads). Here, with the same library code as `fit`'s fused-MoE export:

1. every expert's calibration texts (`router.calib`, calib_data's task format; else its `positive_prompts`) run
   through the MoE's shared tensors with that expert's own FFN (oracle routing), and each layer's router gets the
   bias-free linear discriminant of what those tokens look like at the router (`initial_router_rows("hidden")`,
   `router_from_discriminant`); or, with `init: gate_mode`, mergekit's rows;
2. with `tune_steps`, the MoE is written once to a scratch folder by the same writer, loaded, and only its routers
   train (`tune_router`) against each text's own expert (`teacher_targets`, cached);
3. held-out KL to each text's own expert scores mergekit's rows, the fitted and the tuned ones on that same model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.moe.forward import expert_ffn, moe_forward
from expertmerge.moe.mergekit_moe import MergekitMoeConfig, RouterOptions, tokenize_prompts
from expertmerge.moe.router import DegenerateRouterWarning
from expertmerge.pool import ExpertPool

# The datamodule settings `router.data` may set (the fit's `data:` keys other than `tasks` / `tokenizer`).
DATA_KEYS = ("samples_per_task", "eval_samples_per_task", "max_length", "batch_size", "seed", "rounds")
PROMPTS_TASK = "positive_prompts"


@dataclass(frozen=True)
class CalibrationReader:
    """How `router.calib` entries become tokenised batches: calib_data's `TaskSpec` and `CalibrationDataModule`,
    given by the caller (the `moe` command) so that this package needs neither calib_data nor Lightning."""

    task: Callable[..., Any]  # task(expert=..., name=..., **entry) -> a task spec with `.expert`
    # datamodule(tasks, tokenizer=dir, **data), with .check(names) and .setup("fit")
    datamodule: Callable[..., Any]


@dataclass
class FittedRouter:
    """The routed experts' rows `[layers, experts, hidden]` and how they were made and scored."""

    rows: torch.Tensor
    label: str
    heldout_kl: dict[str, dict[str, float]] = field(default_factory=dict)  # router -> task -> KL
    losses: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. two experts' texts look alike at some router

    def mean_kl(self, router: str) -> float:
        scores = self.heldout_kl[router]
        return sum(scores.values()) / len(scores)


def expert_index(config: MergekitMoeConfig, given: Any, where: str) -> int:
    """The routed expert a `router.calib` entry names: its index in `experts`, or its (unique) `source_model`."""
    count = len(config.experts)
    if isinstance(given, int) and not isinstance(given, bool):
        if 0 <= given < count:
            return given
        raise ExpertMergeError(f"{where}.expert is {given}; give an index 0..{count - 1} of `experts`.")
    matches = [i for i, e in enumerate(config.experts) if e.source_model == given]
    if len(matches) == 1:
        return matches[0]
    models = ", ".join(repr(e.source_model) for e in config.experts)
    why = "several experts have it, give its index" if matches else f"the experts are {models}"
    raise ExpertMergeError(f"{where}.expert is {given!r}: {why}.")


def calib_tasks(
    config: MergekitMoeConfig, options: RouterOptions, source: str, reader: CalibrationReader | None = None
) -> list[Any]:
    """`router.calib` as `reader`'s task specs whose `expert` is the pool name `expert{i}` (checked now)."""
    entries: list[tuple[str, str, dict[str, Any]]] = []
    seen: dict[int, int] = {}
    for index, entry in enumerate(options.calib):
        where = f"{source}: expertmerge.router.calib[{index}]"
        entry = dict(entry)
        if "expert" not in entry:
            raise ExpertMergeError(f"{where}: give `expert` (an index into experts, or its source_model).")
        expert = expert_index(config, entry.pop("expert"), where)
        seen[expert] = seen.get(expert, 0) + 1
        entry.setdefault("name", f"expert{expert}" + (f"_{seen[expert]}" if seen[expert] > 1 else ""))
        entries.append((where, f"expert{expert}", entry))
    tasks: list[Any] = []
    for where, expert_name, entry in entries:
        if reader is None:
            raise ExpertMergeError(
                f"{source}: expertmerge.router.calib needs a calibration reader: pass calibration="
                "CalibrationReader(TaskSpec, CalibrationDataModule) of calib_data (the moe command does)."
            )
        try:
            tasks.append(reader.task(expert=expert_name, **entry))
        except TypeError as error:
            raise ExpertMergeError(
                f"{where}: {error}; it takes the keys of a fit config's data.tasks."
            ) from None
    unknown = sorted(set(options.data) - set(DATA_KEYS))
    if unknown:
        raise ExpertMergeError(
            f"{source}: key 'expertmerge.router.data.{unknown[0]}' is not supported; it takes {', '.join(DATA_KEYS)}."
        )
    if options.tune_steps and not tasks:
        raise ExpertMergeError(
            f"{source}: expertmerge.router.tune_steps needs calibration texts to tune against; list them under "
            "expertmerge.router.calib (e.g. {expert: 1, sources: [data/math.jsonl]})."
        )
    for index, expert in enumerate(config.experts):
        has_texts = any(task.expert == f"expert{index}" for task in tasks)
        if not has_texts and not expert.positive_prompts and options.init == "discriminant":
            raise ExpertMergeError(
                f"{source}: experts[{index}] has neither expertmerge.router.calib texts nor positive_prompts; "
                "its router row needs one of them."
            )
    return tasks


def calibration_data(
    tasks: Sequence[Any],
    options: RouterOptions,
    tokenizer_dir: Path,
    names: list[str],
    reader: CalibrationReader,
) -> Any:
    """The calibration datamodule (checked, set up) of `tasks`, tokenised with the base's tokenizer."""
    datamodule = reader.datamodule(list(tasks), tokenizer=str(tokenizer_dir), **options.data)
    datamodule.check(names)
    datamodule.setup("fit")
    return datamodule


def _gate_rows_of(moe: torch.nn.Module) -> list[torch.nn.Parameter]:
    from expertmerge.moe.router_tuning import gate_parameters

    gates = gate_parameters(moe)
    return [gates[name] for name in sorted(gates, key=lambda n: int(n.split(".layers.")[1].split(".")[0]))]


@torch.no_grad()
def _set_rows(moe: torch.nn.Module, rows: torch.Tensor) -> None:
    for layer, parameter in enumerate(_gate_rows_of(moe)):
        parameter.copy_(rows[layer].to(parameter.dtype))


@torch.no_grad()
def heldout_kl(
    moe: torch.nn.Module, datamodule: Any, targets: Mapping[tuple[str, str], Any]
) -> dict[str, float]:
    """Per task, the mean KL(own expert || MoE) over its held-out texts' real tokens."""
    from expertmerge.evaluate import score_model_tasks

    return {task: scores.kl for task, scores in score_model_tasks(moe, datamodule, targets).items()}


def _batches_per_expert(
    config: MergekitMoeConfig, datamodule: Any | None, tokenizer: Any, batch_size: int
) -> list[dict[str, list]]:
    """Expert e's calibration batches by task (train split), or its positive prompts (mergekit's encoding)."""
    from expertmerge.moe.router_inputs import split_batches

    per_expert: list[dict[str, list]] = [{} for _ in config.experts]
    if datamodule is not None:
        for spec in datamodule.tasks:
            samples = datamodule.task_samples(spec.name, "train")
            index = int(spec.expert.removeprefix("expert"))
            per_expert[index][spec.name] = split_batches(
                samples.input_ids, samples.attention_mask, batch_size
            )
    for index, expert in enumerate(config.experts):
        if not per_expert[index]:
            encoded = tokenize_prompts(expert.positive_prompts or [], tokenizer)
            per_expert[index][PROMPTS_TASK] = split_batches(
                encoded["input_ids"], encoded["attention_mask"], batch_size
            )
    return per_expert


class _FfnOfOneExpert(Sequence):
    """Expert e's FFN tensors (fp32), read when first asked for; only the latest expert's stay in memory, since
    the router statistics run every batch of one expert before the next expert's."""

    def __init__(self, pool: ExpertPool, count: int) -> None:
        self.pool, self.count = pool, count
        self.index: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, expert: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if expert != self.index:
            self.tensors = {}  # the previous expert's FFN is freed before the next is read
            self.tensors, self.index = expert_ffn(self.pool, f"expert{expert}"), expert
        return self.tensors


def discriminant_rows(
    pool: ExpertPool, donor_dir: Path, batches_per_expert: Sequence[Mapping[str, Sequence[Any]]]
) -> torch.Tensor:
    """`fit`'s initial router: each expert's tokens through the shared tensors with that expert's FFN."""
    from transformers import AutoModelForCausalLM

    from expertmerge.moe.router_inputs import initial_router_rows

    model = AutoModelForCausalLM.from_pretrained(str(donor_dir), dtype=torch.float32).eval()
    ffns = _FfnOfOneExpert(pool, len(batches_per_expert))
    names = [f"expert{i}" for i in range(len(batches_per_expert))]
    try:
        return initial_router_rows(
            "hidden", model, batches_per_expert, forward=moe_forward(model, ffns, pool), names=names
        )
    finally:
        del model, ffns


def router_data(
    config: MergekitMoeConfig,
    tokenizer_dir: Path,
    source: str = "config",
    reader: CalibrationReader | None = None,
) -> Any | None:
    """The checked, tokenised `router.calib` texts (None without any), read by `reader`: run before any long work."""
    options = config.options.router
    if options is None:
        return None
    tasks = calib_tasks(config, options, source, reader)
    if not tasks or reader is None:
        return None
    names = [f"expert{i}" for i in range(len(config.experts))]
    return calibration_data(tasks, options, tokenizer_dir, names, reader)


def fit_router(
    config: MergekitMoeConfig,
    datamodule: Any | None,
    pool: ExpertPool,
    donor_dir: Path,
    tokenizer: Any,
    mergekit_rows: torch.Tensor,
    write_scratch: Callable[[torch.Tensor, Path], None],
    *,
    progress: bool = True,
) -> FittedRouter:
    """The routed experts' rows of `config.options.router` (see the module docs).

    `datamodule`: `router_data`'s; `mergekit_rows`: the rows of the config's `gate_mode` `[layers, experts,
    hidden]`; `write_scratch(rows, dir)` writes the MoE with those routed rows into `dir` (the build's own
    writer), for tuning and scoring.
    """
    import warnings

    from transformers import AutoModelForCausalLM

    from expertmerge.moe.router_tuning import tune_router
    from expertmerge.teachers import TeacherSettings, teacher_targets

    options = config.options.router
    if options is None:
        raise ExpertMergeError("fit_router needs the config's expertmerge.router block.")
    tasks = list(datamodule.tasks) if datamodule is not None else []
    names = [f"expert{i}" for i in range(len(config.experts))]
    batch_size = int(options.data.get("batch_size", 8))
    if options.init == "discriminant":
        with warnings.catch_warnings(record=True) as caught:  # become notes of the summary
            warnings.simplefilter("always")
            rows = discriminant_rows(
                pool, donor_dir, _batches_per_expert(config, datamodule, tokenizer, batch_size)
            )
        label = "fitted to calibration data (discriminant)"
        notes = [str(w.message) for w in caught if issubclass(w.category, DegenerateRouterWarning)]
    else:
        rows, notes = mergekit_rows.clone(), []
        label = f"mergekit's gate_mode {config.gate_mode}"
    fitted = FittedRouter(rows.float(), label, notes=notes)
    if datamodule is None:
        return fitted

    taught = {task.expert for task in tasks}
    teachers = {name: pool.expert_dirs[name] for name in names if name in taught}
    targets, _ = teacher_targets(
        datamodule, teachers, TeacherSettings(hidden_layers=()), splits=("train", "eval")
    )
    with tempfile.TemporaryDirectory(prefix="expertmerge-moe-router-") as scratch:
        write_scratch(fitted.rows, Path(scratch) / "moe")
        moe = AutoModelForCausalLM.from_pretrained(str(Path(scratch) / "moe"), dtype=torch.float32).eval()
    _set_rows(moe, mergekit_rows.float())
    fitted.heldout_kl["mergekit gates"] = heldout_kl(moe, datamodule, targets)
    _set_rows(moe, fitted.rows)
    if options.init == "discriminant":
        fitted.heldout_kl["fitted"] = heldout_kl(moe, datamodule, targets)
    if options.tune_steps:
        fitted.losses = tune_router(
            moe,
            datamodule.train_dataloader(),
            targets,
            datamodule.task_names,
            steps=options.tune_steps,
            lr=options.lr,
            balance=options.balance,
            progress=progress,
        )
        fitted.rows = torch.stack([p.detach().float() for p in _gate_rows_of(moe)])
        fitted.heldout_kl["tuned"] = heldout_kl(moe, datamodule, targets)
        fitted.label += f", tuned {options.tune_steps} steps"
    del moe
    return fitted
