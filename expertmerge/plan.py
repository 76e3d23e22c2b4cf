"""A memory planner: what a fit and a merge need per device, from a model's `config.json` alone.

The model is built on the meta device (`from_config` under `torch.device("meta")`: shapes, no weights), so a
user can plan for a 70B model that is not downloaded. Each estimate is a sum of named parts, in bytes:

- `base`: the base model's parameters in fp32 (the fit loads it so; the coefficient maths is fp32), the
  learned tensors in `model.base_dtype` (bf16 halves them);
- `task vectors`: tau[k, p] of the learned tensors in `task_vector_dtype` on the device: all N experts
  (resident), or the two largest neighbouring decoder layers (streamed; the rest waits in host memory or on
  disk), or a 1/D share plus two gathered layers (FSDP, which shards the learned tensors' base the same way);
- `merged tensors`: one fp32 copy of the learned tensors, built once per step and held through backward;
- `activations`: what autograd saves for backward in a Llama-style decoder, per token and layer
  `4 h + 2 A + 2 KV + 4 I + heads + 2` fp32 values (h hidden, A = heads x head_dim, KV = kv_heads x head_dim,
  I intermediate): each RMSNorm's input and output and its reciprocal RMS; attention's query and output,
  k and v, the log-sum-exp; the MLP's gate, up, act(gate) and product. Frozen weights save no inputs. Fitted
  to autograd's own saved tensors (`torch.autograd.graph.saved_tensors_hooks`) and checked in the tests;
- `loss over the logits`: logits, their log-softmax and the gradient, `3 x batch x length x vocab` fp32;
- `teacher pass` (host memory, during the set-up: the teachers run on the CPU before the fit): the base and
  one expert in fp32, their no-grad logits, and the task vectors when they are held in memory;
- `training-free merge`: tensor by tensor, the largest tensor of the base and N experts in fp32 plus the
  method's workspace (about three more copies).

What it does not model: allocator fragmentation and caching (a CUDA run reserves more than it allocates), the
CUDA context (~0.5 GB per device), and bf16 autocast (which halves activations).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from expertmerge.errors import ExpertMergeError
from expertmerge.io.layout import meta_model
from expertmerge.io.model_config import ffn_width, layer_count, routed_expert_count, text_config, vocab_size
from expertmerge.losses import aligned_hidden_layers

STRATEGIES = ("resident", "streamed", "fsdp")
_LAYER = re.compile(r"\.(\d+)\.")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GB = 10**9


@dataclass
class Estimate:
    """Bytes per device of one strategy, by part; `total` is the fit step's peak."""

    parts: dict[str, int] = field(default_factory=dict)
    teacher_pass: int = 0  # host memory during the set-up (teachers run on the CPU, before the fit)
    training_free_merge: int = 0
    host: int = 0  # what the strategy keeps off the device (host memory or disk)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        """What the device must hold: the fit step, or a training-free merge run on it."""
        return max(self.total, self.training_free_merge)


def read_config(path: str | Path) -> Any:
    """A `transformers` config from a `config.json` or a folder holding one."""
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ExpertMergeError(f"plan: no config.json at '{path}'; give a model folder or its config.json.")
    try:
        return AutoConfig.from_pretrained(str(file.parent))
    except (ValueError, KeyError, OSError) as error:
        raise ExpertMergeError(f"plan: cannot read '{file}': {error}") from error


def _bytes(tensors: Sequence[torch.Tensor], size: int) -> int:
    return sum(t.numel() for t in tensors) * size


def activation_bytes(config: Any, batch_size: int, seq_len: int) -> int:
    """Saved-for-backward bytes of one fit forward (fp32), by the per-token count in the module docstring."""
    # Standard attribute names: each family's config class maps its own keys (GPT-2's n_embd) to them.
    config = text_config(config)
    hidden = int(config.hidden_size)
    inter = ffn_width(config, hidden)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    layers = layer_count(config, "plan")
    per_layer = 4 * hidden + 2 * heads * head_dim + 2 * kv_heads * head_dim + 4 * inter + heads + 2
    return 4 * batch_size * seq_len * layers * per_layer


def logit_bytes(config: Any, batch_size: int, seq_len: int) -> int:
    return 3 * 4 * batch_size * seq_len * _vocab(config)


def _vocab(config: Any) -> int:
    size = vocab_size(config)
    if size is None:
        raise ExpertMergeError(f"plan: the {type(config).__name__} has no vocab_size.")
    return size


def estimate_fit(
    model: nn.Module,
    num_experts: int,
    learned: Sequence[str],
    batch_size: int,
    seq_len: int,
    logit_topk: int | None = 64,
    hidden_layers: int = 1,
    task_vector_dtype: str = "bfloat16",
    devices: int = 1,
    teacher_batch_size: int | None = None,
    base_dtype: str = "float32",
) -> dict[str, Estimate]:
    """Per-device estimates of a fit of `model` (real or meta) with `num_experts` experts, by strategy."""
    params = dict(model.named_parameters())
    config = model.config
    size = _DTYPE_BYTES[task_vector_dtype]
    learned_tensors = [params[n] for n in learned]
    learned_ids = {id(p) for p in learned_tensors}
    # the learned tensors in `base_dtype` (model.base_dtype), the rest of the base in fp32
    learned_base = _bytes(learned_tensors, _DTYPE_BYTES[base_dtype])
    base = _bytes([p for p in params.values() if id(p) not in learned_ids], 4) + learned_base
    merged = _bytes(learned_tensors, 4)
    vectors = num_experts * _bytes(learned_tensors, size)
    layers: dict[str, int] = {}
    for name in learned:
        match = _LAYER.search(name)
        key = match.group(1) if match else name
        layers[key] = layers.get(key, 0) + params[name].numel()
    sizes = list(layers.values())
    two_layers = max((a + b for a, b in zip(sizes, sizes[1:], strict=False)), default=sum(sizes))
    streamed_vectors = num_experts * two_layers * size
    activations = activation_bytes(config, batch_size, seq_len)
    logits = logit_bytes(config, batch_size, seq_len)
    # targets of the batch: top-k logits + log-sum-exp, and the hidden states aligned by MSE
    topk = logit_topk or _vocab(config)
    targets = batch_size * seq_len * (8 * topk + 4 + 4 * hidden_layers * int(text_config(config).hidden_size))
    teacher = (
        _bytes(list(params.values()), 4)
        + logit_bytes(config, teacher_batch_size or batch_size, seq_len) // 3 * 2
    )
    largest = max(p.numel() for p in params.values())
    training_free = 4 * largest * (num_experts + 4)
    common = {"activations": activations, "loss over the logits": logits, "teacher targets": targets}
    result = {
        "resident": Estimate(
            {"base": base, "task vectors": vectors, "merged tensors": merged, **common},
            teacher_pass=teacher + base + vectors,
            training_free_merge=training_free,
        ),
        "streamed": Estimate(
            {"base": base, "task vectors": streamed_vectors, "merged tensors": merged, **common},
            teacher_pass=teacher + base,
            training_free_merge=training_free,
            host=vectors,
        ),
    }
    # FSDP (`expertmerge/fit/sharding.py`): the learned tensors' base and task vectors are sharded 1/D; up to two
    # decoder layers are gathered in full at a time (the one merging and the one FSDP prefetches); every rank
    # builds all merged tensors and holds the rest of the base (embeddings, norms, lm_head) whole.
    shard = max(1, devices)
    gathered = 2 * max(sizes, default=0)
    result["fsdp"] = Estimate(
        {
            "base": base - learned_base + learned_base // shard + _DTYPE_BYTES[base_dtype] * gathered,
            "task vectors": vectors // shard + num_experts * gathered * size,
            "merged tensors": merged,
            **common,
        },
        teacher_pass=teacher + base + vectors,
        training_free_merge=training_free,
    )
    return result


@dataclass
class PlanInputs:
    """What a plan reads from a fit config (the keys a fit would use)."""

    config: Any
    num_experts: int
    batch_size: int = 8
    seq_len: int = 512
    logit_topk: int | None = 64
    hidden_layers: int = 1
    task_vector_dtype: str = "bfloat16"
    base_dtype: str = "float32"
    teacher_batch_size: int = 8
    learn_include: list[str] | None = None
    learn_exclude: list[str] | None = None
    learn_matrices_only: bool = True
    name: str = ""


def inputs_from_fit_config(path: str | Path, model_config: str | None = None) -> PlanInputs:
    """Read a fit YAML (`model.base`, `model.experts`, `data.batch_size`, `data.max_length`, ...)."""
    from expertmerge.config_file import read_config_file
    from expertmerge.zoo_registry import resolve_path

    raw = read_config_file(path, "plan --config")
    model, data = raw.get("model") or {}, raw.get("data") or {}
    if model_config is None:
        if "base" not in model:
            raise ExpertMergeError(f"plan: '{path}' has no model.base; name it, or pass --model_config.")
        base = str(model["base"])
        folder = Path(base if base.startswith("/") else Path(path).parent / base)
        if not (folder / "config.json").is_file():
            folder = Path(resolve_path(base))
        model_config = str(folder)
    experts = model.get("experts") or {}
    config = read_config(model_config)
    hidden = aligned_hidden_layers(
        model.get("hidden_layers"), float(model.get("mu", 0.0)), layer_count(config, "plan")
    )
    return PlanInputs(
        config=config,
        num_experts=len(experts),
        batch_size=int(data.get("batch_size", 8)),
        seq_len=int(data.get("max_length", 512)),
        logit_topk=model.get("logit_topk", 64),
        hidden_layers=len(hidden),
        task_vector_dtype=str(model.get("task_vector_dtype", "bfloat16")),
        base_dtype=str(model.get("base_dtype", "float32")),
        teacher_batch_size=int(model.get("teacher_batch_size", 8)),
        learn_include=model.get("learn_include"),
        learn_exclude=model.get("learn_exclude"),
        learn_matrices_only=bool(model.get("learn_matrices_only", True)),
        name=str(model_config),
    )


def plan(inputs: PlanInputs, devices: int = 1) -> tuple[nn.Module, list[str], dict[str, Estimate]]:
    """Build the meta model, choose the learned tensors as the fit would, and estimate every strategy."""
    from expertmerge.coefficients import learns_coefficients

    model = meta_model(inputs.config)
    learned = [
        name
        for name, p in model.named_parameters()
        if learns_coefficients(
            name,
            p,
            inputs.learn_include,
            inputs.learn_exclude,
            inputs.learn_matrices_only,
            routed_expert_count(inputs.config),
        )
    ]
    if inputs.num_experts < 1:
        raise ExpertMergeError("plan: the config names no experts (model.experts); pass --experts N.")
    estimates = estimate_fit(
        model,
        inputs.num_experts,
        learned,
        inputs.batch_size,
        inputs.seq_len,
        inputs.logit_topk,
        inputs.hidden_layers,
        inputs.task_vector_dtype,
        devices,
        inputs.teacher_batch_size,
        inputs.base_dtype,
    )
    return model, learned, estimates


def fits(estimate: Estimate, device_memory: int) -> bool:
    return estimate.peak <= device_memory


def describe(model: nn.Module) -> dict[str, Any]:
    config = model.config
    return {
        "type": getattr(config, "model_type", "?"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": layer_count(config, "plan"),
        "hidden": int(text_config(config).hidden_size),
    }


def to_json(estimates: dict[str, Estimate]) -> str:
    return json.dumps(
        {
            name: {
                **e.parts,
                "total": e.total,
                "teacher pass": e.teacher_pass,
                "merge": e.training_free_merge,
            }
            for name, e in estimates.items()
        },
        indent=1,
    )
