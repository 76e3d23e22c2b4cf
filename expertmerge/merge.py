"""`python -m expertmerge merge`: a training-free merge from a mergekit-style YAML, streamed tensor by tensor.

The config is mergekit's format for the methods we have, so an existing mergekit config runs unchanged:

```yaml
merge_method: ties                 # average | task_arithmetic | ties | dare_linear | dare_ties
base_model: path/or/org-name       # needed by every method but `average`
models:
  - model: path/to/expert_a
    parameters: {weight: 1.0, density: 0.5}
parameters: {normalize: true, lambda: 1.0, rescale: true, int8_mask: false, weight: 1.0, density: 1.0}
dtype: bfloat16                    # output dtype; default: the base's stored dtype
tokenizer_source: base             # only `base` (the merged model keeps the base's tokenizer)
random_seed: 0                     # DARE's drop masks (`seed` is accepted too)
```

Our additions: `include` / `exclude` (regular expressions choosing the merged tensors; the others are copied
from the base; default: all floating-point tensors are merged), `trust_remote_code` (default false) and
`output_dir` (used when `--out` is not given). Global `parameters.weight` / `parameters.density` are the default
for models that do not set them, as in mergekit. Arithmetic is done in fp32 whatever `dtype` says, then cast.

What mergekit accepts and we do not (`slices`, per-tensor parameter filters and layer gradients such as
`weight: [0.1, 0.5]`, tokenizer unions, chat templates, LoRA `model+lora` sources) is refused with an error
naming the key, before any work, rather than merged differently.

Streaming: the output's shards are planned from the base's tensor shapes, each shard's safetensors header is
written first, and then every tensor is merged and appended as soon as it is computed; only the current
tensor of each model is in memory, never a model or a shard.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from expertmerge.errors import ExpertMergeError
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir, check_output_dir
from expertmerge.io.reader import DTYPE_ALIASES as _DTYPE_ALIASES
from expertmerge.io.reader import DTYPES, dtype_name, weights_bytes
from expertmerge.io.support import copy_support_files, write_config
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE, PlannedTensor, shard_limit, write_safetensors
from expertmerge.paths import ZOO_SCHEME
from expertmerge.pool import BASE, ExpertPool, looks_like_hub_id

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "random_seed",
    "seed",
    "include",
    "exclude",
    "trust_remote_code",
    "output_dir",
)
MODEL_KEYS = ("model", "parameters")
MODEL_PARAMETER_KEYS = ("weight", "density")
GLOBAL_PARAMETER_KEYS = ("normalize", "lambda", "rescale", "int8_mask", *MODEL_PARAMETER_KEYS)

# mergekit keys with no equivalent here, and what to do instead.
_UNSUPPORTED = {
    "slices": "slice-wise merges (frankenmerges, layer ranges) are not supported; use `models:` to merge whole "
    "models, and `include`/`exclude` to choose tensors",
    "chat_template": "chat templates are not rewritten; the base's tokenizer files (and template) are copied",
    "modules": "module-wise (multimodal) configs are not supported; merge the text model with `models:`",
    "architecture": "architecture-agnostic merges are not supported; experts must share the base's architecture",
}


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelEntry:
    """One `models[]` entry: a source (folder, `zoo://`, hub id) and its per-model parameters."""

    source: str
    weight: float = 1.0
    density: float = 1.0


@dataclass
class MergeConfig:
    """A validated merge config. `path` is where it was read from (for messages); `raw` is the YAML as given."""

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    normalize: bool | None = None  # parse_merge_config fills in the method's default (mergekit's)
    lambda_: float = 1.0
    rescale: bool | None = None  # likewise
    int8_mask: bool = False
    dtype: str | None = None  # None: the base's stored dtype
    tokenizer_source: str = "base"
    seed: int = 0
    include: list[str] | None = None
    exclude: list[str] | None = None
    trust_remote_code: bool = False
    output_dir: str | None = None
    path: str = "<config>"
    raw: dict[str, Any] = field(default_factory=dict)

    def to_mergekit_yaml(self) -> str:
        """The resolved config (defaults written out) in the same format, so the merge can be re-run."""
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            data["base_model"] = self.base_model
        data["models"] = [
            {"model": m.source, "parameters": {"weight": m.weight, "density": m.density}} for m in self.models
        ]
        parameters: dict[str, Any] = {"lambda": self.lambda_, "int8_mask": self.int8_mask}
        if self.normalize is not None:
            parameters["normalize"] = self.normalize
        if self.rescale is not None:
            parameters["rescale"] = self.rescale
        data["parameters"] = parameters
        if self.dtype is not None:
            data["dtype"] = self.dtype
        data["tokenizer_source"] = self.tokenizer_source
        data["random_seed"] = self.seed
        if self.include is not None:
            data["include"] = list(self.include)
        if self.exclude is not None:
            data["exclude"] = list(self.exclude)
        if self.trust_remote_code:
            data["trust_remote_code"] = True
        return yaml.safe_dump(data, sort_keys=False)


class _Reader:
    """Reads typed values out of the raw YAML, naming the file and the key in every error."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> ExpertMergeError:
        return ExpertMergeError(f"{self.path}: key '{key}': {message}")

    def check_keys(self, mapping: Mapping[str, Any], known: Sequence[str], where: str) -> None:
        for key in mapping:
            full = f"{where}.{key}" if where else str(key)
            if key in _UNSUPPORTED:
                raise self.fail(full, f"not supported: {_UNSUPPORTED[key]}.")
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise self.fail(full, f"unknown key.{hint} Known keys here: {', '.join(known)}.")

    def number(self, value: Any, key: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(value, list):
            raise self.fail(
                key,
                f"a list ({value}) is a mergekit gradient over layers, which is not supported; give one number "
                "(or use `include`/`exclude` and separate merges for different tensor groups).",
            )
        if isinstance(value, dict):
            raise self.fail(
                key,
                "per-tensor values (`filter:` / `value:`) are not supported; give one number per model "
                "(or use `include`/`exclude` and separate merges for different tensor groups).",
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {value!r}.")
        value = float(value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(key, f"{value} is out of range [{low}, {high}].")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if isinstance(value, list | dict):
            self.number(value, key)  # same message for gradients / filters
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}.")
        return value

    def integer(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}.")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}.")
        return value

    def patterns(self, value: Any, key: str) -> list[str] | None:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise self.fail(key, f"expected a list of regular expressions, got {value!r}.")
        for pattern in items:
            try:
                re.compile(pattern)
            except re.error as error:
                raise self.fail(key, f"'{pattern}' is not a valid regular expression ({error}).") from error
        return list(items)

    def source(self, value: Any, key: str) -> str:
        source = self.text(value, key)
        if source.startswith(ZOO_SCHEME) or Path(os.path.expanduser(source)).exists():
            return source
        if "+" in source:
            raise self.fail(
                key,
                f"'{source}': LoRA sources (`model+lora`) are not supported; merge the adapter into its model first.",
            )
        if looks_like_hub_id(source):
            return source  # passed through to the hub when the pool opens it
        raise self.fail(key, f"'{source}' is not an existing folder (nor a hub id like 'org/name').")


def _get_method(name: str, reader: _Reader) -> Any:
    from expertmerge import methods

    try:
        return methods.get_method(name)
    except ExpertMergeError as error:
        raise reader.fail("merge_method", str(error)) from error


def _check_method_parameters(method: Any, config: MergeConfig, reader: _Reader) -> None:
    """Parameters the method would refuse (or silently ignore) are config errors, named by key, found now."""
    from expertmerge import methods

    for i, entry in enumerate(config.models):
        if entry.density != 1 and not method.uses_density:
            raise reader.fail(
                f"models[{i}].parameters.density",
                f"density {entry.density} has no effect with '{method.name}'; remove it, or use ties, "
                "dare_linear or dare_ties to sparsify task vectors.",
            )
    if not method.needs_base and config.lambda_ != 1:
        raise reader.fail(
            "parameters.lambda", f"lambda scales task vectors; '{method.name}' has none. Remove it."
        )
    # Anything else the method refuses shows up on a one-element dry run, before any model is opened.
    try:
        methods.merge_tensor(
            method,
            torch.zeros(1),
            [torch.zeros(1) for _ in config.models],
            [methods.ExpertParams(weight=e.weight, density=e.density) for e in config.models],
            methods.MethodParams(
                normalize=config.normalize,
                lambda_=config.lambda_,
                rescale=config.rescale,
                int8_mask=config.int8_mask,
            ),
            methods.tensor_generator(config.seed, "dry-run"),
        )
    except ExpertMergeError as error:
        raise ExpertMergeError(f"{reader.path}: {error}") from error


def parse_merge_config(data: Any, path: str = "<config>") -> MergeConfig:
    """Validate a config given as a mapping (already read from YAML); every error names `path` and the key."""
    reader = _Reader(path)
    if not isinstance(data, Mapping):
        raise ExpertMergeError(
            f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}."
        )
    reader.check_keys(data, TOP_LEVEL_KEYS, "")
    if "merge_method" not in data:
        raise reader.fail("merge_method", "missing; say which method to use, e.g. `merge_method: ties`.")
    method_name = reader.text(data["merge_method"], "merge_method")
    method = _get_method(method_name, reader)

    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise reader.fail("parameters", f"expected a mapping, got {parameters!r}.")
    reader.check_keys(parameters, GLOBAL_PARAMETER_KEYS, "parameters")
    default_weight = reader.number(parameters.get("weight", 1.0), "parameters.weight")
    default_density = reader.number(parameters.get("density", 1.0), "parameters.density", 0.0, 1.0)

    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise reader.fail("models", "expected a non-empty list of `- model: <path>` entries.")
    models: list[ModelEntry] = []
    for i, entry in enumerate(models_raw):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping):
            raise reader.fail(key, f"expected `model: <path>` (and optional `parameters:`), got {entry!r}.")
        reader.check_keys(entry, MODEL_KEYS, key)
        if "model" not in entry:
            raise reader.fail(
                f"{key}.model", "missing; give the expert's folder, zoo:// reference or hub id."
            )
        source = reader.source(entry["model"], f"{key}.model")
        model_parameters = entry.get("parameters") or {}
        if not isinstance(model_parameters, Mapping):
            raise reader.fail(f"{key}.parameters", f"expected a mapping, got {model_parameters!r}.")
        reader.check_keys(model_parameters, MODEL_PARAMETER_KEYS, f"{key}.parameters")
        weight = reader.number(model_parameters.get("weight", default_weight), f"{key}.parameters.weight")
        density = reader.number(
            model_parameters.get("density", default_density), f"{key}.parameters.density", 0.0, 1.0
        )
        if density == 0.0:
            raise reader.fail(f"{key}.parameters.density", "0 would drop the whole task vector; use (0, 1].")
        models.append(ModelEntry(source, weight, density))
    sources = [m.source for m in models]
    for i, source in enumerate(sources):
        if sources.index(source) != i:
            raise reader.fail(
                f"models[{i}].model",
                f"'{source}' is listed twice (first as models[{sources.index(source)}]).",
            )

    base_model = data.get("base_model")
    if base_model is not None:
        base_model = reader.source(base_model, "base_model")
    if base_model is None and getattr(method, "needs_base", True):
        raise reader.fail(
            "base_model",
            f"missing; '{method_name}' works on task vectors (model - base), so it needs a base model.",
        )

    dtype = None
    for key in ("dtype", "out_dtype"):  # mergekit: out_dtype (output) overrides dtype; we compute in fp32
        if data.get(key) is not None:
            name = reader.text(data[key], key).lower()
            name = _DTYPE_ALIASES.get(name, name)
            if name not in DTYPES:
                raise reader.fail(key, f"'{data[key]}' is not one of {', '.join(DTYPES)}.")
            dtype = name

    tokenizer_source = "base"
    if data.get("tokenizer_source") is not None:
        tokenizer_source = reader.text(data["tokenizer_source"], "tokenizer_source")
    if data.get("tokenizer") is not None:
        tokenizer = data["tokenizer"]
        if not isinstance(tokenizer, Mapping):
            raise reader.fail("tokenizer", f"expected a mapping like `source: base`, got {tokenizer!r}.")
        unsupported = sorted(set(tokenizer) - {"source"})
        if unsupported:
            raise reader.fail(
                f"tokenizer.{unsupported[0]}", "not supported; only `tokenizer: {source: base}` is."
            )
        tokenizer_source = reader.text(tokenizer.get("source", "base"), "tokenizer.source")
    if tokenizer_source != "base":
        key = "tokenizer.source" if data.get("tokenizer") is not None else "tokenizer_source"
        raise reader.fail(
            key,
            f"'{tokenizer_source}' is not supported; only `base` is (experts must share the base's vocabulary, "
            "and the merged model keeps the base's tokenizer). Remove the key or set it to `base`.",
        )

    seeds = {
        key: reader.integer(data[key], key) for key in ("random_seed", "seed") if data.get(key) is not None
    }
    if len(set(seeds.values())) > 1:
        raise reader.fail(
            "seed", f"random_seed={seeds['random_seed']} and seed={seeds['seed']} disagree; give one."
        )

    output_dir = data.get("output_dir")
    config = MergeConfig(
        merge_method=method.name,
        models=models,
        base_model=base_model,
        normalize=method.default_normalize
        if parameters.get("normalize") is None
        else reader.boolean(parameters["normalize"], "parameters.normalize"),
        lambda_=reader.number(parameters.get("lambda", 1.0), "parameters.lambda"),
        rescale=method.default_rescale
        if parameters.get("rescale") is None
        else reader.boolean(parameters["rescale"], "parameters.rescale"),
        int8_mask=reader.boolean(parameters.get("int8_mask", False), "parameters.int8_mask"),
        dtype=dtype,
        tokenizer_source=tokenizer_source,
        seed=next(iter(seeds.values()), 0),
        include=reader.patterns(data.get("include"), "include"),
        exclude=reader.patterns(data.get("exclude"), "exclude"),
        trust_remote_code=reader.boolean(data.get("trust_remote_code", False), "trust_remote_code"),
        output_dir=None if output_dir is None else reader.text(output_dir, "output_dir"),
        path=path,
        raw=dict(data),
    )
    _check_method_parameters(method, config, reader)
    return config


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a merge YAML; relative model paths are taken as given (relative to the cwd)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ExpertMergeError(f"Cannot read merge config '{path}': {error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ExpertMergeError(f"{path}: not valid YAML: {error}") from error
    return parse_merge_config(data, str(path))


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


def _merge_one(
    pool: ExpertPool, name: str, method: Any, expert_params: list, method_params: Any, seed: int
) -> torch.Tensor:
    """One merged tensor; only this tensor of each model is in memory (read in fp32, computed in fp32)."""
    from expertmerge import methods

    base = pool.base_tensor(name, torch.float32) if method.needs_base else None
    experts = [pool.expert_tensor(expert, name, torch.float32) for expert in pool.expert_names]
    return methods.merge_tensor(
        method, base, experts, expert_params, method_params, methods.tensor_generator(seed, name)
    )


def _make_pool(config: MergeConfig, method: Any) -> tuple[ExpertPool, list[ModelEntry]]:
    """The pool and the entries that act as experts (mergekit's rules for the base model)."""
    entries = list(config.models)
    if config.base_model is None:
        # `average` without a base: the first model gives the structure, config and tokenizer.
        base = entries[0].source
    else:
        base = config.base_model
        if getattr(method, "needs_base", True):
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

    from expertmerge import methods

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
    sources = [config.base_model, *(m.source for m in config.models)]
    check_output_dir(out, force, inputs=sources)  # cheap checks now; free space once the size is known
    max_shard = shard_limit(max_shard_bytes)

    method = methods.get_method(config.merge_method)
    pool, entries = _make_pool(config, method)
    pool.validate()
    out_dtype = DTYPES[config.dtype] if config.dtype else _majority_dtype(pool)
    merged = set(pool.merged_names)
    expert_params = [methods.ExpertParams(weight=e.weight, density=e.density) for e in entries]
    method_params = methods.MethodParams(
        normalize=config.normalize, lambda_=config.lambda_, rescale=config.rescale, int8_mask=config.int8_mask
    )

    def produce(name: str, dtype: torch.dtype) -> Any:
        def tensor() -> torch.Tensor:
            if name in merged:
                result = _merge_one(pool, name, method, expert_params, method_params, config.seed)
            else:
                result = pool.base_tensor(name)
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
                "normalize": config.normalize,
                "lambda": config.lambda_,
                "rescale": config.rescale,
                "int8_mask": config.int8_mask,
                "models": {
                    name: dataclasses.asdict(e) for name, e in zip(pool.expert_names, entries, strict=True)
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
