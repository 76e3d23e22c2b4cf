"""Calibration data: per-task unlabeled text for learning merge coefficients, and small corpora we ship.

The names below are imported on first use, so `import calib_data` (or one light submodule such as
`calib_data.sources`) does not start Lightning, torch or `datasets`.
"""

from __future__ import annotations

from expertmerge.lazy import lazy_exports

_EXPORTS = {
    "CORPORA_DIR": "calib_data.sources",
    "CORPORA_SCHEME": "calib_data.sources",
    "BalancedTaskBatchSampler": "calib_data.sampler",
    "CalibrationDataModule": "calib_data.datamodule",
    "TaskSpec": "calib_data.tasks",
    "TokenizedSamples": "calib_data.rendering",
    "collate_task_batch": "calib_data.sampler",
    "resolve_source": "calib_data.sources",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
