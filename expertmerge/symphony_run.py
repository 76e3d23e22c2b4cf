"""`run_symphony`: the Symphony-MoE config (typed, checked before work) and the pipeline that carries it out.

```yaml
experts:                      # name -> model (folder, zoo:// or hub id); no base
  math: zoo://diffinit/experts/math
  code: zoo://diffinit/experts/code
reference: math               # whose coordinates the others are aligned to (default: the first expert)
data:                         # the fit's `data:` keys (calib_data.CalibrationDataModule); tasks name experts
  tasks:
    - {name: math, expert: math, sources: [zoo://diffinit/data/math_calib.jsonl]}
    - {name: code, expert: code, sources: [zoo://diffinit/data/code_calib.jsonl]}
alignment: {residual: true, ffn: true, heads: false}
backbone: {method: slerp, t: null}          # t: the others' total weight, or a list over depth
# backbone: {method: learned, learned: {steps: 60, lr: 0.1}}   # learned with oracle routing (ours)
output: moe                                 # moe | dense
moe: {top_k: 2, router: hidden, router_tuning_steps: 40, router_lr: 0.01, balance: 0.01}
dense: {method: average}                    # average | slerp (of all aligned tensors)
output_dir: outputs/symphony
```
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expertmerge.errors import ExpertMergeError
from expertmerge.symphony import (
    SymphonyPool,
    align,
    backbone,
    dense,
    dense_model,
    router_rows,
    tuned_router_rows,
    write_dense_folder,
    write_moe,
)
from expertmerge.symphony_learned import LearnedBackboneOptions, learned_backbone
from expertmerge.validation import expert_names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no option means anything at NaN or inf


class AlignmentOptions(_Strict):
    residual: bool = True  # rotate each expert's residual stream onto the reference's (different inits)
    ffn: bool = True  # permute each FFN's units onto the reference's (Symphony-MoE)
    heads: bool = False  # permute each layer's attention heads (GQA groups as a whole) onto the reference's


class BackboneOptions(_Strict):
    # slerp / average: training-free fusion (the paper's layer-aware SLERP of attention); learned: our learned
    # merge of the aligned experts relative to the reference, trained with oracle routing (`learned:` keys).
    method: Literal["slerp", "average", "learned"] = "slerp"
    t: float | list[float] | None = None  # slerp / average only
    learned: LearnedBackboneOptions = LearnedBackboneOptions()


class MoeOptions(_Strict):
    top_k: int = 2
    router: Literal["hidden", "cheap_embed", "random"] = "hidden"
    router_tuning_steps: int = 40
    router_lr: float = Field(0.01, gt=0)
    balance: float = Field(0.01, ge=0)


class DenseOptions(_Strict):
    method: Literal["average", "slerp"] = "average"
    t: float | list[float] | None = None


class SymphonyConfig(_Strict):
    experts: dict[str, str]
    reference: str | None = None
    data: dict[str, Any]
    alignment: AlignmentOptions = AlignmentOptions()
    backbone: BackboneOptions = BackboneOptions()
    output: Literal["moe", "dense"] = "moe"
    moe: MoeOptions = MoeOptions()
    dense: DenseOptions = DenseOptions()
    output_dir: str | None = None
    trust_remote_code: bool = False


def load_symphony_config(source: str | Path | dict[str, Any]) -> SymphonyConfig:
    """The typed config from a YAML file (or a dict); errors name the file and the key."""
    where = "symphony config" if isinstance(source, dict) else str(source)
    if isinstance(source, dict):
        raw = source
    else:
        from expertmerge.config_file import read_config_file

        raw = read_config_file(source, "symphony --config")
    if not isinstance(raw, dict):
        raise ExpertMergeError(f"{where}: expected a mapping with `experts:` and `data:`.")
    if "base" in raw or "base_model" in raw:
        raise ExpertMergeError(
            f"{where}: symphony takes no `base` (its experts share none); name a `reference` expert instead."
        )
    try:
        config = SymphonyConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ExpertMergeError(f"{where}: `{key}`: {first['msg']}.") from error
    expert_names(f"{where}: `experts`", config.experts)
    if len(config.experts) < 2:
        raise ExpertMergeError(f"{where}: `experts` needs at least two models, got {len(config.experts)}.")
    if config.moe.top_k < 1 or config.moe.router_tuning_steps < 0:
        raise ExpertMergeError(f"{where}: `moe.top_k` must be >= 1 and `moe.router_tuning_steps` >= 0.")
    return config


@dataclass
class SymphonyRun:
    """Everything the later steps need, set up once: pool (validated), calibration data, teacher targets."""

    pool: SymphonyPool
    datamodule: Any
    targets: dict[tuple[str, str], Any]
    reports: dict[str, dict[str, float]] = field(default_factory=dict)
    backbone_report: dict[str, Any] = field(default_factory=dict)  # the learned backbone's fit, if any
    # trains the learned backbone (`lightning_modules.trainer.plain_trainers`); only that backbone needs one
    trainer_factory: Any = None

    @property
    def task_names(self) -> list[str]:
        return list(self.datamodule.task_names)

    def calibration_batches(self, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every task's calibration (train-split) samples, in batches: the tokens the alignment is fit on."""
        from expertmerge.moe.router_inputs import split_batches

        out = []
        for task in self.task_names:
            samples = self.datamodule.task_samples(task, "train")
            out += split_batches(samples.input_ids, samples.attention_mask, batch_size)
        return out

    def batches_per_expert(self) -> list[dict[str, list]]:
        from expertmerge.moe.router_inputs import split_batches

        expert_of = {spec.name: spec.expert for spec in self.datamodule.tasks}
        per_expert = []
        for expert in self.pool.expert_names:
            tasks = {}
            for task in self.task_names:
                if expert_of[task] == expert:
                    samples = self.datamodule.task_samples(task, "train")
                    tasks[task] = split_batches(samples.input_ids, samples.attention_mask, 8)
            if not tasks:
                raise ExpertMergeError(
                    f"expert '{expert}' has no calibration task (`data.tasks[*].expert`); its router row "
                    "cannot be initialised. Add a task for it."
                )
            per_expert.append(tasks)
        return per_expert

    def align(self, residual: bool = True, ffn: bool = True, heads: bool = False) -> None:
        self.reports = align(self.pool, self.calibration_batches(), residual=residual, ffn=ffn, heads=heads)

    def shared_backbone(self, options: BackboneOptions | None = None) -> dict[str, torch.Tensor]:
        """The shared tensors of the pool's experts as aligned now, fused as `options` say."""
        options = options or BackboneOptions()
        if options.method != "learned":
            return backbone(self.pool, options.t, options.method)
        if self.trainer_factory is None:
            raise ExpertMergeError(
                "symphony: backbone method 'learned' trains a merge; give prepare() / run_symphony() a "
                "trainer_factory (lightning_modules.trainer.plain_trainers())."
            )
        shared, self.backbone_report = learned_backbone(
            self.pool, self.datamodule, self.trainer_factory, options.learned
        )
        return shared

    def routers(
        self, shared: dict[str, torch.Tensor], moe: MoeOptions, progress: bool = False
    ) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Router rows over the backbone `shared`: as initialised (`init`) and, with `moe.router_tuning_steps`,
        tuned (`tuned`); and the tuning's losses."""
        rows = {"init": router_rows(self.pool, shared, self.batches_per_expert(), moe.router)}
        losses: list[float] = []
        if moe.router_tuning_steps:
            rows["tuned"], losses = tuned_router_rows(
                self.pool,
                shared,
                rows["init"],
                self.datamodule.train_dataloader(),
                self.targets,
                self.task_names,
                top_k=moe.top_k,
                steps=moe.router_tuning_steps,
                lr=moe.router_lr,
                balance=moe.balance,
                progress=progress,
            )
        return rows, losses

    def score_moe(
        self,
        options: BackboneOptions | None = None,
        router: str = "hidden",
        tuning_steps: int = 0,
        top_k: int = 2,
        lr: float = 0.01,
    ) -> dict[str, dict[str, float]]:
        """Held-out KL of the MoE of the pool's experts as aligned now: `init` (router as initialised) and,
        with `tuning_steps`, `tuned`. Each MoE is written by the writer to a scratch folder and loaded."""
        import tempfile

        from transformers import AutoModelForCausalLM

        shared = self.shared_backbone(options)
        moe = MoeOptions(top_k=top_k, router=router, router_tuning_steps=tuning_steps, router_lr=lr)
        candidates, _ = self.routers(shared, moe)
        scores = {}
        for name, matrix in candidates.items():
            with tempfile.TemporaryDirectory(prefix="symphony-score-") as scratch:
                folder = Path(scratch) / "moe"
                write_moe(self.pool, folder, shared, matrix, top_k=top_k, router_method=name)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            scores[name] = self.heldout_kl(model)
        return scores

    def score_dense(self, method: str = "average", t: float | list[float] | None = None) -> dict[str, float]:
        """Held-out KL of the dense fusion of the pool's experts as aligned now."""
        return self.heldout_kl(dense_model(self.pool, dense(self.pool, t, method)))

    @torch.no_grad()
    def heldout_kl(self, model: Any) -> dict[str, float]:
        """Per task, the mean KL(own expert || model) over the held-out (eval) samples' real tokens."""
        from expertmerge.evaluate import score_model_tasks

        return {t: scores.kl for t, scores in score_model_tasks(model, self.datamodule, self.targets).items()}


def prepare(config: SymphonyConfig, progress: bool = True, trainer_factory: Any = None) -> SymphonyRun:
    """Validate the experts (before any work), load the calibration data, compute the teacher targets.
    `trainer_factory` trains the learned backbone, when the config asks for one."""
    from calib_data.datamodule import CalibrationDataModule
    from expertmerge.teachers import TeacherSettings, teacher_targets

    pool = SymphonyPool(config.experts, config.reference, trust_remote_code=config.trust_remote_code)
    pool.validate()
    data = dict(config.data)
    data.setdefault("tokenizer", str(pool.base_dir))
    try:
        datamodule = CalibrationDataModule(**data)
    except TypeError as error:
        raise ExpertMergeError(f"symphony config `data`: {error}") from error
    datamodule.check(pool.expert_names)
    datamodule.setup("fit")
    targets, _ = teacher_targets(
        datamodule, pool.expert_dirs, TeacherSettings(hidden_layers=()), splits=("train", "eval")
    )
    return SymphonyRun(pool, datamodule, targets, trainer_factory=trainer_factory)


@dataclass
class SymphonySummary:
    output: Path
    kind: str
    reference: str
    experts: list[str]
    heldout_kl: dict[str, float]
    alignment: dict[str, dict[str, float]]
    router_losses: list[float]
    wall_seconds: float
    backbone: dict[str, Any] = field(default_factory=dict)  # method, and the learned fit's report


def run_symphony(
    config: SymphonyConfig | str | Path | dict[str, Any],
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    trainer_factory: Any = None,
) -> SymphonySummary:
    """Align the experts, fuse the backbone and write the MoE (or the dense model) to `out`, then score it."""
    from transformers import AutoModelForCausalLM

    from expertmerge.io.folder import check_output_dir

    started = time.perf_counter()
    inputs = [] if isinstance(config, SymphonyConfig | dict) else [config]  # the config file too
    if not isinstance(config, SymphonyConfig):
        config = load_symphony_config(config)
    out = out if out is not None else config.output_dir
    if out is None:
        raise ExpertMergeError("symphony: no output folder; pass --out DIR or set `output_dir`.")
    inputs += list(config.experts.values())
    for task in config.data.get("tasks") or []:
        inputs += (
            [s for s in (task.get("sources") or []) if isinstance(s, str)] if isinstance(task, dict) else []
        )
    out = check_output_dir(out, force, inputs)
    run = prepare(config, progress, trainer_factory)
    run.align(config.alignment.residual, config.alignment.ffn, config.alignment.heads)
    pool, losses = run.pool, []
    if config.output == "moe":
        shared = run.shared_backbone(config.backbone)
        candidates, losses = run.routers(shared, config.moe, progress)
        rows = candidates.get("tuned", candidates["init"])
        method = config.moe.router + ("+tuned" if "tuned" in candidates else "")
        used = config.backbone.model_dump(
            exclude={"learned"} if config.backbone.method != "learned" else {"t"}
        )
        card = {"alignment": config.alignment.model_dump(), "backbone": used}
        write_moe(
            pool, out, shared, rows, top_k=config.moe.top_k, router_method=method, force=True, card=card
        )
    else:
        write_dense(pool, out, dense(pool, config.dense.t, config.dense.method))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return SymphonySummary(
        output=Path(out),
        kind=config.output,
        reference=pool.reference,
        experts=pool.expert_names,
        heldout_kl=run.heldout_kl(model),
        alignment=run.reports,
        router_losses=losses,
        wall_seconds=time.perf_counter() - started,
        backbone={"method": config.backbone.method, **run.backbone_report} if config.output == "moe" else {},
    )


def write_dense(pool: SymphonyPool, out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The dense model through the one writer into an atomic folder (config and tokenizer of the reference)."""
    from expertmerge.io.folder import atomic_output_dir
    from expertmerge.io.support import support_bytes

    estimate = sum(t.numel() * t.element_size() for t in tensors.values()) + support_bytes(pool.base_dir)
    inputs = [pool.base_dir, *pool.expert_dirs.values()]
    with atomic_output_dir(out, True, inputs, estimate, command="symphony") as tmp:
        write_dense_folder(pool, tmp, tensors)


__all__ = [
    "SymphonyConfig",
    "SymphonyRun",
    "SymphonySummary",
    "dense_model",
    "load_symphony_config",
    "prepare",
    "run_symphony",
]
