"""`python -m expertmerge merge`: a training-free merge from a mergekit-style YAML, streamed tensor by tensor.

The config is mergekit's format (typed and validated in `expertmerge.merge_config`), so an existing
mergekit config runs unchanged; the methods are the registry in `expertmerge.methods`.

Streaming: the output's shards are planned from the base's tensor shapes, each shard's safetensors header is
written first, and then every tensor is merged and appended as soon as it is computed; only the current
tensor of each model is in memory, never a model or a shard.
"""

from __future__ import annotations

import json
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
from expertmerge.health import HealthCheck, check_folder
from expertmerge.io.folder import atomic_output_dir, check_output_dir
from expertmerge.io.reader import DTYPES, weights_bytes
from expertmerge.io.support import TOKENIZER_FILES, support_bytes
from expertmerge.io.tokenizer import Vocabulary, build_vocabulary
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE, PlannedTensor, shard_limit, write_safetensors
from expertmerge.merge_config.parse import dry_run, load_merge_config, parse_merge_config
from expertmerge.merge_config.resolved import MergeConfig
from expertmerge.merge_config.slices import OutputTensor, output_layers, plan_tensors
from expertmerge.merge_inputs import MergeInputs, open_merge_inputs
from expertmerge.merge_outputs import write_merge_record, write_output_config, write_output_tokenizer
from expertmerge.methods import tensor_generator
from expertmerge.methods.settings import resolve_values
from expertmerge.pool import ExpertPool

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
    output_layers: int | None = None  # set when `slices:` chose the layers
    health: HealthCheck | None = None  # the output's perplexity against the base's (`expertmerge.health`)


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


def _is_selected(pool: ExpertPool, name: str) -> bool:
    """`include` / `exclude` on the output's tensor names (default: every floating tensor is merged)."""
    return (pool.include is None or any(p.search(name) for p in pool.include)) and not any(
        p.search(name) for p in pool.exclude or ()
    )


def _values(config: MergeConfig, tensor: OutputTensor) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The method's per-model and once-per-merge values for one output tensor (mergekit's precedence)."""
    method = config.method
    model_values = [
        resolve_values(
            method, "model", [e.settings, tensor.slice_settings, config.settings], e.name, tensor.t
        )
        for e in tensor.experts
    ]
    return model_values, resolve_values(
        method, "global", [tensor.slice_settings, config.settings], tensor.name, tensor.t
    )


def _shape(inputs: MergeInputs, tensor: OutputTensor, vocabulary: Vocabulary | None) -> tuple[int, ...]:
    """The output shape; every input must have it (the vocabulary axis aside when a tokenizer is built)."""
    shapes = {i.model: tuple(inputs.checkpoint(i.model).shape(i.name)) for i in tensor.inputs}
    first = tensor.inputs[0]
    if vocabulary is not None and _is_vocab(inputs, tensor):
        rest = {shape[1:] for shape in shapes.values()}
        if len(rest) == 1:
            return (vocabulary.size, *shapes[first.model][1:])
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"'{i.model}' {i.name} {list(shapes[i.model])}" for i in tensor.inputs)
        hint = (
            " (a different vocabulary: set `tokenizer_source: union` or `base`)"
            if _is_vocab(inputs, tensor)
            else ""
        )
        raise ExpertMergeError(
            f"Cannot merge output tensor '{tensor.name}': input shapes differ: {listed}{hint}."
        )
    return shapes[first.model]


def _is_vocab(inputs: MergeInputs, tensor: OutputTensor) -> bool:
    """Embeddings and lm_head: outside the layers, 2-D, one row per token of each model."""
    if tensor.layer is not None:
        return False
    return all(
        len(shape := inputs.checkpoint(i.model).shape(i.name)) == 2 and shape[0] == inputs.vocab_size(i.model)
        for i in tensor.inputs
    )


def _one_tokenizer(config: MergeConfig, inputs: MergeInputs, base: str) -> bool:
    """`tokenizer_source: base` where every model has the base's `tokenizer.json` ids (or none) and as many
    tokens as embedding rows: mergekit's permutations are then the identity, so the files are copied as
    they are (loading a 50k-token tokenizer per model costs seconds)."""
    spec = config.tokenizer
    if spec.source != "base" or spec.tokens or spec.pad_to_multiple_of:
        return False
    path = inputs.folder(base) / "tokenizer.json"
    if not path.is_file():
        return False
    text = path.read_bytes()
    data = json.loads(text)
    vocab = (data.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict):
        return False
    count = len(set(vocab) | {t.get("content") for t in data.get("added_tokens", [])})
    for model in config.referenced_models:
        own = inputs.folder(model) / "tokenizer.json"
        if inputs.vocab_size(model) != count:
            return False
        if own.is_file() and own.read_bytes() != text:  # e.g. other padding settings: compare the ids
            theirs = json.loads(own.read_bytes())
            if (theirs.get("model") or {}).get("vocab") != vocab or _added(theirs) != _added(data):
                return False
        if not own.is_file() and any((inputs.folder(model) / f).is_file() for f in TOKENIZER_FILES):
            return False  # another tokenizer format: compared by the full path
    return True


def _added(tokenizer_json: dict[str, Any]) -> list[tuple[Any, Any]]:
    return sorted((t.get("content"), t.get("id")) for t in tokenizer_json.get("added_tokens", []))


def _build_vocabulary(config: MergeConfig, inputs: MergeInputs) -> Vocabulary | None:
    if config.tokenizer is None:
        return None
    models = config.referenced_models
    base = config.base_model or models[0]
    if _one_tokenizer(config, inputs, base):
        return None
    source = config.tokenizer.source
    return build_vocabulary(
        source,
        base,
        models,
        {m: inputs.folder(m) for m in models},
        {m: inputs.vocab_size(m) for m in models},
        config.tokenizer.tokens,
        config.tokenizer.pad_to_multiple_of,
        config.trust_remote_code,
    )


def _producer(
    config: MergeConfig,
    inputs: MergeInputs,
    tensor: OutputTensor,
    dtype: torch.dtype,
    merged: bool,
    vocabulary: Vocabulary | None,
    values: tuple[list[dict[str, Any]], dict[str, Any]],
) -> Any:
    read_dtype = DTYPES[config.input_dtype] if config.input_dtype else torch.float32

    def produce() -> torch.Tensor:
        if not merged:  # copied: from the base when it is an input, else from the first input
            source = next((i for i in tensor.inputs if i.model == tensor.base), tensor.inputs[0])
            return inputs.checkpoint(source.model).tensor(source.name).to(dtype)
        # mergekit reads inputs in `dtype` (when given); the arithmetic is fp32.
        read = {i.model: inputs.checkpoint(i.model).tensor(i.name, read_dtype) for i in tensor.inputs}
        if vocabulary is not None and _is_vocab(inputs, tensor):
            read = vocabulary.align(read)
        read = {m: t.to(torch.float32) for m, t in read.items()}
        base = read[tensor.base] if tensor.base is not None else None
        experts = [read[e.model] for e in tensor.experts]
        model_values, global_values = values
        result = config.method.merge(
            base, experts, model_values, global_values, tensor_generator(config.seed, tensor.name)
        )
        return result.to(dtype)

    return produce


def _read_config(config: MergeConfig | Mapping[str, Any] | str | os.PathLike, console: Any) -> MergeConfig:
    """The typed config (parsed from a mapping or read from a file), its warnings printed."""
    if isinstance(config, MergeConfig):
        pass
    elif isinstance(config, Mapping):
        config = parse_merge_config(config)
    else:
        config = load_merge_config(config)
    for warning in config.warnings:
        console.print(f"[yellow]warning[/yellow]: {config.path}: {warning}", highlight=False, soft_wrap=True)
    return config


def _plan_writes(
    config: MergeConfig,
    inputs: MergeInputs,
    plan: list[OutputTensor],
    vocabulary: Vocabulary | None,
    out_dtype: torch.dtype,
) -> tuple[list[PlannedTensor], int, set[str]]:
    """Every output tensor's shape, dtype and producer, with its values checked; the merged count and experts."""
    planned, merged_count, experts = [], 0, set()
    checked: set[str] = set()
    for tensor in plan:
        stored = inputs.checkpoint(tensor.inputs[0].model).dtype(tensor.inputs[0].name)
        merged = stored.is_floating_point and _is_selected(inputs.pool, tensor.name)
        values = _values(config, tensor)
        if merged:
            merged_count += 1
            experts.update(e.model for e in tensor.experts)
            key = repr(values)
            if key not in checked:  # each distinct set of values once, on a one-element merge
                checked.add(key)
                dry_run(
                    config.method, *values, f"{config.path} (tensor '{tensor.name}')", tensor.base is not None
                )
        dtype = out_dtype if stored.is_floating_point else stored
        shape = _shape(inputs, tensor, vocabulary)
        produce = _producer(config, inputs, tensor, dtype, merged, vocabulary, values)
        planned.append(PlannedTensor(tensor.name, shape, dtype, produce))
    return planned, merged_count, experts


def _write_weights(
    target: Path, planned: list[PlannedTensor], max_shard: int, console: Any, progress: bool
) -> int:
    """Stream every tensor into the shards, with a progress bar; the number of shards."""
    with tensor_progress(console, progress) as bar:
        task = bar.add_task("merging", total=len(planned), tensor="")
        written = write_safetensors(
            target,
            planned,
            max_shard,
            on_start=lambda name: bar.update(task, tensor=name),
            on_written=lambda name: bar.advance(task),
        )
    return written.num_shards


def run_merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike,
    out: str | os.PathLike | None = None,
    force: bool = False,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_SIZE,
    console: Any = None,
    progress: bool = True,
) -> MergeSummary:
    """Merge the config's models into the Hugging Face model folder `out` (or the config's `output_dir`).

    Everything is validated (config, output folder, model compatibility, every tensor's inputs and parameter
    values) before any tensor is read; the output appears only when complete.
    """
    from transformers import AutoConfig  # noqa: F401 - imported before the memory baseline, not counted in it

    from expertmerge.console import make_console

    started = time.perf_counter()
    merge_only = reset_peak_rss()
    start_rss = current_rss_bytes()
    console = console or make_console()
    config = _read_config(config, console)
    out = out if out is not None else config.output_dir
    if out is None:
        raise ExpertMergeError(
            f"{config.path}: no output folder; pass --out DIR or set `output_dir` in the config."
        )
    sources = config.referenced_models
    check_output_dir(out, force, inputs=sources)  # cheap checks now; free space once the size is known
    max_shard = shard_limit(max_shard_bytes)

    inputs = open_merge_inputs(config)
    pool = inputs.pool
    plan = plan_tensors(config, inputs.structure, lambda m: inputs.checkpoint(m).names, inputs.num_layers)
    vocabulary = _build_vocabulary(config, inputs)
    out_dtype = DTYPES[config.dtype] if config.dtype else _majority_dtype(pool)
    planned, merged_count, experts = _plan_writes(config, inputs, plan, vocabulary, out_dtype)
    folders = [*sources, *(inputs.folder(m) for m in sources)]
    estimate = sum(t.nbytes for t in planned) + support_bytes(*(f for f in folders if Path(f).is_dir()))
    with atomic_output_dir(out, force, folders, estimate, command="merge") as tmp:
        num_shards = _write_weights(tmp, planned, max_shard, console, progress)
        write_output_config(config, inputs, plan, tmp, out_dtype, vocabulary)
        write_output_tokenizer(config, inputs, tmp, vocabulary)
        # On the finished folder before it is moved into place, so the card can say what it found.
        base_folder = inputs.folder(config.base_model or config.referenced_models[0])
        health = check_folder(tmp, base_folder, (), "", config.trust_remote_code)
        write_merge_record(config, inputs, plan, tmp, out_dtype, health, merged_count, experts)
        output_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    model_bytes = weights_bytes(pool.base_dir)
    pool.close()
    return MergeSummary(
        method=config.merge_method,
        output=Path(out).expanduser(),
        num_experts=len(experts),
        tensors_merged=merged_count,
        tensors_copied=len(planned) - merged_count,
        num_shards=num_shards,
        output_bytes=output_bytes,
        model_bytes=model_bytes,
        wall_seconds=time.perf_counter() - started,
        start_rss_bytes=start_rss,
        peak_rss_bytes=peak_rss_bytes(),
        peak_rss_is_merge_only=merge_only,
        notes=list(pool.notes),
        output_layers=len(output_layers(plan)) if config.slices is not None else None,
        health=health,
    )


def tensor_progress(console: Any, enabled: bool, label: str = "merge") -> Any:
    """The bar of a command that writes tensor by tensor (`merge`, `moe`): count, time, the current tensor."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=console,
        disable=not enabled,
        transient=True,
    )
