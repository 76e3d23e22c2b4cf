"""The calibration config: one `TaskSpec` per task, the columns a task reads, and the checks of the options.

Everything here is cheap and runs before any file is loaded or tokenized, so a wrong option fails at once
with the config key named.
"""

from __future__ import annotations

import numbers
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from expertmerge.errors import ExpertMergeError
from expertmerge.validation import MAX_TEMPERATURE, in_range, module_name

# A task whose `expert` is this name is taught by the base model itself (general text): the merge keeps what the
# base could do while it learns the experts. Equal to `expertmerge.pool.BASE`, which no expert may be called.
BASE_TEACHER = "base"
MESSAGES_COLUMN = "messages"  # a chat-format column, used as-is with `chat_template: true`
# What a column name looks like. Anything else read as a "column" is a line of some other file given under a data
# suffix (a `.csv` link to /etc/shadow makes its first line one "column"): errors never echo it.
_COLUMN_NAME = re.compile(r"\w[\w .\-()\[\]#%+&']{0,63}")
TxtSampleBy = Literal["line", "paragraph", "document"]
# How a held-out record's greedy generation is scored against it (`expertmerge.accuracy` implements them; named
# here too so a config is checked without importing torch).
SCORERS = ("exact", "exact_case", "contains", "number", "pass@1")
Answers = Literal["none", "expert"]


@dataclass
class TaskSpec:
    """One calibration task: where its text comes from and which expert it belongs to.

    Args:
        name: task name, e.g. "math"; unique within the config.
        expert: name of the expert (in the model's pool) whose behaviour this task's data calibrates, or
            `base`: the base model is the teacher, e.g. on general text (`corpora://prose.jsonl`), so the
            merge keeps the base's general ability; `model.task_weights` trades it against the experts.
        sources: one or more files or globs (.jsonl/.json/.txt/.parquet/.csv), `datasets.save_to_disk`
            folders, or hub dataset ids (passed to `datasets.load_dataset`; needs the hub or its local cache).
            Relative paths are taken from the current directory; `corpora://math_word_problems.jsonl` names a
            corpus shipped with expertmerge (works from any directory); `zoo://` references resolve to the
            demo zoo.
        text_field: column holding the text (.txt files have one column, "text").
        template: instead of `text_field`, a Python format string over several columns, e.g.
            "Question: {question}\\nAnswer: {answer}"; empty: use `text_field`.
        chat_template: render each sample with the tokenizer's chat template: a `messages` column in chat
            format is used as-is; otherwise the text is the user turn and `response_field` (if set) the
            assistant turn.
        response_field: with `chat_template`, the column holding the assistant's reply. Without it the
            conversation is the user turn plus the generation prompt.
        split: split to read from hub datasets and saved DatasetDicts.
        txt_sample_by: how .txt files are cut into samples: one per line, per blank-line-separated
            paragraph, or one per file.
        min_tokens: texts with fewer tokens than this (special tokens not counted) are skipped.
        group_field: a column naming each text's source group (its file, document, topic or template). When
            set, the held-out part (`eval_samples_per_task`) is made of whole groups that the training part
            never sees, so the fit's held-out scores (and the start search, which is judged on them) measure
            text from other sources, as the merge will meet in use. Empty: a random split of the texts.
        answer_field: a column holding each record's reference answer. When set (or `tests_field`, for
            `pass@1`), `evaluate` and the fit's end-of-fit table also score accuracy by generation: every
            model writes a greedy answer to each held-out record's prompt (the rendered text, without a chat
            `response_field`), scored by `scorer`. The text the fit calibrates on stays the prompt alone.
        scorer: `exact` (equal after normalising case, whitespace and trailing punctuation), `exact_case` (the
            same with case kept: a format such as capitals), `contains` (the
            reference inside the answer), `number` (the final numbers equal, GSM8K style: "1,234", "-5",
            "3.50"), or `pass@1` (the answer's code and the record's `tests_field` run in a sandboxed Python
            process with a time limit and no network; a clean exit passes).
        tests_field: with `scorer: pass@1`, the column holding each record's unit tests (Python source run
            after the generated code, e.g. `assert add(1, 2) == 3`).
        eval_max_new_tokens: the most tokens a scored answer may have.
        eval_stop: strings that end a scored answer (the answer is cut before the first one), e.g. ["\n"].
        answers: `expert`: the texts are prompts without answers, and before the teacher pass the task's
            expert (the base for `expert: base`) writes its answer to every prompt (train and held-out, cached
            like the teacher targets); the samples, the teacher targets and the fit's losses then cover prompt
            + answer (`model.answer_weight` weighs the answer tokens). With `chat_template` the prompt is the
            user turn plus the generation prompt. `none` (default): the texts are used as they are.
        max_new_tokens: with `answers: expert`, the longest answer in tokens (prompt + answer are cut to
            `data.max_length`).
        temperature: with `answers: expert`, 0 (default) answers greedily; above 0 samples at that temperature
            (no top-k / top-p), seeded by `data.seed`.
        stop: with `answers: expert`, strings that end an answer (kept in it), besides the expert's EOS.
    """

    name: str
    expert: str
    sources: list[str] | str = field(default_factory=list)
    text_field: str = "text"
    # Typed `str`, not `str | None`: jsonargparse would turn a template starting with "#" into None.
    template: str = ""
    chat_template: bool = False
    response_field: str | None = None
    split: str = "train"
    txt_sample_by: TxtSampleBy = "paragraph"
    min_tokens: int = 4
    group_field: str = ""
    answer_field: str = ""
    scorer: str = "exact"
    tests_field: str = ""
    eval_max_new_tokens: int = 64
    eval_stop: list[str] = field(default_factory=list)
    answers: Answers = "none"
    max_new_tokens: int = 64
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.template = self.template or ""  # None (from Python callers) means no template, like ""
        # A single source may be written without a list (`sources: data/math.jsonl`).
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        else:
            self.sources = list(self.sources)


def scored(task: TaskSpec) -> bool:
    """Whether a task's held-out records are scored by generation (it names a reference or tests column)."""
    return bool(task.answer_field or task.tests_field)


def reference_columns(task: TaskSpec) -> list[str]:
    """The columns a scored task's held-out records read besides their text: the answer and the tests."""
    return [c for c in (task.answer_field, task.tests_field) if c]


def base_task_names(tasks: Sequence[TaskSpec]) -> list[str]:
    """The tasks taught by the base model (`expert: base`), in config order."""
    return [task.name for task in tasks if task.expert == BASE_TEACHER]


def check_count(key: str, value: Any, minimum: int) -> None:
    """An integer option of at least `minimum`; booleans and fractional numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ExpertMergeError(
            f"`{key}` is {value!r} ({type(value).__name__}); it must be a whole number of at least {minimum}."
        )
    if value < minimum:
        raise ExpertMergeError(f"`{key}` is {value}; it must be at least {minimum}.")


def check_settings(tasks: Sequence[TaskSpec], settings: dict[str, tuple[Any, int | None]]) -> None:
    """The datamodule's options and every task's own, before any work.

    `settings` maps an option name to (value, minimum); a minimum of None only asks for a whole number.
    """
    if not tasks:
        raise ExpertMergeError("No calibration tasks: give at least one entry under `data.tasks`.")
    for name, (value, minimum) in settings.items():
        if minimum is None:  # any whole number (the seed)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ExpertMergeError(f"`data.{name}` is {value!r}; it must be a whole number.")
        else:
            check_count(f"data.{name}", value, minimum)
    max_length = settings["max_length"][0]
    seen: dict[str, int] = {}
    for index, task in enumerate(tasks):
        prefix = f"data.tasks[{index}]"
        module_name(f"`{prefix}.name`", task.name)
        if task.name in seen:
            raise ExpertMergeError(
                f"Duplicate task name '{task.name}' in `data.tasks[{seen[task.name]}]` and "
                f"`{prefix}`: task names must be unique; rename one."
            )
        seen[task.name] = index
        check_count(f"{prefix}.min_tokens", task.min_tokens, 1)
        if task.min_tokens > max_length:
            raise ExpertMergeError(
                f"`{prefix}.min_tokens` of task '{task.name}' is {task.min_tokens}; it must be "
                f"between 1 and `data.max_length` ({max_length})."
            )
        if task.txt_sample_by not in get_args(TxtSampleBy):
            raise ExpertMergeError(
                f"`{prefix}.txt_sample_by` of task '{task.name}' is {task.txt_sample_by!r}; use one of "
                f"{', '.join(get_args(TxtSampleBy))}."
            )
        if not isinstance(task.group_field, str):
            raise ExpertMergeError(
                f"`{prefix}.group_field` of task '{task.name}' is {task.group_field!r}; name a column or leave "
                "it empty."
            )
        _check_scoring(task, prefix)
        if not task.template and not (isinstance(task.text_field, str) and task.text_field):
            raise ExpertMergeError(
                f"`{prefix}.text_field` of task '{task.name}' is {task.text_field!r}; name the text column."
            )
        check_answer_options(task, prefix)


def check_answer_options(task: TaskSpec, prefix: str) -> None:
    """`answers` and its generation settings: a known value, and settings only where answers are written."""
    if task.answers not in get_args(Answers):
        raise ExpertMergeError(
            f"`{prefix}.answers` of task '{task.name}' is {task.answers!r}; use `expert` (the task's expert "
            "writes an answer to every prompt) or `none` (the texts as they are)."
        )
    check_count(f"{prefix}.max_new_tokens", task.max_new_tokens, 1)
    in_range(f"`{prefix}.temperature`", task.temperature, 0.0, MAX_TEMPERATURE)
    if not isinstance(task.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in task.stop):
        raise ExpertMergeError(
            f"`{prefix}.stop` of task '{task.name}' is {task.stop!r}; give a list of non-empty strings."
        )
    if task.answers == "none":
        if task.temperature or task.stop:
            raise ExpertMergeError(
                f"`{prefix}.temperature` / `stop` of task '{task.name}' set how the expert writes answers, but "
                f"the task writes none; set `{prefix}.answers: expert` or drop them."
            )
        return
    if task.response_field is not None:
        raise ExpertMergeError(
            f"Task '{task.name}' has its own answers (`{prefix}.response_field`: {task.response_field!r}) and "
            f"asks its expert to write them (`{prefix}.answers: expert`); keep one of the two."
        )


def _check_scoring(task: TaskSpec, prefix: str) -> None:
    """The accuracy options of one task: a known scorer, and the columns it needs named."""
    for key in ("answer_field", "tests_field"):
        if not isinstance(getattr(task, key), str):
            raise ExpertMergeError(
                f"`{prefix}.{key}` of task '{task.name}' is {getattr(task, key)!r}; name a column or leave it "
                "empty."
            )
    if task.scorer not in SCORERS:
        raise ExpertMergeError(
            f"`{prefix}.scorer` of task '{task.name}' is {task.scorer!r}; use one of {', '.join(SCORERS)}."
        )
    if task.scorer == "pass@1" and not task.tests_field:
        raise ExpertMergeError(
            f"`{prefix}.scorer` of task '{task.name}' is pass@1, which runs each record's unit tests: name "
            f"their column with `{prefix}.tests_field`."
        )
    if task.tests_field and task.scorer != "pass@1":
        raise ExpertMergeError(
            f"`{prefix}.tests_field` of task '{task.name}' is set, but only `scorer: pass@1` runs tests (its "
            f"scorer is {task.scorer!r}); set the scorer to pass@1 or drop tests_field."
        )
    if not scored(task):
        return
    check_count(f"{prefix}.eval_max_new_tokens", task.eval_max_new_tokens, 1)
    stops = task.eval_stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ExpertMergeError(
            f"`{prefix}.eval_stop` of task '{task.name}' is {stops!r}; give a list of non-empty strings."
        )


def template_columns(template: str) -> list[str]:
    """Top-level column names a format string reads ("{a.b[0]}" reads column "a")."""
    columns = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        root = field_name.split(".", 1)[0].split("[", 1)[0]
        if root == "" or root.isdigit():
            raise ValueError(
                "positional fields like '{}' or '{0}' are not allowed; name a column: '{question}'"
            )
        if root not in columns:
            columns.append(root)
    return columns


def needed_columns(task: TaskSpec, index: int) -> tuple[list[str], str]:
    """The columns a task reads, and the config key that names them."""
    prefix = f"data.tasks[{index}]"
    if task.template:
        try:
            columns = template_columns(task.template)
        except ValueError as error:
            raise ExpertMergeError(
                f"Task '{task.name}': `{prefix}.template` is not a valid format string: {error}."
            ) from error
        if not columns:
            raise ExpertMergeError(
                f"Task '{task.name}': `{prefix}.template` names no column; write e.g. '{{question}}'."
            )
        key = f"{prefix}.template"
    else:
        columns, key = [task.text_field], f"{prefix}.text_field"
    if task.chat_template and task.response_field is not None:
        columns = [*columns, task.response_field]
    return columns, key


def group_column(task: TaskSpec) -> list[str]:
    """The group column a task reads (`group_field`), if any."""
    return [task.group_field] if task.group_field else []


def describe_columns(columns: Sequence[Any]) -> str:
    """The column names for an error message, leaving out every name that does not look like one: such a
    "column" is file content (a password line, a key), and errors must not print it."""
    shown = [str(c) for c in columns if isinstance(c, str) and _COLUMN_NAME.fullmatch(c)]
    hidden = len(columns) - len(shown)
    text = ", ".join(shown) or "(none)"
    if hidden:
        text += (
            f" and {hidden} more that do not look like column names (not shown; is the file really in the "
            "format its name says?)"
        )
    return text


def check_columns(task: TaskSpec, index: int, where: str, available: Sequence[str]) -> None:
    """Every column the task reads is among `available` (the columns of the file or dataset `where`)."""
    if task.group_field and task.group_field not in available:
        raise ExpertMergeError(
            f"Task '{task.name}': {where} has no column '{task.group_field}' (named by "
            f"`data.tasks[{index}].group_field`); its columns are: {describe_columns(available)}. Set it "
            "to the column naming each text's source, or leave it empty for a random held-out split."
        )
    for key in ("answer_field", "tests_field"):
        column = getattr(task, key)
        if column and column not in available:
            raise ExpertMergeError(
                f"Task '{task.name}': {where} has no column '{column}' (named by `data.tasks[{index}].{key}`, "
                f"which accuracy by generation reads); its columns are: {describe_columns(available)}. Set it "
                "to the column holding each record's "
                f"{'reference answer' if key == 'answer_field' else 'unit tests'}, or leave it empty."
            )
    if task.chat_template and MESSAGES_COLUMN in available:
        return  # a chat-format `messages` column is used as-is
    needed, key = needed_columns(task, index)
    for column in needed:
        if column in available:
            continue
        if task.chat_template and column == task.response_field:
            key = f"data.tasks[{index}].response_field"
        raise ExpertMergeError(
            f"Task '{task.name}': {where} has no column '{column}' (named by `{key}`); its columns "
            f"are: {describe_columns(available)}. Set `{key}` to one of them."
        )
