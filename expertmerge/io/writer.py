"""The one streaming safetensors writer: shards planned from names, shapes and dtypes, headers first, tensors
appended as they are computed, and every floating value checked to be finite on the way out.

Only the tensor being written is in memory, never a shard or a model. A tensor is given as a function that
returns it (or yields it in row-major pieces, e.g. one MoE expert at a time). A NaN/Inf value stops the write
with an `ExpertMergeError` naming the tensor; the caller's atomic output folder then removes everything.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.io.reader import (
    SAFETENSORS_CODES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    element_size,
    natural_key,
    nonfinite_count,
)

DEFAULT_MAX_SHARD_SIZE = "5GB"  # mergekit's default output shard size
# Tests only: seconds to sleep after each tensor, so a test can kill a write half-way (real process, real files).
_TEST_DELAY_ENV = "EXPERTMERGE_TEST_WRITE_DELAY"

Produce = Callable[[], "torch.Tensor | Iterable[torch.Tensor]"]


def parse_size(size: str | int, what: str = "Shard size") -> int:
    """`"2GB"` -> 2_000_000_000, `"500MiB"` -> 524_288_000, ints pass (the units of `transformers`); `what`
    names the option in the error."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ExpertMergeError(
            f"{what} '{size}' is not a size; give a number of bytes with a unit, like 24GB, 500MB or 80GiB."
        )
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * scale[unit])


def shard_limit(size: str | int) -> int:
    """`parse_size`, refusing sizes that are not positive."""
    limit = parse_size(size)
    if limit <= 0:
        raise ExpertMergeError(f"Shard size must be positive, got {size!r}.")
    return limit


@dataclass
class PlannedTensor:
    """One output tensor: what the header says, and how to get its values when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Produce

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * element_size(self.dtype)


@dataclass
class WrittenWeights:
    """What `write_safetensors` wrote: file names (in order), the number of shards and the weights' bytes."""

    filenames: list[str]
    total_bytes: int

    @property
    def num_shards(self) -> int:
        return len(self.filenames)


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy split in the given order; a tensor larger than the limit gets a shard of its own (as transformers).

    Within a shard, tensors are ordered by element size (largest first), as safetensors does, so every
    tensor's offset is aligned to its element size.
    """
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [sorted(shard, key=lambda t: -element_size(t.dtype)) for shard in shards if shard]


def shard_filenames(count: int) -> list[str]:
    """transformers' names: `model.safetensors`, or `model-00001-of-00003.safetensors` ... when sharded."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _pieces(planned: PlannedTensor) -> Iterator[torch.Tensor]:
    produced = planned.produce()
    if isinstance(produced, torch.Tensor):
        yield produced
    else:
        yield from produced


def _write_shard(path: Path, tensors: Sequence[PlannedTensor], on_written: Callable[[str], None]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": SAFETENSORS_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for planned in tensors:
            written = 0
            bad = 0
            for piece in _pieces(planned):
                piece = piece.detach()
                if piece.dtype != planned.dtype:
                    raise RuntimeError(f"'{planned.name}': got {piece.dtype}, planned {planned.dtype}")
                bad += nonfinite_count(piece)  # on the tensor in hand: no second pass over the output
                data = piece.contiguous().cpu().reshape(-1).view(torch.uint8)
                handle.write(memoryview(data.numpy()))
                written += data.numel()
            if bad:
                raise ExpertMergeError(
                    f"output tensor '{planned.name}' holds {bad} NaN/Inf value(s) of "
                    f"{planned.nbytes // element_size(planned.dtype)}; nothing was written. Check the weights, "
                    "coefficients and parameters that produce it (e.g. a NaN/Inf weight or lambda)."
                )
            if written != planned.nbytes:
                raise RuntimeError(
                    f"'{planned.name}': wrote {written} bytes, planned {planned.nbytes} "
                    f"(shape {list(planned.shape)})"
                )
            on_written(planned.name)
            if os.environ.get(_TEST_DELAY_ENV):
                handle.flush()
                time.sleep(float(os.environ[_TEST_DELAY_ENV]))


def write_safetensors(
    folder: Path,
    tensors: Sequence[PlannedTensor],
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_SIZE,
    on_written: Callable[[str], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> WrittenWeights:
    """Write `tensors` (in this order, split into shards) into `folder`, plus the index when sharded.

    `on_start(name)` / `on_written(name)` are called around each tensor (progress bars).
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise ExpertMergeError("Writing safetensors on a big-endian machine is not supported.")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1}, key=natural_key)
        raise RuntimeError(f"tensor names planned twice: {twice[:5]}")
    if on_start is not None:
        tensors = [_announced(t, on_start) for t in tensors]
    shards = plan_shards(tensors, shard_limit(max_shard_bytes))
    filenames = shard_filenames(len(shards))
    for filename, shard in zip(filenames, shards, strict=True):
        _write_shard(folder / filename, shard, on_written or (lambda name: None))
    total = sum(t.nbytes for t in tensors)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {
                t.name: filename
                for filename, shard in zip(filenames, shards, strict=True)
                for t in sorted(shard, key=lambda t: t.name)
            },
        }
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return WrittenWeights(filenames, total)


def _announced(tensor: PlannedTensor, on_start: Callable[[str], None]) -> PlannedTensor:
    def produce() -> torch.Tensor | Iterable[torch.Tensor]:
        on_start(tensor.name)
        return tensor.produce()

    return PlannedTensor(tensor.name, tensor.shape, tensor.dtype, produce)


def write_state_dict(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> WrittenWeights:
    """In-memory tensors through the same writer, floating ones cast to `dtype` one at a time (in name order
    as given). The caller chooses the names (e.g. without tied copies, as `save_pretrained` does)."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    planned = [
        PlannedTensor(
            name,
            tuple(tensor.shape),
            dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype,
            lambda tensor=tensor: cast(tensor),
        )
        for name, tensor in state.items()
    ]
    return write_safetensors(folder, planned, max_shard_bytes)
