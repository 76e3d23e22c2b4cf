"""Teacher targets: each expert runs once over its own tasks' calibration samples; the results are cached.

The official Expert Merging code runs every expert live at every step, keeping all of them in memory. Here
each expert is loaded once, its targets (chosen hidden layers, top-k logits + log-sum-exp or full logits,
and its own next-token NLL for perplexity) are written to the cache, and the expert is freed before the next.
An expert whose targets are all cached is never loaded. `teacher_targets` is the one entry point: the
learned merge (and so the fused MoE), the sequence MoE and `evaluate` all get their targets from it.

A cache entry is keyed by the expert's content hash, the tokenized data, the target settings, the attention
implementation and the torch / transformers versions (both change the numbers an expert produces).
"""

from __future__ import annotations

import gc
import hashlib
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from expertmerge.errors import ExpertMergeError
from expertmerge.hashing import json_hash, model_content_hash
from expertmerge.losses import next_token_nll
from expertmerge.paths import cache_dir
from expertmerge.pool import BASE  # = calib_data.tasks.BASE_TEACHER: a task's `expert: base`

_FORWARDS = [0]  # teacher forward passes (batches) in this process: the sweep shows it reuses targets
CACHE_FORMAT = 3  # 2: entries carry a checksum of their tensors; 3: the key names attention and versions


@dataclass(frozen=True)
class TeacherSettings:
    hidden_layers: tuple[int, ...]  # indices into `hidden_states` (0 = embeddings output)
    logit_topk: int | None = 64  # None: store the full logits
    temperature: float = 1.0
    batch_size: int = 8
    # None: transformers' default for the model, which the library versions in the key pin down.
    attn_implementation: str | None = None


@dataclass
class TeacherTargets:
    """One (task, split)'s targets, row-aligned with the datamodule's `task_samples(task, split)`."""

    tensors: dict[str, torch.Tensor]

    def rows(
        self, sample_index: torch.Tensor, length: int, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """The targets of the given samples, cut to the batch's padded length."""
        index = sample_index.cpu()
        return {k: v[index, :length].to(device) for k, v in self.tensors.items()}


def cache_key(expert_hash: str, data_fingerprint: str, settings: TeacherSettings) -> str:
    import transformers

    fields = asdict(settings)
    fields.pop("batch_size")  # does not change the targets
    fields["attn_implementation"] = settings.attn_implementation or "default"
    return json_hash(
        {
            "format": CACHE_FORMAT,
            "expert": expert_hash,
            "data": data_fingerprint,
            "settings": fields,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
    )


def _cache_file(key: str, folder: str = "teachers") -> Path:
    return cache_dir() / folder / f"{key}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes: catches damage the file format cannot see."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_cached(key: str, folder: str = "teachers") -> TeacherTargets | None:
    """The cached targets, or None when absent or unreadable (a crash mid-write or a damaged file).

    `folder`: the cache's subfolder (`answers` keeps the expert-written answers the same way)."""
    path = _cache_file(key, folder)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") != key:
                raise ValueError("key mismatch")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        if metadata.get("checksum") != _checksum(tensors):
            raise ValueError("checksum mismatch")
        return TeacherTargets(tensors)
    except Exception as error:  # a damaged entry is recomputed, never trusted
        warnings.warn(
            f"Ignoring damaged {'teacher' if folder == 'teachers' else folder} cache entry {path} ({error}); "
            "it will be recomputed.",
            stacklevel=2,
        )
        return None


def save_cached(key: str, targets: TeacherTargets, folder: str = "teachers") -> None:
    """Written to a temporary name and renamed: readers see the old entry or the complete new one."""
    path = _cache_file(key, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tensors = {k: v.contiguous() for k, v in targets.tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={"key": key, "checksum": _checksum(tensors)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def compute_targets(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: TeacherSettings
) -> TeacherTargets:
    """Run `model` over padded samples [n, L] in batches and collect the targets."""
    model.eval()
    device = next(model.parameters()).device
    n, length = input_ids.shape
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, settings.batch_size):
        ids = input_ids[start : start + settings.batch_size]
        mask = attention_mask[start : start + settings.batch_size]
        used = int(mask.sum(1).max())
        _FORWARDS[0] += 1
        out = model(
            input_ids=ids[:, :used].to(device),
            attention_mask=mask[:, :used].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        logits = out.logits.float()
        parts: dict[str, torch.Tensor] = {}
        for layer in settings.hidden_layers:
            parts[f"hidden.{layer}"] = out.hidden_states[layer].float()
        if settings.logit_topk is None:
            parts["logits"] = logits
        else:
            k = min(settings.logit_topk, logits.shape[-1])
            values, indices = logits.topk(k, dim=-1)
            parts["topk_values"] = values
            parts["topk_indices"] = indices.to(torch.int32)
            parts["logsumexp"] = torch.logsumexp(logits / settings.temperature, dim=-1)
        nll, _ = next_token_nll(logits, ids[:, :used].to(device), mask[:, :used].to(device))
        parts["nll"] = torch.nn.functional.pad(nll, (0, 1))  # aligned with positions; last has no next token
        for name, value in parts.items():
            pad = [0, 0] * (value.dim() - 2) + [0, length - used]
            chunks.setdefault(name, []).append(torch.nn.functional.pad(value.cpu(), pad))
    return TeacherTargets({name: torch.cat(parts) for name, parts in chunks.items()})


@torch.no_grad()
def mean_next_token_nll(model: nn.Module, samples: Any, batch_size: int = 8) -> float:
    """A model's mean next-token NLL (nats per token, padding excluded) over padded samples
    (`input_ids` / `attention_mask` [n, L]), in batches."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for start in range(0, samples.input_ids.shape[0], max(1, batch_size)):
        mask = samples.attention_mask[start : start + batch_size]
        used = int(mask.sum(1).max())
        ids = samples.input_ids[start : start + batch_size, :used].to(device)
        mask = mask[:, :used].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        nll, target_mask = next_token_nll(logits, ids, mask)
        total += float((nll * target_mask).sum())
        count += float(target_mask.sum())
    return total / max(count, 1.0)


def teacher_forwards() -> int:
    """How many teacher batches this process has run through a model so far (cache hits run none)."""
    return _FORWARDS[0]


def teacher_dirs(
    base_dir: str | os.PathLike, expert_dirs: Mapping[str, str | os.PathLike], tasks: Sequence[Any]
) -> dict[str, str | os.PathLike]:
    """The teachers of `tasks` for `teacher_targets`: the experts' folders, plus the base's under the name `base`
    when a task names it (`expert: base`). The base is then one more teacher: loaded once, fresh from its folder
    (never the fit's model, whose untrained tensors already hold the alpha0 merge), cached like an expert."""
    dirs = dict(expert_dirs)
    if any(task.expert == BASE for task in tasks):
        dirs[BASE] = base_dir
    return dirs


@dataclass
class TeacherStats:
    computed: int = 0
    reused: int = 0


def load_teacher(
    folder: str | os.PathLike, settings: TeacherSettings, trust_remote_code: bool = False
) -> nn.Module:
    """An expert as a teacher: fp32, eval mode, the attention implementation the cache key names."""
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if settings.attn_implementation is not None:
        options["attn_implementation"] = settings.attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(folder), **options).eval()


def _check_finite(targets: TeacherTargets, attention_mask: torch.Tensor, expert: str, task: str) -> None:
    """A broken expert gives NaN/Inf targets: refuse them (at real tokens) instead of caching them."""
    real = attention_mask.bool()
    for name, tensor in targets.tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor[real]).all():
            raise ExpertMergeError(
                f"expert '{expert}' gives non-finite teacher targets ('{name}') on task '{task}'; "
                "its weights are broken (NaN/Inf) or it overflows: re-export it or leave it out."
            )


def teacher_targets(
    datamodule: Any,
    expert_dirs: Mapping[str, str | os.PathLike],
    settings: TeacherSettings,
    splits: Sequence[str] = ("train", "eval"),
    expert_hashes: Mapping[str, str] | None = None,
    trust_remote_code: bool = False,
) -> tuple[dict[tuple[str, str], TeacherTargets], TeacherStats]:
    """Targets of every (task, split) from the task's own expert, one expert in memory at a time.

    `expert_dirs` names the teachers (`teacher_dirs` adds the base for `expert: base` tasks).
    `datamodule` is set up (its tasks name their experts; `task_samples` and `fingerprint` give each split's
    padded samples and their hash). Experts are visited in `expert_dirs` order; an expert is loaded only if
    one of its entries misses the cache, and then computes exactly those entries. Cached entries are read
    back verified (key and checksum); a damaged one is recomputed. `expert_hashes` (content hashes of the
    expert folders) are computed when not given.
    """
    experts_of = {spec.name: spec.expert for spec in datamodule.tasks}
    hashes = dict(expert_hashes or {})
    results: dict[tuple[str, str], TeacherTargets] = {}
    stats = TeacherStats()
    with Progress(transient=True) as progress:
        bar = progress.add_task("teacher targets", total=len(expert_dirs))
        for expert, folder in expert_dirs.items():
            progress.update(bar, description=f"teacher targets: {expert}")
            entries = [(t, s) for t in datamodule.task_names if experts_of[t] == expert for s in splits]
            if entries and expert not in hashes:
                hashes[expert] = model_content_hash(folder)
            missing = []
            for task, split in entries:
                key = cache_key(hashes[expert], datamodule.fingerprint(task, split), settings)
                cached = load_cached(key)
                if cached is None:
                    missing.append((task, split, key))
                else:
                    results[(task, split)] = cached
                    stats.reused += 1
            if missing:
                model = load_teacher(folder, settings, trust_remote_code)
                for task, split, key in missing:
                    samples = datamodule.task_samples(task, split)
                    targets = compute_targets(model, samples.input_ids, samples.attention_mask, settings)
                    _check_finite(targets, samples.attention_mask, expert, task)
                    save_cached(key, targets)
                    results[(task, split)] = targets
                    stats.computed += 1
                del model
                gc.collect()
            progress.advance(bar)
    return results, stats
