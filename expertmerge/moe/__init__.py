"""Fused Mixture-of-Experts: each expert's FFN becomes one MoE expert; shared tensors merged; routers initialised.

- `formats`: dense family -> MoE format (Mixtral, Qwen2-MoE, Qwen3-MoE), config, tensor names, forced routing.
- `checkpoint`: `write_moe_checkpoint`, the streaming, atomic writer of a folder `transformers` loads as is.
- `router`: router initialisation maths (`hidden`, `cheap_embed`, `random`, the fit's linear discriminant).
- `router_inputs`: what the routers see on calibration data (one hook-based collection) and `initial_router_rows`.
- `router_tuning`: `tune_router`, training only the gates against the oracle-routed targets.
"""

from expertmerge.moe.checkpoint import (
    MoeExportSummary,
    expert_shared_tensors,
    shared_tensor_names,
    write_moe_checkpoint,
)
from expertmerge.moe.formats import (
    MOE_FORMATS,
    DenseLayout,
    MoeFormat,
    MoeLayerNames,
    build_moe_config,
    expected_tensors,
    moe_format_for,
    moe_layer_names,
    split_dense_names,
    supported_families,
)
from expertmerge.moe.router import (
    DEGENERATE_COSINE,
    ROUTER_GAP,
    ROUTER_METHODS,
    DegenerateRouterWarning,
    RouterDegeneracy,
    add_generalist_row,
    calibrate_margin,
    pooled_within_scatter,
    router_degeneracy,
    router_from_discriminant,
    router_from_embeddings,
    router_from_hidden,
    router_random,
    warn_if_degenerate,
)
from expertmerge.moe.router_inputs import (
    RouterInputs,
    initial_router_rows,
    mean_token_embeddings,
    router_input_modules,
    router_input_statistics,
    split_batches,
)
from expertmerge.moe.router_tuning import gate_parameters, router_tuning_loss, tune_router

__all__ = [
    "DEGENERATE_COSINE",
    "MOE_FORMATS",
    "ROUTER_GAP",
    "ROUTER_METHODS",
    "DegenerateRouterWarning",
    "DenseLayout",
    "MoeExportSummary",
    "MoeFormat",
    "MoeLayerNames",
    "RouterDegeneracy",
    "RouterInputs",
    "add_generalist_row",
    "build_moe_config",
    "calibrate_margin",
    "expected_tensors",
    "expert_shared_tensors",
    "gate_parameters",
    "initial_router_rows",
    "mean_token_embeddings",
    "moe_format_for",
    "moe_layer_names",
    "pooled_within_scatter",
    "router_degeneracy",
    "router_from_discriminant",
    "router_from_embeddings",
    "router_from_hidden",
    "router_input_modules",
    "router_input_statistics",
    "router_random",
    "router_tuning_loss",
    "shared_tensor_names",
    "split_batches",
    "split_dense_names",
    "supported_families",
    "tune_router",
    "warn_if_degenerate",
    "write_moe_checkpoint",
]
