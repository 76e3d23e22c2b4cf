"""`LearnedMerge`: a prepared learned merge, everything its steps need and everything they found.

`prepare_fit` builds it; the Lightning module trains its coefficients; `run_fit` runs the stages; the
evaluation and the exports read it. Its checkpoint payload is the coefficients' own format (the base and the
task vectors are inputs, not results), so a checkpoint is small and plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.fit.merged import MergedModel
from expertmerge.fit.objective import Calibration, Objective
from expertmerge.fit.options import FitOptions
from expertmerge.fit.stages import enter_stage2, select_stage2
from expertmerge.fit.start import scores_json
from expertmerge.io.fit_checkpoint import MODEL_HASHES

COEFFICIENTS_PREFIX = "coefficients."  # the checkpoint's state_dict keys


@dataclass
class LearnedMerge:
    """A learned merge, prepared: options, models, calibration data and targets, the objective, and results."""

    options: FitOptions
    pool: Any  # the base and experts (`ExpertPool`)
    calibration: Calibration
    merged: MergedModel
    objective: Objective
    start_scores: dict[tuple[str, float], float] = field(default_factory=dict)  # start search: its objectives
    stage2_choice: dict[str, Any] | None = None  # stage2_select held_out: what it found
    prepare_seconds: float = 0.0  # what `prepare_fit` took (loading, teacher targets, start search)
    # every training batch's loss, in order (detached tensors: reading one would wait for the device every step)
    step_losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return self.calibration.task_names

    @property
    def expert_names(self) -> list[str]:
        return self.merged.expert_names

    @property
    def task_scales(self) -> dict[str, float] | None:
        return self.objective.task_scales

    def start_scores_json(self) -> dict[str, dict[str, float]] | None:
        return scores_json(self.start_scores)

    def before_training(self) -> None:
        """The task scales that are measured at the start point (`start_kl`), once, before the first step."""
        balance = self.options.loss.task_balance
        if balance != "none" and self.objective.task_scales is None:
            self.objective.task_scales = self.objective.start_task_scales(balance)

    def enter_stage2(self, stage1_values: dict[str, torch.Tensor]) -> None:
        enter_stage2(self.merged, stage1_values, self.options.chunking)

    def select_stage2(self) -> dict[str, Any] | None:
        """After the fits: `stage2_select: held_out` keeps the chunk-wise coefficients only if they beat the
        layer-wise ones on the held-out calibration samples. Returns (and keeps) what it found."""
        if self.merged.stage == 2 and self.options.chunking.stage2_select == "held_out":
            self.stage2_choice = select_stage2(self.merged, self.objective)
        return self.stage2_choice

    def restart(self, options: FitOptions) -> None:
        """Fresh coefficients at the chosen start under new `options` that change no prepared input (e.g. other
        task weights): the base, task vectors, targets and start stay, the next fit owes nothing to the last."""
        from expertmerge.chunking import read_stage1_result

        self.options = options
        self.objective.loss = options.loss
        merged = self.merged
        merged.stage, merged.stage1_values, merged.chunk_allocation = 1, None, None
        self.stage2_choice = None
        merged.start_coefficients(merged.start_alpha)
        if options.chunking.stage1_result:
            self.enter_stage2(
                read_stage1_result(
                    options.chunking.stage1_result, self.expert_names, merged.coefficient_names
                )
            )

    # ------------------------------------------------------------------------------------- checkpoints
    def checkpoint_section(self) -> dict[str, Any]:
        """What a checkpoint stores beside the coefficients: their structure, start, stage and models."""
        merged = self.merged
        return {
            "expert_names": merged.expert_names,
            "coefficient_names": merged.coefficient_names,
            "chunk_counts": merged.coefficients.chunk_counts,
            "stage": merged.stage,
            "stage1_values": merged.stage1_values,
            "task_scales": self.objective.task_scales,
            "start": [merged.start_merge, merged.start_alpha],  # what the coefficients are relative to
            # what they were learned on: a resume or export onto other weights of the same names is refused
            MODEL_HASHES: self.pool.content_hashes(),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Check a checkpoint's section against this merge and enter its stage (before its coefficients load)."""
        merged = self.merged
        if saved and (
            saved.get("coefficient_names") != merged.coefficient_names
            or saved.get("expert_names") != merged.expert_names
        ):
            raise ExpertMergeError(
                "The checkpoint's experts or merged tensors differ from this configuration; "
                "resume with the config the checkpoint was made with."
            )
        start = saved.get("start")
        if start is not None:
            merge, alpha = start
            same_alpha = torch.allclose(
                torch.as_tensor(alpha, dtype=torch.float64),
                torch.as_tensor(merged.start_alpha, dtype=torch.float64),
            )
            if merge != merged.start_merge or not same_alpha:
                raise ExpertMergeError(
                    f"The checkpoint's coefficients were learned from the start {merge} at alpha0 {alpha}, but "
                    f"this configuration starts from {merged.start_merge} at alpha0 {merged.start_alpha} (other "
                    "calibration data or start options?); resume or export with the config and data it was made "
                    "with."
                )
        if saved.get("task_scales") is not None:
            self.objective.task_scales = saved[
                "task_scales"
            ]  # measured at the start point, not the resumed one
        if saved.get("stage") == 2 and merged.stage == 1:
            # The run stopped in the chunk-wise stage: rebuild that stage's coefficients before loading them.
            self.enter_stage2(saved["stage1_values"])
        counts = saved.get("chunk_counts")
        if (
            counts is not None
            and saved.get("stage", 1) == 1
            and list(counts) != list(merged.coefficients.chunk_counts)
        ):
            axis = "on" if merged.stage1_chunks else "off"
            raise ExpertMergeError(
                "The checkpoint's coefficients are cut into other chunks than this configuration's (with "
                f"model.expert_axis {axis} here); resume or export with the config the checkpoint was made with."
            )

    def load_coefficients(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The coefficients of a checkpoint's `state_dict` (keys `coefficients.*`)."""
        values = {
            k[len(COEFFICIENTS_PREFIX) :]: v
            for k, v in state_dict.items()
            if k.startswith(COEFFICIENTS_PREFIX)
        }
        self.merged.coefficients.load_state_dict(values)
