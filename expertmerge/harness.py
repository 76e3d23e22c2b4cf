"""lm-evaluation-harness (the optional `eval` extra) on models held in memory, offline and quietly.

A model is wrapped in lm-eval's `HFLM` and scored by `simple_evaluate` on tasks found by a `TaskManager`
(an `include_path` folder of task YAML first, lm-eval's own tasks only when a name is not there). The hub and
datasets are switched offline: a task must read local files. lm-eval's logging, tqdm bars and the stderr of the
`git` it runs for its environment report are kept out of our output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rich.table import Table

from expertmerge.errors import ExpertMergeError

MISSING = 'lm-eval is not installed: pip install -e ".[eval]"'
_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
_QUIET_LOGGERS = ("lm_eval", "lm-eval", "datasets", "evaluate", "accelerate")

# model -> task -> metric -> {"value": float, "stderr": float | None}
Scores = dict[str, dict[str, dict[str, dict[str, float | None]]]]


def require_harness() -> None:
    """Fail in one line, before any model loads, when the `eval` extra is not installed."""
    if any(importlib.util.find_spec(name) is None for name in ("lm_eval", "accelerate")):
        raise ExpertMergeError(MISSING)


def offline() -> None:
    """Neither the hub nor datasets go online from here on (datasets reads this when it is first imported)."""
    os.environ.update(_OFFLINE)


def task_manager(tasks: Sequence[str], include_path: str | None) -> Any:
    """A TaskManager that knows every name in `tasks` (tasks, groups or tags); indexing lm-eval's own few
    thousand task files takes seconds, so that happens only when the include path lacks a name."""
    offline()
    from lm_eval.tasks import TaskManager

    with _quiet():
        manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
        if include_path is not None and _unknown(tasks, manager):
            manager = TaskManager(include_path=include_path, include_defaults=True)
    unknown = _unknown(tasks, manager)
    if unknown:
        where = f"in --include_path '{include_path}' or " if include_path else "in "
        raise ExpertMergeError(
            f"evaluate --lm_eval: unknown task {', '.join(repr(t) for t in unknown)}: not {where}lm-eval's own tasks."
        )
    return manager


def _unknown(tasks: Sequence[str], manager: Any) -> list[str]:
    known = set(manager.all_tasks)
    return [task for task in tasks if task not in known]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' log lines and progress bars, and any subprocess's stderr, go nowhere for the
    block: they log through their own handlers, write tqdm bars to sys.stderr and `git` errors to descriptor 2."""
    import datasets

    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        # Both: sys.stderr need not write to descriptor 2 (a captured or redirected stream does not).
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        if bars:
            datasets.utils.logging.enable_progress_bar()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def harness_scores(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    manager: Any,
    limit: float | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """One in-memory model's task -> metric -> {value, stderr} (stderr None where lm-eval gives none)."""
    offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=wrapped, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False
        )
    return _metrics(output["results"])


def _metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """lm-eval's `{task: {"acc,none": v, "acc_stderr,none": s, "alias": ..., ...}}` as task -> metric -> value
    and stderr; a filter other than `none` stays in the metric's name (`exact_match,strict-match`)."""
    scores: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, values in results.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else key
            metrics[name] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            }
        scores[task] = metrics
    return scores


def harness_table(title: str, scores: Scores) -> Table:
    """One row per (task, metric), one column per model: its value ± stderr."""
    models = list(scores)
    rows = sorted({(task, metric) for per in scores.values() for task in per for metric in per[task]})
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    for model in models:
        table.add_column(model, justify="right")
    for index, (task, metric) in enumerate(rows):
        cells = []
        for model in models:
            found = scores[model].get(task, {}).get(metric)
            if found is None:
                cells.append("")
            elif found["stderr"] is None:
                cells.append(f"{found['value']:.4f}")
            else:
                cells.append(f"{found['value']:.4f} ± {found['stderr']:.4f}")
        last_of_task = index + 1 == len(rows) or rows[index + 1][0] != task
        table.add_row(
            task if index == 0 or rows[index - 1][0] != task else "",
            metric,
            *cells,
            end_section=last_of_task,
        )
    return table
