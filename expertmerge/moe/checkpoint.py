"""Write a fused MoE checkpoint from an `ExpertPool`, streaming, atomically, loadable by `transformers` as is.

Each expert's FFN (gate/up/down of layer l) becomes routed expert e of layer l, in pool order; the shared tensors
(attention, norms, embeddings, head) come from the caller; routers from the caller (see `expertmerge.moe.router`).
Tensors are read one expert-FFN at a time and appended to the safetensors file as they come, so memory stays near
one FFN matrix whatever the number of experts. The output folder appears only when complete.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.health import HealthCheck, HealthSamples, check_folder
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir, check_output_dir
from expertmerge.io.reader import dtype_name, parse_dtype
from expertmerge.io.support import support_bytes
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE, shard_limit
from expertmerge.moe.formats import (
    QWEN2_MOE,
    ZERO_SHARED_EXPERT_WIDTH,
    DenseLayout,
    MoeFormat,
    build_moe_config,
    moe_format_for,
    split_dense_names,
)
from expertmerge.moe.plan import MoePlan, MoeSources, plan_moe
from expertmerge.moe.router import add_generalist_row
from expertmerge.pool import BASE, ExpertPool

SharedTensors = Callable[[str], torch.Tensor] | Mapping[str, torch.Tensor]
RouterWeights = Mapping[int, torch.Tensor] | torch.Tensor


@dataclass
class MoeExportSummary:
    """What `write_moe_checkpoint` wrote."""

    output: Path
    format: str
    architecture: str
    routed_experts: list[
        str
    ]  # routed expert e of every layer is the FFN of routed_experts[e] ("base": the base)
    shared_expert: str | None  # Qwen2-MoE: "base" or "zero"; None for formats without one
    top_k: int
    router_method: str
    num_shards: int
    output_bytes: int
    notes: list[str] = field(default_factory=list)
    health: HealthCheck | None = None  # the output's perplexity against the base's (`expertmerge.health`)


def expert_shared_tensors(pool: ExpertPool, model: str) -> Callable[[str], torch.Tensor]:
    """Shared tensors taken from one model of the pool (an expert's name, or `"base"`)."""
    if model == BASE:
        return pool.base_tensor
    if model not in pool.expert_names:
        raise ExpertMergeError(f"Unknown expert '{model}'; experts are {pool.expert_names}.")
    return lambda name: pool.expert_tensor(model, name)


def shared_tensor_names(pool: ExpertPool) -> list[str]:
    """The dense tensors an MoE export takes from `shared_tensors` (all but the FFNs), in model order."""
    return split_dense_names(pool.tensor_names).shared


def _router_rows(
    router_weights: RouterWeights,
    num_layers: int,
    num_routed: int,
    num_experts: int,
    hidden: int,
    generalist: bool,
) -> list[torch.Tensor]:
    """One `[num_routed, hidden]` fp32 matrix per layer; a missing generalist row is the experts' mean row."""
    if isinstance(router_weights, torch.Tensor):
        if router_weights.dim() != 3 or router_weights.shape[0] != num_layers:
            raise ExpertMergeError(
                f"router_weights must be [layers={num_layers}, experts, hidden={hidden}], got {list(router_weights.shape)}."
            )
        per_layer = {layer: router_weights[layer] for layer in range(num_layers)}
    else:
        per_layer = dict(router_weights)
        if sorted(per_layer) != list(range(num_layers)):
            raise ExpertMergeError(
                f"router_weights must have one matrix per layer 0..{num_layers - 1}, got layers {sorted(per_layer)}."
            )
    rows = []
    for layer in range(num_layers):
        matrix = torch.as_tensor(per_layer[layer]).detach().to("cpu", torch.float32)
        if matrix.dim() != 2 or matrix.shape[1] != hidden or matrix.shape[0] not in (num_experts, num_routed):
            allowed = f"{num_routed}" if num_routed == num_experts else f"{num_experts} or {num_routed}"
            raise ExpertMergeError(
                f"router_weights[{layer}] must be [{allowed}, {hidden}] (one row per routed expert), "
                f"got {list(matrix.shape)}."
            )
        if not torch.isfinite(matrix).all():
            raise ExpertMergeError(f"router_weights[{layer}] holds NaN or Inf.")
        if generalist and matrix.shape[0] == num_experts:
            matrix = add_generalist_row(matrix[None])[0]
        rows.append(matrix)
    return rows


@dataclass
class _Export:
    """What a fused MoE export of a pool is: its format and dtype, its routed experts and its shared expert."""

    fmt: MoeFormat
    layout: DenseLayout
    dtype: torch.dtype
    include_base: bool
    routed: list[str]  # pool names of the routed experts, in expert order ("base": the base's FFN)
    base_as_shared: bool  # Qwen2-MoE: the base's FFN is the shared expert
    shared_weight: float
    shared_width: int | None  # Qwen2-MoE's shared expert width; None without one

    @property
    def routed_scale(self) -> float:
        return 1.0 - self.shared_weight if self.base_as_shared else 1.0

    @property
    def shared_description(self) -> str | None:
        if self.base_as_shared:
            return "base"
        return "zero" if self.fmt is QWEN2_MOE else None


def _export(
    pool: ExpertPool, include_base_expert: bool, shared_expert_weight: float, dtype: torch.dtype | str | None
) -> _Export:
    fmt: MoeFormat = moe_format_for(getattr(pool.config, "model_type", None))
    layout = split_dense_names(pool.tensor_names)
    first_gate = layout.ffn[0]["gate"]
    out_dtype = pool.stored_dtype(first_gate) if dtype is None else parse_dtype(dtype)
    intermediate = pool.shape(first_gate)[0]
    base_as_shared = include_base_expert and fmt.shared_expert
    routed: list[str] = list(pool.expert_names) + (
        [BASE] if include_base_expert and not fmt.shared_expert else []
    )
    if base_as_shared and not 0.0 < float(shared_expert_weight) < 1.0:
        raise ExpertMergeError(
            f"shared_expert_weight must be between 0 and 1 (exclusive), got {shared_expert_weight}."
        )
    shared_width = None
    if fmt.shared_expert:
        shared_width = intermediate if base_as_shared else min(intermediate, ZERO_SHARED_EXPERT_WIDTH)
    return _Export(
        fmt,
        layout,
        out_dtype,
        include_base_expert,
        routed,
        base_as_shared,
        float(shared_expert_weight),
        shared_width,
    )


def _shared_source(
    shared_tensors: SharedTensors, pool: ExpertPool, names: list[str]
) -> Callable[[str], torch.Tensor]:
    """The shared tensors by name; a mapping's names and shapes are checked now, before any writing."""
    if isinstance(shared_tensors, Mapping):
        missing = [name for name in names if name not in shared_tensors]
        if missing:
            shown = ", ".join(f"'{n}'" for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ExpertMergeError(f"shared_tensors lacks {len(missing)} shared tensor(s): {shown}.")
        for name in names:
            if tuple(shared_tensors[name].shape) != pool.shape(name):
                raise ExpertMergeError(
                    f"shared_tensors['{name}'] has shape {list(shared_tensors[name].shape)}, the model's is "
                    f"{list(pool.shape(name))}."
                )
        get_shared: Callable[[str], torch.Tensor] = shared_tensors.__getitem__
    elif callable(shared_tensors):
        get_shared = shared_tensors
    else:
        raise ExpertMergeError(
            "shared_tensors must be a mapping {name: tensor} or a function name -> tensor."
        )

    def shared(name: str) -> torch.Tensor:
        tensor = torch.as_tensor(get_shared(name)).detach().cpu()
        if tuple(tensor.shape) != pool.shape(name):
            raise ExpertMergeError(
                f"shared tensor '{name}' has shape {list(tensor.shape)}, the model's is {list(pool.shape(name))}."
            )
        return tensor

    return shared


def _sources(
    pool: ExpertPool,
    spec: _Export,
    shared: Callable[[str], torch.Tensor],
    routers: list[torch.Tensor],
    hidden: int,
) -> MoeSources:
    """The values: FFNs read in fp32, scaled (Qwen2-MoE with the base as shared expert), cast to the output dtype."""

    def ffn(model: str, name: str, scale: float = 1.0) -> torch.Tensor:
        tensor = (
            pool.base_tensor(name, torch.float32)
            if model == BASE
            else pool.expert_tensor(model, name, torch.float32)
        )
        return (tensor if scale == 1.0 else tensor * scale).to(spec.dtype)

    def routed_ffn(expert: int, projection: str, name: str) -> torch.Tensor:
        model = spec.routed[expert]
        return ffn(model, name, spec.routed_scale if projection == "down" and model != BASE else 1.0)

    def shared_ffn(projection: str, name: str, shape: tuple[int, int]) -> torch.Tensor:
        if not spec.base_as_shared:
            return torch.zeros(shape, dtype=spec.dtype)  # no shared expert: adds exactly 0
        return ffn(BASE, name, 2.0 * spec.shared_weight if projection == "down" else 1.0)

    return MoeSources(
        shared=shared,
        routed_ffn=routed_ffn,
        router=lambda layer: routers[layer].to(spec.dtype),
        shared_ffn=shared_ffn,
        shared_expert_gate=lambda layer: torch.zeros((1, hidden), dtype=spec.dtype),
    )


def _plan(
    pool: ExpertPool,
    spec: _Export,
    top_k: int,
    shared_tensors: SharedTensors,
    router_weights: RouterWeights,
) -> MoePlan:
    """The output's config and tensors, checked (routers, shared tensors, layout) before any writing."""
    layout = spec.layout
    config = build_moe_config(pool.config, len(spec.routed), top_k, shared_expert_size=spec.shared_width)
    config.dtype = spec.dtype
    hidden = pool.shape(layout.ffn[0]["gate"])[1]
    generalist = spec.include_base and not spec.fmt.shared_expert
    count = len(pool.expert_names)
    routers = _router_rows(router_weights, layout.num_layers, len(spec.routed), count, hidden, generalist)
    shared = _shared_source(shared_tensors, pool, layout.shared)
    plan = plan_moe(
        pool,
        layout,
        spec.fmt,
        config,
        _sources(pool, spec, shared, routers, hidden),
        dtype=spec.dtype,
        num_routed=len(spec.routed),
        shared_names=layout.shared,
        shared_width=spec.shared_width,
    )
    # What we plan must be exactly what the installed transformers builds for this config.
    mismatch = plan.mismatch()
    if mismatch is not None:
        import transformers

        raise ExpertMergeError(
            f"The {spec.fmt.architecture} layout of the installed transformers {transformers.__version__} differs "
            f"from what expertmerge writes (fused 3-D experts, transformers 5.x): {mismatch}."
        )
    return plan


def write_moe_checkpoint(
    pool: ExpertPool,
    out: str | Path,
    shared_tensors: SharedTensors,
    router_weights: RouterWeights,
    *,
    top_k: int = 2,
    include_base_expert: bool = False,
    shared_expert_weight: float = 0.5,
    router_method: str = "unspecified",
    force: bool = False,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    card_parameters: Mapping[str, object] | None = None,
    health_samples: HealthSamples | None = None,
    force_flag: str = "--force",
) -> MoeExportSummary:
    """Write the fused MoE of `pool`'s experts to the model folder `out`, which `AutoModelForCausalLM` loads as is.

    Args:
        pool: base + experts; the format follows the base's `model_type` (see `expertmerge.moe.formats`).
        out: the output folder; refused if it exists unless `force`. Written to a temporary sibling and renamed
            into place only when complete.
        shared_tensors: every non-FFN dense tensor (`shared_tensor_names(pool)`), by name: a mapping or a function
            (e.g. a learned merge, or `expert_shared_tensors(pool, "alpha")`). Other names in a mapping are ignored.
        router_weights: `[layers, R, hidden]` or `{layer: [R, hidden]}`, row e for routed expert e. R is the number
            of experts, plus one when the base FFN is a routed expert (Mixtral/Qwen3 with `include_base_expert`);
            there, R - 1 rows are accepted too and the base's row is the mean of the others (`add_generalist_row`: its
            logit is the experts' mean logit on every token).
        top_k: routed experts per token (their weights renormalised to sum to 1).
        include_base_expert: add the base FFN as a generalist: Mixtral/Qwen3: one more routed expert (the last);
            Qwen2-MoE: the shared expert.
        shared_expert_weight: Qwen2-MoE with the base as shared expert only: w in (0, 1). The block then computes
            `w * base_ffn(x) + (1 - w) * sum_k p_k expert_k(x)` with `sum_k p_k = 1`: the shared-expert gate row is
            zero (sigmoid(0) = 1/2 for every token), the shared `down_proj` is the base's times 2w, and each routed
            `down_proj` is the expert's times (1 - w). The default 1/2 scales by exactly 1 and 1/2 (exact in binary
            floating point). Without the base, Qwen2-MoE's shared expert is all zeros and adds exactly 0.
        router_method: how the routers were made (`hidden`, `cheap_embed`, `random`, `tuned`, ...), for the card.
        dtype: output dtype of floating tensors (default: the base's stored FFN dtype).
        card_parameters: extra entries for the merge card's parameters (e.g. how the shared tensors were merged).
        health_samples: the texts of the health check (`expertmerge.health`; default its built-in texts).
        force_flag: how the calling command spells `force`, for the refusal messages (`fit`: `--export.force true`).
    """
    inputs = [pool.base_source, *pool.expert_sources.values()]
    out = check_output_dir(out, force, inputs, force_flag=force_flag)
    max_shard = shard_limit(max_shard_size)
    pool.validate()
    spec = _export(pool, include_base_expert, shared_expert_weight, dtype)
    plan = _plan(pool, spec, top_k, shared_tensors, router_weights)
    layout = spec.layout
    notes = [f"ignored dense tensor '{name}' (not part of the MoE model)" for name in layout.ignored]
    inputs += [pool.base_dir, *pool.expert_dirs.values()]
    estimate = plan.nbytes + support_bytes(pool.base_dir)
    with atomic_output_dir(out, force, inputs, estimate, command="moe", force_flag=force_flag) as tmp:
        total = plan.write(tmp, max_shard, pool.base_dir).num_shards
        health = check_folder(tmp, pool.base_dir, samples=health_samples)
        _write_card(tmp, pool, spec, top_k, router_method, card_parameters, health, notes)
        output_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    return MoeExportSummary(
        output=out,
        format=spec.fmt.name,
        architecture=spec.fmt.architecture,
        routed_experts=spec.routed,
        shared_expert=spec.shared_description,
        top_k=top_k,
        router_method=router_method,
        num_shards=total,
        output_bytes=output_bytes,
        notes=notes,
        health=health,
    )


def _write_card(
    folder: Path,
    pool: ExpertPool,
    spec: _Export,
    top_k: int,
    router_method: str,
    card_parameters: Mapping[str, object] | None,
    health: HealthCheck,
    notes: list[str],
) -> None:
    fmt, routed = spec.fmt, spec.routed
    parameters: dict[str, object] = {
        "format": fmt.name,
        "architecture": fmt.architecture,
        "source_model_type": pool.config.model_type,
        "router_method": router_method,
        "top_k": top_k,
        "norm_topk_prob": True,
        "routed_experts": routed,
        "include_base_expert": spec.include_base,
        "dtype": dtype_name(spec.dtype),
    }
    if fmt.shared_expert:
        parameters["shared_expert"] = spec.shared_description
        if spec.base_as_shared:
            parameters["shared_expert_weight"] = spec.shared_weight
    parameters.update(card_parameters or {})
    hashes = pool.content_hashes()
    experts = list(pool.expert_names)
    shared = f"\n- shared expert: {'the base FFN' if spec.base_as_shared else 'zeros (contributes nothing)'}"
    write_merge_card(
        folder,
        title=f"Fused MoE ({fmt.architecture}) of {len(experts)} expert(s)",
        method=f"moe:{fmt.name}",
        base=(pool.base_source, hashes[BASE]),
        experts={name: (pool.expert_sources[name], hashes[name]) for name in experts},
        parameters=parameters,
        sections={
            "Experts": "\n".join(
                f"- routed expert {index}: FFN of {'the base model' if name == BASE else f'expert `{name}`'}"
                for index, name in enumerate(routed)
            )
            + (shared if fmt.shared_expert else ""),
            "Routing": f"Router initialisation `{router_method}`, top-{top_k} of {len(routed)} routed experts, "
            "top-k weights renormalised to sum to 1.",
            "Health check": health.card_section(),
            **({"Notes": "\n".join(f"- {note}" for note in notes)} if notes else {}),
        },
    )
