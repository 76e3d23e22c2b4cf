"""Sequence-level MoE (MergeME): build it from whole experts, train what it learns, export it.

What is trained, all on the unlabeled calibration data, everything else frozen:
- `shared` embeddings (experts of different widths, depths or families): each expert's input and output
  projectors, by distillation to that expert's own logits on its task's samples (T^2 KL, top-k targets
  cached like the fit's teacher targets);
- the `learned` router: a linear layer on the mean prompt embedding, trained to send each sample to the
  expert whose calibration set it came from (which expert a text belongs to is how the data is organised,
  not a label anyone wrote). It sees random prefixes of the samples, because at inference it sees prompts.

The perplexity router needs no training. Both routers are evaluated at the end of the fit (routing accuracy
per task on the held-out samples, whole sample and first half), whichever one the export uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from rich.table import Table
from transformers import AutoModelForCausalLM

from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError
from expertmerge.evaluate import TaskScores, expert_scores, score_task, scores_to_json
from expertmerge.hashing import model_content_hash
from expertmerge.losses import kl_to_teacher, logit_kl_loss
from expertmerge.moe.sequence import ROUTERS
from expertmerge.moe.sequence_build import build_sequence_moe, export_sequence_moe
from expertmerge.sources import model_dir
from expertmerge.teachers import TeacherSettings, teacher_targets
from expertmerge.validation import check_sequence_moe_options


class SequenceMoEModule(pl.LightningModule):
    """A sequence-level mixture of whole experts (MergeME): routing once per request, by perplexity or learned.

    Args:
        experts: name -> model folder, hub id or `zoo://` reference. Experts may differ in width, depth and
            family but must share a tokenizer. Calibration tasks name their expert.
        embeddings: `own` (each expert keeps its embedding and head: exact), `shared` (one embedding and
            head of the widest expert, per-expert projectors trained by distillation: MergeME's
            heterogeneous join), or `auto` (own when all experts share one architecture, else shared).
        router: the exported model's router, `perplexity` (no training) or `learned`.
        top_k: experts per request; above 1 their next-token distributions are mixed.
        train_router: train the learned router (also when `router` is perplexity, to report both).
        router_lr: Adam learning rate of the router.
        projector_lr: Adam learning rate of the projectors (`shared` only).
        min_prefix: the router trains on prefixes of at least this fraction of each sample.
        logit_topk: teacher logits kept per token (None: the full vocabulary).
        temperature: distillation temperature T (the loss is T^2 KL).
        trust_remote_code: passed to transformers when loading the experts.
    """

    def __init__(
        self,
        experts: dict[str, str],
        embeddings: str = "auto",
        router: str = "perplexity",
        top_k: int = 1,
        train_router: bool = True,
        router_lr: float = 0.05,
        projector_lr: float = 3e-3,
        min_prefix: float = 0.25,
        logit_topk: int | None = 64,
        temperature: float = 1.0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if router not in ROUTERS:
            raise ExpertMergeError(f"model.router must be one of {list(ROUTERS)}, not '{router}'.")
        if not experts:
            raise ExpertMergeError("model.experts is empty: name at least one expert folder.")
        check_sequence_moe_options(self.hparams)  # before any expert is resolved or loaded
        self.expert_names = list(experts)
        # Resolved now, so a wrong path is reported (by expert name) before data or models are loaded.
        self.expert_dirs = {
            name: str(model_dir(source, f"expert '{name}' ({source})")) for name, source in experts.items()
        }
        self.model = None
        self.datamodule = None
        self.targets: dict[tuple[str, str], Any] = {}
        self.task_experts: list[int] = []

    @property
    def task_names(self) -> list[str]:
        return self.datamodule.task_names

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self.model is None:
            self.prepare(self.trainer.datamodule)

    def prepare(self, datamodule: Any) -> None:
        """Check inputs, build the model, cache the teacher targets (one expert in memory at a time)."""
        hp = self.hparams
        if datamodule.tokenizer_path is None:
            datamodule.tokenizer_path = next(iter(self.expert_dirs.values()))
        datamodule.check(self.expert_names)
        self.model = build_sequence_moe(
            self.expert_dirs,
            hp.embeddings,
            hp.router,
            hp.top_k,
            hp.trust_remote_code,
            make_console(stderr=True),
        )
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._trainable(name))
        datamodule.setup("fit")
        self.datamodule = datamodule
        experts_of = {spec.name: spec.expert for spec in datamodule.tasks}
        self.task_experts = [self.expert_names.index(experts_of[t]) for t in datamodule.task_names]
        splits = ("train", "eval") if self.model.config.embeddings == "shared" else ("eval",)
        settings = TeacherSettings(hidden_layers=(), logit_topk=hp.logit_topk, temperature=hp.temperature)
        self.expert_hashes = {name: model_content_hash(path) for name, path in self.expert_dirs.items()}
        self.targets, stats = teacher_targets(
            datamodule, self.expert_dirs, settings, splits, self.expert_hashes, hp.trust_remote_code
        )
        make_console(stderr=True).print(
            f"teacher targets: {stats.computed} / {stats.reused} (computed / reused)"
        )

    def _load_expert(self, name: str) -> Any:
        return AutoModelForCausalLM.from_pretrained(
            self.expert_dirs[name], dtype=torch.float32, trust_remote_code=self.hparams.trust_remote_code
        ).eval()

    def _trainable(self, name: str) -> bool:
        if name.startswith("router."):
            return bool(self.hparams.train_router)
        # The widest expert reads and writes the shared space as is (identity projectors): kept exact.
        anchor = self.model.config.router_expert
        if name.startswith((f"input_projectors.{anchor}.", f"output_projectors.{anchor}.")):
            return False
        return name.startswith(("input_projectors.", "output_projectors."))

    # --------------------------------------------------------------------------------------- training
    def configure_optimizers(self) -> Any:
        groups = []
        projectors = [p for n, p in self.model.named_parameters() if p.requires_grad and "projectors." in n]
        if projectors:
            groups.append({"params": projectors, "lr": self.hparams.projector_lr})
        if self.hparams.train_router:
            groups.append({"params": list(self.model.router.parameters()), "lr": self.hparams.router_lr})
        if not groups:
            return None  # own embeddings and the perplexity router: nothing to learn
        return torch.optim.Adam(groups)

    def training_step(
        self, batch: dict[str, Any] | list[dict[str, Any]], batch_index: int
    ) -> torch.Tensor | None:
        if isinstance(batch, list):  # a round: one sub-batch per task
            losses = [loss for part in batch if (loss := self.training_step(part, batch_index)) is not None]
            return sum(losses) / len(losses) if losses else None
        task_index = batch["task_index"]
        task = self.task_names[task_index]
        expert = self.task_experts[task_index]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        losses = {}
        if self.model.config.embeddings == "shared":
            logits, _ = self.model.expert_forward(expert, ids, mask)
            rows = self.targets[(task, "train")].rows(batch["sample_index"], ids.shape[1], self.device)
            kl_tokens = kl_to_teacher(logits, rows, self.hparams.temperature)
            losses["kl"] = logit_kl_loss(kl_tokens, mask, self.hparams.temperature)
        if self.hparams.train_router:
            prefix = _random_prefix_mask(mask, self.hparams.min_prefix)
            target = torch.full((ids.shape[0],), expert, device=self.device)
            router_logits = self.model.router_logits(ids, prefix)
            losses["router"] = F.cross_entropy(router_logits, target)
            self.log(
                f"router_acc/{task}", (router_logits.argmax(1) == target).float().mean(), batch_size=len(ids)
            )
        for key, value in losses.items():
            self.log(f"{key}/{task}", value, batch_size=len(ids), prog_bar=key == "kl")
        return sum(losses.values()) if losses else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only what training changes: the experts are re-read from their folders.
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(("model.router.", "model.input_projectors.", "model.output_projectors."))
        }

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, dict[str, TaskScores]], dict[str, dict[str, dict[str, float]]]]:
        """Held-out per-task scores (each expert alone, the MoE with each router) and routing accuracy."""
        model = self.model.eval()
        temperature = self.hparams.temperature
        routers = ["perplexity"] + (["learned"] if self.hparams.train_router else [])
        exported_router = model.config.router

        def score(model: Any = model, **forced: Any) -> dict[str, TaskScores]:
            return {
                task: score_task(
                    lambda ids, mask: (
                        model(input_ids=ids, attention_mask=mask, use_cache=False, **forced).logits
                    ),
                    s.input_ids,
                    s.attention_mask,
                    self.targets[(task, "eval")],
                    temperature,
                    device=self.device,
                )
                for task in self.task_names
                for s in [self.datamodule.task_samples(task, "eval")]
            }

        rows: dict[str, dict[str, TaskScores]] = {}
        for index, name in enumerate(self.expert_names):  # the original experts, as they were given
            if model.config.embeddings == "own":  # held inside the MoE, exactly (forcing it is the expert)
                rows[f"expert {name} alone"] = score(expert_index=index)
            else:  # the MoE holds it behind projectors: read the original again
                rows[f"expert {name} alone"] = score(model=self._load_expert(name).to(self.device))
        accuracy: dict[str, dict[str, dict[str, float]]] = {}
        try:
            for router in routers:
                model.config.router = router
                rows[f"sequence MoE ({router} router)"] = score()
                accuracy[router] = {
                    part: {
                        task: self._routing_accuracy(task_index, part)
                        for task_index, task in enumerate(self.task_names)
                    }
                    for part in ("whole sample", "first half")
                }
        finally:
            model.config.router = exported_router
        rows["experts"] = {
            task: expert_scores(
                self.datamodule.task_samples(task, "eval").attention_mask, self.targets[(task, "eval")]
            )
            for task in self.task_names
        }
        return rows, accuracy

    def _routing_accuracy(self, task_index: int, part: str, batch_size: int = 8) -> float:
        samples = self.datamodule.task_samples(self.task_names[task_index], "eval")
        hits = 0
        for start in range(0, samples.input_ids.shape[0], batch_size):
            mask = samples.attention_mask[start : start + batch_size]
            ids = samples.input_ids[start : start + batch_size]
            if part == "first half":
                lengths = mask.sum(1)
                keep = torch.arange(mask.shape[1]).unsqueeze(0) < (lengths // 2).clamp_min(2).unsqueeze(1)
                mask = mask * keep
            used = int(mask.sum(1).max())
            weights = self.model.routing(ids[:, :used].to(self.device), mask[:, :used].to(self.device))
            hits += int((weights.argmax(1) == self.task_experts[task_index]).sum())
        return hits / max(1, samples.input_ids.shape[0])

    # ----------------------------------------------------------------------------------------- export
    def export(
        self,
        output_dir: str,
        force: bool,
        rows: Any = None,
        accuracy: Any = None,
        config_yaml: str | None = None,
    ) -> Path:
        hp = self.hparams
        sections, extra_files = {}, {}
        if accuracy:
            sections["Routing accuracy (held-out samples)"] = routing_markdown(accuracy, self.task_names)
            extra_files["routing.json"] = json.dumps(accuracy, indent=1)
        if rows:
            extra_files["eval.json"] = json.dumps(scores_to_json(rows), indent=1)
        if config_yaml:
            extra_files["fit_config.yaml"] = config_yaml
        return export_sequence_moe(
            self.model,
            output_dir,
            force,
            tokenizer=self.datamodule.tokenizer,
            experts={n: (hp.experts[n], self.expert_hashes[n]) for n in self.expert_names},
            parameters={
                "tasks": {
                    t: self.expert_names[e] for t, e in zip(self.task_names, self.task_experts, strict=True)
                },
                "router_trained": bool(hp.train_router),
                "steps": int(self.trainer.global_step) if self._trainer is not None else 0,
            },
            sections=sections,
            extra_files=extra_files,
        )


def _random_prefix_mask(mask: torch.Tensor, min_fraction: float) -> torch.Tensor:
    """`mask` cut after a random length in [min_fraction, 1] of each sample's real tokens (at least one)."""
    lengths = mask.sum(1)
    fraction = min_fraction + (1 - min_fraction) * torch.rand(lengths.shape, device=mask.device)
    keep = (lengths.float() * fraction).ceil().clamp_min(1)
    return mask * (torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < keep.unsqueeze(1))


def routing_markdown(accuracy: dict[str, dict[str, dict[str, float]]], tasks: list[str]) -> str:
    lines = ["| router | prompt | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 3) + "|"]
    for router, parts in accuracy.items():
        for part, per_task in parts.items():
            values = [per_task[t] for t in tasks]
            lines.append(
                f"| {router} | {part} | "
                + " | ".join(f"{v:.0%}" for v in values)
                + f" | {sum(values) / len(values):.0%} |"
            )
    return "\n".join(lines)


def routing_table(accuracy: dict[str, dict[str, dict[str, float]]], tasks: list[str]) -> Table:
    table = Table(title="Routing accuracy: held-out samples sent to their task's expert")
    for column in ("router", "prompt", *tasks, "mean"):
        table.add_column(column, justify="left" if column in ("router", "prompt") else "right")
    for router, parts in accuracy.items():
        for part, per_task in parts.items():
            values = [per_task[t] for t in tasks]
            table.add_row(router, part, *(f"{v:.0%}" for v in values), f"{sum(values) / len(values):.0%}")
    return table
