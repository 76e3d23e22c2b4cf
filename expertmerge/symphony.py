"""Symphony-MoE: one model from experts that share an architecture and a tokenizer but no base.

The flow (arXiv 2509.18542, with our residual alignment for models from different random inits):

1. `SymphonyPool`: the experts, the first (or the named `reference`) standing in for the base, so the usual
   compatibility checks run (architecture, tied embeddings, vocabulary, tokenizer, tensor names and shapes)
   before any work; only shared ancestry is not asked for. Errors name the expert and the tensor.
2. Alignment (`align`): each expert is mapped into the reference's coordinates (`expertmerge.alignment`: an
   orthogonal rotation of the residual stream, then a permutation of each FFN's units), from one pass over
   the calibration data (`expertmerge.alignment_stats`), one expert in memory at a time. The pool then reads
   every expert tensor aligned, lazily.
3. The shared backbone (`backbone`): layer-aware fusion of the aligned non-FFN tensors: SLERP of the
   attention matrices (the interpolation weight may vary with depth), a linear average of the embeddings,
   norms and head (as the paper).
4. The MoE (`moe`): the aligned experts' FFNs as routed experts, routers initialised from calibration data
   (`expertmerge.moe.router_inputs`) and tuned (`expertmerge.moe.router_tuning`), written by the fused-MoE
   writer (`expertmerge.moe.checkpoint`, atomic). Or a dense model (`dense`): align, then average or SLERP.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from expertmerge.alignment import IDENTITY, Alignment, aligned_tensor, tensor_role
from expertmerge.errors import ExpertMergeError
from expertmerge.methods.spherical import slerp  # the registry's (mergekit's) slerp
from expertmerge.moe.formats import split_dense_names
from expertmerge.moe.forward import expert_ffn, moe_forward
from expertmerge.pool import BASE, ExpertPool

_LAYER = re.compile(r"layers\.(\d+)\.")
_SLERP_ROLES = ("qkv", "qkv_bias", "o")  # attention: SLERP; everything else shared: linear average


# ------------------------------------------------------------------------------------------------ maths
def layer_weight(t: float | Sequence[float], layer: int | None, layers: int) -> float:
    """The interpolation weight of `layer`: `t`, or a gradient over depth (mergekit-style list, linearly
    interpolated from layer 0 to the last); tensors outside the layers take the gradient's mean."""
    if isinstance(t, (int, float)):
        return float(t)
    points = [float(v) for v in t]
    if not points:
        raise ExpertMergeError("backbone t must be a number or a non-empty list of numbers")
    if layer is None:
        return sum(points) / len(points)
    if len(points) == 1 or layers == 1:
        return points[0]
    where = layer / (layers - 1) * (len(points) - 1)
    low = min(int(where), len(points) - 2)
    return points[low] + (where - low) * (points[low + 1] - points[low])


def fuse(tensors: Sequence[torch.Tensor], t: float, spherical: bool) -> torch.Tensor:
    """The reference (first) at weight `1 - t`, the others sharing `t` equally: one SLERP (or lerp) per
    other expert, each step's weight chosen so the shares come out exactly so (two experts: plain SLERP)."""
    if len(tensors) == 1:
        return tensors[0]
    others = len(tensors) - 1
    own, share = 1.0 - t, t / others
    merged = tensors[0]
    for k, tensor in enumerate(tensors[1:]):
        step = share / (own + (k + 1) * share)  # of the k + 2 tensors fused so far, this one's share
        merged = slerp(step, merged, tensor) if spherical else (1 - step) * merged + step * tensor
    return merged


# ------------------------------------------------------------------------------------------------ pool
class SymphonyPool(ExpertPool):
    """Experts with no common base: the reference expert stands in for the base; tensors read aligned.

    `alignments[name]` (default identity) is applied to every tensor `expert_tensor` returns, so the MoE
    writer and the dense merge read the aligned experts lazily, one tensor at a time.
    """

    def __init__(self, experts: Mapping[str, str], reference: str | None = None, **options: Any) -> None:
        if not experts:
            raise ExpertMergeError("symphony: `experts` is empty; name at least two expert models.")
        if BASE in experts:
            raise ExpertMergeError(f"symphony: no expert may be named '{BASE}'; rename it.")
        reference = reference or next(iter(experts))
        if reference not in experts:
            raise ExpertMergeError(
                f"symphony: reference '{reference}' is not one of the experts ({', '.join(experts)})."
            )
        super().__init__(experts[reference], dict(experts), **options)
        self.reference = reference
        self._base_expert = reference  # the reference is the base: the same folder and weights by design
        self.alignments: dict[str, Alignment] = {}

    def label(self, model: str) -> str:
        if model == BASE:
            return f"reference expert '{self.reference}' ({self.base_source})"
        return super().label(model)

    def validate(self) -> SymphonyPool:
        try:
            super().validate()
        except ExpertMergeError as error:  # the pool's messages speak of a base; here it is the reference
            message = (
                str(error).replace("the base's", "the reference's").replace("the base ", "the reference ")
            )
            raise ExpertMergeError(
                message.replace("fine-tunes of the reference", "of the reference's")
            ) from None
        if self.config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ExpertMergeError(
                f"{self.label(BASE)}: model_type '{self.config.model_type}' cannot be aligned yet "
                "(Llama-style decoders only: llama, mistral, qwen2, qwen3)."
            )
        return self

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def expert_tensor(self, expert: str, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        alignment = self.alignments.get(expert, IDENTITY)
        if alignment.is_identity:
            return super().expert_tensor(expert, name, dtype)
        raw = super().expert_tensor
        tensor = aligned_tensor(name, lambda n: raw(expert, n, torch.float32), alignment, tied=self.tied)
        return tensor.to(dtype or self.stored_dtype(name))

    def base_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.expert_tensor(self.reference, name, dtype)  # the reference, aligned like the others

    @torch.no_grad()
    def load_model(self, model: str = BASE) -> torch.nn.Module:
        """The base (the reference) or an expert, as aligned now: its folder's model with every parameter
        replaced by the aligned tensor (no copy of the aligned weights is written anywhere)."""
        expert = self.reference if model == BASE else model
        loaded = super().load_model(model)
        keys = self.parameter_keys(loaded)
        for name, parameter in loaded.named_parameters():
            parameter.copy_(self.expert_tensor(expert, keys[name], torch.float32))
        return loaded


# ------------------------------------------------------------------------------------------- backbone
def _fused(
    pool: SymphonyPool,
    names: Sequence[str],
    t: float | Sequence[float] | None,
    spherical: Callable[[str, torch.Tensor], bool],
) -> dict[str, torch.Tensor]:
    """`names` fused over the aligned experts (reference first): by SLERP where `spherical(name, tensor)`,
    else linearly; `t` the others' total weight (default: equal shares), or a gradient over depth."""
    experts = [pool.reference, *(e for e in pool.expert_names if e != pool.reference)]
    weight = (len(experts) - 1) / len(experts) if t is None else t
    layers = split_dense_names(pool.tensor_names).num_layers
    out = {}
    for name in names:
        tensors = [pool.expert_tensor(e, name, torch.float32) for e in experts]
        if not tensors[0].is_floating_point():
            out[name] = tensors[0]
            continue
        match = _LAYER.search(name)
        step = layer_weight(weight, int(match[1]) if match else None, layers)
        out[name] = fuse(tensors, step, spherical(name, tensors[0]))
    return out


def backbone(
    pool: SymphonyPool, t: float | Sequence[float] | None = None, method: str = "slerp"
) -> dict[str, torch.Tensor]:
    """The shared (non-FFN) tensors of the aligned experts, fused: attention by SLERP (`method: slerp`) or
    linearly (`average`); embeddings, norms and head linearly. (`learned`: `expertmerge.symphony_learned`.)"""
    if method not in ("slerp", "average"):
        raise ExpertMergeError(f"backbone method '{method}' is not one of slerp, average.")
    return _fused(
        pool,
        split_dense_names(pool.tensor_names).shared,
        t,
        lambda name, _: method == "slerp" and tensor_role(name) in _SLERP_ROLES,
    )


def dense(
    pool: SymphonyPool, t: float | Sequence[float] | None = None, method: str = "average"
) -> dict[str, torch.Tensor]:
    """A dense model of the aligned experts: every tensor fused (FFNs too) like the backbone's attention
    (`slerp`) or linearly (`average`)."""
    if method not in ("slerp", "average"):
        raise ExpertMergeError(f"dense method '{method}' is not one of slerp, average.")
    return _fused(pool, pool.tensor_names, t, lambda _, tensor: method == "slerp" and tensor.dim() >= 2)


def write_dense_folder(
    pool: SymphonyPool, folder: Path, tensor: Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]
) -> Path:
    """A dense model of the pool's architecture into `folder` (created): every tensor from `tensor` (a mapping
    or a function of the name, read one at a time), written by the one writer in the stored dtypes, with the
    reference's config and tokenizer."""
    from expertmerge.io.support import copy_support_files, write_config
    from expertmerge.io.writer import PlannedTensor, write_safetensors

    read = tensor.__getitem__ if isinstance(tensor, Mapping) else tensor
    folder.mkdir(parents=True, exist_ok=True)
    planned = [
        PlannedTensor(
            name,
            pool.shape(name),
            pool.stored_dtype(name),
            lambda name=name: read(name).detach().to(pool.stored_dtype(name)),
        )
        for name in pool.tensor_names
    ]
    write_safetensors(folder, planned)
    write_config(pool.base_dir, folder, pool.stored_dtype(pool.tensor_names[0]))
    copy_support_files(pool.base_dir, folder, pool.trust_remote_code)
    return folder


def dense_model(pool: SymphonyPool, tensors: Mapping[str, torch.Tensor]) -> Any:
    """An fp32 `transformers` model of the pool's architecture holding `tensors` (eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(pool.config, dtype=torch.float32).eval()
    keys = pool.parameter_keys(model)
    state = {param: tensors[key] for param, key in keys.items()}
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------------------- alignment
Batch = tuple[torch.Tensor, torch.Tensor]


def align(
    pool: SymphonyPool,
    batches: Sequence[Batch],
    *,
    residual: bool = True,
    ffn: bool = True,
    heads: bool = False,
    load: Callable[[str], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Align every expert of `pool` to its reference on `batches` (sets `pool.alignments`); returns, per
    expert, how alike the coordinates were before and after (see `alignment_to_reference`)."""
    from expertmerge.alignment_stats import alignment_to_reference, model_activations

    load = load or (lambda name: _load_original(pool, name))
    pool.alignments = {}
    reference = model_activations(load(pool.reference), batches, heads=heads)
    reports = {}
    for name in pool.expert_names:
        if name == pool.reference:
            continue
        model = load(name)  # one expert in memory at a time
        pool.alignments[name], reports[name] = alignment_to_reference(
            reference, model, batches, residual=residual, ffn=ffn, heads=heads
        )
        del model
    if residual:  # the reference's norms are folded too, so the backbone's norms are all ones
        hidden = int(pool.config.hidden_size)
        pool.alignments[pool.reference] = Alignment(residual=torch.eye(hidden))
    return reports


def _load_original(pool: SymphonyPool, name: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(pool.expert_dirs[name]), dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ MoE
def router_rows(
    pool: SymphonyPool,
    shared: Mapping[str, torch.Tensor],
    batches_per_expert: Sequence[Mapping[str, Sequence[Batch]]],
    method: str = "hidden",
    seed: int = 0,
) -> torch.Tensor:
    """Initial `[layers, experts, hidden]` router rows: what each expert's tokens look like at every router,
    run through the shared backbone with that expert's own (aligned) FFN."""
    from expertmerge.moe.router_inputs import initial_router_rows

    ffns = [expert_ffn(pool, name) for name in pool.expert_names]
    model = dense_model(pool, {**shared, **ffns[0]})
    return initial_router_rows(
        method,
        model,
        batches_per_expert,
        forward=moe_forward(model, ffns, pool),
        names=pool.expert_names,
        seed=seed,
    )


def write_moe(
    pool: SymphonyPool,
    out: str | Path,
    shared: Mapping[str, torch.Tensor],
    routers: torch.Tensor,
    *,
    top_k: int = 2,
    router_method: str = "hidden",
    force: bool = False,
    card: Mapping[str, object] | None = None,
) -> Any:
    """Write the MoE through the fused-MoE writer (atomic folder, merge card); returns its summary."""
    from expertmerge.moe.checkpoint import write_moe_checkpoint

    return write_moe_checkpoint(
        pool,
        out,
        shared,
        routers,
        top_k=min(top_k, len(pool.expert_names)),
        router_method=router_method,
        force=force,
        card_parameters={"symphony_reference": pool.reference, **(card or {})},
    )


def tuned_router_rows(
    pool: SymphonyPool,
    shared: Mapping[str, torch.Tensor],
    routers: torch.Tensor,
    batches: Any,
    targets: Mapping[tuple[str, str], Any],
    task_names: Sequence[str],
    *,
    top_k: int = 2,
    steps: int = 50,
    lr: float = 0.01,
    balance: float = 0.01,
    progress: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Router rows after `tune_router` (only the gates train, against each task's own expert): the MoE is
    written once to a scratch folder by the same writer and loaded, so what is tuned is what is exported."""
    from transformers import AutoModelForCausalLM

    from expertmerge.moe.router_tuning import gate_parameters, tune_router

    with tempfile.TemporaryDirectory(prefix="symphony-router-") as scratch:
        write_moe(pool, Path(scratch) / "moe", shared, routers, top_k=top_k, router_method="scratch")
        model = AutoModelForCausalLM.from_pretrained(Path(scratch) / "moe", dtype=torch.float32)
    losses = tune_router(
        model, batches, targets, task_names, steps=steps, lr=lr, balance=balance, progress=progress
    )
    gates = gate_parameters(model)
    ordered = sorted(gates, key=lambda n: int(_LAYER.search(n)[1]))
    return torch.stack([gates[n].detach().float() for n in ordered]), losses
