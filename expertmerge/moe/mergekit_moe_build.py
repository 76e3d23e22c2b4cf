"""Build the MoE of a mergekit-moe config (`expertmerge.moe.mergekit_moe`) through the one writer, atomically.

Everything that can fail cheaply fails first: the config, the output folder, the models' compatibility, the
output family, and the tensor layout the installed `transformers` expects for the output config. Only then are
the gate rows computed (the one step that may run the base model) and the tensors streamed out, one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.health import HealthCheck, check_folder
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir, check_output_dir
from expertmerge.io.reader import dtype_name, natural_key, parse_dtype
from expertmerge.io.support import copy_support_files, support_bytes
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE, PlannedTensor, shard_limit, write_safetensors
from expertmerge.merge import tensor_progress
from expertmerge.moe.formats import (
    QWEN2_MOE,
    build_moe_config,
    expected_tensors,
    moe_layer_names,
    split_dense_names,
)
from expertmerge.moe.mergekit_moe import (
    CONFIG_COPY,
    MergekitMoeConfig,
    MoeExpert,
    check_moe_config,
    degenerate_layers,
    gate_rows,
    load_moe_config,
    moe_tokenizer,
    select_format,
)
from expertmerge.moe.mergekit_moe_router import fit_router, router_data
from expertmerge.pool import BASE, ExpertPool


@dataclass
class MoeBuildSummary:
    """What `build_mergekit_moe` wrote."""

    output: Path
    format: str
    architecture: str
    experts: list[str]
    shared_expert: str | None
    gate_mode: str
    top_k: int
    dtype: str
    num_tensors: int
    num_shards: int
    output_bytes: int
    wall_seconds: float
    notes: list[str] = field(default_factory=list)
    router: str = ""  # which routers were written ("mergekit's gate_mode hidden", "fitted ..., tuned ...")
    router_kl: dict[str, float] = field(default_factory=dict)  # router -> mean held-out KL to the own expert
    health: HealthCheck | None = None  # the output's perplexity against base_model's (`expertmerge.health`)


def _output_dtype(config: MergekitMoeConfig, pool: ExpertPool, first_ffn: str, source: str) -> torch.dtype:
    """mergekit's `select_dtype`: the config's `dtype`, else the base config's, else the stored FFN dtype."""
    if config.dtype:
        try:
            return parse_dtype(config.dtype)
        except ExpertMergeError as error:
            raise ExpertMergeError(f"{source}: key 'dtype': {error}") from None
    raw = pool.raw_config(BASE)
    stored = raw.get("dtype") or raw.get("torch_dtype")
    try:
        return parse_dtype(stored) if stored else pool.stored_dtype(first_ffn)
    except ExpertMergeError:
        return pool.stored_dtype(first_ffn)


def _noise_and_scale(tensor: torch.Tensor, expert: MoeExpert, residual: bool) -> torch.Tensor:
    """mergekit's `noise_and_scale`, in the stored dtype: Gaussian noise, then `residual_scale` on `down_proj`."""
    if expert.noise_scale is not None:
        tensor = tensor + torch.randn_like(tensor) * expert.noise_scale
    if residual and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def build_mergekit_moe(
    config: MergekitMoeConfig | str | Path,
    out: str | Path,
    *,
    force: bool = False,
    allow_all_same: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    console: Any = None,
    progress: bool = True,
    config_text: str | None = None,
) -> MoeBuildSummary:
    """Write the MoE that `mergekit-moe` writes for `config` (a parsed config or a YAML path) into `out`."""
    started = time.perf_counter()
    source = "config"
    if not isinstance(config, MergekitMoeConfig):
        source = str(config)
        config, config_text = load_moe_config(config, allow_all_same)
    else:
        check_moe_config(config, source, allow_all_same)
    routed = [e.source_model for e in config.experts]
    shared_defs = list(config.shared_experts or [])
    sources = [config.base_model, *routed, *(e.source_model for e in shared_defs)]
    check_output_dir(out, force, inputs=sources)
    max_shard = shard_limit(max_shard_size)

    names = {f"expert{i}": s for i, s in enumerate(routed)}
    names.update({f"shared{j}": e.source_model for j, e in enumerate(shared_defs)})
    donor = BASE
    if config.options.shared_tensors is not None:
        donor = "shared_tensors"  # ours: the non-FFN tensors (and the gates' model) from e.g. a learned merge
        names[donor] = config.options.shared_tensors
        sources.append(config.options.shared_tensors)
    pool = ExpertPool(config.base_model, names, distinct=False)  # mergekit-moe: the base may be an expert
    pool.validate()
    router_calibration = router_data(config, pool.base_dir, source)  # checked before any long work
    model_types = [pool.raw_config(m).get("model_type") for m in (BASE, *names) if m != "shared_tensors"]
    fmt = select_format(config, model_types, source)

    layout = split_dense_names(pool.tensor_names)
    first = layout.ffn[0]
    out_dtype = _output_dtype(config, pool, first["gate"], source)
    intermediate, hidden = pool.shape(first["gate"])
    num_experts = len(config.experts)
    moe_config = build_moe_config(
        pool.config,
        num_experts,
        config.experts_per_token,
        shared_expert_size=intermediate if fmt is QWEN2_MOE else None,
        target=fmt,
    )
    moe_config.dtype = out_dtype
    expected = expected_tensors(moe_config)

    rows: dict[
        str, torch.Tensor
    ] = {}  # filled after the cheap checks: "routed" [L, E, H], "shared" [L, S, H]

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor

    def base_tensor(name: str) -> Callable[[], torch.Tensor]:
        if donor == BASE:
            return lambda: cast(pool.base_tensor(name))
        return lambda: cast(pool.expert_tensor(donor, name))

    def ffn(model: str, expert: MoeExpert, name: str, residual: bool) -> torch.Tensor:
        return _noise_and_scale(pool.expert_tensor(model, name), expert, residual).to(out_dtype)

    entries: list[PlannedTensor] = []
    notes: list[str] = []
    for name in layout.shared:
        if name not in expected:
            notes.append(f"base tensor '{name}' is not part of the {fmt.architecture} model; left out")
            continue
        stored = pool.stored_dtype(name)
        entries.append(
            PlannedTensor(
                name, pool.shape(name), out_dtype if stored.is_floating_point else stored, base_tensor(name)
            )
        )
    for name, shape in expected.items():
        # mergekit's Qwen MoE from Llama/Mistral sources: their attention has no biases, Qwen2-MoE's has; zeros
        # keep the attention exactly the source's.
        if name.endswith("_proj.bias") and name not in pool.tensor_names and fmt is QWEN2_MOE:
            entries.append(
                PlannedTensor(name, shape, out_dtype, lambda shape=shape: torch.zeros(shape, dtype=out_dtype))
            )
    routed_models = [(f"expert{i}", e) for i, e in enumerate(config.experts)]
    for layer, projections in layout.ffn.items():
        layer_names = moe_layer_names(fmt, layout.mlp_prefix[layer])

        def gate_up(projections: dict[str, str] = projections) -> Iterator[torch.Tensor]:
            for model, expert in routed_models:
                yield ffn(model, expert, projections["gate"], False)
                yield ffn(model, expert, projections["up"], False)

        def down(projections: dict[str, str] = projections) -> Iterator[torch.Tensor]:
            for model, expert in routed_models:
                yield ffn(model, expert, projections["down"], True)

        def router(layer: int = layer) -> torch.Tensor:
            return rows["routed"][layer].to(out_dtype).contiguous()

        entries += [
            PlannedTensor(layer_names.router, (num_experts, hidden), out_dtype, router),
            PlannedTensor(layer_names.gate_up, (num_experts, 2 * intermediate, hidden), out_dtype, gate_up),
            PlannedTensor(layer_names.down, (num_experts, hidden, intermediate), out_dtype, down),
        ]
        if fmt is QWEN2_MOE:
            shared = shared_defs[0]

            def shared_ffn(
                projection: str, projections: dict[str, str] = projections, shared: MoeExpert = shared
            ) -> Callable[[], torch.Tensor]:
                return lambda: ffn("shared0", shared, projections[projection], projection == "down")

            def shared_gate(layer: int = layer) -> torch.Tensor:
                return rows["shared"][layer, :1].to(out_dtype).contiguous()

            entries += [
                PlannedTensor(layer_names.shared_gate, (intermediate, hidden), out_dtype, shared_ffn("gate")),
                PlannedTensor(layer_names.shared_up, (intermediate, hidden), out_dtype, shared_ffn("up")),
                PlannedTensor(layer_names.shared_down, (hidden, intermediate), out_dtype, shared_ffn("down")),
                PlannedTensor(layer_names.shared_expert_gate, (1, hidden), out_dtype, shared_gate),
            ]
    entries.sort(key=lambda entry: natural_key(entry.name))
    planned = {entry.name: entry.shape for entry in entries}
    lacking = sorted(set(expected) - set(planned), key=natural_key)
    wrong = [n for n in planned if n in expected and tuple(expected[n]) != tuple(planned[n])]
    if lacking or wrong or set(planned) - set(expected):
        raise ExpertMergeError(
            f"{source}: the {fmt.architecture} the installed transformers builds differs from the tensors planned: "
            f"missing {lacking[:4]}, wrong shape {[(n, planned[n], expected[n]) for n in wrong[:4]]}."
        )

    # The one heavy step before writing: the gate rows (hidden modes run the base model once per prompt set).
    if config.options.seed is not None:
        torch.manual_seed(config.options.seed)
    donor_dir = pool.base_dir if donor == BASE else pool.expert_dirs[donor]
    tokenizer = moe_tokenizer(pool.base_dir)
    gates = gate_rows(config, donor_dir, tokenizer, pool, donor)
    rows["routed"], rows["shared"] = gates[:, :num_experts], gates[:, num_experts:]
    if fmt is QWEN2_MOE and rows["shared"].shape[1] == 0:
        rows["shared"] = torch.zeros(
            gates.shape[0], 1, hidden
        )  # random gates without shared prompts: mergekit fails
    degenerate = degenerate_layers(gates)
    fitted_router = config.options.router is not None and config.options.router.init == "discriminant"
    if degenerate and not fitted_router:
        notes.append(
            f"layers {degenerate} have degenerate gates (condition number > 5): prompts may be too similar, some "
            "experts will be underused"
        )

    def write_model(folder: Path, show: bool) -> Any:
        """Weights, config and tokenizer files into `folder` (the final atomic folder, or a scratch one)."""
        with tensor_progress(console, show, "moe") as bar:
            task = bar.add_task("moe", total=len(entries), tensor="")
            written = write_safetensors(
                folder,
                entries,
                max_shard,
                on_start=lambda name: bar.update(task, tensor=name),
                on_written=lambda name: bar.advance(task),
            )
        moe_config.save_pretrained(folder)
        copy_support_files(pool.base_dir, folder)
        return written

    router_label, fitted = f"mergekit's gate_mode {config.gate_mode}", None
    if config.options.router is not None:  # ours: routers fitted to calibration data (and tuned)
        mergekit_rows = rows["routed"].float()

        def write_scratch(candidate: torch.Tensor, folder: Path) -> None:
            rows["routed"] = candidate
            folder.mkdir(parents=True)
            write_model(folder, False)

        fitted = fit_router(
            config,
            router_calibration,
            pool,
            donor_dir,
            tokenizer,
            mergekit_rows,
            write_scratch,
            progress=progress,
        )
        rows["routed"], router_label = fitted.rows, fitted.label
        notes += fitted.notes

    inputs = [*sources, pool.base_dir, *pool.expert_dirs.values()]
    estimate = sum(entry.nbytes for entry in entries) + support_bytes(pool.base_dir)
    with atomic_output_dir(out, force, inputs, estimate, command="moe") as tmp:
        written = write_model(tmp, progress)
        if config_text is not None:
            (tmp / CONFIG_COPY).write_text(config_text)
        # The experts' prompts are the config's own texts (mergekit-moe configs have no other).
        prompts = [p for e in [*config.experts, *shared_defs] for p in e.positive_prompts or ()]
        health = check_folder(tmp, pool.base_dir, prompts, "config prompts")
        hashes = pool.content_hashes()
        options = config.options
        shared_label = shared_defs[0].source_model if fmt is QWEN2_MOE else None
        write_merge_card(
            tmp,
            title=f"mergekit-moe config as {fmt.architecture} of {num_experts} expert(s)",
            method=f"mergekit-moe:{fmt.name}",
            base=(pool.base_source, hashes[BASE]),
            experts={name: (pool.expert_sources[name], hashes[name]) for name in names},
            parameters={
                "gate_mode": config.gate_mode,
                "experts_per_token": config.experts_per_token,
                "architecture": fmt.architecture,
                "dtype": dtype_name(out_dtype),
                "seed": options.seed,
                "shared_tensors": options.shared_tensors or "base_model",
                **({"router": router_label} if fitted is not None else {}),
            },
            sections={
                "Experts": "\n".join(
                    f"- routed expert {i}: FFN of `{e.source_model}`" for i, e in enumerate(config.experts)
                )
                + (f"\n- shared expert: FFN of `{shared_label}`" if shared_label else ""),
                "Health check": health.card_section(),
                **(
                    {"Notes": "\n".join(f"- {n}" for n in [*notes, *pool.notes])}
                    if notes or pool.notes
                    else {}
                ),
            },
        )
        output_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    pool.close()
    return MoeBuildSummary(
        output=Path(out).expanduser(),
        format=fmt.name,
        architecture=fmt.architecture,
        experts=routed,
        shared_expert=shared_label,
        gate_mode=config.gate_mode,
        top_k=config.experts_per_token,
        dtype=dtype_name(out_dtype),
        num_tensors=len(entries),
        num_shards=written.num_shards,
        output_bytes=output_bytes,
        wall_seconds=time.perf_counter() - started,
        notes=[*notes, *pool.notes],
        router=router_label,
        router_kl={name: fitted.mean_kl(name) for name in fitted.heldout_kl} if fitted is not None else {},
        health=health,
    )
