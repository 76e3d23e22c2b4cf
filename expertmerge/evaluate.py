"""How well a model matches each expert on that expert's held-out calibration samples.

Metrics per task (torchmetrics, weighted by tokens): perplexity of the held-out text, KL(expert || model),
and top-1 agreement with the expert's next-token choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.table import Table
from torchmetrics import MeanMetric

from expertmerge.losses import kl_to_teacher, next_token_nll, teacher_top1
from expertmerge.teachers import TeacherTargets

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> logits


@dataclass
class TaskScores:
    perplexity: float
    kl: float
    top1: float


@torch.no_grad()
def score_task(
    forward: Forward,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    targets: TeacherTargets,
    temperature: float = 1.0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> TaskScores:
    nll_mean, kl_mean, top1_mean = MeanMetric(), MeanMetric(), MeanMetric()
    for start in range(0, input_ids.shape[0], batch_size):
        mask = attention_mask[start : start + batch_size]
        used = int(mask.sum(1).max())
        ids = input_ids[start : start + batch_size, :used].to(device)
        mask = mask[:, :used].to(device)
        rows = targets.rows(torch.arange(start, start + ids.shape[0]), used, device)
        logits = forward(ids, mask).float()
        kl = kl_to_teacher(logits, rows, temperature)
        real = mask.bool()
        kl_mean.update(kl[real].cpu())
        top1_mean.update((logits.argmax(-1) == teacher_top1(rows))[real].float().cpu())
        nll, target_mask = next_token_nll(logits, ids, mask)
        nll_mean.update(nll[target_mask.bool()].cpu())
    return TaskScores(
        perplexity=math.exp(float(nll_mean.compute())),
        kl=float(kl_mean.compute()),
        top1=float(top1_mean.compute()),
    )


def expert_scores(attention_mask: torch.Tensor, targets: TeacherTargets) -> TaskScores:
    """The expert against itself: its own perplexity (from the cached NLL), KL 0, agreement 1."""
    next_real = attention_mask[:, 1:] * attention_mask[:, :-1]
    nll = targets.tensors["nll"][:, : next_real.shape[1]]
    mean_nll = float((nll * next_real).sum() / next_real.sum().clamp_min(1))
    return TaskScores(perplexity=math.exp(mean_nll), kl=0.0, top1=1.0)


def mean_scores(per_task: Mapping[str, TaskScores]) -> TaskScores:
    """Unweighted mean over tasks (perplexity: geometric mean)."""
    values = list(per_task.values())
    return TaskScores(
        perplexity=math.exp(sum(math.log(s.perplexity) for s in values) / len(values)),
        kl=sum(s.kl for s in values) / len(values),
        top1=sum(s.top1 for s in values) / len(values),
    )


def gain_retained(base: TaskScores, merge: TaskScores, expert: TaskScores) -> float:
    """`(loss_base - loss_merge) / (loss_base - loss_expert)` with loss = log perplexity; NaN when equal."""
    base_loss, loss, own = (math.log(s.perplexity) for s in (base, merge, expert))
    return (base_loss - loss) / (base_loss - own) if base_loss != own else math.nan


def mean_gain_retained(
    rows: Mapping[str, Mapping[str, TaskScores]], model: str, tasks: Sequence[str] | None = None
) -> float:
    """`model`'s gain retained averaged over `tasks` (default: all of the `base` row's), skipping the tasks
    whose teacher is the base (no gain to retain); NaN without any. Needs rows `base` and `experts`."""
    tasks = list(rows["base"]) if tasks is None else tasks
    gains = [gain_retained(rows["base"][t], rows[model][t], rows["experts"][t]) for t in tasks]
    gains = [g for g in gains if not math.isnan(g)]
    return sum(gains) / len(gains) if gains else math.nan


def card_evaluation_lines(rows: Mapping[str, Mapping[str, TaskScores]]) -> list[str]:
    """The merge card's evaluation table (Markdown), one line per model with its means over tasks; with
    `base` and `experts` rows, the mean gain retained first (1: the experts, 0: the base), as in the fit's
    printed table."""
    with_gain = "base" in rows and "experts" in rows
    lines = [
        "| model |"
        + (" mean gain retained |" if with_gain else "")
        + " mean perplexity | mean KL to expert | mean top-1 agree |",
        "|---|---|---|---|" + ("---|" if with_gain else ""),
    ]
    for name, per_task in rows.items():
        m = mean_scores(per_task)
        gain = ""
        if with_gain:
            value = mean_gain_retained(rows, name)
            gain = " |" if math.isnan(value) else f" {value:+.3f} |"
        lines.append(f"| {name} |{gain} {m.perplexity:.3f} | {m.kl:.4f} | {m.top1:.1%} |")
    return lines


def scores_table(title: str, rows: Mapping[str, Mapping[str, TaskScores]], tasks: Sequence[str]) -> Table:
    """One row per (task, model), models in the order given, with the mean over tasks last. With `base` and
    `experts` rows, a `gain retained` column too (1: the task's expert, 0: the base; blank where the base is
    the task's teacher), the score the default objective maximises."""
    with_gain = "base" in rows and "experts" in rows
    table = Table(title=title)
    columns = ["task", "model", "perplexity", "KL to expert", "top-1 agree"] + (
        ["gain retained"] if with_gain else []
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "model") else "right")

    def gain(model: str, task: str) -> float:
        if task != "mean":
            return gain_retained(rows["base"][task], rows[model][task], rows["experts"][task])
        return mean_gain_retained(rows, model, tasks)

    sections = list(tasks) + ["mean"]
    for section_index, task in enumerate(sections):
        for model_index, (model, per_task) in enumerate(rows.items()):
            scores = mean_scores(per_task) if task == "mean" else per_task[task]
            cells = [f"{scores.perplexity:.3f}", f"{scores.kl:.4f}", f"{scores.top1:.1%}"]
            if with_gain:
                value = gain(model, task)
                cells.append("" if math.isnan(value) else f"{value:+.3f}")
            table.add_row(
                task if model_index == 0 else "",
                model,
                *cells,
                end_section=model_index == len(rows) - 1 and section_index < len(sections) - 1,
            )
    return table


def scores_to_json(rows: Mapping[str, Mapping[str, TaskScores]]) -> dict[str, dict[str, dict[str, float]]]:
    return {model: {task: asdict(s) for task, s in per_task.items()} for model, per_task in rows.items()}


def score_model_tasks(
    model: torch.nn.Module,
    datamodule: Any,
    targets: Any,
    temperature: float = 1.0,
    device: torch.device | str = "cpu",
) -> dict[str, TaskScores]:
    """Per task of `datamodule`, a causal LM's scores against its teacher on the held-out (eval) samples:
    `targets[(task, "eval")]` are the teacher's cached rows (the fused MoE, mergekit-moe and Symphony use it)."""
    model.eval()

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    scores = {}
    for task in datamodule.task_names:
        samples = datamodule.task_samples(task, "eval")
        scores[task] = score_task(
            forward,
            samples.input_ids,
            samples.attention_mask,
            targets[(task, "eval")],
            temperature,
            device=device,
        )
    return scores
