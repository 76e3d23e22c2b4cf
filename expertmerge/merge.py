"""`python -m expertmerge merge`: a training-free merge from a mergekit-style YAML, streamed tensor by tensor.

The config is mergekit's format (typed and validated in `expertmerge.methods.config`), so an existing
mergekit config runs unchanged; the methods are the registry in `expertmerge.methods`.

Streaming: the output's shards are planned from the base's tensor shapes, each shard's safetensors header is
written first, and then every tensor is merged and appended as soon as it is computed; only the current
tensor of each model is in memory, never a model or a shard.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir, check_output_dir
from expertmerge.io.reader import DTYPES, dtype_name, weights_bytes
from expertmerge.io.support import copy_support_files, write_config
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE, PlannedTensor, shard_limit, write_safetensors
from expertmerge.methods import MergeMethod, tensor_generator
from expertmerge.methods.config import MergeConfig, ModelEntry, load_merge_config, parse_merge_config
from expertmerge.pool import BASE, ExpertPool

__all__ = ["MergeConfig", "MergeSummary", "load_merge_config", "parse_merge_config", "run_merge"]


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


def reset_peak_rss() -> bool:
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
    """Peak resident memory: Linux's VmHWM (which `reset_peak_rss` resets), else `getrusage`.

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


def _merge_one(pool: ExpertPool, name: str, config: MergeConfig, entries: list[ModelEntry]) -> torch.Tensor:
    """One merged tensor; only this tensor of each model is in memory (read in fp32, computed in fp32)."""
    method = config.method
    base = pool.base_tensor(name, torch.float32) if method.uses_base and config.base_model else None
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
        if method.uses_base:
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
    merge_only = reset_peak_rss()
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
    sources = [config.base_model, *(m.source for m in config.models)]
    check_output_dir(out, force, inputs=sources)  # cheap checks now; free space once the size is known
    max_shard = shard_limit(max_shard_bytes)

    pool, entries = _make_pool(config, config.method)
    pool.validate()
    out_dtype = DTYPES[config.dtype] if config.dtype else _majority_dtype(pool)
    merged = set(pool.merged_names)

    def produce(name: str, dtype: torch.dtype) -> Any:
        def tensor() -> torch.Tensor:
            result = _merge_one(pool, name, config, entries) if name in merged else pool.base_tensor(name)
            return result.to(dtype)

        return tensor

    planned = []
    for name in pool.tensor_names:
        stored = pool.stored_dtype(name)
        dtype = out_dtype if stored.is_floating_point else stored
        planned.append(PlannedTensor(name, pool.shape(name), dtype, produce(name, dtype)))
    inputs = [*sources, pool.base_dir, *pool.expert_dirs.values()]
    estimate = sum(t.nbytes for t in planned)
    with atomic_output_dir(out, force, inputs, estimate, command="merge") as tmp:
        with _progress(console, progress) as bar:
            task = bar.add_task("merging", total=len(planned), tensor="")
            written = write_safetensors(
                tmp,
                planned,
                max_shard,
                on_start=lambda name: bar.update(task, tensor=name),
                on_written=lambda name: bar.advance(task),
            )
        total = written.num_shards
        write_config(pool.base_dir, tmp, out_dtype)
        copy_support_files(pool.base_dir, tmp, config.trust_remote_code)
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
                "dtype": dtype_name(out_dtype),
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
    model_bytes = weights_bytes(pool.base_dir)
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
