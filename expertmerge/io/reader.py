"""Reading checkpoints lazily, tensor by tensor, and the one dtype table (safetensors code, torch dtype, names).

Checkpoint files are opened with safetensors' `safe_open` (or memory-mapped `torch.load(weights_only=True)` for
`.bin`); each call reads one tensor of one model. Every tensor read is checked for NaN/Inf.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.io.fit_checkpoint import refused_object

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# ------------------------------------------------------------------------------------------- dtypes
# The one table: safetensors header code <-> torch dtype. Output dtypes a config may name are in DTYPES.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

# Output dtypes by config name (mergekit's names), and the aliases users write.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_ALIASES = {
    "fp32": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "float": "float32",
}


def dtype_key(name: str) -> str:
    """The canonical name of an output dtype name or alias (`bf16` -> `bfloat16`); unknown names unchanged."""
    key = str(name).strip().lower().removeprefix("torch.")
    return DTYPE_ALIASES.get(key, key)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a config name / alias; refuses names outside `DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = dtype_key(dtype)
    if key not in DTYPES:
        raise ExpertMergeError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (the name config.json uses)."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weights_bytes(folder: Path) -> int:
    """The size of a model folder's weight files (safetensors, else `.bin`): an output size estimate."""
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------------------- names
_SHOWN = 5  # how many names an error lists before "... and N more"


def _few(names: Iterable[str]) -> str:
    names = sorted(names, key=natural_key)
    shown = ", ".join(f"'{n}'" for n in names[:_SHOWN])
    return shown + (f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def natural_key(name: str) -> tuple:
    """Sort key that puts `layers.2` before `layers.10`, so tensors come in model order, not string order."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values a floating tensor holds (0 for other dtypes).

    A finite sum means finite entries and costs no temporary the size of the tensor (unlike isfinite, or a
    float64 sum, which casts first); only a non-finite sum (or an fp16 overflow) is counted exactly.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0 or torch.isfinite(tensor.sum()):
        return 0
    return int((~torch.isfinite(tensor)).sum())


# ------------------------------------------------------------------------------------------- reader
class Checkpoint:
    """One model folder's weights: names, shapes and dtypes from the file headers; tensors read one at a time.

    `label` names the model in every error (e.g. "expert 'arith' (/path/to/arith)").

    A safetensors file is opened for each read and closed right after: `get_tensor` returns a tensor backed by
    the file's memory map, and an open handle keeps every page read so far resident, so long-lived handles on
    N+1 models would grow the process to N+1 models' size. `.bin` files (legacy) are memory-mapped once.
    """

    def __init__(self, folder: Path, label: str) -> None:
        self.folder = folder
        self.label = label
        self._file_of: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._bin_state: dict[str, Mapping[str, torch.Tensor]] = {}
        self._is_bin = False
        if (folder / SAFETENSORS_INDEX).is_file():
            self._file_of = self._read_index(folder / SAFETENSORS_INDEX)
            for filename in sorted(set(self._file_of.values())):
                self._read_header(filename)
        elif (folder / SAFETENSORS_SINGLE).is_file():
            self._read_header(SAFETENSORS_SINGLE)
            self._file_of = dict.fromkeys(self._meta, SAFETENSORS_SINGLE)
        elif (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file():
            self._is_bin = True
            if (folder / BIN_INDEX).is_file():
                self._file_of = self._read_index(folder / BIN_INDEX)
            else:
                self._file_of = dict.fromkeys(self._bin(BIN_SINGLE), BIN_SINGLE)
            for filename in sorted(set(self._file_of.values())):
                for name, tensor in self._bin(filename).items():
                    self._meta[name] = (tuple(tensor.shape), tensor.dtype)
        else:
            raise ExpertMergeError(
                f"{label}: no weights found; expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                f"{BIN_SINGLE} or {BIN_INDEX} in the folder."
            )
        unindexed = sorted(set(self._file_of) - set(self._meta))
        if unindexed:
            raise ExpertMergeError(
                f"{label}: the shard index lists tensor(s) missing from their files: {_few(unindexed)}."
            )
        self.names = sorted(self._file_of, key=natural_key)
        self.names_set = frozenset(self.names)

    @property
    def format(self) -> str:
        return "bin" if self._is_bin else "safetensors"

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ExpertMergeError(
                f"{self.label}: cannot read the shard index '{path.name}': {error}"
            ) from error
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise ExpertMergeError(
                f"{self.label}: '{path.name}' lists shard files that are missing: {missing}."
            )
        return dict(weight_map)

    def _open(self, filename: str) -> Any:
        from safetensors import safe_open

        path = self.folder / filename
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:
            raise ExpertMergeError(f"{self.label}: cannot read '{path}': {error}") from error

    def _read_header(self, filename: str) -> None:
        with self._open(filename) as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                view = handle.get_slice(name)
                code = view.get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise ExpertMergeError(f"{self.label}: tensor '{name}' has unsupported dtype {code}.")
                self._meta[name] = (tuple(view.get_shape()), SAFETENSORS_DTYPES[code])

    def _bin(self, filename: str) -> Mapping[str, torch.Tensor]:
        if filename in self._bin_state:
            return self._bin_state[filename]
        path = self.folder / filename
        try:
            # weights_only: a .bin is a pickle, and only plain tensors may come out of it. mmap keeps the
            # file's tensors on disk until they are read.
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            refused = refused_object(error)
            if refused:
                raise ExpertMergeError(
                    f"{self.label}: '{path}' is not a plain tensor file ({refused}); re-save it as safetensors."
                ) from error
            reason = " ".join(str(error).split())[:200]
            raise ExpertMergeError(
                f"{self.label}: cannot read '{path}' ({type(error).__name__}: {reason})."
            ) from error
        if not isinstance(state, Mapping):
            raise ExpertMergeError(f"{self.label}: '{filename}' does not hold a state dict.")
        self._bin_state[filename] = state
        return state

    def _known(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            raise ExpertMergeError(f"{self.label} has no tensor '{name}'.")
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._known(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._known(name)[1]

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (optionally cast); raise naming the model and tensor if it holds NaN or Inf."""
        self._known(name)
        filename = self._file_of[name]
        if self._is_bin:
            tensor = self._bin(filename)[name].clone()
        else:
            with self._open(filename) as handle:
                tensor = handle.get_tensor(name)
        bad = nonfinite_count(tensor)
        if bad:
            raise ExpertMergeError(
                f"{self.label}: tensor '{name}' holds {bad} NaN/Inf value(s) of {tensor.numel()}; "
                "this checkpoint is broken, re-export it or leave it out of the merge."
            )
        return tensor if dtype is None else tensor.to(dtype)

    def close(self) -> None:
        self._bin_state.clear()
