"""Calibration data: per-task unlabeled text for learning merge coefficients, and small corpora we ship."""

from calib_data.datamodule import (
    CORPORA_DIR,
    CORPORA_SCHEME,
    BalancedTaskBatchSampler,
    CalibrationDataModule,
    TaskSpec,
    TokenizedSamples,
    collate_task_batch,
    resolve_source,
)

__all__ = [
    "CORPORA_DIR",
    "CORPORA_SCHEME",
    "BalancedTaskBatchSampler",
    "CalibrationDataModule",
    "TaskSpec",
    "TokenizedSamples",
    "collate_task_batch",
    "resolve_source",
]
