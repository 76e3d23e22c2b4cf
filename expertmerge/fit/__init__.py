"""The learned merge (Expert Merging and ++) as a library, without Lightning.

- `options`: `FitOptions` and its typed groups (start, loss, tensors, optimiser, chunking, moe): every default,
  choice and check once.
- `merged`: `MergedModel`, the base run on `theta0 + sum_k c_k tau_k` built per forward; oracle routing.
- `objective`: `Calibration` (tasks, cached teacher targets) and `Objective` (the loss terms and their weights).
- `start`: the training-free start (task arithmetic, RegMean) chosen on calibration data.
- `stages`: Expert Merging++'s chunk-wise stage and its held-out selection.
- `prepare`: `prepare_fit`, from options and data to a `LearnedMerge` (`learned`) ready to train.
- `run`: `run_fit(FitRun, trainer_factory) -> FitResult`, the stages, for `fit`, `sweep` and Symphony.
- `outputs`: after a fit: the per-task evaluation, the dense export, the fused MoE export, the health check.
- `sharding`: the learned tensors sharded by decoder layer (`--trainer.strategy fsdp`).

The names below are imported from their module on first use, so `import expertmerge.fit` starts no torch.
"""

from __future__ import annotations

from expertmerge.lazy import lazy_exports

_EXPORTS = {
    "FitOptions": "expertmerge.fit.options",
    "StartOptions": "expertmerge.fit.options",
    "LossOptions": "expertmerge.fit.options",
    "TensorOptions": "expertmerge.fit.options",
    "OptimiserOptions": "expertmerge.fit.options",
    "ChunkingOptions": "expertmerge.fit.options",
    "MoEOptions": "expertmerge.fit.options",
    "MergedModel": "expertmerge.fit.merged",
    "Calibration": "expertmerge.fit.objective",
    "Objective": "expertmerge.fit.objective",
    "LearnedMerge": "expertmerge.fit.learned",
    "prepare_fit": "expertmerge.fit.prepare",
    "FitRun": "expertmerge.fit.run",
    "FitResult": "expertmerge.fit.run",
    "run_fit": "expertmerge.fit.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
