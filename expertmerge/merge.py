"""`python -m expertmerge merge`: a training-free merge from a mergekit-style YAML, streamed tensor by tensor.

The config is mergekit's format (typed and validated in `expertmerge.methods.config`), so an existing
mergekit config runs unchanged; the methods are the registry in `expertmerge.methods`.

Streaming: the output's shards are planned from the base's tensor shapes, each shard's safetensors header is
written first, and then every tensor is merged and appended as soon as it is computed; only the current
tensor of each model is in memory, never a model or a shard.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.export import atomic_output_dir, check_output_dir, write_merge_card
from expertmerge.methods import MergeMethod, tensor_generator
from expertmerge.methods.config import MergeConfig, ModelEntry, load_merge_config, parse_merge_config
from expertmerge.pool import BASE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, ExpertPool

__all__ = ["MergeConfig", "MergeSummary", "load_merge_config", "parse_merge_config", "run_merge"]

DEFAULT_MAX_SHARD_SIZE = "5GB"  # mergekit's default output shard size

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SAFETENSORS_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}

# Files copied from the base next to the merged weights: tokenizer, generation settings, processor.
_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)

# --------------------------------------------------------------------------------------------- streaming


def parse_size(size: str | int) -> int:
    """`"2GB"` -> 2_000_000_000, `"500MiB"` -> 524_288_000, ints pass (the units of `transformers`)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ExpertMergeError(f"Shard size '{size}' is not a size like 2GB, 500MB or 1GiB.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * scale[unit])


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    merged: bool

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[_Planned], max_shard_bytes: int) -> list[list[_Planned]]:
    """Greedy split in model order; a tensor larger than the limit gets a shard of its own (as transformers).

    Within a shard, tensors are ordered by element size (largest first), as safetensors does, so every
    tensor's offset is aligned to its element size.
    """
    shards: list[list[_Planned]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    itemsize = {t.name: torch.empty((), dtype=t.dtype).element_size() for t in tensors}
    return [sorted(shard, key=lambda t: -itemsize[t.name]) for shard in shards if shard]


class _ShardWriter:
    """A safetensors file written as a stream: header first (all shapes are known), then tensor after tensor."""

    def __init__(self, path: Path, tensors: Sequence[_Planned]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in tensors:
            header[tensor.name] = {
                "dtype": _SAFETENSORS_CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.expected = [t.name for t in tensors]
        self.planned = {t.name: t for t in tensors}
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by __exit__; lives across many writes
        self.handle.write(struct.pack("<Q", len(encoded)))
        self.handle.write(encoded)
        self.position = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.planned[name]
        if self.expected[self.position] != name:
            raise RuntimeError(
                f"shard {self.path.name}: expected '{self.expected[self.position]}', got '{name}'"
            )
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(
                f"'{name}': got {tuple(tensor.shape)} {tensor.dtype}, planned {planned.shape} {planned.dtype}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise ExpertMergeError("Writing safetensors on a big-endian machine is not supported.")
        self.handle.write(memoryview(data.numpy()))
        self.position += 1

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.handle.close()
        if kind is None and self.position != len(self.expected):
            raise RuntimeError(
                f"shard {self.path.name}: {len(self.expected) - self.position} tensors not written"
            )


@dataclass
class MergeSummary:
    """What a merge did; `peak_rss_bytes` is the peak resident memory during the merge (or of the process)."""

    method: str
    output: Path
    num_experts: int
    tensors_merged: int
    tensors_copied: int
    num_shards: int
    output_bytes: int
    model_bytes: int  # the base checkpoint's weights, for comparison with the peak memory
    wall_seconds: float
    start_rss_bytes: int  # resident memory when the merge started (libraries, interpreter)
    peak_rss_bytes: int
    peak_rss_is_merge_only: bool
    notes: list[str] = field(default_factory=list)


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its peak RSS, so the summary reports the merge's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory: Linux's VmHWM (which `_reset_peak_rss` resets), else `getrusage`.

    `getrusage` alone can report the parent's memory: at exec, Linux carries the forked copy's peak over.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _majority_dtype(pool: ExpertPool) -> torch.dtype:
    """The base's stored dtype: the floating dtype holding most of its parameters."""
    counts: dict[torch.dtype, int] = {}
    for name in pool.tensor_names:
        dtype = pool.stored_dtype(name)
        if dtype.is_floating_point:
            numel = 1
            for size in pool.shape(name):
                numel *= size
            counts[dtype] = counts.get(dtype, 0) + numel
    return max(counts, key=counts.get) if counts else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _copy_support_files(base_dir: Path, target: Path, trust_remote_code: bool) -> list[str]:
    copied = []
    for filename in _COPIED_FILES:
        if (base_dir / filename).is_file():
            shutil.copy2(base_dir / filename, target / filename)
            copied.append(filename)
    if trust_remote_code:  # a config with auto_map needs its modeling code next to it
        for code in sorted(base_dir.glob("*.py")):
            shutil.copy2(code, target / code.name)
            copied.append(code.name)
    return copied


def _write_config(base_dir: Path, target: Path, dtype: torch.dtype) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = _dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = _dtype_name(dtype)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _weights_bytes(folder: Path) -> int:
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def _merge_one(pool: ExpertPool, name: str, config: MergeConfig, entries: list[ModelEntry]) -> torch.Tensor:
    """One merged tensor; only this tensor of each model is in memory (read in fp32, computed in fp32)."""
    method = config.method
    base = pool.base_tensor(name, torch.float32) if method.needs_base else None
    experts = [pool.expert_tensor(expert, name, torch.float32) for expert in pool.expert_names]
    return method.merge(
        base, experts, [e.parameters for e in entries], config.parameters, tensor_generator(config.seed, name)
    )


def _make_pool(config: MergeConfig, method: MergeMethod) -> tuple[ExpertPool, list[ModelEntry]]:
    """The pool and the entries that act as experts (mergekit's rules for the base model)."""
    entries = list(config.models)
    if config.base_model is None:
        # `average` without a base: the first model gives the structure, config and tokenizer.
        base = entries[0].source
    else:
        base = config.base_model
        if method.needs_base:
            # mergekit skips the base in the task vectors: its own task vector is zero.
            entries = [e for e in entries if e.source != base]
            if not entries:
                raise ExpertMergeError(
                    f"{config.path}: key 'models': only the base model is listed; nothing to merge."
                )
    pool = ExpertPool(
        base,
        [e.source for e in entries],
        trust_remote_code=config.trust_remote_code,
        include=config.include,
        exclude=config.exclude,
    )
    return pool, entries


def run_merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike,
    out: str | os.PathLike | None = None,
    force: bool = False,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_SIZE,
    console: Any = None,
    progress: bool = True,
) -> MergeSummary:
    """Merge the config's models into the Hugging Face model folder `out` (or the config's `output_dir`).

    Everything is validated (config, output folder, model compatibility) before any tensor is read; the output
    appears only when complete.
    """
    from rich.console import Console
    from transformers import AutoConfig  # noqa: F401 - imported before the memory baseline, not counted in it

    started = time.perf_counter()
    merge_only = _reset_peak_rss()
    start_rss = current_rss_bytes()
    console = console or Console()
    if isinstance(config, MergeConfig):
        pass
    elif isinstance(config, Mapping):
        config = parse_merge_config(config)
    else:
        config = load_merge_config(config)
    out = out if out is not None else config.output_dir
    if out is None:
        raise ExpertMergeError(
            f"{config.path}: no output folder; pass --out DIR or set `output_dir` in the config."
        )
    check_output_dir(out, force)
    shard_limit = parse_size(max_shard_bytes)
    if shard_limit <= 0:
        raise ExpertMergeError(f"Shard size must be positive, got {max_shard_bytes!r}.")

    pool, entries = _make_pool(config, config.method)
    pool.validate()
    out_dtype = DTYPES[config.dtype] if config.dtype else _majority_dtype(pool)
    merged = set(pool.merged_names)
    planned = [
        _Planned(
            name,
            pool.shape(name),
            out_dtype if pool.stored_dtype(name).is_floating_point else pool.stored_dtype(name),
            name in merged,
        )
        for name in pool.tensor_names
    ]
    shards = plan_shards(planned, shard_limit)

    with atomic_output_dir(out, force) as tmp:
        total = len(shards)
        filenames = (
            [SAFETENSORS_SINGLE]
            if total == 1
            else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        )
        with _progress(console, progress) as bar:
            task = bar.add_task("merging", total=len(planned), tensor="")
            for filename, shard in zip(filenames, shards, strict=True):
                with _ShardWriter(tmp / filename, shard) as writer:
                    for item in shard:
                        bar.update(task, tensor=item.name)
                        if item.merged:
                            result = _merge_one(pool, item.name, config, entries)
                        else:
                            result = pool.base_tensor(item.name)
                        writer.write(item.name, result.to(item.dtype))
                        del result
                        bar.advance(task)
        if total > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in planned)},
                "weight_map": {
                    t.name: filename
                    for filename, shard in zip(filenames, shards, strict=True)
                    for t in sorted(shard, key=lambda t: t.name)
                },
            }
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _write_config(pool.base_dir, tmp, out_dtype)
        _copy_support_files(pool.base_dir, tmp, config.trust_remote_code)
        resolved_yaml = config.to_mergekit_yaml()
        (tmp / "merge_config.yaml").write_text(resolved_yaml)
        hashes = pool.content_hashes()
        write_merge_card(
            tmp,
            title=f"{config.merge_method} merge of {len(entries)} expert(s)",
            method=config.merge_method,
            base=None if config.base_model is None else (config.base_model, hashes[BASE]),
            experts={
                name: (e.source, hashes[name]) for name, e in zip(pool.expert_names, entries, strict=True)
            },
            parameters={
                **config.parameters,
                "models": {
                    name: {"source": e.source, **e.parameters}
                    for name, e in zip(pool.expert_names, entries, strict=True)
                },
                "dtype": _dtype_name(out_dtype),
                "random_seed": config.seed,
                "include": config.include,
                "exclude": config.exclude,
                "tensors_merged": len(merged),
                "tensors_copied_from_base": len(planned) - len(merged),
            },
            sections={
                "Merge config": f"Re-run with `python -m expertmerge merge --config merge_config.yaml --out DIR`.\n\n"
                f"```yaml\n{resolved_yaml}```",
                **({"Notes": "\n".join(f"- {note}" for note in pool.notes)} if pool.notes else {}),
            },
        )
        output_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    model_bytes = _weights_bytes(pool.base_dir)
    pool.close()
    summary = MergeSummary(
        method=config.merge_method,
        output=Path(out).expanduser(),
        num_experts=len(entries),
        tensors_merged=len(merged),
        tensors_copied=len(planned) - len(merged),
        num_shards=total,
        output_bytes=output_bytes,
        model_bytes=model_bytes,
        wall_seconds=time.perf_counter() - started,
        start_rss_bytes=start_rss,
        peak_rss_bytes=peak_rss_bytes(),
        peak_rss_is_merge_only=merge_only,
        notes=list(pool.notes),
    )
    return summary


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]merge"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=console,
        disable=not enabled,
        transient=True,
    )
