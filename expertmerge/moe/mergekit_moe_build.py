"""Build the MoE of a mergekit-moe config (`expertmerge.moe.mergekit_moe`) through the one writer, atomically.

Everything that can fail cheaply fails first: the config, the output folder, the models' compatibility, the
output family, and the tensor layout the installed `transformers` expects for the output config. Only then are
the gate rows computed (the one step that may run the base model) and the tensors streamed out, one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.health import HealthCheck, check_folder
from expertmerge.io.card import write_merge_card
from expertmerge.io.folder import atomic_output_dir, check_output_dir
from expertmerge.io.reader import dtype_name, parse_dtype
from expertmerge.io.support import support_bytes
from expertmerge.io.writer import DEFAULT_MAX_SHARD_SIZE, WrittenWeights, shard_limit
from expertmerge.merge import tensor_progress
from expertmerge.moe.formats import (
    QWEN2_MOE,
    MoeFormat,
    build_moe_config,
    expected_tensors,
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
from expertmerge.moe.mergekit_moe_router import CalibrationReader, FittedRouter, fit_router, router_data
from expertmerge.moe.plan import MoePlan, MoeSources, plan_moe
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


def _sources(
    config: MergekitMoeConfig,
    pool: ExpertPool,
    donor: str,
    dtype: torch.dtype,
    rows: Mapping[str, torch.Tensor],
) -> MoeSources:
    """Shared tensors from the donor, each expert's FFN noised and scaled as mergekit does; the gate rows are read
    from `rows` when written (filled after the cheap checks, replaced by fitted routers)."""

    def ffn(model: str, expert: MoeExpert, name: str, residual: bool) -> torch.Tensor:
        return _noise_and_scale(pool.expert_tensor(model, name), expert, residual).to(dtype)

    shared_defs = config.shared_experts or []
    return MoeSources(
        shared=pool.base_tensor if donor == BASE else lambda name: pool.expert_tensor(donor, name),
        routed_ffn=lambda e, projection, name: ffn(
            f"expert{e}", config.experts[e], name, projection == "down"
        ),
        router=lambda layer: rows["routed"][layer].to(dtype).contiguous(),
        shared_ffn=lambda projection, name, shape: ffn("shared0", shared_defs[0], name, projection == "down"),
        shared_expert_gate=lambda layer: rows["shared"][layer, :1].to(dtype).contiguous(),
    )


def _plan(
    config: MergekitMoeConfig,
    pool: ExpertPool,
    fmt: MoeFormat,
    donor: str,
    rows: Mapping[str, torch.Tensor],
    source: str,
) -> tuple[MoePlan, list[str]]:
    """The output's tensors and config, checked against what the installed `transformers` builds; and notes."""
    layout = split_dense_names(pool.tensor_names)
    dtype = _output_dtype(config, pool, layout.ffn[0]["gate"], source)
    intermediate = pool.shape(layout.ffn[0]["gate"])[0]
    moe_config = build_moe_config(
        pool.config,
        len(config.experts),
        config.experts_per_token,
        shared_expert_size=intermediate if fmt is QWEN2_MOE else None,
        target=fmt,
    )
    moe_config.dtype = dtype
    expected = expected_tensors(moe_config)
    notes = [
        f"base tensor '{name}' is not part of the {fmt.architecture} model; left out"
        for name in layout.shared
        if name not in expected
    ]
    # mergekit's Qwen MoE from Llama/Mistral sources: their attention has no biases, Qwen2-MoE's has; zeros keep the
    # attention exactly the source's.
    zeros = {
        name: shape
        for name, shape in expected.items()
        if name.endswith("_proj.bias") and name not in pool.tensor_names and fmt is QWEN2_MOE
    }
    plan = plan_moe(
        pool,
        layout,
        fmt,
        moe_config,
        _sources(config, pool, donor, dtype, rows),
        dtype=dtype,
        num_routed=len(config.experts),
        shared_names=[name for name in layout.shared if name in expected],
        zeros=zeros,
    )
    mismatch = plan.mismatch(expected)
    if mismatch is not None:
        raise ExpertMergeError(
            f"{source}: the {fmt.architecture} the installed transformers builds differs from the tensors planned: "
            f"missing {mismatch.lacking[:4]}, wrong shape {mismatch.wrong[:4]}."
        )
    return plan, notes


def _gate_rows(
    config: MergekitMoeConfig,
    pool: ExpertPool,
    fmt: MoeFormat,
    donor: str,
    rows: dict[str, torch.Tensor],
    notes: list[str],
) -> Any:
    """Sets the gate rows of `gate_mode`, "routed" `[L, E, H]` and "shared" `[L, S, H]`, into `rows` (a note on
    degenerate layers into `notes`); returns the base's tokenizer."""
    if config.options.seed is not None:
        torch.manual_seed(config.options.seed)
    tokenizer = moe_tokenizer(pool.base_dir)
    donor_dir = pool.base_dir if donor == BASE else pool.expert_dirs[donor]
    gates = gate_rows(config, donor_dir, tokenizer, pool, donor)
    count = len(config.experts)
    rows.update(routed=gates[:, :count], shared=gates[:, count:])
    if fmt is QWEN2_MOE and rows["shared"].shape[1] == 0:
        # random gates without shared prompts: mergekit fails
        rows["shared"] = torch.zeros(gates.shape[0], 1, gates.shape[2])
    degenerate = degenerate_layers(gates)
    fitted_router = config.options.router is not None and config.options.router.init == "discriminant"
    if degenerate and not fitted_router:
        notes.append(
            f"layers {degenerate} have degenerate gates (condition number > 5): prompts may be too similar, some "
            "experts will be underused"
        )
    return tokenizer


def _read_config(
    config: MergekitMoeConfig | str | Path, allow_all_same: bool, config_text: str | None
) -> tuple[MergekitMoeConfig, str | None, str]:
    """The checked config, its text (copied beside the output) and where it came from (for messages)."""
    if isinstance(config, MergekitMoeConfig):
        check_moe_config(config, "config", allow_all_same)
        return config, config_text, "config"
    parsed, text = load_moe_config(config, allow_all_same)
    return parsed, text, str(config)


def _open_pool(config: MergekitMoeConfig) -> tuple[ExpertPool, dict[str, str], str]:
    """The pool of the config's models (`expert{i}`, `shared{j}`, `shared_tensors`) and the shared tensors' donor."""
    names = {f"expert{i}": e.source_model for i, e in enumerate(config.experts)}
    names.update({f"shared{j}": e.source_model for j, e in enumerate(config.shared_experts or [])})
    donor = BASE
    if config.options.shared_tensors is not None:
        donor = "shared_tensors"  # ours: the non-FFN tensors (and the gates' model) from e.g. a learned merge
        names[donor] = config.options.shared_tensors
    pool = ExpertPool(config.base_model, names, distinct=False)  # mergekit-moe: the base may be an expert
    pool.validate()
    return pool, names, donor


def _model_writer(
    plan: MoePlan, max_shard: int, support_dir: Path, console: Any
) -> Callable[[Path, bool], WrittenWeights]:
    """`write(folder, show)`: weights, config and tokenizer files into `folder` (the final atomic folder, or a
    scratch one), with a progress bar when `show`."""

    def write_model(folder: Path, show: bool) -> WrittenWeights:
        with tensor_progress(console, show, "moe") as bar:
            task = bar.add_task("moe", total=len(plan.tensors), tensor="")
            return plan.write(
                folder,
                max_shard,
                support_dir,
                on_start=lambda name: bar.update(task, tensor=name),
                on_written=lambda name: bar.advance(task),
            )

    return write_model


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
    calibration: CalibrationReader | None = None,
) -> MoeBuildSummary:
    """Write the MoE that `mergekit-moe` writes for `config` (a parsed config or a YAML path) into `out`.

    `calibration`: how `expertmerge.router.calib` texts are read (calib_data's task and datamodule classes); only
    configs with such texts need it.
    """
    started = time.perf_counter()
    config, config_text, source = _read_config(config, allow_all_same, config_text)
    shared_defs = list(config.shared_experts or [])
    sources = [config.base_model, *(e.source_model for e in [*config.experts, *shared_defs])]
    check_output_dir(out, force, inputs=sources)
    max_shard = shard_limit(max_shard_size)
    sources += [config.options.shared_tensors] if config.options.shared_tensors is not None else []
    pool, names, donor = _open_pool(config)
    router_calibration = router_data(config, pool.base_dir, source, calibration)  # checked before long work
    model_types = [pool.raw_config(m).get("model_type") for m in (BASE, *names) if m != "shared_tensors"]
    fmt = select_format(config, model_types, source)
    rows: dict[str, torch.Tensor] = {}  # the gate rows, filled after the cheap checks
    plan, notes = _plan(config, pool, fmt, donor, rows, source)

    # The one heavy step before writing: the gate rows (hidden modes run the base model once per prompt set).
    tokenizer = _gate_rows(config, pool, fmt, donor, rows, notes)

    write_model = _model_writer(plan, max_shard, pool.base_dir, console)
    router_label, fitted = f"mergekit's gate_mode {config.gate_mode}", None
    if config.options.router is not None:  # ours: routers fitted to calibration data (and tuned)
        fitted = _fit_router(config, router_calibration, pool, donor, tokenizer, rows, write_model, progress)
        rows["routed"], router_label = fitted.rows, fitted.label
        notes += fitted.notes

    inputs = [*sources, pool.base_dir, *pool.expert_dirs.values()]
    with atomic_output_dir(
        out, force, inputs, plan.nbytes + support_bytes(pool.base_dir), command="moe"
    ) as tmp:
        written = write_model(tmp, progress)
        if config_text is not None:
            (tmp / CONFIG_COPY).write_text(config_text)
        # The experts' prompts are the config's own texts (mergekit-moe configs have no other).
        prompts = [p for e in [*config.experts, *shared_defs] for p in e.positive_prompts or ()]
        health = check_folder(tmp, pool.base_dir, prompts, "config prompts")
        shared_label = _write_card(tmp, config, pool, plan, names, router_label, fitted, notes, health)
        output_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    pool.close()
    return MoeBuildSummary(
        output=Path(out).expanduser(),
        format=fmt.name,
        architecture=fmt.architecture,
        experts=[e.source_model for e in config.experts],
        shared_expert=shared_label,
        gate_mode=config.gate_mode,
        top_k=config.experts_per_token,
        dtype=dtype_name(plan.dtype),
        num_tensors=len(plan.tensors),
        num_shards=written.num_shards,
        output_bytes=output_bytes,
        wall_seconds=time.perf_counter() - started,
        notes=[*notes, *pool.notes],
        router=router_label,
        router_kl={name: fitted.mean_kl(name) for name in fitted.heldout_kl} if fitted is not None else {},
        health=health,
    )


def _fit_router(
    config: MergekitMoeConfig,
    calibration: Any,
    pool: ExpertPool,
    donor: str,
    tokenizer: Any,
    rows: dict[str, torch.Tensor],
    write_model: Callable[[Path, bool], WrittenWeights],
    progress: bool,
) -> FittedRouter:
    """`expertmerge.router`: the routed rows fitted (and tuned) from mergekit's, scored on scratch copies of the
    MoE written by the build's own writer."""
    mergekit_rows = rows["routed"].float()

    def write_scratch(candidate: torch.Tensor, folder: Path) -> None:
        rows["routed"] = candidate
        folder.mkdir(parents=True)
        write_model(folder, False)

    donor_dir = pool.base_dir if donor == BASE else pool.expert_dirs[donor]
    return fit_router(
        config, calibration, pool, donor_dir, tokenizer, mergekit_rows, write_scratch, progress=progress
    )


def _write_card(
    folder: Path,
    config: MergekitMoeConfig,
    pool: ExpertPool,
    plan: MoePlan,
    names: Mapping[str, str],
    router_label: str,
    fitted: FittedRouter | None,
    notes: list[str],
    health: HealthCheck,
) -> str | None:
    """The merge card; returns the shared expert's model (Qwen2-MoE) for the summary."""
    fmt, hashes, options = plan.fmt, pool.content_hashes(), config.options
    shared_label = (config.shared_experts or [])[0].source_model if fmt is QWEN2_MOE else None
    all_notes = [*notes, *pool.notes]
    write_merge_card(
        folder,
        title=f"mergekit-moe config as {fmt.architecture} of {len(config.experts)} expert(s)",
        method=f"mergekit-moe:{fmt.name}",
        base=(pool.base_source, hashes[BASE]),
        experts={name: (pool.expert_sources[name], hashes[name]) for name in names},
        parameters={
            "gate_mode": config.gate_mode,
            "experts_per_token": config.experts_per_token,
            "architecture": fmt.architecture,
            "dtype": dtype_name(plan.dtype),
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
            **({"Notes": "\n".join(f"- {n}" for n in all_notes)} if all_notes else {}),
        },
    )
    return shared_label
