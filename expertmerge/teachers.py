"""Teacher targets: each expert runs once over its own tasks' calibration samples; the results are cached.

The official Expert Merging code runs every expert live at every step, keeping all of them in memory. Here
each expert is loaded once, its targets (chosen hidden layers, top-k logits + log-sum-exp or full logits,
and its own next-token NLL for perplexity) are written to the cache, and the expert is freed before the next.
A cache entry is keyed by the expert's content hash, the tokenized data and the target settings.
"""

from __future__ import annotations

import gc
import hashlib
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from expertmerge.hashing import json_hash
from expertmerge.losses import next_token_nll
from expertmerge.paths import cache_dir

CACHE_FORMAT = 2  # 2: entries carry a checksum of their tensors


@dataclass(frozen=True)
class TeacherSettings:
    hidden_layers: tuple[int, ...]  # indices into `hidden_states` (0 = embeddings output)
    logit_topk: int | None = 64  # None: store the full logits
    temperature: float = 1.0
    batch_size: int = 8


@dataclass
class TeacherTargets:
    """One (task, split)'s targets, row-aligned with the datamodule's `task_samples(task, split)`."""

    tensors: dict[str, torch.Tensor]

    @property
    def hidden_layers(self) -> list[int]:
        return sorted(int(k.split(".")[1]) for k in self.tensors if k.startswith("hidden."))

    @property
    def full_logits(self) -> bool:
        return "logits" in self.tensors

    def rows(
        self, sample_index: torch.Tensor, length: int, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """The targets of the given samples, cut to the batch's padded length."""
        index = sample_index.cpu()
        return {k: v[index, :length].to(device) for k, v in self.tensors.items()}

    def top1(self) -> torch.Tensor:
        return self.tensors["logits"].argmax(-1) if self.full_logits else self.tensors["topk_indices"][..., 0]


def cache_key(expert_hash: str, data_fingerprint: str, settings: TeacherSettings) -> str:
    fields = asdict(settings)
    fields.pop("batch_size")  # does not change the targets
    return json_hash(
        {"format": CACHE_FORMAT, "expert": expert_hash, "data": data_fingerprint, "settings": fields}
    )


def _cache_file(key: str) -> Path:
    return cache_dir() / "teachers" / f"{key}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes: catches damage the file format cannot see."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_cached(key: str) -> TeacherTargets | None:
    """The cached targets, or None when absent or unreadable (a crash mid-write or a damaged file)."""
    path = _cache_file(key)
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
            f"Ignoring damaged teacher cache entry {path} ({error}); it will be recomputed.", stacklevel=2
        )
        return None


def save_cached(key: str, targets: TeacherTargets) -> None:
    """Written to a temporary name and renamed: readers see the old entry or the complete new one."""
    path = _cache_file(key)
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


@dataclass
class TeacherJob:
    task: str
    split: str
    expert: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    fingerprint: str


@dataclass
class TeacherStats:
    computed: int = 0
    reused: int = 0


def collect_targets(
    jobs: Sequence[TeacherJob],
    expert_hashes: dict[str, str],
    load_expert: Callable[[str], nn.Module],
    settings: TeacherSettings,
    expert_order: Iterable[str],
    on_expert_loaded: Callable[[str, nn.Module], None] | None = None,
) -> tuple[dict[tuple[str, str], TeacherTargets], TeacherStats]:
    """Targets for every job, one expert in memory at a time.

    An expert is loaded only if one of its jobs misses the cache, or if `on_expert_loaded` needs it (the fit
    reads the expert's weights then, to form its task vector in the same load).
    """
    results: dict[tuple[str, str], TeacherTargets] = {}
    stats = TeacherStats()
    expert_order = list(expert_order)
    with Progress(transient=True) as progress:
        bar = progress.add_task("teacher targets", total=len(expert_order))
        for expert in expert_order:
            progress.update(bar, description=f"teacher targets: {expert}")
            missing = []
            for job in (j for j in jobs if j.expert == expert):
                key = cache_key(expert_hashes[expert], job.fingerprint, settings)
                cached = load_cached(key)
                if cached is None:
                    missing.append((job, key))
                else:
                    results[(job.task, job.split)] = cached
                    stats.reused += 1
            if missing or on_expert_loaded is not None:
                model = load_expert(expert)
                for job, key in missing:
                    targets = compute_targets(model, job.input_ids, job.attention_mask, settings)
                    save_cached(key, targets)
                    results[(job.task, job.split)] = targets
                    stats.computed += 1
                if on_expert_loaded is not None:
                    on_expert_loaded(expert, model)
                del model
                gc.collect()
            progress.advance(bar)
    return results, stats
