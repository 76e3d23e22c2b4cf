"""The training DataLoader that Lightning can checkpoint: a fit resumed from any step, mid-epoch and under
gradient accumulation included, sees the same batches and the same random draws as the uninterrupted fit.

Lightning (2.x) keeps the `state_dict()` of every train DataLoader that has one in the checkpoint (the fit
loop's "combined_loader" entry) and hands it back through `load_state_dict` before the resumed fit draws its
first batch. The state is where the fit stands in its stream of batches and draws:

- the position: the epoch and how many of its batches the loop has taken. Counted here, where the loop takes
  them (worker processes read the sampler ahead of that). The batch sampler's order is a function of
  (seed, epoch), so it starts the restored epoch at that batch without reading the ones before.
- the global random states (torch, CUDA, Python, NumPy): whatever the steps draw (noise, random prefixes,
  dropout) continues as it would have. Restored here, just before the resumed fit's first step, rather than
  with the module's state, which Lightning restores earlier.

The DataLoader's own generator (the workers' seeds) is reseeded from (seed, epoch) at every epoch, so iterating
the data draws nothing from the global random state.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from calib_data.sampler import BalancedTaskBatchSampler


def random_states() -> dict[str, Any]:
    """The global random states, as tensors and plain values (a checkpoint read with weights_only takes them)."""
    import numpy as np

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `BalancedTaskBatchSampler` whose `state_dict` / `load_state_dict` Lightning uses to
    resume a fit at the batch where its checkpoint was taken (see the module docstring)."""

    def __init__(self, dataset: Dataset, batch_sampler: BalancedTaskBatchSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, generator=torch.Generator(), **kwargs)
        self.batch_sampler: BalancedTaskBatchSampler
        self._taken = (batch_sampler.epoch, 0)  # (epoch, batches of it the loop has taken)

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first batch, after Lightning's `set_epoch` for the epoch it serves.
        sampler = self.batch_sampler
        self.generator.manual_seed((sampler.seed * 1_000_003 + sampler.epoch) % 2**63)
        for count, batch in enumerate(super().__iter__(), start=1):
            self._taken = (sampler.iteration_epoch, sampler.iteration_start + count)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._taken
        return {
            "epoch": epoch,
            "batches": batches,
            "order": self.batch_sampler.order_settings(),
            "random": random_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_random_states(state["random"])
        order = self.batch_sampler.order_settings()
        if state["order"] != order:
            saved = state["order"]
            changed = ", ".join(
                f"{key} {saved.get(key)} -> {order[key]}" for key in order if saved.get(key) != order[key]
            )
            warnings.warn(
                f"The checkpoint's calibration batches were drawn with other settings ({changed}): the resumed "
                "fit starts its epoch from the first batch, and its steps differ from the uninterrupted fit's. "
                "Resume with the data settings (data.seed, samples_per_task, batch_size, rounds) and devices the "
                "checkpoint was made with for the same result.",
                UserWarning,
                stacklevel=2,
            )
            return
        self._taken = (int(state["epoch"]), int(state["batches"]))  # until the resumed fit takes a batch
        self.batch_sampler.resume_at(*self._taken)
