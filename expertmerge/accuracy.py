"""Accuracy by generation: greedy answers to held-out prompts, scored against reference answers.

Generation is batched with left padding and the model's KV cache (`model.generate`), greedy, cut at the first
stop string. Scorers: `exact` (equal after normalisation), `contains` (the normalised reference inside the
normalised generation), `exact_case` (equal with case kept: format skills such as capitals), `number` (the final
number of each, GSM8K style), and the opt-in `pass@1`: the
generated code and the record's unit tests run in a separate Python process with a time limit, resource
limits and no network; never in this process.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from expertmerge.errors import ExpertMergeError

Scorer = Literal["exact", "exact_case", "contains", "number", "pass@1"]
SCORERS: tuple[str, ...] = get_args(Scorer)
PASS_AT_1_SECONDS = 10.0  # a test run that takes longer counts as failed
_TRAILING_PUNCTUATION = ".,;:!?。"
# A final number: an optional sign, digits with thousands commas (1,234) or plain, an optional decimal part.
# A comma must be followed by exactly three digits, so "3, 4" is two numbers and "1,234" is one.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_FENCED = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ scorers
def normalise(text: str, keep_case: bool = False) -> str:
    """Lower case (unless `keep_case`), whitespace runs as one space, no leading/trailing space or trailing
    punctuation."""
    text = " ".join(text.split())
    text = text if keep_case else text.lower()
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(generation: str, reference: str) -> bool:
    return normalise(generation) == normalise(reference)


def exact_case_match(generation: str, reference: str) -> bool:
    return normalise(generation, keep_case=True) == normalise(reference, keep_case=True)


def contains(generation: str, reference: str) -> bool:
    wanted = normalise(reference)
    return bool(wanted) and wanted in normalise(generation)


def final_number(text: str) -> Decimal | None:
    """The last number in `text` ("1,234", "-5", "3.50", "#### 72"), or None without one."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # the pattern only matches numbers; kept for safety
        return None


def number_match(generation: str, reference: str) -> bool:
    """The generation's final number equals the reference's (3.50 == 3.5); no number in either: a miss."""
    wanted, got = final_number(reference), final_number(generation)
    return wanted is not None and got is not None and wanted == got


def extract_code(generation: str) -> str:
    """The first fenced code block (```python ... ```) of a generation, else the whole generation."""
    match = _FENCED.search(generation)
    return match.group(1) if match else generation


# The program the sandboxed interpreter runs first: resource limits, no network namespace (where the kernel
# lets an unprivileged process make one) and refused sockets, then the solution file as __main__. It runs in the
# fresh child interpreter (one thread), not between fork and exec of this multi-threaded process.
_SANDBOX = r"""
import ctypes, resource, runpy, socket, sys
seconds, memory = int(sys.argv[2]), int(sys.argv[3])
for limit, value in ((resource.RLIMIT_CPU, seconds), (resource.RLIMIT_AS, memory),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
try:
    ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET
except Exception:
    pass
def _refused(*args, **kwargs):
    raise OSError("network access is disabled while tests run")
for name in ("connect", "connect_ex", "bind", "sendto", "listen"):
    setattr(socket.socket, name, _refused)
socket.create_connection = socket.getaddrinfo = _refused
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def run_tests(code: str, tests: str, timeout: float = PASS_AT_1_SECONDS, memory_bytes: int = 2 << 30) -> bool:
    """Whether `code` followed by `tests` runs to a clean exit in a sandboxed Python process.

    The process: `python -I` (no user site, no PYTHON* variables), a fresh temporary folder as its working
    directory and home, an environment without proxies or credentials, CPU / memory / file-size limits, no
    network, its own session (killed as a group at `timeout` seconds of wall time: a failure).
    """
    with tempfile.TemporaryDirectory(prefix="expertmerge-pass1-") as folder:
        program = Path(folder) / "solution.py"
        program.write_text(f"{code}\n\n{tests}\n", encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        command = [
            sys.executable,
            "-I",
            "-c",
            _SANDBOX,
            str(program),
            str(math.ceil(timeout)),
            str(memory_bytes),
        ]
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            # The whole session goes, children it forked included, finished or not.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def score_one(scorer: str, generation: str, answer: str | None, tests: str | None) -> bool:
    if scorer == "pass@1":
        return run_tests(extract_code(generation), tests or "")
    reference = answer or ""
    if scorer == "exact":
        return exact_match(generation, reference)
    if scorer == "exact_case":
        return exact_case_match(generation, reference)
    if scorer == "contains":
        return contains(generation, reference)
    if scorer == "number":
        return number_match(generation, reference)
    raise ValueError(f"unknown scorer {scorer!r}; use one of {', '.join(SCORERS)}")


# --------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding of held-out prompts: at most `max_new_tokens`, cut at the first of `stop`."""

    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    add_special_tokens: bool = (
        True  # False for chat-rendered prompts, which already hold their special tokens
    )


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = min((index for s in stop if s and (index := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class _StopStrings:
    """Per row: done once the new tokens' text holds a stop string (what `generate` asks of a criterion)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stop, self.prompt_length = tokenizer, [s for s in stop if s], prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(
            [any(s in text for s in self.stop) for text in texts], dtype=torch.bool, device=input_ids.device
        )


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, ids in enumerate(rows):
        if ids:
            input_ids[row, length - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, length - len(ids) :] = 1
    return input_ids, mask


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
    )


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    label: str = "generating",
    progress: bool = True,
) -> list[str]:
    """Each prompt's greedy continuation (decoded, special tokens left out, cut at the first stop string).

    Prompts are batched longest first (less padding), left-padded so every row's next token sits at the end, and
    decoded with the KV cache; a row stops at EOS, at a stop string or at `max_new_tokens`.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    if settings.max_new_tokens < 1 or settings.batch_size < 1:
        raise ExpertMergeError(
            f"generation needs max_new_tokens and batch_size of at least 1, got {settings.max_new_tokens} and "
            f"{settings.batch_size}."
        )
    encoded = [
        tokenizer(prompt, add_special_tokens=settings.add_special_tokens)["input_ids"] for prompt in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=int(pad_id),
        eos_token_id=eos or None,
    )
    device = next(model.parameters()).device
    model.eval()
    outputs: list[str] = [""] * len(prompts)
    with _progress(progress) as bar:
        task = bar.add_task(label, total=len(prompts))
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            input_ids, mask = _left_padded([encoded[i] for i in rows], int(pad_id))
            criteria = StoppingCriteriaList()
            if settings.stop:
                criteria.append(_StopStrings(tokenizer, settings.stop, input_ids.shape[1]))
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=criteria,
            )
            new = generated[:, input_ids.shape[1] :].cpu()
            for row, index in enumerate(rows):
                text = tokenizer.decode(new[row], skip_special_tokens=True)
                outputs[index] = cut_at_stop(text, settings.stop)
            bar.update(task, advance=len(rows))
    return outputs


# ---------------------------------------------------------------------------------------------- accuracy
@dataclass
class TaskAccuracy:
    """A task's accuracy: `correct` of `total` held-out records."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan


def score_generations(
    scorer: str,
    generations: Sequence[str],
    answers: Sequence[str | None],
    tests: Sequence[str | None] | None = None,
) -> TaskAccuracy:
    """How many generations the scorer accepts against their records' answers (or tests, for pass@1)."""
    tests = tests if tests is not None else [None] * len(generations)
    correct = sum(score_one(scorer, g, a, t) for g, a, t in zip(generations, answers, tests, strict=True))
    return TaskAccuracy(int(correct), len(generations))


def accuracy_gain_retained(base: float, merge: float, expert: float) -> float | None:
    """`(acc_merge - acc_base) / (acc_expert - acc_base)`: 1 keeps the expert's gain, 0 none. None where the
    expert is no more (or less) accurate than the base: there is no gain to retain, and no ratio."""
    if any(math.isnan(v) for v in (base, merge, expert)) or expert == base:
        return None
    return (merge - base) / (expert - base)


Rows = Mapping[str, Mapping[str, TaskAccuracy]]  # model -> task -> accuracy


def accuracy_gains(rows: Rows, model: str) -> dict[str, float | None]:
    """`model`'s accuracy gain retained per task (needs rows `base` and `experts`)."""
    return {
        task: accuracy_gain_retained(
            rows["base"][task].accuracy, rows[model][task].accuracy, rows["experts"][task].accuracy
        )
        for task in rows[model]
    }


def accuracy_table(title: str, rows: Rows, tasks: Sequence[str]) -> Table:
    """One row per (task, model): accuracy (correct / total) and, with `base` and `experts` rows, the gain
    retained (blank where the expert is as accurate as the base)."""
    with_gain = "base" in rows and "experts" in rows
    table = Table(title=title)
    for column in ["task", "model", "accuracy", "correct"] + (["gain retained"] if with_gain else []):
        table.add_column(column, justify="left" if column in ("task", "model") else "right")
    for section, task in enumerate(tasks):
        for index, (model, per_task) in enumerate(rows.items()):
            scores = per_task[task]
            cells = [f"{scores.accuracy:.1%}", f"{scores.correct}/{scores.total}"]
            if with_gain:
                gain = accuracy_gains(rows, model)[task]
                cells.append("n/a" if gain is None else f"{gain:+.3f}")
            table.add_row(
                task if index == 0 else "",
                model,
                *cells,
                end_section=index == len(rows) - 1 and section < len(tasks) - 1,
            )
    return table


def accuracy_json(rows: Rows) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> task -> {accuracy, correct, total, accuracy_gain_retained (null: n/a)}."""
    with_gain = "base" in rows and "experts" in rows
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for model, per_task in rows.items():
        gains = accuracy_gains(rows, model) if with_gain else {}
        result[model] = {
            task: {
                "accuracy": s.accuracy,
                "correct": s.correct,
                "total": s.total,
                **({"accuracy_gain_retained": gains[task]} if with_gain else {}),
            }
            for task, s in per_task.items()
        }
    return result


@dataclass(frozen=True)
class AccuracyTask:
    """One task's held-out records to generate from and score: prompts, reference answers, tests, settings."""

    name: str
    scorer: str
    prompts: Sequence[str]
    answers: Sequence[str | None]
    tests: Sequence[str | None]
    settings: GenerationSettings


def model_accuracy(
    model: Any, tokenizer: Any, tasks: Sequence[AccuracyTask], label: str, progress: bool = True
) -> dict[str, TaskAccuracy]:
    """A model's accuracy on each task: its greedy generations scored by the task's scorer."""
    result = {}
    for task in tasks:
        generations = generate_greedy(
            model, tokenizer, task.prompts, task.settings, f"{label}: {task.name}", progress
        )
        result[task.name] = score_generations(task.scorer, generations, task.answers, task.tests)
    return result


def merge_accuracy_json(scores: dict[str, Any], rows: Rows) -> dict[str, Any]:
    """`scores_to_json`'s model -> task -> metrics, with each scored task's accuracy fields added."""
    merged = {model: {task: dict(values) for task, values in per.items()} for model, per in scores.items()}
    for model, per_task in accuracy_json(rows).items():
        for task, values in per_task.items():
            merged.setdefault(model, {}).setdefault(task, {}).update(values)
    return merged


def accuracy_tasks(datamodule: Any, batch_size: int = 8) -> list[AccuracyTask]:
    """The scored tasks of a set-up calibration data module (its `scored_task_names`, `held_out_records`)."""
    specs = {spec.name: spec for spec in datamodule.tasks}
    tasks = []
    for name in datamodule.scored_task_names:
        spec, records = specs[name], datamodule.held_out_records(name)
        settings = GenerationSettings(
            max_new_tokens=int(spec.eval_max_new_tokens),
            stop=tuple(spec.eval_stop),
            batch_size=batch_size,
            add_special_tokens=not spec.chat_template,
        )
        tasks.append(
            AccuracyTask(
                name,
                spec.scorer,
                [r.prompt for r in records],
                [r.answer for r in records],
                [r.tests for r in records],
                settings,
            )
        )
    return tasks


def experts_accuracy(
    tasks: Sequence[AccuracyTask],
    teachers: Mapping[str, str],
    load: Any,
    tokenizer: Any,
    known: Mapping[str, Mapping[str, TaskAccuracy]] | None = None,
    progress: bool = True,
) -> dict[str, TaskAccuracy]:
    """Each task's accuracy by its own teacher (`teachers`: task -> teacher name), one teacher loaded at a time
    by `load(name)`; a teacher whose row is in `known` (the base, scored already) is not run again."""
    result: dict[str, TaskAccuracy] = {}
    by_teacher: dict[str, list[AccuracyTask]] = {}
    for task in tasks:
        by_teacher.setdefault(teachers[task.name], []).append(task)
    for teacher, own in by_teacher.items():
        if known and teacher in known:
            result.update({t.name: known[teacher][t.name] for t in own})
            continue
        model = load(teacher)
        result.update(model_accuracy(model, tokenizer, own, teacher, progress))
        del model
    return {task.name: result[task.name] for task in tasks}
