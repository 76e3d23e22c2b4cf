"""The learned merge's options, in typed groups: each default, each choice (`Literal`) and each check written once.

A config names them flat under `model:` (`model.gamma`, `--model.lr 0.2`), as it always has; the groups are the
library's view (`options.loss.gamma`). `FitOptions.from_flat` / `to_flat` go between the two, and
`flat_parameters()` gives the flat signature the Lightning module shows to jsonargparse, so the command line,
the configs and the library read the same fields. Every check runs when the options are built, before any
model or data is touched; each error names the key as the user writes it (`model.lr`).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from expertmerge.errors import ExpertMergeError
from expertmerge.validation import (
    expert_names,
    in_range,
    integer,
    non_negative,
    optional,
    patterns,
    per_name,
    positive,
    positive_int,
    temperature,
    weights,
)

StartMerge = Literal["task_arithmetic", "regmean"]
TensorDtype = Literal["bfloat16", "float16", "float32"]


@dataclass
class StartOptions:
    """Where the coefficients start.

    Args:
        alpha0: start value of every coefficient (one, or one per expert in `experts` order); also where
            the tensors without learned coefficients are merged (task arithmetic at alpha0).
        alpha0_search: candidate start values; when given, alpha0 is the one whose task arithmetic (every
            coefficient and every tensor without coefficients at that value) has the lowest fit objective
            (KL, plus the hidden and text terms the fit uses, task weights applied) on the training
            calibration samples, measured once after the teacher pass (no labels, no held-out data).
            Replaces alpha0; the value chosen is in the summary table and `coefficients.json`.
        start_merges: the training-free merges the start is chosen among, each at every start value (the
            `alpha0_search` candidates, or `alpha0` alone): `task_arithmetic` (base + lam * sum of task vectors)
            and `regmean` (RegMean's closed-form merge of the learned linear layers from each expert's input
            Grams on its own training calibration texts, scaled like task arithmetic: base + N lam (W_RegMean -
            base); at lam = 1/N, always a candidate when searching, it is plain RegMean). The coefficients start
            at lam and learn on top of the chosen merge: `W = W_start + sum_k (c_k - lam) tau_k`. Tensors that
            are not linear weights start at task arithmetic lam (the average at 1/N, as RegMean has them).
        regmean_alpha: RegMean's scale of the Grams' off-diagonal entries (1: exact least squares, 0: a
            per-input-feature weighted average).
        start_search_split: the calibration samples the start search scores candidates on: `train` (the
            texts the fit trains on, which RegMean's Grams are also taken from) or `eval` (the held-out ones,
            `data.eval_samples_per_task`; with `data.tasks[*].group_field` they come from other sources, so a
            start that only suits the training texts' sources loses there).
        fixed_tensors: where the tensors without learned coefficients go: task arithmetic at `alpha0`, or
            kept at the `base` (the official code's choice; matters for experts that changed embeddings,
            norms or lm_head, i.e. full fine-tunes).
    """

    alpha0: float | list[float] = 0.3
    alpha0_search: list[float] | None = None
    start_merges: list[StartMerge] | None = None
    regmean_alpha: float = 0.9
    start_search_split: Literal["train", "eval"] = "train"
    fixed_tensors: Literal["alpha0", "base"] = "alpha0"

    @property
    def merges(self) -> list[str]:
        return list(self.start_merges or ["task_arithmetic"])

    @property
    def searches(self) -> bool:
        """More than one start candidate: the unlearned tensors are folded only once one is chosen."""
        return bool(self.alpha0_search) or len(self.merges) > 1

    def check(self, experts: list[str]) -> None:
        in_open_unit = lambda k, v: in_range(k, v, 0, 1, True, True)  # noqa: E731
        per_name("model.alpha0", self.alpha0, experts, in_open_unit, "experts")
        search = self.alpha0_search
        if search is not None:
            if not isinstance(search, (list, tuple)) or not search:
                raise ExpertMergeError(
                    f"model.alpha0_search must be a non-empty list of start values in (0, 1), got {search!r}."
                )
            for index, value in enumerate(search):
                in_open_unit(f"model.alpha0_search[{index}]", value)
        merges = self.start_merges
        if merges is not None:
            known = typing.get_args(StartMerge)
            if not isinstance(merges, (list, tuple)) or not merges or any(m not in known for m in merges):
                raise ExpertMergeError(
                    f"model.start_merges must be a non-empty list of {list(known)}, got {merges!r}."
                )
            if len(set(merges)) != len(merges):
                raise ExpertMergeError(f"model.start_merges names a merge twice: {merges!r}.")
            if "regmean" in merges and isinstance(self.alpha0, (list, tuple)) and not search:
                raise ExpertMergeError(
                    "model.start_merges: a regmean start scales one merge by one value; give model.alpha0 as "
                    "one number (or use model.alpha0_search)."
                )
        in_range("model.regmean_alpha", self.regmean_alpha, 0, 1)


@dataclass
class LossOptions:
    """The objective: what the merged model is aligned to, and how tasks are weighed.

    Args:
        gamma: weight of the regulariser `mean |c - start|`.
        mu: weight of the hidden-state term relative to the logit KL. 0 (the default) aligns the logits only
            and caches no hidden states (benchmarks/LEVERS.md: no hidden-term setting beat the KL alone).
        hidden_loss: the hidden-state term: `mse` (plain, its size follows the model's hidden-state norm),
            `normalized_mse` (MSE over the teacher state's mean square: a relative error, the same scale on
            every model) or `cosine` (1 - cosine similarity per token).
        temperature: T of the T^2 * KL(expert || merged) logit loss.
        hidden_layers: indices into the model's `hidden_states` (0 = embeddings) aligned by MSE;
            default: the middle layer when `mu` > 0, none when `mu` is 0.
        task_weights: beta per task name (default 1 for every task); raise one to favour that task.
        task_balance: `none`; `start_kl`: each task's loss is divided by its KL at the start point (task
            arithmetic at alpha0, measured once on the task's calibration samples; mean scale 1), so the fit
            trades *relative* improvements between tasks instead of spending everything on the task whose KL
            is largest; `expert_gain`: each task's loss is divided by its expert's gain on the task's
            calibration texts (base NLL minus expert NLL, nats per token, measured once; mean scale 1), so
            the fit's objective is the gain retained per task, the quantity the merge is judged by. Tasks
            taught by the base keep scale 1; a gain under a tenth of the largest counts as that tenth.
        ce_weight: weight of the language-modelling loss on the calibration texts' own next tokens (no labels:
            the texts themselves), added to each task's alignment loss. The default 3 with `task_balance`
            `expert_gain` and `mu` 0 is the objective measured best on both SmolLM2 zoos' calibration data
            (LEVERS.md): KL to an expert caps a task at that expert, its own text does not.
        kl_where: `all` (default): the KL term counts every token. `expert_better`: it counts only the tokens
            where the expert gives the text's own next token a higher probability than the merged model does
            (the cached expert NLL against the merge's, no labels), divided by all tokens; where the merge
            already predicts the text better than its expert, only the text's own loss acts. Needs
            `ce_weight` > 0.
        logit_topk: the teacher's logits are cached as the top k plus the log-sum-exp; null caches full logits.
        teacher_batch_size: batch size of the one-off teacher pass (and of the start search's scoring, and of
            the experts' answer writing for `answers: expert` tasks).
        answer_weight: how much a position counts in the KL, hidden and text terms when the token it predicts is
            part of an expert-written answer (`data.tasks[i].answers: expert`), against 1 for the prompt's;
            padding never counts. 1 (default): every token alike.
    """

    gamma: float = 0.05
    mu: float = 0.0
    hidden_loss: Literal["mse", "normalized_mse", "cosine"] = "mse"
    temperature: float = 1.0
    hidden_layers: list[int] | None = None
    task_weights: dict[str, float] | None = None
    task_balance: Literal["none", "start_kl", "expert_gain"] = "expert_gain"
    ce_weight: float = 3.0
    kl_where: Literal["all", "expert_better"] = "all"
    logit_topk: int | None = 64
    teacher_batch_size: int = 8
    answer_weight: float = 1.0

    def check(self) -> None:
        non_negative("model.gamma", self.gamma)
        positive("model.answer_weight", self.answer_weight)
        non_negative("model.mu", self.mu)
        non_negative("model.ce_weight", self.ce_weight)
        if self.kl_where == "expert_better" and not self.ce_weight:
            raise ExpertMergeError(
                "model.kl_where: expert_better drops the KL where the merge predicts the text better than its "
                "expert, so the text's own loss must be on: set model.ce_weight > 0 (or kl_where: all)."
            )
        temperature("model.temperature", self.temperature)
        if self.hidden_layers is not None:
            if not isinstance(self.hidden_layers, (list, tuple)):
                raise ExpertMergeError(
                    f"model.hidden_layers must be a list of layer indices, got {self.hidden_layers}."
                )
            for index, layer in enumerate(self.hidden_layers):
                integer(f"model.hidden_layers[{index}]", layer)
        weights("model.task_weights", self.task_weights or {})
        optional(positive_int)("model.logit_topk", self.logit_topk)
        positive_int("model.teacher_batch_size", self.teacher_batch_size)


@dataclass
class TensorOptions:
    """Which tensors learn coefficients, and how the frozen ones are stored.

    Args:
        learn_include: regexes; tensors whose name matches one get learned coefficients.
        learn_exclude: regexes; matching tensors are merged at alpha0 instead.
        learn_matrices_only: only matrices get learned coefficients (norms, biases stay at alpha0); an MoE's
            fused expert weights (3-D: one matrix per routed expert) count as matrices.
        expert_axis: an MoE's fused expert weights get one coefficient per routed expert (and expert model)
            from the start, instead of one per tensor: each routed expert of the merge takes its own share of
            every fine-tune. Expert Merging++'s chunks of these tensors are cut along the same axis.
        task_vector_dtype: storage dtype of the task vectors (the merge itself is computed in fp32).
        base_dtype: storage dtype of the base's learned tensors (the bulk of the model). `bfloat16` halves
            them; each merged tensor is still computed in fp32 (the base tensor upcast as it is read) and the
            forward runs in fp32, so a base checkpoint stored in bf16 gives the fp32 fit's coefficients.
        task_vectors: `resident` holds every expert's task vectors on the compute device; `streamed` keeps
            them in a store and brings them to the device one decoder layer at a time (memory that does not
            grow with the number of experts; same coefficients; `expertmerge/streaming.py`).
        task_vector_store: where streamed task vectors live: `host` memory (pinned with CUDA), `disk` (a
            safetensors file in the cache), or `auto` (host when CUDA is present, else disk).
    """

    learn_include: list[str] | None = None
    learn_exclude: list[str] | None = None
    learn_matrices_only: bool = True
    expert_axis: bool = False
    task_vector_dtype: TensorDtype = "bfloat16"
    base_dtype: Literal["float32", "bfloat16"] = "float32"
    task_vectors: Literal["resident", "streamed"] = "resident"
    task_vector_store: Literal["auto", "host", "disk"] = "auto"

    def check(self) -> None:
        patterns("model.learn_include", self.learn_include)
        patterns("model.learn_exclude", self.learn_exclude)


@dataclass
class OptimiserOptions:
    """The optimiser of the coefficient logits (Adam).

    Args:
        lr: learning rate of the coefficient logits (Adam).
        scheduler: learning-rate schedule over the fit's steps.
        warmup_steps: linear warm-up steps before the schedule.
    """

    lr: float = 0.1
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0

    def check(self) -> None:
        positive("model.lr", self.lr)
        integer("model.warmup_steps", self.warmup_steps, minimum=0)


@dataclass
class ChunkingOptions:
    """Expert Merging++: the chunk-wise second stage.

    Args:
        chunking: Expert Merging++: after the layer-wise fit (`trainer.max_steps` steps), give the important
            tensors several coefficients along their output rows and fit again for `stage2_steps` steps.
        chunk_budget: total chunks B shared among the learned tensors (default: their number, so the
            coefficient count stays that of the layer-wise fit).
        chunk_kappa: exponent on the importance: 0 spreads chunks evenly, larger concentrates them.
        stage2_steps: optimiser steps of the chunk-wise stage.
        stage2_lr: learning rate of the chunk-wise stage (default: `lr`).
        stage2_select: `held_out` (default): after the chunk-wise stage, keep its coefficients only when
            they lower the fit objective on the held-out calibration samples below the layer-wise result's by
            more than one standard error of the per-sample difference (the simpler merge wins within noise);
            otherwise the chunks go back to their layer-wise values (the summary and the merge card say
            which). `last`: always keep them.
        stage1_result: `coefficients.json` of an earlier layer-wise fit (or its output folder): skip stage 1
            and run the chunk-wise stage from those coefficients (implies `chunking`).
    """

    chunking: bool = False
    chunk_budget: int | None = None
    chunk_kappa: float = 1.0
    stage2_steps: int = 60
    stage2_lr: float | None = None
    stage2_select: Literal["held_out", "last"] = "held_out"
    stage1_result: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.chunking or self.stage1_result)

    def check(self) -> None:
        optional(integer)("model.chunk_budget", self.chunk_budget, 0)
        # kappa = 0 is meaningful (I^0 = 1 spreads the chunks evenly); only negative or non-finite is nonsense.
        non_negative("model.chunk_kappa", self.chunk_kappa)
        integer("model.stage2_steps", self.stage2_steps, minimum=1 if self.enabled else 0)
        optional(positive)("model.stage2_lr", self.stage2_lr)


@dataclass
class MoEOptions:
    """The fused MoE built from the fit, and its router.

    Args:
        moe: fused-MoE mode: each task's batches run through its own expert's FFN (oracle routing) and only the
            shared tensors (attention, and whatever else `learn_include` picks outside the FFN) are learned;
            the result is the shared backbone of an MoE whose experts are the experts' FFNs.
        moe_top_k: experts per token of the exported MoE.
        moe_router: router initialisation: per-task mean of the router's input through the learned backbone
            (`hidden`), mean token embedding per task (`cheap_embed`), or seeded `random` rows.
        moe_include_base_expert: add the base FFN as a generalist expert (the shared expert of Qwen2-MoE).
        router_tuning_steps: after the export's router initialisation, train only the router gates this many
            steps on the mixed calibration set against the experts' targets (0: no tuning).
        router_lr: learning rate of router tuning.
        router_balance: weight of the load-balancing term during router tuning.
    """

    moe: bool = False
    moe_top_k: int = 2
    moe_router: Literal["hidden", "cheap_embed", "random"] = "hidden"
    moe_include_base_expert: bool = False
    router_tuning_steps: int = 0
    router_lr: float = 0.01
    router_balance: float = 0.01

    def check(self, experts: list[str]) -> None:
        # The MoE has one expert per fine-tuned expert, plus the base FFN when asked; k beyond that means nothing.
        experts_in_moe = len(experts) + (1 if self.moe_include_base_expert else 0)
        if self.moe:
            integer("model.moe_top_k", self.moe_top_k, 1, experts_in_moe)
        else:  # `export --moe` may still build an MoE from this config, with how many experts is known only then
            positive_int("model.moe_top_k", self.moe_top_k)
        integer("model.router_tuning_steps", self.router_tuning_steps, minimum=0)
        positive("model.router_lr", self.router_lr)
        non_negative("model.router_balance", self.router_balance)


_GROUPS = {
    "start": StartOptions,
    "loss": LossOptions,
    "tensors": TensorOptions,
    "optimiser": OptimiserOptions,
    "chunking": ChunkingOptions,
    "moe": MoEOptions,
}


@dataclass
class FitOptions:
    """Everything the learned merge needs to know, checked when built.

    Args:
        base: folder (or hub id, or `zoo://` reference) of the base model the experts were fine-tuned from.
        experts: expert name -> folder. Tasks in the data config name these experts.
        trust_remote_code: allow model folders that ship their own modelling code.
    """

    base: str
    experts: dict[str, str]
    trust_remote_code: bool = False
    start: StartOptions = field(default_factory=StartOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    tensors: TensorOptions = field(default_factory=TensorOptions)
    optimiser: OptimiserOptions = field(default_factory=OptimiserOptions)
    chunking: ChunkingOptions = field(default_factory=ChunkingOptions)
    moe: MoEOptions = field(default_factory=MoEOptions)

    def __post_init__(self) -> None:
        if not self.experts:
            raise ExpertMergeError("model.experts is empty: name at least one expert folder.")
        expert_names("model.experts", self.experts)
        names = list(self.experts)
        self.start.check(names)
        self.loss.check()
        self.tensors.check()
        self.optimiser.check()
        self.chunking.check()
        self.moe.check(names)

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    @classmethod
    def from_flat(cls, **values: Any) -> FitOptions:
        """From the flat keys of a config's `model:` block (`gamma`, `chunk_budget`, ...)."""
        unknown = set(values) - set(_flat_fields())
        if unknown:
            raise ExpertMergeError(f"model: unknown keys {sorted(unknown)}; `--model.help` lists them.")
        groups = {
            name: group(**{f.name: values[f.name] for f in dataclasses.fields(group) if f.name in values})
            for name, group in _GROUPS.items()
        }
        top = {name: values[name] for name in ("base", "experts", "trust_remote_code") if name in values}
        return cls(**top, **groups)

    def to_flat(self) -> dict[str, Any]:
        """The flat keys (`from_flat`'s input), e.g. for the checkpoint's hyper-parameters."""
        flat: dict[str, Any] = {
            "base": self.base,
            "experts": dict(self.experts),
            "trust_remote_code": self.trust_remote_code,
        }
        for name in _GROUPS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    def replace(self, **flat: Any) -> FitOptions:
        """A copy with some flat keys changed (checked again)."""
        return FitOptions.from_flat(**{**self.to_flat(), **flat})


@cache
def _flat_fields() -> dict[str, tuple[Any, Any]]:
    """Flat key -> (type, default), in the order a config lists them: base, experts, then each group's."""
    hints = typing.get_type_hints(FitOptions)
    result: dict[str, tuple[Any, Any]] = {
        "base": (hints["base"], inspect.Parameter.empty),
        "experts": (hints["experts"], inspect.Parameter.empty),
    }
    for group in _GROUPS.values():
        group_hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            result[f.name] = (group_hints[f.name], f.default)
    result["trust_remote_code"] = (hints["trust_remote_code"], False)
    return result


def flat_parameters() -> list[inspect.Parameter]:
    """The flat options as keyword parameters with their types and defaults (a signature for jsonargparse)."""
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in _flat_fields().items()
    ]


def flat_docs() -> str:
    """The `Args:` sections of every group, as one (the flat options' help)."""
    lines = []
    for group in (FitOptions, *_GROUPS.values()):
        doc = inspect.cleandoc(group.__doc__ or "")
        lines += doc.partition("Args:\n")[2].splitlines()
    return "Args:\n" + "\n".join(lines)
