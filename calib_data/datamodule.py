"""CalibrationDataModule: per-task unlabeled text, tokenized, padded, split into train/val, tagged by task.

Each task names the expert whose behaviour its text calibrates. Sources are local files (jsonl / json /
txt / parquet / csv), globs over them, `datasets.save_to_disk` folders, or hub ids passed to
`datasets.load_dataset`; `corpora://<file>` names a corpus shipped in `calib_data/corpora/` (see its README).
The jobs live apart: `tasks` (config and checks), `sources` (finding and reading files), `rendering` (rows to
token ids), `splits` (train / held-out, fingerprints), `sampler` (batches); this module wires them.

Distributed training: the train batch sampler shards its own global batch order across ranks (every rank
takes every `world_size`-th batch), so the Trainer needs `use_distributed_sampler=False`; with it left on,
`train_dataloader` raises an ExpertMergeError saying so rather than let Lightning swap the sampler out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from calib_data.groups import Split
from calib_data.rendering import (
    HeldOutRecord,
    TokenizedSamples,
    check_tokenizer_path,
    join_answers,
    load_tokenizer,
    task_tokens,
)
from calib_data.resume import ResumableDataLoader
from calib_data.sampler import (
    BalancedTaskBatchSampler,
    collate_round,
    collate_task_batch,
    interleaved_batches,
)
from calib_data.sources import load_saved, peek_columns, resolve_task_sources
from calib_data.splits import SPLIT_KEYS, SplitDataset, fingerprint, split_task
from calib_data.tasks import TaskSpec, check_columns, check_settings, scored
from expertmerge.errors import ExpertMergeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BalancedTaskBatchSampler",
    "CalibrationDataModule",
    "HeldOutRecord",
    "TaskSpec",
    "TokenizedSamples",
]


class CalibrationDataModule(pl.LightningDataModule):
    """Unlabeled calibration text per task, for Expert Merging.

    Every task is loaded, turned into text (a column, a template over columns, or a chat conversation),
    deduplicated, shuffled with `seed`, and split into a held-out "val" part (also called "eval") and a
    "train" part that never share a text (or a truncated token sequence). Samples are right-padded; the
    attention mask is 0 on pads. Batches hold one task each: `input_ids [B, l]` and `attention_mask [B, l]`
    trimmed to the batch's longest sample, `task_index` (int into `task_names`) and `sample_index [B]`
    (rows of `task_samples(task, split)`, to look teacher targets up); and `answer_mask [B, l]` for tasks with
    `answers: expert`, once the fit has attached their experts' answers (`attach_answers`).

    Needs `Trainer(use_distributed_sampler=False)` under DDP: the train sampler shards itself across ranks.
    The val loader is not sharded: every rank sees every val batch, so per-task metrics that sync across
    ranks get an update for every task on every rank (and a mean over ranks equals the single-rank value).

    Args:
        tasks: the calibration tasks, in order; a task's index in this list is its `task_index`.
        tokenizer: tokenizer folder, hub id or `zoo://` reference (usually the base model's); a missing pad
            token is set to the eos token (pads are masked out, so their id never matters).
        samples_per_task: train samples per task.
        eval_samples_per_task: held-out samples per task (validation, evaluation); at least 1.
        max_length: samples are truncated to this many tokens.
        batch_size: samples per batch (every batch holds one task).
        seed: seeds the shuffle before the split and the train batch order.
        num_workers: DataLoader worker processes (0: load in the main process).
        rounds: train batches are rounds, a list of one single-task batch per task, so one optimiser step
            sees every task without `trainer.accumulate_grad_batches` (the default, False, yields one task per
            batch: set accumulate_grad_batches to the number of tasks for the same effect).
        group_balance: for tasks with a `group_field`, draw the training samples in rounds over their source
            groups (one text of each group, then a second of each, ...) from a pool of up to four times the
            texts wanted, instead of in shuffled order (where a large source fills most of the part). The
            held-out samples are the same either way.
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
        group_balance: bool = False,
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
        self.group_balance = group_balance
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._samples: dict[tuple[str, str], TokenizedSamples] = {}  # keyed by (task, "train" | "eval")
        self._records: dict[str, list[HeldOutRecord]] = {}  # scored tasks: one per held-out sample, in order
        # The prompts of `answers: expert` tasks, kept when their answers join them in `_samples`.
        self._prompts: dict[tuple[str, str], TokenizedSamples] = {}

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    # ------------------------------------------------------------------------------------ validation
    def _check_settings(self) -> None:
        check_settings(
            self.tasks,
            {
                "samples_per_task": (self.samples_per_task, 1),
                # The fit scores the merge on held-out samples at its end: none would fail after training.
                "eval_samples_per_task": (self.eval_samples_per_task, 1),
                "max_length": (self.max_length, 2),
                "batch_size": (self.batch_size, 1),
                "num_workers": (self.num_workers, 0),
                "seed": (self.seed, None),
            },
        )
        if self.group_balance and not any(task.group_field for task in self.tasks):
            warnings.warn(
                "data.group_balance is true, but no task sets `group_field`: it only changes how tasks with "
                "source groups pick their training texts, so it does nothing here. Name each task's source "
                "column with `data.tasks[i].group_field`, or drop group_balance.",
                UserWarning,
                stacklevel=3,
            )

    def check(self, expert_names: Iterable[str] | None = None) -> None:
        """Cheap validation before any heavy work: settings, task names, experts, the tokenizer's folder,
        sources and their columns.

        Reads only the first rows (or schema) of each file: an empty file, one that is not valid JSON (Lines)
        or one that lacks the task's columns fails here. Hub datasets are only checked at `setup`.
        """
        self._check_settings()
        experts = list(expert_names) if expert_names is not None else None
        if self.tokenizer_path is not None:
            check_tokenizer_path(self.tokenizer_path)
        for index, task in enumerate(self.tasks):
            if experts is not None and task.expert not in experts:
                raise ExpertMergeError(
                    f"Task '{task.name}' names expert '{task.expert}' (`data.tasks[{index}].expert`), which "
                    f"is not in the model's experts: {', '.join(experts) or '(none)'}. Use one of those names."
                )
            for source in resolve_task_sources(task, index):
                if source.kind == "files":
                    for path in source.files:
                        check_columns(task, index, f"file '{path}'", peek_columns(task, index, path))
                elif source.kind == "saved":
                    dataset = load_saved(task, index, source)
                    check_columns(task, index, f"dataset folder '{source.path}'", dataset.column_names)

    # ------------------------------------------------------------------------------------ loading
    def setup(self, stage: str | None = None) -> None:
        """Check, then load, shuffle, split and tokenize every task; later calls do nothing."""
        if self._samples:
            return
        # Lightning sets the datamodule up before the module: the cheap checks run here first.
        self.check()
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        samples: dict[tuple[str, str], TokenizedSamples] = {}
        for index, task in enumerate(self.tasks):
            records: dict[tuple[int, ...], HeldOutRecord] | None = {} if scored(task) else None
            kept, described, groups = task_tokens(
                task,
                index,
                self.tokenizer,
                seed=self.seed,
                wanted=self.samples_per_task + self.eval_samples_per_task,
                max_length=self.max_length,
                tokenizer_name=self.tokenizer_path,
                eval_wanted=self.eval_samples_per_task,
                balanced=self.group_balance,
                records=records,
            )
            splits = split_task(
                task,
                index,
                kept,
                described,
                samples_per_task=self.samples_per_task,
                eval_samples_per_task=self.eval_samples_per_task,
                pad_id=int(self.tokenizer.pad_token_id),
                groups=groups,
                balanced=self.group_balance,
            )
            for split, split_samples in splits.items():
                samples[(task.name, split)] = split_samples
            if records is not None:
                # The held-out rows are found again by their token ids: the split itself stays as it was.
                held_out = splits["eval"]
                self._records[task.name] = [
                    records[tuple(ids[: int(mask.sum())].tolist())]
                    for ids, mask in zip(held_out.input_ids, held_out.attention_mask, strict=True)
                ]
        self._samples = samples
        self._prompts = {key: value for key, value in samples.items() if key[0] in self.answer_tasks}

    # ------------------------------------------------------------------------------------ answers
    @property
    def answer_tasks(self) -> list[str]:
        """The tasks whose prompts their expert answers (`answers: expert`), in config order."""
        return [task.name for task in self.tasks if task.answers == "expert"]

    def prompt_samples(self, task: str, split: Split) -> TokenizedSamples:
        """An `answers: expert` task's prompts alone (right-padded), whether or not its answers are attached."""
        self._require(task, split)
        return self._prompts[(task, SPLIT_KEYS[split])]

    def prompt_fingerprint(self, task: str, split: Split) -> str:
        """Stable hash of an answer task's prompts: keys the answer cache."""
        return fingerprint(self.prompt_samples(task, split))

    def attach_answers(self, answers: dict[tuple[str, str], list[list[int]]]) -> None:
        """The samples of each (task, split) become its prompts followed by the given answers' token ids (one
        per prompt, in row order), cut to `max_length`, with an answer mask; a warning counts the answers the
        cut shortened. Attaching again starts from the prompts."""
        assert self.tokenizer is not None
        for (task, split), task_answers in answers.items():
            prompts = self.prompt_samples(task, split)
            samples, shortened = join_answers(
                prompts, task_answers, self.max_length, int(self.tokenizer.pad_token_id)
            )
            if shortened:
                warnings.warn(
                    f"Task '{task}': {shortened} of {len(task_answers)} {SPLIT_KEYS[split]} prompts with their "
                    f"answers are longer than data.max_length ({self.max_length}) and were cut there; raise "
                    "data.max_length to keep whole answers.",
                    UserWarning,
                    stacklevel=2,
                )
            self._samples[(task, SPLIT_KEYS[split])] = samples

    # ------------------------------------------------------------------------------------ access
    def _require(self, task: str, split: Split) -> TokenizedSamples:
        if not self._samples:
            raise RuntimeError("CalibrationDataModule.setup() must run before its samples are read")
        if split not in SPLIT_KEYS:
            raise ValueError(f"split must be 'train' or 'val' (alias 'eval'), got {split!r}")
        if (task, SPLIT_KEYS[split]) not in self._samples:
            raise KeyError(f"unknown task {task!r}; tasks are {self.task_names}")
        return self._samples[(task, SPLIT_KEYS[split])]

    def task_samples(self, task: str, split: Split) -> TokenizedSamples:
        """All samples of one task's split, padded to the split's longest sample."""
        return self._require(task, split)

    @property
    def scored_task_names(self) -> list[str]:
        """The tasks whose held-out records are scored by generation (`answer_field` / `tests_field`)."""
        return [task.name for task in self.tasks if scored(task)]

    def held_out_records(self, task: str) -> list[HeldOutRecord]:
        """A scored task's held-out records (prompt, reference answer, tests), row by row of
        `task_samples(task, "eval")`."""
        self._require(task, "eval")
        if task not in self._records:
            raise KeyError(f"task {task!r} names no answer_field or tests_field: it has no held-out records")
        return self._records[task]

    def fingerprint(self, task: str, split: Split) -> str:
        """Stable hash of a split's token ids and mask: keys the teacher cache."""
        return fingerprint(self._require(task, split))

    def _split_dataset(self, split: Split) -> SplitDataset:
        return SplitDataset([self._require(task, split) for task in self.task_names])

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
        """Balanced single-task batches, round-robin over tasks, reshuffled per epoch (Lightning calls the
        sampler's `set_epoch`). A checkpoint keeps the loader's position and the random states, so a fit resumed
        from any step goes on with the batches (and draws) the uninterrupted fit would have had."""
        self._check_trainer_sampler()
        dataset = self._split_dataset("train")
        # Under a Trainer its rank and world size rule; without one, torch.distributed's (if initialised).
        trainer = getattr(self, "trainer", None)
        sampler = BalancedTaskBatchSampler(
            dataset.task_sizes,
            self.batch_size,
            seed=self.seed,
            offsets=dataset.offsets[:-1],
            rank=trainer.global_rank if trainer is not None else None,
            world_size=trainer.world_size if trainer is not None else None,
            rounds=self.rounds,
        )
        collate: Any = collate_round if self.rounds else collate_task_batch
        return ResumableDataLoader(dataset, sampler, collate_fn=collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """The held-out split in single-task batches, rows in order, tasks interleaved round-robin.

        Every rank sees all of it (see the class docstring). Interleaving keeps every task represented when
        the Trainer only runs the first `limit_val_batches` batches.
        """
        self._check_trainer_sampler()
        dataset = self._split_dataset("val")
        batches = interleaved_batches(dataset.task_sizes, self.batch_size, dataset.offsets[:-1])
        return DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate_task_batch,
            num_workers=self.num_workers,
            # Its own generator: validating draws nothing from the global random state the training steps use
            # (a resumed fit skips the validation its checkpoint was followed by).
            generator=torch.Generator().manual_seed(self.seed),
        )
