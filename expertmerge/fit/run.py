"""`run_fit`: the learned merge's stages, given a way to train. The `fit` command, `sweep` and Symphony's
learned backbone all run their fits through it.

Stage 1 fits layer-wise coefficients for the trainer's steps; with Expert Merging++ stage 2 fits chunk-wise ones
for `stage2_steps` (a fresh trainer and optimiser over the same prepared merge: nothing is loaded twice). A
checkpoint says its stage: a stage-2 checkpoint resumes stage 2. The trainer comes from `trainer_factory`,
so this file knows no Lightning: `lightning_modules.trainer` gives the Lightning one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.fit.learned import LearnedMerge
from expertmerge.fit.options import FitOptions
from expertmerge.fit.stages import checkpoint_stage


@dataclass
class FitRun:
    """What a fit's stages share: the options, the calibration data, and the learned merge once prepared.

    The merge is prepared by the first stage's trainer, where it runs (after the ranks exist: FSDP shards
    while preparing), or given ready (`learned`) to fit again on the same models and targets.
    """

    options: FitOptions
    datamodule: Any = None
    pool: Any = None  # default: the options' folders
    distinct: bool = True  # refuse an expert equal to the base (False for Symphony's aligned reference)
    learned: LearnedMerge | None = None

    def make_pool(self) -> Any:
        """The options' base and experts, resolved (a `zoo://` reference built) and checked; no model loads."""
        from expertmerge.fit.prepare import make_pool

        return make_pool(self.options, self.distinct)

    def restart(self, options: FitOptions) -> None:
        """New options that change no prepared input (e.g. other task weights): the run's and its prepared
        merge's (fresh coefficients at the chosen start), so the trainer and the objective read the same."""
        self.options = options
        if self.learned is not None:
            self.learned.restart(options)

    def prepare(self, shard_device: torch.device | None = None, announce: bool = True) -> LearnedMerge:
        if self.learned is None:
            from expertmerge.fit.prepare import prepare_fit

            self.learned = prepare_fit(
                self.options, self.datamodule, self.pool, shard_device, self.distinct, announce
            )
        return self.learned


class StageTrainer(Protocol):
    """One stage's trainer: trains `run.learned`'s coefficients (preparing it first when needed)."""

    interrupted: bool
    global_step: int

    def fit(self, run: FitRun, ckpt_path: str | None = None) -> None: ...

    def finish(self, run: FitRun) -> bool:
        """After the last stage, on every rank: bring the merge back whole where the evaluation and exports
        run (FSDP gathers its shards; not after an interruption); True on the one process that goes on
        (rank 0)."""
        ...


# A trainer for one stage: `factory()` with the configured settings (stage 1), `factory(max_steps=N)` for
# stage 2; keyword settings are the trainer's (e.g. `accumulate_grad_batches`).
TrainerFactory = Callable[..., StageTrainer]


@dataclass
class FitResult:
    """What a fit made: the learned merge (on the device it ran on), its stages' steps and time."""

    learned: LearnedMerge | None
    trainers: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    main_process: bool = True  # False on the other ranks of a distributed fit: they have nothing left to do

    @property
    def interrupted(self) -> bool:
        return any(t.interrupted for t in self.trainers)

    @property
    def steps(self) -> str:
        return " + ".join(str(t.global_step) for t in self.trainers)


def run_fit(run: FitRun, trainer_factory: TrainerFactory, ckpt_path: str | None = None) -> FitResult:
    """Stage 1 (layer-wise), then for Expert Merging++ stage 2 (chunk-wise) with a second trainer; then, on the
    main process, `stage2_select`. Returns the merge and the trainers that ran."""
    started = time.perf_counter()
    chunking = run.options.chunking
    resume_stage = checkpoint_stage(ckpt_path) if ckpt_path else None
    if resume_stage == 2 and not chunking.enabled:
        raise ExpertMergeError(
            f"--ckpt_path '{ckpt_path}' is a chunk-wise (stage 2) checkpoint: resume it with model.chunking true."
        )
    if resume_stage == 1 and chunking.stage1_result:
        raise ExpertMergeError(
            f"--ckpt_path '{ckpt_path}' is a layer-wise (stage 1) checkpoint, but model.stage1_result runs "
            "stage 2 only: drop one of the two."
        )
    trainers: list[Any] = []
    if not chunking.stage1_result and resume_stage != 2:
        stage1 = trainer_factory()
        if chunking.enabled and getattr(stage1, "max_steps", 1) < 1:
            raise ExpertMergeError(
                f"trainer.max_steps is {stage1.max_steps}; model.chunking needs it >= 1 (the steps of the "
                "layer-wise stage before the chunk-wise one)."
            )
        stage1.fit(run, ckpt_path=ckpt_path)
        trainers.append(stage1)
    if not trainers or (chunking.enabled and not trainers[-1].interrupted):
        if trainers:
            run.learned.enter_stage2(run.learned.merged.stage1_snapshot())
            ckpt_path = None
        # With stage1_result or a stage-2 checkpoint the merge enters stage 2 while it is prepared / restored.
        stage2 = trainer_factory(max_steps=int(chunking.stage2_steps))
        stage2.fit(run, ckpt_path=ckpt_path)
        trainers.append(stage2)
    result = FitResult(run.learned, trainers, time.perf_counter() - started)
    result.main_process = trainers[-1].finish(run)
    if result.main_process and not result.interrupted:
        run.learned.select_stage2()
    return result
