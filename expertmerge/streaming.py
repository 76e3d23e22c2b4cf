"""Streamed task vectors: tau[k, p] kept off the compute device and brought to it one decoder layer at a time.

The resident fit (`coefficients.TaskVectors`) holds every expert's task vectors on the device, so its memory
grows by one model (in bf16) per expert. Here they live in a store instead:

- `host`: CPU tensors, pinned when CUDA is present so a layer's copy to the GPU is asynchronous;
- `disk`: one safetensors file written by the one writer (`io/writer.py`) and read back by the one reader
  (`io/reader.py`), which opens the file for each read, so the process holds only what it is reading.

`StreamedTaskVectors[index]` returns `[N, *shape]` on the compute device. Reads are grouped by decoder layer
(all learned tensors of `layers.7.` together) and the next layer in the direction of travel is read ahead in a
background thread (forward: ascending layers while the merged tensors are built; backward: descending, as
the gradients arrive), so at most two layers of task vectors are on the device. `MergeCoefficients`
(`merged_tensor` with `for_merge(index)`) builds each merged tensor from a read and keeps no reference to it:
backward reads the layer again for d loss / d c[k, p] = <d loss / d theta_p, tau[k, p]>, so the step's
memory does not depend on N. The numbers are the resident path's: the same bf16 values, the same ops.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from expertmerge.errors import ExpertMergeError

StoreKind = Literal["auto", "host", "disk"]
_LAYER = re.compile(r"\.(\d+)\.")
_FILE_FORMAT = 1  # bump when the store file's layout changes, so old cached stores are not read


class TaskVectorStore(Protocol):
    """Where the task vectors of the learned tensors live between reads."""

    def read(self, index: int) -> torch.Tensor:
        """`[N, *shape]` of learned tensor `index`, on the CPU."""
        ...


class HostStore:
    """Task vectors in host memory (pinned when `pin`, so device copies can run asynchronously)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    def read(self, index: int) -> torch.Tensor:
        return self.tensors[index]

    @classmethod
    def fill(
        cls,
        sources: Sequence[Callable[[], Iterator[torch.Tensor]]],
        shapes: Sequence[tuple[int, ...]],
        dtype: torch.dtype,
        pin: bool,
    ) -> HostStore:
        tensors = []
        for source, shape in zip(sources, shapes, strict=True):
            tensor = torch.empty(shape, dtype=dtype, pin_memory=pin)
            for k, tau in enumerate(source()):
                tensor[k].copy_(tau)
            tensors.append(tensor)
        return cls(tensors)


class DiskStore:
    """Task vectors in a safetensors file; each read opens it, reads one tensor and closes it again."""

    def __init__(self, folder: Path, names: Sequence[str]) -> None:
        from expertmerge.io.reader import Checkpoint

        self.folder = folder
        self.names = list(names)
        self.checkpoint = Checkpoint(folder, f"streamed task vectors ({folder})")

    def read(self, index: int) -> torch.Tensor:
        return self.checkpoint.tensor(self.names[index])

    @classmethod
    def fill(
        cls,
        folder: Path,
        names: Sequence[str],
        sources: Sequence[Callable[[], Iterator[torch.Tensor]]],
        shapes: Sequence[tuple[int, ...]],
        dtype: torch.dtype,
    ) -> DiskStore:
        """Write the store once (atomically: a killed write leaves no file that looks complete), then open it.

        An existing store with the same key is reused: the key covers the models' content hashes, the tensor
        names and the dtype, so the file can only hold these task vectors.
        """
        from expertmerge.io.folder import atomic_output_dir
        from expertmerge.io.writer import PlannedTensor, write_safetensors

        if not (folder / "model.safetensors").is_file():
            planned = [
                PlannedTensor(name, tuple(shape), dtype, source)
                for name, shape, source in zip(names, shapes, sources, strict=True)
            ]
            try:
                with atomic_output_dir(folder) as tmp:
                    # One file, whatever its size: reads seek by name, and shards would only add an index.
                    write_safetensors(tmp, planned, max_shard_bytes=2**62)
            except ExpertMergeError:
                if not (folder / "model.safetensors").is_file():  # another process wrote it first: reuse
                    raise
        return cls(folder, names)


def store_folder(content_hashes: dict[str, str], names: Sequence[str], dtype: torch.dtype) -> Path:
    """`<cache>/task_vectors/<key>`: one folder per (models' contents, learned tensors, dtype)."""
    from expertmerge.paths import cache_dir

    key = json.dumps(
        {"format": _FILE_FORMAT, "models": content_hashes, "names": list(names), "dtype": str(dtype)},
        sort_keys=True,
    )
    return cache_dir() / "task_vectors" / hashlib.sha256(key.encode()).hexdigest()[:24]


def layer_groups(names: Sequence[str]) -> list[list[int]]:
    """Indices of `names` grouped by decoder layer (the first `.<number>.` in a name), in order of appearance;
    a name outside the repeated blocks is a group of its own."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        match = _LAYER.search(name)
        groups.setdefault(match.group(1) if match else f"#{index}", []).append(index)
    return list(groups.values())


class StreamedTaskVectors(nn.Module):
    """`tau[k, p]` read from a `TaskVectorStore` one decoder layer at a time, the next layer read ahead.

    Indexing and `len` work as for `coefficients.TaskVectors`, so every reader of the task vectors (the
    merge, the alpha0 and stage-1 evaluation rows, the chunk allocation) takes either. The compute device is
    followed with an empty buffer, which `Module.to` moves like any other.
    """

    def __init__(
        self, store: TaskVectorStore, shapes: Sequence[tuple[int, ...]], names: Sequence[str]
    ) -> None:
        super().__init__()
        self.store = store
        self.shapes = [torch.Size(s) for s in shapes]
        self.groups = layer_groups(names)
        self._group_of = {i: g for g, group in enumerate(self.groups) for i in group}
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self._cache: dict[int, Future | dict[int, torch.Tensor]] = {}
        self._last_group = 0
        self._direction = 1
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._stream: Any = None
        self.reads = 0  # layers read (by a miss or ahead), for tests and benchmarks

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def shape(self, index: int) -> torch.Size:
        return self.shapes[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self.shapes):
            raise IndexError(index)
        group = self._group_of[index]
        with self._lock:
            if group != self._last_group:
                self._direction = 1 if group > self._last_group else -1
            if group == 0:
                self._direction = 1
            elif group == len(self.groups) - 1:
                # the forward's last layer is the backward's first: read ahead downwards from here
                self._direction = -1
            self._last_group = group
            ahead = group + self._direction
            for stale in [g for g in self._cache if g not in (group, ahead)]:
                del self._cache[stale]
            entry = self._cache.get(group)
            if entry is None:
                entry = self._read_group(group)
                self._cache[group] = entry
            if 0 <= ahead < len(self.groups) and ahead not in self._cache:
                self._cache[ahead] = self._pool().submit(self._read_group, ahead)
        if isinstance(entry, Future):
            entry = entry.result()
            with self._lock:
                if group in self._cache:
                    self._cache[group] = entry
        tensor = entry[index]
        if tensor.device.type == "cuda":
            # read on the copy stream; make the consumer's stream wait for it and own it from now on
            current = torch.cuda.current_stream(tensor.device)
            current.wait_stream(self._copy_stream())
            tensor.record_stream(current)
        return tensor

    def for_merge(self, index: int) -> Callable[[], torch.Tensor]:
        """What `MergeCoefficients.merged_tensor` reads tensor `index`'s task vectors with (forward and
        backward), instead of holding them."""
        return lambda: self[index]

    def release(self) -> None:
        """Drop the layers in hand (e.g. before a long pause); the next read starts afresh."""
        with self._lock:
            self._cache.clear()

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-vector-read")
        return self._executor

    def _copy_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _read_group(self, group: int) -> dict[int, torch.Tensor]:
        device = self.device
        self.reads += 1
        out = {}
        for index in self.groups[group]:
            host = self.store.read(index)
            if device.type == "cuda":
                with torch.cuda.device(device), torch.cuda.stream(self._copy_stream()):
                    out[index] = host.to(device, non_blocking=host.is_pinned())
            else:
                out[index] = host.to(device)
            if out[index].shape != self.shapes[index]:
                raise ExpertMergeError(
                    f"streamed task vectors: tensor {index} has shape {tuple(out[index].shape)}, "
                    f"expected {tuple(self.shapes[index])}; remove {getattr(self.store, 'folder', 'the store')}."
                )
        return out

    def __getstate__(self) -> dict[str, Any]:
        # threads, locks and CUDA streams do not pickle (deepcopy, spawn): a copy starts with none
        state = self.__dict__.copy()
        state.update(_cache={}, _lock=None, _executor=None, _stream=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def resolve_store(kind: StoreKind) -> Literal["host", "disk"]:
    """`auto`: host memory when a GPU does the compute (it is not the GPU's memory), else the disk (on a CPU
    fit, host memory is the compute device's memory, so only the disk keeps it from growing with N)."""
    if kind == "auto":
        return "host" if torch.cuda.is_available() else "disk"
    return kind


def streamed_task_vectors(
    pool: Any,
    keys: Sequence[str],
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    store: StoreKind = "auto",
) -> StreamedTaskVectors:
    """Fill a store with `tau_k = theta_k - theta_0` of the learned tensors, one expert tensor at a time.

    `keys` are the checkpoint names of the model parameters `names`; `shapes` are `[N, *shape]`.
    """

    def source(key: str) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: pool.iter_task_vectors(key, dtype)

    sources = [source(key) for key in keys]
    if resolve_store(store) == "host":
        backing: TaskVectorStore = HostStore.fill(sources, shapes, dtype, pin=torch.cuda.is_available())
    else:
        folder = store_folder(pool.content_hashes(), keys, dtype)
        backing = DiskStore.fill(folder, keys, sources, shapes, dtype)
    return StreamedTaskVectors(backing, shapes, names)
