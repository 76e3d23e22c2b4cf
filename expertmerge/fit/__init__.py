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

_NAMES = {  # module -> the names it defines that the package re-exports
    "expertmerge.fit.options": (
        "FitOptions",
        "StartOptions",
        "LossOptions",
        "TensorOptions",
        "OptimiserOptions",
        "ChunkingOptions",
        "MoEOptions",
    ),
    "expertmerge.fit.merged": ("MergedModel",),
    "expertmerge.fit.objective": ("Calibration", "Objective"),
    "expertmerge.fit.learned": ("LearnedMerge",),
    "expertmerge.fit.prepare": ("prepare_fit",),
    "expertmerge.fit.run": ("FitRun", "FitResult", "run_fit"),
}
_EXPORTS = {name: module for module, names in _NAMES.items() for name in names}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
