"""CalibrationDataModule: per-task unlabeled text, tokenized, padded, split into train/val, tagged by task.

Each task names the expert whose behaviour its text calibrates. Sources are local files (jsonl / json /
txt / parquet / csv), globs over them, `datasets.save_to_disk` folders, or hub ids passed to
`datasets.load_dataset`; `corpora://<file>` names a corpus shipped in `calib_data/corpora/` (see its README).

Distributed training: the train batch sampler shards its own global batch order across ranks (every rank
takes every `world_size`-th batch), so the Trainer needs `use_distributed_sampler=False`; with it left on,
`train_dataloader` raises an ExpertMergeError saying so rather than let Lightning swap the sampler out.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import math
import os
import string
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from expertmerge.errors import ExpertMergeError
from expertmerge.paths import resolve_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# "val" and "eval" name the same held-out split (the teacher cache and the CLI say "eval").
Split = Literal["train", "val", "eval"]
_SPLIT_KEYS = {"train": "train", "val": "eval", "eval": "eval"}

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
CORPORA_SCHEME = "corpora://"

# file suffix -> `datasets` packaged builder that reads it
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
# Suffixes of files we cannot read: a missing "notes.tsv" is a wrong path, not a hub dataset id.
_OTHER_FILE_SUFFIXES = {
    ".tsv", ".xlsx", ".xls", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".md", ".html", ".xml",
    ".yaml", ".yml", ".pdf", ".doc", ".docx", ".py", ".jsonlines", ".ndjson",
}  # fmt: skip
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_MESSAGES_COLUMN = "messages"
_TOKENIZE_CHUNK = 256


@dataclass
class TaskSpec:
    """One calibration task: where its text comes from and which expert it belongs to.

    Args:
        name: task name, e.g. "math"; unique within the config.
        expert: name of the expert (in the model's pool) whose behaviour this task's data calibrates.
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
    txt_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    min_tokens: int = 4

    def __post_init__(self) -> None:
        self.template = self.template or ""  # None (from Python callers) means no template, like ""
        # A single source may be written without a list (`sources: data/math.jsonl`).
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        else:
            self.sources = list(self.sources)


class TokenizedSamples(NamedTuple):
    input_ids: torch.Tensor  # [n, L] long, right-padded with the pad id
    attention_mask: torch.Tensor  # [n, L] long, 1 on real tokens


@dataclass
class _Source:
    """One resolved source: what the user wrote, and how to read it."""

    given: str
    kind: Literal["files", "saved", "hub"]
    files: list[str] = field(default_factory=list)  # for kind == "files"
    path: str = ""  # for kind == "saved" (folder) or "hub" (dataset id)


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _looks_like_hub_id(reference: str) -> bool:
    """`owner/name` or `name` with no file suffix and no path-like prefix: a hub dataset id."""
    if reference.startswith((".", "/", "~", "\\")) or "\\" in reference:
        return False
    if Path(reference).suffix.lower() in _BUILDERS.keys() | _OTHER_FILE_SUFFIXES:
        return False
    return reference.count("/") <= 1 and reference.strip() != ""


def resolve_source(reference: str) -> str:
    """A source as a local path: `corpora://<file>` to the shipped corpora folder, `zoo://` via the zoo.

    Anything else (a path relative to the current directory, an absolute path, a hub id) is unchanged.
    """
    if reference.startswith(CORPORA_SCHEME):
        return str(CORPORA_DIR / reference[len(CORPORA_SCHEME) :])
    return resolve_path(reference)


def _template_columns(template: str) -> list[str]:
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


def _first_row_columns(path: str) -> list[str]:
    """Column names of a data file, read from its first rows (or its schema) only."""
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return ["text"]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), [])
    with open(path, encoding="utf-8") as handle:
        first_line = ""
        for line in handle:
            if line.strip():
                first_line = line
                break
        if not first_line:
            return []
        try:
            row = json.loads(first_line)
            if isinstance(row, dict):
                return list(row)
        except json.JSONDecodeError:
            pass
        # A .json array of records: its first record spans several lines, so the whole file is parsed.
        handle.seek(0)
        data = json.load(handle)
    if isinstance(data, list):
        return list(data[0]) if data and isinstance(data[0], dict) else []
    if isinstance(data, dict):
        return list(data)
    return []


class _SplitDataset(Dataset):
    """One split's samples of every task, addressed by a flat index (task offset + row)."""

    def __init__(self, samples: Sequence[TokenizedSamples]) -> None:
        self.samples = list(samples)
        self.offsets = [0]
        for task_samples in self.samples:
            self.offsets.append(self.offsets[-1] + task_samples.input_ids.shape[0])

    def __len__(self) -> int:
        return self.offsets[-1]

    def flat_index(self, task_index: int, row: int) -> int:
        return self.offsets[task_index] + row

    def __getitem__(self, index: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        task_index = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[task_index]
        task_samples = self.samples[task_index]
        return task_index, row, task_samples.input_ids[row], task_samples.attention_mask[row]


def collate_task_batch(items: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Stack one task's rows and trim the padding every row of the batch shares."""
    task_indices = {item[0] for item in items}
    if len(task_indices) != 1:
        raise RuntimeError(f"a calibration batch must hold one task, got tasks {sorted(task_indices)}")
    input_ids = torch.stack([item[2] for item in items])
    attention_mask = torch.stack([item[3] for item in items])
    # Padding is on the right, so the longest sample's length is the last column any row needs.
    length = max(1, int(attention_mask.sum(dim=1).max()))
    return {
        "input_ids": input_ids[:, :length].contiguous(),
        "attention_mask": attention_mask[:, :length].contiguous(),
        "task_index": task_indices.pop(),
        "sample_index": torch.tensor([item[1] for item in items], dtype=torch.long),
    }


def collate_round(items: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    """A round: one single-task batch per task, in task order (rows keep their order within a task)."""
    by_task: dict[int, list] = {}
    for item in items:
        by_task.setdefault(item[0], []).append(item)
    return [collate_task_batch(by_task[task]) for task in sorted(by_task)]


def _distributed_rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BalancedTaskBatchSampler:
    """Single-task batches, round-robin over tasks, the same number of batches per task every epoch.

    Every epoch, each task contributes ceil(max_task_size / batch_size) batches and (up to its size per batch)
    as many samples as the largest task; a smaller task walks through fresh reshuffles of its rows. Batches
    are interleaved task0, task1, ..., task0, ...; the order is a function of (seed, epoch) only. Under
    torch.distributed each rank takes every world_size-th batch of that global order, padded by wrapping
    around so every rank runs the same number of steps (a rank that stops early would hang the others).
    """

    def __init__(
        self,
        task_sizes: Sequence[int],
        batch_size: int,
        seed: int = 0,
        offsets: Sequence[int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        rounds: bool = False,
    ) -> None:
        if not task_sizes or min(task_sizes) < 1:
            raise ValueError(f"every task needs at least one sample, got sizes {list(task_sizes)}")
        self.task_sizes = list(task_sizes)
        self.batch_size = batch_size
        self.seed = seed
        self.offsets = list(offsets) if offsets is not None else [0] * len(self.task_sizes)
        self.rank = rank
        self.world_size = world_size
        self.rounds = rounds  # yield one round (a batch of every task) at a time instead of one batch
        self.epoch = 0

    @property
    def sampler(self) -> BalancedTaskBatchSampler:
        # Lightning's loops call `set_epoch` on `dataloader.batch_sampler.sampler`, not on the batch sampler.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def batches_per_task(self) -> int:
        return math.ceil(max(self.task_sizes) / self.batch_size)

    def _rank_and_world(self) -> tuple[int, int]:
        rank, world = _distributed_rank_and_world()
        return (self.rank if self.rank is not None else rank), (
            self.world_size if self.world_size is not None else world
        )

    def _task_rows(self, task_index: int) -> list[list[int]]:
        """This epoch's batches of one task, as row indices."""
        size = self.task_sizes[task_index]
        steps = self.batches_per_task
        # Every task gets the largest task's batch sizes (its last batch may be short), capped at its size.
        sizes = [self.batch_size] * (steps - 1) + [max(self.task_sizes) - self.batch_size * (steps - 1)]
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch * 10_007 + task_index) % 2**63
        )
        pending: list[int] = []
        batches = []
        for wanted in sizes:
            batch: list[int] = []
            while len(batch) < min(wanted, size):
                if not pending:
                    order = torch.randperm(size, generator=generator).tolist()
                    # Rows already in this batch go to the back of the fresh shuffle: no row twice in a batch.
                    taken = set(batch)
                    pending = [r for r in order if r not in taken] + [r for r in order if r in taken]
                    pending.reverse()  # pop() from the end is O(1)
                batch.append(pending.pop())
            batches.append(batch)
        return batches

    def global_batches(self) -> list[tuple[int, list[int]]]:
        """(task index, rows) of every batch of this epoch, across all ranks, in order."""
        per_task = [self._task_rows(t) for t in range(len(self.task_sizes))]
        return [
            (task, per_task[task][step])
            for step in range(self.batches_per_task)
            for task in range(len(self.task_sizes))
        ]

    def __len__(self) -> int:
        _, world = self._rank_and_world()
        units = self.batches_per_task * (1 if self.rounds else len(self.task_sizes))
        return math.ceil(units / world)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._rank_and_world()
        batches = [[self.offsets[task] + row for row in rows] for task, rows in self.global_batches()]
        if self.rounds:  # consecutive batches task0..taskN-1 form one round
            n = len(self.task_sizes)
            batches = [sum(batches[i : i + n], []) for i in range(0, len(batches), n)]
        total = len(self) * world
        padded = [batches[i % len(batches)] for i in range(total)]
        yield from padded[rank::world]


class CalibrationDataModule(pl.LightningDataModule):
    """Unlabeled calibration text per task, for Expert Merging.

    Every task is loaded, turned into text (a column, a template over columns, or a chat conversation),
    deduplicated, shuffled with `seed`, and split into a held-out "val" part (also called "eval") and a
    "train" part that never share a text (or a truncated token sequence). Samples are right-padded; the
    attention mask is 0 on pads. Batches hold one task each: `input_ids [B, l]` and `attention_mask [B, l]`
    trimmed to the batch's longest sample, `task_index` (int into `task_names`) and `sample_index [B]`
    (rows of `task_samples(task, split)`, to look teacher targets up).

    Needs `Trainer(use_distributed_sampler=False)` under DDP: the train sampler shards itself across ranks.
    The val loader is not sharded: every rank sees every val batch, so per-task metrics that sync across
    ranks get an update for every task on every rank (and a mean over ranks equals the single-rank value).

    Args:
        tasks: the calibration tasks, in order; a task's index in this list is its `task_index`.
        tokenizer: tokenizer folder, hub id or `zoo://` reference (usually the base model's); a missing pad
            token is set to the eos token (pads are masked out, so their id never matters).
        samples_per_task: train samples per task.
        eval_samples_per_task: held-out samples per task (validation, evaluation).
        max_length: samples are truncated to this many tokens.
        batch_size: samples per batch (every batch holds one task).
        seed: seeds the shuffle before the split and the train batch order.
        num_workers: DataLoader worker processes (0: load in the main process).
        rounds: train batches are rounds, a list of one single-task batch per task, so one optimiser step
            sees every task without `trainer.accumulate_grad_batches` (the default, False, yields one task per
            batch: set accumulate_grad_batches to the number of tasks for the same effect).
    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        tokenizer: str | None = None,
        samples_per_task: int = 32,
        eval_samples_per_task: int = 8,
        max_length: int = 256,
        batch_size: int = 4,
        seed: int = 0,
        num_workers: int = 0,
        rounds: bool = False,
    ) -> None:
        super().__init__()
        # Plain dicts are accepted too, for code that builds the config by hand.
        self.tasks: list[TaskSpec] = [TaskSpec(**t) if isinstance(t, dict) else t for t in tasks]
        self.tokenizer_path = tokenizer
        self.samples_per_task = samples_per_task
        self.eval_samples_per_task = eval_samples_per_task
        self.max_length = max_length
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rounds = rounds
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._samples: dict[tuple[str, str], TokenizedSamples] = {}  # keyed by (task, "train" | "eval")
        self._train_sampler: BalancedTaskBatchSampler | None = None

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    # ------------------------------------------------------------------------------------ validation
    def _check_settings(self) -> None:
        if not self.tasks:
            raise ExpertMergeError("No calibration tasks: give at least one entry under `data.tasks`.")
        for key, value, minimum in (
            ("samples_per_task", self.samples_per_task, 1),
            ("eval_samples_per_task", self.eval_samples_per_task, 0),
            ("max_length", self.max_length, 2),
            ("batch_size", self.batch_size, 1),
            ("num_workers", self.num_workers, 0),
        ):
            if value < minimum:
                raise ExpertMergeError(f"`data.{key}` is {value}; it must be at least {minimum}.")
        seen: dict[str, int] = {}
        for index, task in enumerate(self.tasks):
            if task.name in seen:
                raise ExpertMergeError(
                    f"Duplicate task name '{task.name}' in `data.tasks[{seen[task.name]}]` and "
                    f"`data.tasks[{index}]`: task names must be unique; rename one."
                )
            seen[task.name] = index
            if not 1 <= task.min_tokens <= self.max_length:
                raise ExpertMergeError(
                    f"`data.tasks[{index}].min_tokens` of task '{task.name}' is {task.min_tokens}; it must be "
                    f"between 1 and `data.max_length` ({self.max_length})."
                )

    def _resolve_sources(self, index: int) -> list[_Source]:
        """Every source of a task as files / a saved folder / a hub id; raises when a local one is missing."""
        task = self.tasks[index]
        key = f"data.tasks[{index}].sources"
        if not task.sources:
            raise ExpertMergeError(f"Task '{task.name}' has no sources: list its data files under `{key}`.")
        resolved = []
        for given in task.sources:
            reference = resolve_source(given)
            if _is_glob(reference):
                matches = sorted(
                    os.path.abspath(m) for m in glob.glob(reference, recursive=True) if os.path.isfile(m)
                )
                if not matches:
                    raise ExpertMergeError(
                        f"Task '{task.name}': the glob '{given}' in `{key}` matches no file "
                        f"(looked from {os.getcwd()}). Fix the pattern or the working directory."
                    )
                for match in matches:
                    self._check_suffix(index, given, match)
                resolved.append(_Source(given, "files", files=matches))
                continue
            path = os.path.abspath(reference)
            if os.path.isdir(path):
                if not any(os.path.exists(os.path.join(path, m)) for m in _SAVED_DATASET_MARKERS):
                    raise ExpertMergeError(
                        f"Task '{task.name}': '{given}' in `{key}` is a folder but not a "
                        "`datasets.save_to_disk` folder; give its files instead, e.g. "
                        f"'{os.path.join(given, '*.jsonl')}'."
                    )
                resolved.append(_Source(given, "saved", path=path))
            elif os.path.isfile(path):
                self._check_suffix(index, given, path)
                resolved.append(_Source(given, "files", files=[path]))
            elif _looks_like_hub_id(reference):
                resolved.append(_Source(given, "hub", path=reference))
            elif given.startswith(CORPORA_SCHEME):
                shipped = sorted(p.name for p in CORPORA_DIR.glob("*.jsonl"))
                raise ExpertMergeError(
                    f"Task '{task.name}': '{given}' in `{key}` is not a shipped corpus (looked for {path}); "
                    f"the shipped corpora are: {', '.join(CORPORA_SCHEME + name for name in shipped)}."
                )
            else:
                raise ExpertMergeError(
                    f"Task '{task.name}': file '{given}' in `{key}` does not exist (looked for {path}). "
                    "Fix the path or run from the folder it is relative to."
                )
        return resolved

    def _check_suffix(self, index: int, given: str, path: str) -> None:
        if Path(path).suffix.lower() not in _BUILDERS:
            raise ExpertMergeError(
                f"Task '{self.tasks[index].name}': '{path}' (from '{given}' in "
                f"`data.tasks[{index}].sources`) has an unsupported type; use one of "
                f"{', '.join(sorted(_BUILDERS))}, or a `datasets.save_to_disk` folder."
            )

    def _needed_columns(self, index: int) -> tuple[list[str], str]:
        """The columns a task reads, and the config key that names them."""
        task = self.tasks[index]
        prefix = f"data.tasks[{index}]"
        if task.template:
            try:
                columns = _template_columns(task.template)
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

    def _check_columns(self, index: int, where: str, available: Sequence[str]) -> None:
        task = self.tasks[index]
        if task.chat_template and _MESSAGES_COLUMN in available:
            return  # a chat-format `messages` column is used as-is
        needed, key = self._needed_columns(index)
        for column in needed:
            if column in available:
                continue
            if task.chat_template and column == task.response_field:
                key = f"data.tasks[{index}].response_field"
            raise ExpertMergeError(
                f"Task '{task.name}': {where} has no column '{column}' (named by `{key}`); its columns "
                f"are: {', '.join(available) or '(none)'}. Set `{key}` to one of them."
            )

    def check(self, expert_names: Iterable[str] | None = None) -> None:
        """Cheap validation before any heavy work: settings, task names, experts, sources and their columns.

        Reads only the first rows (or schema) of each file. Hub datasets are only checked at `setup`.
        """
        self._check_settings()
        experts = list(expert_names) if expert_names is not None else None
        for index, task in enumerate(self.tasks):
            if experts is not None and task.expert not in experts:
                raise ExpertMergeError(
                    f"Task '{task.name}' names expert '{task.expert}' (`data.tasks[{index}].expert`), which "
                    f"is not in the model's experts: {', '.join(experts) or '(none)'}. Use one of those names."
                )
            for source in self._resolve_sources(index):
                if source.kind == "files":
                    for path in source.files:
                        try:
                            columns = _first_row_columns(path)
                        except (OSError, UnicodeDecodeError, ValueError) as error:
                            raise ExpertMergeError(
                                f"Task '{task.name}': cannot read '{path}' (`data.tasks[{index}].sources`): "
                                f"{error}"
                            ) from error
                        self._check_columns(index, f"file '{path}'", columns)
                elif source.kind == "saved":
                    dataset = self._load_saved(index, source)
                    self._check_columns(index, f"dataset folder '{source.path}'", dataset.column_names)

    # ------------------------------------------------------------------------------------ loading
    def _load_saved(self, index: int, source: _Source) -> Any:
        import datasets

        task = self.tasks[index]
        loaded = datasets.load_from_disk(source.path)
        if isinstance(loaded, datasets.DatasetDict):
            if task.split not in loaded:
                raise ExpertMergeError(
                    f"Task '{task.name}': dataset folder '{source.path}' has no split '{task.split}' "
                    f"(`data.tasks[{index}].split`); its splits are: {', '.join(loaded)}."
                )
            loaded = loaded[task.split]
        return loaded

    def _load_source(self, index: int, source: _Source) -> list[tuple[Any, bool]]:
        """The `datasets.Dataset`s of one source (one per file type of a glob), each with whether it was
        cut from .txt files (whose samples keep the line break that ended them)."""
        import datasets

        task = self.tasks[index]
        if source.kind == "saved":
            return [(self._load_saved(index, source), False)]
        if source.kind == "hub":
            try:
                return [(datasets.load_dataset(source.path, split=task.split), False)]
            except Exception as error:  # the hub client raises many types (offline, gated, missing)
                raise ExpertMergeError(
                    f"Task '{task.name}': could not load '{source.given}' (`data.tasks[{index}].sources`) as a "
                    f"local file or a hub dataset: {type(error).__name__}: {error}. If it is a file, fix the "
                    "path; if it is a hub dataset and this machine is offline, download it elsewhere and "
                    "give the saved folder or files instead."
                ) from error
        by_builder: dict[str, list[str]] = {}
        for path in source.files:
            by_builder.setdefault(_BUILDERS[Path(path).suffix.lower()], []).append(path)
        loaded = []
        for builder, files in by_builder.items():
            options: dict[str, Any] = {}
            if builder == "text":
                # Inside a paragraph or document the line breaks are part of the text.
                options = {"sample_by": task.txt_sample_by, "keep_linebreaks": task.txt_sample_by != "line"}
            try:
                dataset = datasets.load_dataset(builder, data_files=files, split="train", **options)
            except Exception as error:  # parse errors surface as several exception types
                raise ExpertMergeError(
                    f"Task '{task.name}': cannot read {', '.join(files)} (`data.tasks[{index}].sources`): "
                    f"{type(error).__name__}: {error}"
                ) from error
            loaded.append((dataset, builder == "text"))
        return loaded

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        if self.tokenizer_path is None:
            raise ExpertMergeError(
                "No tokenizer: set `data.tokenizer` to the base model's folder (the fit command links it "
                "from `model.base`)."
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_path(self.tokenizer_path))
        except (OSError, ValueError) as error:
            raise ExpertMergeError(
                f"Cannot load the tokenizer '{self.tokenizer_path}' (`data.tokenizer`): {error}"
            ) from error
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ExpertMergeError(
                    f"The tokenizer '{self.tokenizer_path}' (`data.tokenizer`) has neither a pad nor an eos "
                    "token, so samples cannot be padded; add a pad token to it."
                )
            # Padded positions are masked out everywhere, so which id fills them does not matter.
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _row_text(self, index: int, row: dict[str, Any], where: str, from_txt: bool = False) -> str | None:
        """The sample text of one row, or None when the row holds no usable text."""
        task = self.tasks[index]
        tokenizer = self.tokenizer
        assert tokenizer is not None
        if from_txt and isinstance(row.get("text"), str):
            # A paragraph or document of a .txt file ends with the line break(s) that closed it.
            row = {**row, "text": row["text"].strip("\r\n")}
        if task.chat_template and row.get(_MESSAGES_COLUMN) is not None:
            messages = row[_MESSAGES_COLUMN]
            return tokenizer.apply_chat_template(messages, tokenize=False) if messages else None
        if task.template:
            values = {k: ("" if v is None else v) for k, v in row.items()}
            try:
                text = task.template.format_map(values)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
                raise ExpertMergeError(
                    f"Task '{task.name}': `data.tasks[{index}].template` fails on a row of {where}: "
                    f"{type(error).__name__}: {error}"
                ) from error
        else:
            value = row.get(task.text_field)
            if isinstance(value, (list, dict)):
                raise ExpertMergeError(
                    f"Task '{task.name}': column '{task.text_field}' (`data.tasks[{index}].text_field`) of "
                    f"{where} holds {type(value).__name__}s, not text. Name a text column, or set "
                    "`chat_template: true` for a chat-format `messages` column."
                )
            text = "" if value is None else str(value)
        if not text.strip():
            return None
        if not task.chat_template:
            return text
        messages = [{"role": "user", "content": text}]
        reply = row.get(task.response_field) if task.response_field is not None else None
        if reply is not None and str(reply).strip():
            messages.append({"role": "assistant", "content": str(reply)})
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=len(messages) == 1
        )

    def _task_tokens(self, index: int) -> tuple[list[list[int]], list[str]]:
        """Usable, distinct token sequences of a task in shuffled order (as many as the split needs)."""
        task = self.tasks[index]
        tokenizer = self.tokenizer
        assert tokenizer is not None
        if task.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ExpertMergeError(
                f"Task '{task.name}' sets `data.tasks[{index}].chat_template: true`, but the tokenizer "
                f"'{self.tokenizer_path}' has no chat template; set it to false or use a chat tokenizer."
            )
        sources = self._resolve_sources(index)
        needed, _ = self._needed_columns(index)
        parts = []
        wheres = []
        from_txt = []
        described: list[str] = []
        for source in sources:
            described.extend(source.files if source.kind == "files" else [source.path])
            for dataset, is_txt in self._load_source(index, source):
                where = f"'{source.given}'"
                self._check_columns(index, where, dataset.column_names)
                # Reading only the used columns keeps row access cheap next to wide or binary columns.
                used = [c for c in dataset.column_names if c in needed or c == _MESSAGES_COLUMN]
                parts.append(dataset.select_columns(used))
                wheres.append(where)
                from_txt.append(is_txt)
        sizes = [len(part) for part in parts]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        # The shuffle is seeded per task by a stable hash of its name, so adding a task leaves the others be.
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + zlib.crc32(task.name.encode())) % 2**63
        )
        order = torch.randperm(bounds[-1], generator=generator).tolist()
        wanted = self.samples_per_task + self.eval_samples_per_task
        # Chat-rendered text already holds the template's special tokens (BOS included).
        add_special_tokens = not task.chat_template
        special_ids = set(tokenizer.all_special_ids)
        seen_texts: set[str] = set()
        seen_tokens: set[tuple[int, ...]] = set()
        kept: list[list[int]] = []
        position = 0
        while position < len(order) and len(kept) < wanted:
            texts = []
            while position < len(order) and len(texts) < _TOKENIZE_CHUNK:
                flat = order[position]
                position += 1
                part = next(p for p in range(len(parts)) if flat < bounds[p + 1])
                text = self._row_text(index, parts[part][flat - bounds[part]], wheres[part], from_txt[part])
                if text is not None and text not in seen_texts:
                    seen_texts.add(text)
                    texts.append(text)
            if not texts:
                continue
            encoded = tokenizer(
                texts, add_special_tokens=add_special_tokens, truncation=True, max_length=self.max_length
            )["input_ids"]
            for ids in encoded:
                key = tuple(ids)
                # Counted after truncation; _check_settings keeps min_tokens <= max_length.
                content = sum(1 for token in ids if token not in special_ids)
                # Texts that share their first max_length tokens are the same sample once truncated.
                if content >= task.min_tokens and key not in seen_tokens and len(kept) < wanted:
                    seen_tokens.add(key)
                    kept.append(list(ids))
        return kept, described

    def _pad(self, sequences: Sequence[Sequence[int]]) -> TokenizedSamples:
        assert self.tokenizer is not None
        length = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), length), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return TokenizedSamples(input_ids, attention_mask)

    def setup(self, stage: str | None = None) -> None:
        """Load, shuffle, split and tokenize every task; later calls do nothing."""
        if self._samples:
            return
        self._check_settings()
        self.tokenizer = self._load_tokenizer()
        samples: dict[tuple[str, str], TokenizedSamples] = {}
        for index, task in enumerate(self.tasks):
            kept, described = self._task_tokens(index)
            count = len(kept)
            files = ", ".join(described)
            # One sample to train on, and one to hold out when a held-out split is asked for.
            minimum = 2 if self.eval_samples_per_task > 0 else 1
            if count < minimum:
                raise ExpertMergeError(
                    f"Task '{task.name}' has {count} usable samples in {files}; it needs at least {minimum}. "
                    f"A sample is a non-empty, distinct text of at least {task.min_tokens} tokens "
                    f"(`data.tasks[{index}].min_tokens`). Add data, or check `data.tasks[{index}].text_field` "
                    "/ `template`."
                )
            n_eval = self.eval_samples_per_task
            n_train = self.samples_per_task
            if count < n_train + n_eval:
                n_eval = min(n_eval, max(1, count // 5))
                n_train = count - n_eval
                warnings.warn(
                    f"Task '{task.name}' has {count} usable samples in {files}, fewer than "
                    f"samples_per_task + eval_samples_per_task = "
                    f"{self.samples_per_task + self.eval_samples_per_task}; using {n_train} for training "
                    f"and {n_eval} held out.",
                    UserWarning,
                    stacklevel=2,
                )
            # The eval part comes first so that changing samples_per_task keeps the held-out set unchanged.
            samples[(task.name, "eval")] = (
                self._pad(kept[:n_eval])
                if n_eval
                else TokenizedSamples(
                    torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
                )
            )
            samples[(task.name, "train")] = self._pad(kept[n_eval : n_eval + n_train])
        self._samples = samples

    # ------------------------------------------------------------------------------------ access
    def _require(self, task: str, split: Split) -> TokenizedSamples:
        if not self._samples:
            raise RuntimeError("CalibrationDataModule.setup() must run before its samples are read")
        if split not in _SPLIT_KEYS:
            raise ValueError(f"split must be 'train' or 'val' (alias 'eval'), got {split!r}")
        if (task, _SPLIT_KEYS[split]) not in self._samples:
            raise KeyError(f"unknown task {task!r}; tasks are {self.task_names}")
        return self._samples[(task, _SPLIT_KEYS[split])]

    def task_samples(self, task: str, split: Split) -> TokenizedSamples:
        """All samples of one task's split, padded to the split's longest sample."""
        return self._require(task, split)

    def fingerprint(self, task: str, split: Split) -> str:
        """Stable hash of a split's token ids and mask: keys the teacher cache."""
        samples = self._require(task, split)
        digest = hashlib.blake2b(digest_size=16)
        for tensor in samples:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _split_dataset(self, split: Split) -> _SplitDataset:
        return _SplitDataset([self._require(task, split) for task in self.task_names])

    def _check_trainer_sampler(self) -> None:
        trainer = getattr(self, "trainer", None)
        connector = getattr(trainer, "_accelerator_connector", None)
        if connector is None:
            return
        if getattr(connector, "use_distributed_sampler", False) and getattr(
            connector, "is_distributed", False
        ):
            raise ExpertMergeError(
                "The calibration batch sampler shards batches across ranks itself; run the Trainer with "
                "`use_distributed_sampler=False` (`--trainer.use_distributed_sampler false`)."
            )

    def train_dataloader(self) -> DataLoader:
        """Balanced single-task batches, round-robin over tasks, reshuffled per epoch (`set_epoch`)."""
        self._check_trainer_sampler()
        dataset = self._split_dataset("train")
        # Under a Trainer its rank and world size rule; without one, torch.distributed's (if initialised).
        trainer = getattr(self, "trainer", None)
        self._train_sampler = BalancedTaskBatchSampler(
            [samples.input_ids.shape[0] for samples in dataset.samples],
            self.batch_size,
            seed=self.seed,
            offsets=dataset.offsets[:-1],
            rank=trainer.global_rank if trainer is not None else None,
            world_size=trainer.world_size if trainer is not None else None,
            rounds=self.rounds,
        )
        return DataLoader(
            dataset,
            batch_sampler=self._train_sampler,
            collate_fn=collate_round if self.rounds else collate_task_batch,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out split in single-task batches, rows in order, tasks interleaved round-robin.

        Every rank sees all of it (see the class docstring). Interleaving keeps every task represented when
        the Trainer only runs the first `limit_val_batches` batches.
        """
        self._check_trainer_sampler()
        dataset = self._split_dataset("val")
        per_task = [
            [
                [dataset.flat_index(t, row) for row in range(start, min(start + self.batch_size, size))]
                for start in range(0, size, self.batch_size)
            ]
            for t, size in enumerate(samples.input_ids.shape[0] for samples in dataset.samples)
        ]
        steps = max((len(task_batches) for task_batches in per_task), default=0)
        batches = [
            task_batches[step]
            for step in range(steps)
            for task_batches in per_task
            if step < len(task_batches)
        ]
        return DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate_task_batch, num_workers=self.num_workers
        )

    def set_epoch(self, epoch: int) -> None:
        """Reorder the train batches for `epoch` (Lightning does this itself through the batch sampler)."""
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)
