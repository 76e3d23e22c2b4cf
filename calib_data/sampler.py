"""Batches: single-task batches round-robin over tasks, balanced per epoch and sharded across DDP ranks
by the sampler itself, the held-out batches in order, and the collate functions that trim the padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def collate_task_batch(items: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Stack one task's rows and trim the padding every row of the batch shares (items: task index, row,
    input ids, attention mask, and the answer mask where the task has expert-written answers)."""
    task_indices = {item[0] for item in items}
    if len(task_indices) != 1:
        raise RuntimeError(f"a calibration batch must hold one task, got tasks {sorted(task_indices)}")
    input_ids = torch.stack([item[2] for item in items])
    attention_mask = torch.stack([item[3] for item in items])
    # Padding is on the right, so the longest sample's length is the last column any row needs.
    length = max(1, int(attention_mask.sum(dim=1).max()))
    batch = {
        "input_ids": input_ids[:, :length].contiguous(),
        "attention_mask": attention_mask[:, :length].contiguous(),
        "task_index": task_indices.pop(),
        "sample_index": torch.tensor([item[1] for item in items], dtype=torch.long),
    }
    if len(items[0]) > 4:
        batch["answer_mask"] = torch.stack([item[4] for item in items])[:, :length].contiguous()
    return batch


def collate_round(items: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
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
    A restored checkpoint's position (`resume_at`, from calib_data/resume.py) starts the next iteration of its
    epoch at the batch the fit had reached.
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
        self._resume: tuple[int, int] | None = None  # (epoch, batches already taken) of a restored fit
        # The epoch and first batch of the iteration under way (a checkpoint's position counts from them).
        self.iteration_epoch = 0
        self.iteration_start = 0

    @property
    def sampler(self) -> BalancedTaskBatchSampler:
        # Lightning's loops call `set_epoch` on `dataloader.batch_sampler.sampler`, not on the batch sampler.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next iteration, if it is over `epoch`, leaves out its first `batches` batches (a checkpoint's
        position). An iteration over a later epoch starts at its beginning: a checkpoint taken at an epoch's end
        says (that epoch, all of its batches), and the loop moves on to the next epoch."""
        self.epoch = epoch
        self._resume = (epoch, batches)

    def order_settings(self) -> dict[str, Any]:
        """What the batch order is a function of, besides the epoch."""
        _, world = self._rank_and_world()
        return {
            "seed": self.seed,
            "task_sizes": self.task_sizes,
            "batch_size": self.batch_size,
            "rounds": self.rounds,
            "world_size": world,
        }

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
        # A generator: the epoch is read at the first batch, after the loop's `set_epoch`.
        start = 0
        if self._resume is not None:
            epoch, taken = self._resume
            self._resume = None
            start = taken if epoch == self.epoch else 0
        self.iteration_epoch, self.iteration_start = self.epoch, start
        rank, world = self._rank_and_world()
        batches = [[self.offsets[task] + row for row in rows] for task, rows in self.global_batches()]
        if self.rounds:  # consecutive batches task0..taskN-1 form one round
            n = len(self.task_sizes)
            batches = [sum(batches[i : i + n], []) for i in range(0, len(batches), n)]
        total = len(self) * world
        padded = [batches[i % len(batches)] for i in range(total)]
        yield from padded[rank::world][start:]


def interleaved_batches(
    task_sizes: Sequence[int], batch_size: int, offsets: Sequence[int]
) -> list[list[int]]:
    """Every row of every task once, in order, in single-task batches interleaved round-robin over tasks
    (so the first batches of a loader cut short by `limit_val_batches` still cover every task)."""
    per_task = [
        [
            [offsets[t] + row for row in range(start, min(start + batch_size, size))]
            for start in range(0, size, batch_size)
        ]
        for t, size in enumerate(task_sizes)
    ]
    steps = max((len(task_batches) for task_batches in per_task), default=0)
    return [
        task_batches[step] for step in range(steps) for task_batches in per_task if step < len(task_batches)
    ]
