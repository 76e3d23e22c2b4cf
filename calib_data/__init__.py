"""Calibration data: per-task unlabeled text for learning merge coefficients, and small corpora we ship."""

from calib_data.datamodule import CalibrationDataModule
from calib_data.rendering import TokenizedSamples
from calib_data.sampler import BalancedTaskBatchSampler, collate_task_batch
from calib_data.sources import CORPORA_DIR, CORPORA_SCHEME, resolve_source
from calib_data.tasks import TaskSpec

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
