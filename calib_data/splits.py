"""Train / held-out splits of a task's samples, their fingerprints (the teacher cache's keys), and the
flat dataset over one split of every task that the data loaders index.
"""

from __future__ import annotations

import bisect
import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from calib_data.groups import group_roles
from calib_data.rendering import TokenizedSamples, pad
from calib_data.tasks import TaskSpec
from expertmerge.errors import ExpertMergeError

# "val" and "eval" name the same held-out split (the teacher cache and the CLI say "eval").
SPLIT_KEYS = {"train": "train", "val": "eval", "eval": "eval"}


def split_task(
    task: TaskSpec,
    index: int,
    kept: Sequence[Sequence[int]],
    described: Sequence[str],
    *,
    samples_per_task: int,
    eval_samples_per_task: int,
    pad_id: int,
    groups: Sequence[str] | None = None,
    balanced: bool = False,
) -> dict[str, TokenizedSamples]:
    """A task's shuffled, distinct samples cut into {"eval": ..., "train": ...}, each padded.

    With fewer samples than asked for, the held-out part shrinks to a fifth (at least one) and a warning
    says so; fewer than two samples (one to train on, one to hold out) is an error. With `groups` (the
    task's `group_field` value per sample) the held-out part is whole groups (`group_roles`); a task whose
    groups all go to the held-out part is an error.
    """
    count = len(kept)
    files = ", ".join(described)
    if groups is not None:
        return _split_groups(
            task, index, kept, files, groups, samples_per_task, eval_samples_per_task, pad_id, balanced
        )
    if count < 2:
        raise ExpertMergeError(
            f"Task '{task.name}' has {count} usable samples in {files}; it needs at least 2. "
            f"A sample is a non-empty, distinct text of at least {task.min_tokens} tokens "
            f"(`data.tasks[{index}].min_tokens`). Add data, or check `data.tasks[{index}].text_field` "
            "/ `template`."
        )
    n_eval, n_train = eval_samples_per_task, samples_per_task
    if count < n_train + n_eval:
        n_eval = min(n_eval, max(1, count // 5))
        n_train = count - n_eval
        warnings.warn(
            f"Task '{task.name}' has {count} usable samples in {files}, fewer than "
            f"samples_per_task + eval_samples_per_task = {samples_per_task + eval_samples_per_task}; "
            f"using {n_train} for training and {n_eval} held out.",
            UserWarning,
            stacklevel=3,
        )
    # The eval part comes first so that changing samples_per_task keeps the held-out set unchanged.
    return {"eval": pad(kept[:n_eval], pad_id), "train": pad(kept[n_eval : n_eval + n_train], pad_id)}


def _split_groups(
    task: TaskSpec,
    index: int,
    kept: Sequence[Sequence[int]],
    files: str,
    groups: Sequence[str],
    n_train: int,
    n_eval: int,
    pad_id: int,
    balanced: bool = False,
) -> dict[str, TokenizedSamples]:
    distinct = len(set(groups))
    roles = group_roles(groups, n_eval, n_train, balanced)
    parts = {
        role: [ids for ids, r in zip(kept, roles, strict=True) if r == role] for role in ("eval", "train")
    }
    if not parts["train"]:
        raise ExpertMergeError(
            f"Task '{task.name}' keeps its held-out texts apart by `data.tasks[{index}].group_field` "
            f"('{task.group_field}'), but its {len(kept)} usable samples in {files} fall in {distinct} "
            f"group(s), and the held-out part (`data.eval_samples_per_task` = {n_eval}) takes them all: no "
            "group is left to train on. Add texts from other sources, lower `data.eval_samples_per_task`, or "
            "leave `group_field` empty for a random held-out split."
        )
    if len(parts["eval"]) < n_eval or len(parts["train"]) < n_train:
        warnings.warn(
            f"Task '{task.name}' has {len(kept)} usable samples in {distinct} groups of "
            f"'{task.group_field}' in {files}, fewer than asked for in groups kept apart; using "
            f"{len(parts['train'])} for training and {len(parts['eval'])} held out (from other groups).",
            UserWarning,
            stacklevel=4,
        )
    return {role: pad(parts[role], pad_id) for role in ("eval", "train")}


def fingerprint(samples: TokenizedSamples) -> str:
    """Stable hash of a split's token ids and mask: keys the teacher cache (keep it byte-stable)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in samples:
        if tensor is None:  # no answer mask: the key stays what it was before answers existed
            continue
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class SplitDataset(Dataset):
    """One split's samples of every task, addressed by a flat index (task offset + row)."""

    def __init__(self, samples: Sequence[TokenizedSamples]) -> None:
        self.samples = list(samples)
        self.offsets = [0]
        for task_samples in self.samples:
            self.offsets.append(self.offsets[-1] + task_samples.input_ids.shape[0])

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def task_sizes(self) -> list[int]:
        return [task_samples.input_ids.shape[0] for task_samples in self.samples]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        """(task index, row, input ids, attention mask), and the answer mask where the task has answers."""
        task_index = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[task_index]
        task_samples = self.samples[task_index]
        item = (task_index, row, task_samples.input_ids[row], task_samples.attention_mask[row])
        if task_samples.answer_mask is None:
            return item
        return (*item, task_samples.answer_mask[row])
