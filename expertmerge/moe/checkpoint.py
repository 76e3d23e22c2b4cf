"""Write a fused MoE checkpoint from an `ExpertPool`, streaming, atomically, loadable by `transformers` as is.

Each expert's FFN (gate/up/down of layer l) becomes routed expert e of layer l, in pool order; the shared tensors
(attention, norms, embeddings, head) come from the caller; routers from the caller (see `expertmerge.moe.router`).
Tensors are read one expert-FFN at a time and appended to the safetensors file as they come, so memory stays near
one FFN matrix whatever the number of experts. The output folder appears only when complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.health import HealthCheck, HealthSamples, check_folder
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir, check_output_dir
from expertmerge.io.reader import dtype_name, parse_dtype
from expertmerge.io.support import copy_support_files, support_bytes
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE, PlannedTensor, shard_limit, write_safetensors
from expertmerge.moe.formats import (
    QWEN2_MOE,
    ZERO_SHARED_EXPERT_WIDTH,
    MoeFormat,
    build_moe_config,
    expected_tensors,
    moe_format_for,
    moe_layer_names,
    split_dense_names,
)
from expertmerge.moe.router import add_generalist_row
from expertmerge.pool import BASE, ExpertPool, natural_key

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
    fmt: MoeFormat = moe_format_for(getattr(pool.config, "model_type", None))
    layout = split_dense_names(pool.tensor_names)
    first_ffn = layout.ffn[0]
    out_dtype = pool.stored_dtype(first_ffn["gate"]) if dtype is None else parse_dtype(dtype)
    intermediate, hidden = pool.shape(first_ffn["gate"])

    experts = list(pool.expert_names)
    base_as_shared = include_base_expert and fmt.shared_expert
    routed: list[str] = experts + ([BASE] if include_base_expert and not fmt.shared_expert else [])
    if base_as_shared and not 0.0 < float(shared_expert_weight) < 1.0:
        raise ExpertMergeError(
            f"shared_expert_weight must be between 0 and 1 (exclusive), got {shared_expert_weight}."
        )
    routed_scale = 1.0 - float(shared_expert_weight) if base_as_shared else 1.0
    shared_width = None
    if fmt.shared_expert:
        shared_width = intermediate if base_as_shared else min(intermediate, ZERO_SHARED_EXPERT_WIDTH)
    config = build_moe_config(pool.config, len(routed), top_k, shared_expert_size=shared_width)
    config.dtype = out_dtype
    routers = _router_rows(
        router_weights,
        layout.num_layers,
        len(routed),
        len(experts),
        hidden,
        generalist=include_base_expert and not fmt.shared_expert,
    )

    # The shared tensors: check names (and, for a mapping, shapes) before any writing.
    if isinstance(shared_tensors, Mapping):
        missing = [name for name in layout.shared if name not in shared_tensors]
        if missing:
            shown = ", ".join(f"'{n}'" for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ExpertMergeError(f"shared_tensors lacks {len(missing)} shared tensor(s): {shown}.")
        for name in layout.shared:
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

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor

    def shared_parts(name: str) -> Callable[[], Iterator[torch.Tensor]]:
        def parts() -> Iterator[torch.Tensor]:
            tensor = torch.as_tensor(get_shared(name)).detach().cpu()
            if tuple(tensor.shape) != pool.shape(name):
                raise ExpertMergeError(
                    f"shared tensor '{name}' has shape {list(tensor.shape)}, the model's is {list(pool.shape(name))}."
                )
            yield cast(tensor)

        return parts

    def ffn(model: str, name: str, scale: float = 1.0) -> torch.Tensor:
        tensor = (
            pool.base_tensor(name, torch.float32)
            if model == BASE
            else pool.expert_tensor(model, name, torch.float32)
        )
        return (tensor if scale == 1.0 else tensor * scale).to(out_dtype)

    entries: list[PlannedTensor] = []
    shared_dtype = {
        name: out_dtype if pool.stored_dtype(name).is_floating_point else pool.stored_dtype(name)
        for name in layout.shared
    }
    for name in layout.shared:
        entries.append(PlannedTensor(name, pool.shape(name), shared_dtype[name], shared_parts(name)))
    for layer, projections in layout.ffn.items():
        names = moe_layer_names(fmt, layout.mlp_prefix[layer])

        def gate_up(projections: dict[str, str] = projections) -> Iterator[torch.Tensor]:
            for model in routed:
                yield ffn(model, projections["gate"])
                yield ffn(model, projections["up"])

        def down(projections: dict[str, str] = projections) -> Iterator[torch.Tensor]:
            for model in routed:
                yield ffn(model, projections["down"], routed_scale if model != BASE else 1.0)

        def router(matrix: torch.Tensor = routers[layer]) -> Iterator[torch.Tensor]:
            yield matrix.to(out_dtype)

        count = len(routed)
        entries += [
            PlannedTensor(names.router, (count, hidden), out_dtype, router),
            PlannedTensor(names.gate_up, (count, 2 * intermediate, hidden), out_dtype, gate_up),
            PlannedTensor(names.down, (count, hidden, intermediate), out_dtype, down),
        ]
        if fmt.shared_expert:
            width = shared_width or intermediate

            def shared_ffn(
                projection: str, shape: tuple[int, int], projections: dict[str, str] = projections
            ) -> Callable[[], Iterator[torch.Tensor]]:
                def parts() -> Iterator[torch.Tensor]:
                    if base_as_shared:
                        scale = 2.0 * float(shared_expert_weight) if projection == "down" else 1.0
                        yield ffn(BASE, projections[projection], scale)
                    else:
                        yield torch.zeros(shape, dtype=out_dtype)

                return parts

            def shared_gate() -> Iterator[torch.Tensor]:
                yield torch.zeros((1, hidden), dtype=out_dtype)

            entries += [
                PlannedTensor(
                    names.shared_gate, (width, hidden), out_dtype, shared_ffn("gate", (width, hidden))
                ),
                PlannedTensor(names.shared_up, (width, hidden), out_dtype, shared_ffn("up", (width, hidden))),
                PlannedTensor(
                    names.shared_down, (hidden, width), out_dtype, shared_ffn("down", (hidden, width))
                ),
                PlannedTensor(names.shared_expert_gate, (1, hidden), out_dtype, shared_gate),
            ]
    entries.sort(key=lambda entry: natural_key(entry.name))

    # What we plan must be exactly what the installed transformers builds for this config.
    expected = expected_tensors(config)
    planned = {entry.name: entry.shape for entry in entries}
    unexpected = sorted(set(planned) - set(expected), key=natural_key)
    lacking = sorted(set(expected) - set(planned), key=natural_key)
    wrong = [n for n in planned if n in expected and tuple(expected[n]) != tuple(planned[n])]
    if unexpected or lacking or wrong:
        import transformers

        raise ExpertMergeError(
            f"The {fmt.architecture} layout of the installed transformers {transformers.__version__} differs from "
            f"what expertmerge writes (fused 3-D experts, transformers 5.x): unexpected {unexpected[:4]}, "
            f"missing {lacking[:4]}, wrong shape {[(n, planned[n], expected[n]) for n in wrong[:4]]}."
        )

    notes = [f"ignored dense tensor '{name}' (not part of the MoE model)" for name in layout.ignored]
    if base_as_shared:
        shared_description = "base"
    elif fmt is QWEN2_MOE:
        shared_description = "zero"
    else:
        shared_description = None
    hashes = pool.content_hashes()
    inputs += [pool.base_dir, *pool.expert_dirs.values()]
    estimate = sum(entry.nbytes for entry in entries) + support_bytes(pool.base_dir)
    with atomic_output_dir(out, force, inputs, estimate, command="moe", force_flag=force_flag) as tmp:
        total = write_safetensors(tmp, entries, max_shard).num_shards
        config.save_pretrained(tmp)
        copy_support_files(pool.base_dir, tmp)
        health = check_folder(tmp, pool.base_dir, samples=health_samples)
        parameters: dict[str, object] = {
            "format": fmt.name,
            "architecture": fmt.architecture,
            "source_model_type": pool.config.model_type,
            "router_method": router_method,
            "top_k": top_k,
            "norm_topk_prob": True,
            "routed_experts": routed,
            "include_base_expert": include_base_expert,
            "dtype": dtype_name(out_dtype),
        }
        if fmt.shared_expert:
            parameters["shared_expert"] = shared_description
            if base_as_shared:
                parameters["shared_expert_weight"] = float(shared_expert_weight)
        parameters.update(card_parameters or {})
        write_merge_card(
            tmp,
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
                + (
                    f"\n- shared expert: {'the base FFN' if base_as_shared else 'zeros (contributes nothing)'}"
                    if fmt.shared_expert
                    else ""
                ),
                "Routing": f"Router initialisation `{router_method}`, top-{top_k} of {len(routed)} routed experts, "
                "top-k weights renormalised to sum to 1.",
                "Health check": health.card_section(),
                **({"Notes": "\n".join(f"- {note}" for note in notes)} if notes else {}),
            },
        )
        output_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    return MoeExportSummary(
        output=out,
        format=fmt.name,
        architecture=fmt.architecture,
        routed_experts=routed,
        shared_expert=shared_description,
        top_k=top_k,
        router_method=router_method,
        num_shards=total,
        output_bytes=output_bytes,
        notes=notes,
        health=health,
    )
