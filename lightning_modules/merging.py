"""ExpertMergingModule: learn merge coefficients so the merged model behaves like each expert on its data.

Only the coefficients are trainable. The base model's weights and the task vectors are frozen buffers; each
step builds the merged tensors once and runs the base architecture on them with `functional_call`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torchmetrics
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from calib_data.tasks import BASE_TEACHER, base_task_names
from expertmerge.chunking import allocation_table, chunk_allocation, read_stage1_result
from expertmerge.coefficients import MergeCoefficients, TaskVectors, learns_coefficients
from expertmerge.errors import ExpertMergeError
from expertmerge.fsdp import (
    ShardedMerge,
    all_reduce_gradients,
    gather_to_resident,
    is_layer_sharded,
    set_parameter,
    shard_learned,
    sharded_merge,
)
from expertmerge.io.fit_checkpoint import MODEL_HASHES, check_same_models, load_fit_checkpoint
from expertmerge.losses import (
    aligned_hidden_layers,
    expert_gain_scales,
    hidden_loss,
    kl_to_teacher,
    logit_kl_loss,
    masked_mean,
    next_token_nll,
    teacher_top1,
)
from expertmerge.streaming import StreamedTaskVectors, streamed_task_vectors
from expertmerge.teachers import (
    TeacherSettings,
    TeacherStats,
    TeacherTargets,
    mean_next_token_nll,
    teacher_dirs,
    teacher_targets,
)
from expertmerge.validation import check_merging_options, weights

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExpertMergingModule(pl.LightningModule):
    """Expert Merging (arXiv 2509.25712): coefficients over frozen task vectors, aligned to the experts.

    Args:
        base: folder (or hub id, or `zoo://` reference) of the base model the experts were fine-tuned from.
        experts: expert name -> folder. Tasks in the data config name these experts.
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
        learn_include: regexes; tensors whose name matches one get learned coefficients.
        learn_exclude: regexes; matching tensors are merged at alpha0 instead.
        learn_matrices_only: only 2-D tensors get learned coefficients (norms, biases stay at alpha0).
        fixed_tensors: where the tensors without learned coefficients go: task arithmetic at `alpha0`, or
            kept at the `base` (the official code's choice; matters for experts that changed embeddings,
            norms or lm_head, i.e. full fine-tunes).
        logit_topk: the teacher's logits are cached as the top k plus the log-sum-exp; null caches full logits.
        task_vector_dtype: storage dtype of the task vectors (the merge itself is computed in fp32).
        base_dtype: storage dtype of the base's learned tensors (the bulk of the model). `bfloat16` halves
            them; each merged tensor is still computed in fp32 (the base tensor upcast as it is read) and the
            forward runs in fp32, so a base checkpoint stored in bf16 gives the fp32 fit's coefficients.
        task_vectors: `resident` holds every expert's task vectors on the compute device; `streamed` keeps
            them in a store and brings them to the device one decoder layer at a time (memory that does not
            grow with the number of experts; same coefficients; `expertmerge/streaming.py`).
        task_vector_store: where streamed task vectors live: `host` memory (pinned with CUDA), `disk` (a
            safetensors file in the cache), or `auto` (host when CUDA is present, else disk).
        lr: learning rate of the coefficient logits (Adam).
        scheduler: learning-rate schedule over the fit's steps.
        warmup_steps: linear warm-up steps before the schedule.
        teacher_batch_size: batch size of the one-off teacher pass.
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
        trust_remote_code: allow model folders that ship their own modelling code.
    """

    def __init__(
        self,
        base: str,
        experts: dict[str, str],
        alpha0: float | list[float] = 0.3,
        alpha0_search: list[float] | None = None,
        start_merges: list[Literal["task_arithmetic", "regmean"]] | None = None,
        regmean_alpha: float = 0.9,
        start_search_split: Literal["train", "eval"] = "train",
        gamma: float = 0.05,
        mu: float = 0.0,
        hidden_loss: Literal["mse", "normalized_mse", "cosine"] = "mse",
        temperature: float = 1.0,
        hidden_layers: list[int] | None = None,
        task_weights: dict[str, float] | None = None,
        task_balance: Literal["none", "start_kl", "expert_gain"] = "expert_gain",
        ce_weight: float = 3.0,
        kl_where: Literal["all", "expert_better"] = "all",
        learn_include: list[str] | None = None,
        learn_exclude: list[str] | None = None,
        learn_matrices_only: bool = True,
        fixed_tensors: Literal["alpha0", "base"] = "alpha0",
        logit_topk: int | None = 64,
        task_vector_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        base_dtype: Literal["float32", "bfloat16"] = "float32",
        task_vectors: Literal["resident", "streamed"] = "resident",
        task_vector_store: Literal["auto", "host", "disk"] = "auto",
        lr: float = 0.1,
        scheduler: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        teacher_batch_size: int = 8,
        chunking: bool = False,
        chunk_budget: int | None = None,
        chunk_kappa: float = 1.0,
        stage2_steps: int = 60,
        stage2_lr: float | None = None,
        stage2_select: Literal["held_out", "last"] = "held_out",
        stage1_result: str | None = None,
        moe: bool = False,
        moe_top_k: int = 2,
        moe_router: Literal["hidden", "cheap_embed", "random"] = "hidden",
        moe_include_base_expert: bool = False,
        router_tuning_steps: int = 0,
        router_lr: float = 0.01,
        router_balance: float = 0.01,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not experts:
            raise ExpertMergeError("model.experts is empty: name at least one expert folder.")
        check_merging_options(self.hparams)  # before any model or data is touched
        self.expert_names = list(experts)
        self.strict_loading = False  # checkpoints hold the coefficients only
        self.model: nn.Module | None = None
        self.coefficients: MergeCoefficients | None = None
        self.task_vectors: TaskVectors | StreamedTaskVectors | ShardedMerge | None = None
        self.targets: dict[tuple[str, str], TeacherTargets] = {}
        self.teacher_stats = TeacherStats()
        self.task_names: list[str] = []
        self.task_experts: list[int | None] = []  # per task its expert's index; None: taught by the base
        self.coefficient_names: list[str] = []
        self.pool = None
        self.datamodule = None
        # False only where the base is one of the experts on purpose (Symphony's learned backbone: the aligned
        # reference expert is the base); a user's fit refuses that expert (its task vector is zero).
        self.distinct_experts = True
        self.stage = 1
        self.stage1_values: dict[str, torch.Tensor] | None = None  # layer-wise result, [N] per tensor
        self.chunk_allocation: dict[str, Any] | None = None
        self.stage2_choice: dict[str, Any] | None = None  # stage2_select held_out: what it found
        self.task_scales: dict[str, float] | None = None  # task_balance: per-task scale, mean 1
        # task_balance expert_gain: the base's NLL per task on its training texts
        self.base_nll: dict[str, float] = {}
        self.start_alpha: float | list[float] = alpha0  # the start actually used (alpha0_search's choice)
        self.start_merge = "task_arithmetic"  # the training-free merge the fit starts from
        # start search: (merge, value) -> calibration objective
        self.start_scores: dict[tuple[str, float], float] = {}
        self._regmean_offsets: dict[str, torch.Tensor] = {}  # start_merges regmean: R per linear weight
        self._applied_start = (0.0, 0.0)  # (fixed tensors, RegMean offsets) already moved by the search
        self._fixed_deltas: dict[
            str, torch.Tensor
        ] = {}  # alpha0_search: sum of task vectors, unlearned tensors

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self.model is None:
            self.prepare(self.trainer.datamodule)

    def prepare(self, datamodule: Any) -> None:
        """Check inputs, load the base, read the task vectors from the pool, then get the teacher targets
        (from the cache; an expert model is built only for targets that are not cached)."""
        from expertmerge.pool import ExpertPool

        hp = self.hparams
        pool = ExpertPool(
            hp.base, hp.experts, trust_remote_code=hp.trust_remote_code, distinct=self.distinct_experts
        )
        pool.validate()
        datamodule.check([*self.expert_names, BASE_TEACHER])  # `expert: base`: the base teaches that task
        datamodule.setup("fit")
        self.pool, self.datamodule = pool, datamodule
        self.task_names = list(datamodule.task_names)
        task_experts = {spec.name: spec.expert for spec in datamodule.tasks}
        # None: a task taught by the base (its batches see the base FFN in MoE mode).
        self.task_experts = [
            None if task_experts[t] == BASE_TEACHER else self.expert_names.index(task_experts[t])
            for t in self.task_names
        ]
        if hp.moe and None in self.task_experts and not hp.moe_include_base_expert:
            raise ExpertMergeError(
                f"model.moe: tasks {base_task_names(datamodule.tasks)} are taught by the base (`expert: base`), "
                "but no MoE expert is the base FFN: set model.moe_include_base_expert true (their batches then "
                "run through the base FFN) or drop those tasks."
            )
        if "regmean" in self.start_merge_names:
            untaught = [k for k, name in enumerate(self.expert_names) if k not in self.task_experts]
            if untaught:
                raise ExpertMergeError(
                    "model.start_merges: a regmean start needs every expert's input Grams from its own "
                    f"calibration texts, but experts {[self.expert_names[k] for k in untaught]} teach no task; "
                    "give each a task in data.tasks or drop regmean from start_merges."
                )
        unknown = set(hp.task_weights or {}) - set(self.task_names)
        if unknown:
            raise ExpertMergeError(
                f"model.task_weights names unknown tasks {sorted(unknown)}; tasks are {self.task_names}."
            )
        weights("model.task_weights", hp.task_weights or {}, self.task_names)  # not every task at 0

        model = self._load(pool.base_dir)
        num_layers = int(getattr(model.config, "num_hidden_layers", 2))
        self.hidden_layers = aligned_hidden_layers(hp.hidden_layers, hp.mu, num_layers)
        for layer in self.hidden_layers:
            if not -num_layers - 1 <= layer <= num_layers:
                raise ExpertMergeError(
                    f"model.hidden_layers: {layer} is out of range for a {num_layers}-layer model."
                )
        self.hidden_layers = [layer % (num_layers + 1) for layer in self.hidden_layers]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if hp.task_balance == "expert_gain":  # the pure base, before any tensor is merged into it
            self.base_nll = self.measure_base_nll(model, datamodule)
        params = dict(model.named_parameters())
        self.ffn_names: list[str] = []
        if hp.moe:
            from expertmerge.moe import moe_format_for, split_dense_names

            moe_format_for(getattr(model.config, "model_type", None))  # unsupported family: fail now
            layout = split_dense_names(list(params))
            self.ffn_names = [name for layer in layout.ffn.values() for name in layer.values()]
            missing = set(range(len(self.expert_names))) - set(self.task_experts)
            if missing:
                raise ExpertMergeError(
                    "model.moe: experts "
                    f"{[self.expert_names[k] for k in sorted(missing)]} have no calibration task; every MoE "
                    "expert needs one (its data initialises its router row)."
                )
        ffn_set = set(self.ffn_names)
        self.coefficient_names = [
            name
            for name in params
            if name not in ffn_set
            and learns_coefficients(
                name, params[name], hp.learn_include, hp.learn_exclude, hp.learn_matrices_only
            )
        ]
        if not self.coefficient_names:
            raise ExpertMergeError(
                "No tensor matches model.learn_include / learn_exclude: nothing would be learned. "
                f"Tensor names look like '{next(iter(params))}'."
            )
        num_experts = len(self.expert_names)
        dtype = _DTYPES[hp.task_vector_dtype]
        streamed = hp.task_vectors == "streamed"
        sharded = is_layer_sharded(self._trainer)
        if streamed and sharded:
            raise ExpertMergeError(
                "model.task_vectors: streamed and trainer.strategy: fsdp do not combine (FSDP already spreads "
                "the task vectors over the ranks); set model.task_vectors resident or use another strategy."
            )
        if sharded and "regmean" in self.start_merge_names:
            raise ExpertMergeError(
                "model.start_merges: a regmean start and trainer.strategy: fsdp do not combine (the base tensors "
                "it moves are sharded); drop regmean from start_merges or use ddp / one device."
            )
        shapes = [params[n].shape for n in self.coefficient_names]
        self.task_vectors = None if streamed or sharded else TaskVectors(shapes, num_experts, dtype)
        self.ffn_vectors = TaskVectors([params[n].shape for n in self.ffn_names], num_experts, dtype)
        rows = [params[n].shape[0] for n in self.coefficient_names]
        del params  # the learned base tensors may be replaced below (bf16, FSDP shards): hold no old copy
        # Task vectors first: a broken (NaN/Inf) expert fails here, before its teacher targets are computed.
        self._read_task_vectors(pool, model)
        if "regmean" in self.start_merge_names:  # from the fp32 base, before any storage change
            self._regmean_offsets = self.regmean_offsets(model, datamodule)
        if streamed:
            keys = pool.parameter_keys(model)
            self.task_vectors = streamed_task_vectors(
                pool,
                [keys[n] for n in self.coefficient_names],
                self.coefficient_names,
                [(num_experts, *shape) for shape in shapes],
                dtype,
                hp.task_vector_store,
            )
        if hp.base_dtype != "float32":
            with torch.no_grad():
                for name in self.coefficient_names:
                    set_parameter(model, name, model.get_parameter(name).detach().to(_DTYPES[hp.base_dtype]))
        if sharded:
            self.task_vectors = shard_learned(self, pool, model, dtype)
        self.targets, self.teacher_stats = teacher_targets(
            datamodule,
            teacher_dirs(pool.base_dir, pool.expert_dirs, datamodule.tasks),
            self.teacher_settings,
            expert_hashes=pool.content_hashes(),
            trust_remote_code=hp.trust_remote_code,
        )
        gc.collect()
        self.model = model
        if hp.task_balance == "expert_gain":  # start-independent: known before the start search uses them
            self.task_scales = self.start_task_scales()
        if self.searches_start:
            self.start_merge, self.start_alpha = self.search_start(rows)
        elif self._regmean_offsets:  # one start, RegMean at alpha0; the unlearned tensors are folded already
            self._move_start("regmean", float(hp.alpha0))
            self.start_merge = "regmean"
        self._fixed_deltas, self._regmean_offsets = {}, {}
        self.coefficients = MergeCoefficients(
            self.coefficient_names,
            rows,
            num_experts,
            alpha0=self.start_alpha,
        )
        if hp.stage1_result:
            self.start_stage2(read_stage1_result(hp.stage1_result, self.expert_names, self.coefficient_names))
        self._build_metrics()

    @torch.no_grad()
    def _read_task_vectors(self, pool: Any, model: nn.Module) -> None:
        """tau_k = theta_k - theta_0 from the checkpoints, tensor by tensor (no expert model is built).

        Learned and FFN tensors keep theirs in the buffers; every other parameter is merged into the base
        now, by task arithmetic at alpha0 (or left at the base, `fixed_tensors: base`), so its task vectors
        are never held.
        """
        alpha = (
            torch.as_tensor(self.hparams.alpha0, dtype=torch.float32).flatten().expand(len(self.expert_names))
        )
        learned = set(self.coefficient_names)  # streamed: their task vectors go to the store, not here
        buffers = {}
        if self.task_vectors is not None:
            buffers = {name: self.task_vectors[i] for i, name in enumerate(self.coefficient_names)}
        buffers.update({name: self.ffn_vectors[i] for i, name in enumerate(self.ffn_names)})
        keys = pool.parameter_keys(model)
        for name, parameter in model.named_parameters():
            if name in buffers:
                for k, tau in enumerate(pool.iter_task_vectors(keys[name], buffers[name].dtype)):
                    buffers[name][k].copy_(tau)
            elif name not in learned and self.hparams.fixed_tensors == "alpha0":
                delta = torch.zeros_like(parameter)
                for k, tau in enumerate(pool.iter_task_vectors(keys[name], torch.float32)):
                    delta.add_(tau, alpha=1.0 if self.searches_start else float(alpha[k]))
                if self.searches_start:  # merged once the start value is chosen
                    if bool(delta.any()):
                        self._fixed_deltas[name] = delta
                else:
                    parameter.add_(delta)

    @property
    def layer_sharded(self) -> bool:
        return isinstance(self.task_vectors, ShardedMerge)

    def gather_to_resident(self, keep: bool) -> None:
        """Undo the FSDP sharding layer by layer (every rank calls it); ranks with `keep` get the resident form."""
        gather_to_resident(self, keep)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.layer_sharded:  # no DDP wrapper under FSDP: average the replicated coefficients' gradients
            all_reduce_gradients(list(self.coefficients.parameters()))

    @property
    def teacher_settings(self) -> TeacherSettings:
        return TeacherSettings(
            hidden_layers=tuple(self.hidden_layers),
            logit_topk=self.hparams.logit_topk,
            temperature=self.hparams.temperature,
            batch_size=self.hparams.teacher_batch_size,
        )

    def _load(self, folder: Any) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=self.hparams.trust_remote_code
        )
        return model.eval()

    def _build_metrics(self) -> None:
        def per_task() -> nn.ModuleDict:
            return nn.ModuleDict({t: torchmetrics.MeanMetric() for t in self.task_names})

        self.val_kl = per_task()
        self.val_top1 = per_task()

    # ------------------------------------------------------------------------------------ the merge
    def merged_parameters(
        self,
        coefficients: Callable[[int], torch.Tensor] | None = None,
        oracle_expert: int | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """theta_p = theta0_p + sum_k c[k,p] tau[k,p] for every tensor with coefficients.

        `coefficients(index) -> [N, rows]` overrides the learned ones (e.g. alpha0 for task arithmetic).
        In MoE mode the FFN tensors are expert `oracle_expert`'s own (oracle routing; `"base"`: the base FFN), or
        task arithmetic at alpha0 when no expert is named (the dense view of the same merge).
        """
        assert self.model is not None and self.coefficients is not None
        merged = {}
        for index, name in enumerate(self.ffn_names):
            base, tau = self.model.get_parameter(name), self.ffn_vectors[index]
            if oracle_expert == BASE_TEACHER:
                merged[name] = base  # the base FFN, the MoE's generalist expert
            elif oracle_expert is not None:
                merged[name] = base + tau[oracle_expert].float()
            else:
                alpha = self.coefficients.alpha0.to(base.device).view(-1, *([1] * (tau.dim() - 1)))
                merged[name] = base + (tau.float() * alpha).sum(0)
        if self.layer_sharded:
            merged.update(sharded_merge(self, coefficients))
            return merged
        for index, name in enumerate(self.coefficient_names):
            base = self.model.get_parameter(name)
            if coefficients is None:
                merged[name] = self.coefficients.merged_tensor(
                    index, base, self.task_vectors.for_merge(index)
                )
            else:
                tau = self.task_vectors[index]
                row_c = coefficients(index).to(base.device)
                view = (tau.shape[0], tau.shape[1]) + (1,) * (tau.dim() - 2)
                merged[name] = base + (tau.float() * row_c.view(view)).sum(0)
        return merged

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        coefficients: Callable[[int], torch.Tensor] | None = None,
        output_hidden_states: bool = True,
        oracle_expert: int | str | None = None,
    ) -> Any:
        return functional_call(
            self.model,
            self.merged_parameters(coefficients, oracle_expert),
            args=(),
            kwargs={
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "output_hidden_states": output_hidden_states,
                "use_cache": False,
            },
        )

    def oracle_expert(self, task: str) -> int | str | None:
        """In MoE mode, the expert whose FFN serves `task` (oracle routing; `"base"` for a task the base
        teaches); None for a dense merge."""
        if not self.hparams.moe:
            return None
        expert = self.task_experts[self.task_names.index(task)]
        return BASE_TEACHER if expert is None else expert

    def alpha0_coefficients(self, index: int) -> torch.Tensor:
        """Task arithmetic at alpha0, as per-row coefficients."""
        rows = self.task_vectors[index].shape[1]
        return self.coefficients.alpha0.view(-1, 1).expand(-1, rows)

    def layerwise_coefficients(self, values: dict[str, torch.Tensor]) -> Callable[[int], torch.Tensor]:
        """Per-row coefficients from one value per (expert, tensor), e.g. the stage-1 result."""

        def rows(index: int) -> torch.Tensor:
            tau = self.task_vectors[index]
            return values[self.coefficient_names[index]].to(tau.device).view(-1, 1).expand(-1, tau.shape[1])

        return rows

    # ------------------------------------------------------------------- Expert Merging++ (stage 2)
    @property
    def chunking_enabled(self) -> bool:
        return bool(self.hparams.chunking or self.hparams.stage1_result)

    def start_stage2(self, stage1_values: dict[str, torch.Tensor]) -> None:
        """Enter the chunk-wise stage: chunk-wise coefficients that start from (and stay near) stage 1.

        Called between fits (never inside a running one): the stage-2 Trainer then builds its optimiser, and
        under DDP its reducer, over these new parameters.
        """
        hp = self.hparams
        budget = len(self.coefficient_names) if hp.chunk_budget is None else int(hp.chunk_budget)
        taus = self.task_vectors  # a sequence: streamed ones are read layer by layer, not all at once
        self.chunk_allocation = chunk_allocation(
            stage1_values, self.coefficient_names, taus, budget, hp.chunk_kappa
        )
        self.stage1_values = {name: value.detach().float().cpu() for name, value in stage1_values.items()}
        self._chunks_at_stage1()
        self.stage = 2

    def _chunks_at_stage1(self) -> None:
        """Fresh chunk-wise coefficients (`chunk_allocation`'s chunks) with every chunk at its tensor's stage-1
        value, where the previous coefficients were."""
        tensors = self.chunk_allocation["tensors"]
        self.coefficients = MergeCoefficients(
            self.coefficient_names,
            [info["rows"] for info in tensors.values()],
            len(self.expert_names),
            alpha0=self.start_alpha,
            chunks={name: info["chunks"] for name, info in tensors.items()},
            start={name: value.view(-1, 1) for name, value in self.stage1_values.items()},
        ).to(self.coefficients.alpha0.device)

    def stage1_snapshot(self) -> dict[str, torch.Tensor]:
        values = self.coefficients.layerwise_values()
        return {name: values[:, i].detach().cpu() for i, name in enumerate(self.coefficient_names)}

    def on_train_start(self) -> None:
        if self.hparams.task_balance != "none" and self.task_scales is None:
            self.task_scales = self.start_task_scales()
        if self.stage == 2 and self.trainer.is_global_zero:
            Console().print(allocation_table(self.chunk_allocation))

    @property
    def progress_label(self) -> str:
        """What the progress bar counts: the stage's steps when the fit has two stages."""
        return f"stage {self.stage} step" if self.chunking_enabled else "step"

    # ------------------------------------------------------------------------------------ the loss
    def task_losses(self, batch: dict[str, Any], split: str = "train") -> dict[str, torch.Tensor]:
        """KL, hidden MSE and top-1 agreement of the merged model against the batch's own expert."""
        task = self.task_names[int(batch["task_index"])]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = self.targets[(task, split)].rows(batch["sample_index"], ids.shape[1], ids.device)
        out = self(
            ids, mask, output_hidden_states=bool(self.hidden_layers), oracle_expert=self.oracle_expert(task)
        )
        kl_tokens = kl_to_teacher(out.logits, targets, self.hparams.temperature)
        kl = logit_kl_loss(kl_tokens, mask, self.hparams.temperature)
        terms = [
            hidden_loss(out.hidden_states[layer], targets[f"hidden.{layer}"], mask, self.hparams.hidden_loss)
            for layer in self.hidden_layers
        ]
        mse = torch.stack(terms).mean() if terms else out.logits.new_zeros(())
        agree = (out.logits.argmax(-1) == teacher_top1(targets)).float()
        real = mask.float()
        top1 = (agree * real).sum() / real.sum().clamp_min(1)
        parts = {"kl": kl, "mse": mse, "top1": top1, "kl_tokens": kl_tokens}
        if self.hparams.ce_weight:
            nll, next_mask = next_token_nll(out.logits, ids, mask)
            parts["ce"] = masked_mean(nll, next_mask)
            if self.hparams.kl_where == "expert_better":
                # 1 where the expert predicts the next token better; positions without one keep their KL
                behind = (targets["nll"][:, :-1] < nll.detach()).to(kl_tokens.dtype)
                weight = torch.cat([behind, behind.new_ones(behind.shape[0], 1)], dim=1)
                parts["kl_fit"] = logit_kl_loss(kl_tokens * weight, mask, self.hparams.temperature)
        return parts

    @torch.no_grad()
    def start_losses(self, split: str = "train") -> dict[str, dict[str, float]]:
        """Per task its loss terms (token-weighted means) for the current coefficients over every calibration
        sample of the task's `split` (the same on every rank)."""
        means = {}
        size = max(1, int(self.hparams.teacher_batch_size))
        for index, task in enumerate(self.task_names):
            totals: dict[str, float] = {}
            tokens = 0.0
            for batch in self._split_batches(index, split, size):
                count = float(batch["attention_mask"].sum())
                for part, value in self.task_losses(batch, split).items():
                    if part != "kl_tokens":
                        totals[part] = totals.get(part, 0.0) + float(value) * count
                tokens += count
            means[task] = {part: total / max(tokens, 1.0) for part, total in totals.items()}
        return means

    def _split_batches(self, index: int, split: str, size: int) -> Iterator[dict[str, Any]]:
        """Task `index`'s samples of a calibration split in order, `size` per batch, trimmed to the batch's
        longest sample, on the module's device."""
        samples = self.datamodule.task_samples(self.task_names[index], split)
        for first in range(0, samples.input_ids.shape[0], size):
            rows = torch.arange(first, min(first + size, samples.input_ids.shape[0]))
            mask = samples.attention_mask[rows].to(self.device)
            length = int(mask.sum(1).max())
            yield {
                "input_ids": samples.input_ids[rows, :length].to(self.device),
                "attention_mask": mask[:, :length],
                "task_index": index,
                "sample_index": rows,
            }

    def objective_weights(self) -> dict[str, float]:
        """Per task its weight in the fit objective: its task weight times its balance scale."""
        scales = self.task_scales or {}
        weights = self.hparams.task_weights or {}
        return {t: float(weights.get(t, 1.0)) * scales.get(t, 1.0) for t in self.task_names}

    @torch.no_grad()
    def calibration_objective(self, split: str) -> float:
        """The fit objective of the current coefficients over every sample of a calibration split: each task's
        `task_objective` (token-weighted) weighted by its task weight and balance scale, as a weighted mean."""
        weights = self.objective_weights()
        losses = self.start_losses(split)
        total = sum(weights[t] * self.task_objective(losses[t]) for t in losses)
        return float(total / sum(weights[t] for t in losses))

    @torch.no_grad()
    def sample_objectives(self, split: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per task, each sample's fit objective (`task_objective` of its own terms) for the current
        coefficients on a calibration split, and its real-token count (float64 [n] each)."""
        result = {}
        for index, task in enumerate(self.task_names):
            values, tokens = [], []
            for batch in self._split_batches(index, split, 1):
                values.append(float(self.task_objective(self.task_losses(batch, split))))
                tokens.append(float(batch["attention_mask"].sum()))
            result[task] = (
                torch.tensor(values, dtype=torch.float64),
                torch.tensor(tokens, dtype=torch.float64),
            )
        return result

    @torch.no_grad()
    def select_stage2(self) -> dict[str, Any]:
        """`stage2_select: held_out`, the one-standard-error rule: keep the chunk-wise coefficients only when
        they lower the fit objective on the held-out calibration samples by more than one standard error of
        the per-sample difference; otherwise go back to the simpler layer-wise result (as chunk-wise
        coefficients, each chunk at its tensor's stage-1 value). Returns (and keeps) what it found."""
        learned = {k: v.detach().clone() for k, v in self.coefficients.state_dict().items()}
        chunk_wise = self.sample_objectives("eval")
        self._chunks_at_stage1()  # the layer-wise result, in stage 2's chunks
        layer_wise = self.sample_objectives("eval")
        before, after, error = paired_objectives(layer_wise, chunk_wise, self.objective_weights())
        kept = after < before - error
        if kept:
            self.coefficients.load_state_dict(learned)
        self.stage2_choice = {
            "kept": bool(kept),
            "objective_layer_wise": round(before, 6),
            "objective_chunk_wise": round(after, 6),
            "standard_error": round(error, 6),
        }
        return self.stage2_choice

    def task_objective(self, parts: dict[str, Any]) -> Any:
        """One task's alignment loss from its terms: KL + mu * hidden term + ce_weight * text loss."""
        loss = parts.get("kl_fit", parts["kl"]) + self.hparams.mu * parts["mse"]
        if "ce" in parts:
            loss = loss + self.hparams.ce_weight * parts["ce"]
        return loss

    @property
    def searches_start(self) -> bool:
        """More than one start candidate: the unlearned tensors are folded only once one is chosen."""
        return bool(self.hparams.alpha0_search) or len(self.start_merge_names) > 1

    @property
    def start_merge_names(self) -> list[str]:
        return list(self.hparams.start_merges or ["task_arithmetic"])

    def start_candidates(self) -> list[tuple[str, float]]:
        """(merge, value) pairs the start search scores: every start merge at every `alpha0_search` value (or
        at `alpha0`), and plain RegMean (1/N) when RegMean is searched."""
        values = [float(v) for v in (self.hparams.alpha0_search or [self.hparams.alpha0])]
        candidates = [(merge, value) for merge in self.start_merge_names for value in values]
        plain = 1.0 / len(self.expert_names)
        searched = "regmean" in self.start_merge_names and self.hparams.alpha0_search
        if searched and not any(abs(value - plain) < 1e-9 for value in values):
            candidates.append(("regmean", plain))
        return candidates

    @torch.no_grad()
    def search_start(self, rows: list[int]) -> tuple[str, float]:
        """The (merge, value) start candidate with the lowest fit objective on the training calibration
        samples (task weights and `expert_gain` scales applied); the model is left at it (unlearned tensors
        merged at the value, RegMean's offsets added for a `regmean` start)."""
        candidates = self.start_candidates()
        with Progress(transient=True) as progress:
            bar = progress.add_task("start search", total=len(candidates))
            for merge, value in candidates:
                self._move_start(merge, value)
                self.coefficients = MergeCoefficients(
                    self.coefficient_names, rows, len(self.expert_names), alpha0=value
                )
                self.start_scores[(merge, value)] = self.calibration_objective(
                    self.hparams.start_search_split
                )
                progress.advance(bar)
        best = min(self.start_scores, key=self.start_scores.__getitem__)
        self._move_start(*best)
        self.coefficients = None
        if self._trainer is None or self.trainer.is_global_zero:
            where = "held-out" if self.hparams.start_search_split == "eval" else "training"
            table = Table(title=f"start search: training-free merges on the {where} calibration samples")
            table.add_column("start", justify="left")
            table.add_column("alpha0", justify="right")
            table.add_column("objective", justify="right")
            for (merge, value), score in self.start_scores.items():
                chosen = " (chosen)" if (merge, value) == best else ""
                table.add_row(merge + chosen, f"{value:.4g}", f"{score:.4f}")
            Console().print(table)
        return best

    def start_scores_json(self) -> dict[str, dict[str, float]] | None:
        """The start search's objectives as {merge: {value: objective}} (None when nothing was searched)."""
        if not self.start_scores:
            return None
        result: dict[str, dict[str, float]] = {}
        for (merge, value), score in self.start_scores.items():
            result.setdefault(merge, {})[f"{value:.6g}"] = round(float(score), 6)
        return result

    @torch.no_grad()
    def _move_start(self, merge: str, value: float) -> None:
        """Put the model at start candidate (merge, value): the unlearned tensors at task arithmetic `value`
        (those kept for the search) and each learned linear weight's base moved by `value` x its RegMean offset
        for a `regmean` start (by 0 for task arithmetic)."""
        fixed, offset = self._applied_start
        target = (value, value if merge == "regmean" else 0.0)
        for name, delta in self._fixed_deltas.items():
            self.model.get_parameter(name).add_(delta, alpha=target[0] - fixed)
        for name, delta in self._regmean_offsets.items():
            parameter = self.model.get_parameter(name)
            parameter.add_(delta.to(parameter.device, parameter.dtype), alpha=target[1] - offset)
        self._applied_start = target

    def start_task_scales(self) -> dict[str, float]:
        """Per task 1 / (its KL at the start point) (`start_kl`) or 1 / (its expert's gain over the base on its
        calibration texts) (`expert_gain`), scaled to mean 1. Measured on every training sample of the task
        (the same on every rank), before the first step."""
        if self.hparams.task_balance == "expert_gain":
            return expert_gain_scales(self.expert_gains())
        kls = {task: max(parts["kl"], 1e-6) for task, parts in self.start_losses().items()}
        inverse = {task: 1.0 / kl for task, kl in kls.items()}
        mean_inverse = sum(inverse.values()) / len(inverse)
        return {task: value / mean_inverse for task, value in inverse.items()}

    def regmean_offsets(self, base_model: nn.Module, datamodule: Any) -> dict[str, torch.Tensor]:
        """`start_merges: regmean`: per learned linear weight, RegMean's offset from the average in units of
        the start value (`expertmerge.regmean.regmean_start_offsets`), from each expert's input Grams on the
        training calibration texts of the tasks it teaches. Loads each expert once."""
        from expertmerge.regmean import regmean_start_offsets

        learned = set(self.coefficient_names)
        names = [
            name
            for name, module in base_model.named_modules()
            if isinstance(module, nn.Linear) and f"{name}.weight" in learned
        ]
        if not names:
            return {}
        train = {t: datamodule.task_samples(t, "train") for t in self.task_names}
        samples = [
            [
                (train[t].input_ids, train[t].attention_mask)
                for t, e in zip(self.task_names, self.task_experts, strict=True)
                if e == k
            ]
            for k in range(len(self.expert_names))
        ]
        with Progress(transient=True) as progress:
            bar = progress.add_task("RegMean start: experts' input Grams", total=len(self.expert_names))
            return regmean_start_offsets(
                base_model,
                [
                    lambda k=k: self._load(self.pool.expert_dirs[self.expert_names[k]])
                    for k in range(len(samples))
                ],
                samples,
                names,
                alpha=float(self.hparams.regmean_alpha),
                batch_size=int(self.hparams.teacher_batch_size),
                on_expert=lambda: progress.advance(bar),
            )

    def measure_base_nll(self, base_model: nn.Module, datamodule: Any) -> dict[str, float]:
        """Per task the base model's mean next-token NLL on the task's training calibration texts."""
        size = self.hparams.teacher_batch_size
        return {
            t: mean_next_token_nll(base_model, datamodule.task_samples(t, "train"), size)
            for t in self.task_names
        }

    def expert_gains(self) -> dict[str, float | None]:
        """Per task its expert's gain over the base on the task's training calibration texts (nats per token,
        base NLL minus the expert NLL cached with the teacher targets); None for tasks the base teaches."""
        gains: dict[str, float | None] = {}
        for task, expert in zip(self.task_names, self.task_experts, strict=True):
            if expert is None:
                gains[task] = None
                continue
            mask = self.datamodule.task_samples(task, "train").attention_mask
            nll = self.targets[(task, "train")].tensors["nll"][:, : mask.shape[1]]
            gains[task] = self.base_nll[task] - masked_mean(nll[:, :-1], mask[:, 1:] * mask[:, :-1]).item()
        return gains

    def training_step(self, batch: dict[str, Any] | list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        # A batch is one task's samples, or a round with one sub-batch per task (one step sees every task).
        task_batches = batch if isinstance(batch, list) else [batch]
        weights = self.objective_weights()
        alignment = 0.0
        for task_batch in task_batches:
            task = self.task_names[int(task_batch["task_index"])]
            parts = self.task_losses(task_batch)
            beta = weights[task]
            task_loss = self.task_objective(parts)
            if "ce" in parts:
                self.log(f"train/ce/{task}", parts["ce"], batch_size=task_batch["input_ids"].shape[0])
            alignment = alignment + beta * task_loss
            size = task_batch["input_ids"].shape[0]
            self.log(f"train/kl/{task}", parts["kl"], batch_size=size)
            self.log(f"train/mse/{task}", parts["mse"], batch_size=size)
            self.log(f"train/top1/{task}", parts["top1"], batch_size=size)
        regularizer = self.coefficients.regularizer()
        loss = alignment / len(task_batches) + self.hparams.gamma * regularizer
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/reg", regularizer)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            values = self.coefficients.layerwise_values()  # [N, P]
            for k, expert in enumerate(self.expert_names):
                self.log(f"coef/mean/{expert}", values[k].mean())
                self.log(f"coef/min/{expert}", values[k].min())
                self.log(f"coef/max/{expert}", values[k].max())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        task = self.task_names[int(batch["task_index"])]
        parts = self.task_losses(batch, split="eval")
        tokens = batch["attention_mask"].sum()
        self.val_kl[task].update(parts["kl"], tokens)
        self.val_top1[task].update(parts["top1"], tokens)

    def on_validation_epoch_end(self) -> None:
        kls = []
        for task in self.task_names:
            if self.val_kl[task].update_count == 0:
                continue
            kl = self.val_kl[task].compute()
            kls.append(kl)
            self.log(f"val/kl/{task}", kl)
            self.log(f"val/top1/{task}", self.val_top1[task].compute())
            self.val_kl[task].reset()
            self.val_top1[task].reset()
        if kls:
            self.log("val/kl_mean", torch.stack(kls).mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if self.stage == 2:
            lr, total = (hp.stage2_lr or hp.lr), int(hp.stage2_steps)
        else:
            lr, total = hp.lr, int(self.trainer.max_steps)
            if total < 0:
                total = int(self.trainer.estimated_stepping_batches)
        optimizer = torch.optim.Adam(self.coefficients.parameters(), lr=lr)
        total = max(1, total)
        warmup = max(0, int(self.hparams.warmup_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.hparams.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item()) * 0.9 + 0.1

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The base model and task vectors are inputs, not results: keep checkpoints to the coefficients.
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith("coefficients.")
        }
        checkpoint["expertmerge"] = {
            "expert_names": self.expert_names,
            "coefficient_names": self.coefficient_names,
            "chunk_counts": self.coefficients.chunk_counts,
            "stage": self.stage,
            "stage1_values": self.stage1_values,
            "task_scales": self.task_scales,
            "start": [self.start_merge, self.start_alpha],  # what the coefficients are relative to
            # what they were learned on: a resume or export onto other weights of the same names is refused
            MODEL_HASHES: self.pool.content_hashes() if self.pool is not None else {},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("expertmerge", {})
        if self.pool is not None:  # the CLIs compared already, before any model loaded; "last" / "best" not
            path = str(getattr(self._trainer, "ckpt_path", None) or "being loaded")
            folders = {"base": self.pool.base_dir, **self.pool.expert_dirs}
            check_same_models(checkpoint, self.pool.content_hashes(), folders, path, "--ckpt_path")
        if (
            self.coefficients is not None
            and saved
            and (
                saved.get("coefficient_names") != self.coefficient_names
                or saved.get("expert_names") != self.expert_names
            )
        ):
            raise ExpertMergeError(
                "The checkpoint's experts or merged tensors differ from this configuration; "
                "resume with the config the checkpoint was made with."
            )
        start = saved.get("start")
        if self.coefficients is not None and start is not None:
            merge, alpha = start
            same_alpha = torch.allclose(
                torch.as_tensor(alpha, dtype=torch.float64),
                torch.as_tensor(self.start_alpha, dtype=torch.float64),
            )
            if merge != self.start_merge or not same_alpha:
                raise ExpertMergeError(
                    f"The checkpoint's coefficients were learned from the start {merge} at alpha0 {alpha}, but this "
                    f"configuration starts from {self.start_merge} at alpha0 {self.start_alpha} (other "
                    "calibration data or start options?); resume or export with the config and data it was made with."
                )
        if saved.get("task_scales") is not None:
            self.task_scales = saved["task_scales"]  # measured at the start point, not at the resumed one
        if self.coefficients is not None and saved.get("stage") == 2 and self.stage == 1:
            # The run stopped in the chunk-wise stage: rebuild that stage's coefficients before loading them.
            self.start_stage2(saved["stage1_values"])


def paired_objectives(
    before: dict[str, tuple[torch.Tensor, torch.Tensor]],
    after: dict[str, tuple[torch.Tensor, torch.Tensor]],
    weights: dict[str, float],
) -> tuple[float, float, float]:
    """Two states' objectives on the same samples (`sample_objectives`), as the fit weighs them (tokens within a
    task, `weights` across tasks, a weighted mean), and the standard error of their difference (the per-sample
    differences' spread within each task, samples independent)."""
    total = sum(weights[t] for t in before)
    mean_before = mean_after = variance = 0.0
    for task, (values, tokens) in before.items():
        share = tokens / tokens.sum()
        factor = weights[task] / total * share
        difference = after[task][0] - values
        mean_before += float((factor * values).sum())
        mean_after += float((factor * after[task][0]).sum())
        count = len(values)
        if count > 1:
            centred = difference - (share * difference).sum()
            variance += float((factor**2 * centred**2).sum()) * count / (count - 1)
    return mean_before, mean_after, variance**0.5


def checkpoint_stage(path: str | Path) -> int | None:
    """The stage (1 layer-wise, 2 chunk-wise) a fit checkpoint was saved in; None when `path` is no file
    (Lightning's "last" / "best" names, resolved by the Trainer itself)."""
    if not Path(path).is_file():
        return None
    checkpoint = load_fit_checkpoint(path, "--ckpt_path")
    return int(checkpoint.get("expertmerge", {}).get("stage", 1))
