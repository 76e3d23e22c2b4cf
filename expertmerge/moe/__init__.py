"""Fused Mixture-of-Experts: each expert's FFN becomes one MoE expert; shared tensors merged; routers initialised.

- `formats`: dense family -> MoE format (Mixtral, Qwen2-MoE, Qwen3-MoE), config, tensor names, forced routing.
- `checkpoint`: `write_moe_checkpoint`, the streaming, atomic writer of a folder `transformers` loads as is.
- `router`: router initialisation (`hidden`, `cheap_embed`, `random`) and the statistics they need.
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
    forced_routing,
    moe_blocks,
    moe_format_for,
    moe_layer_names,
    split_dense_names,
    supported_families,
)
from expertmerge.moe.router import (
    DEGENERATE_COSINE,
    ROUTER_METHODS,
    DegenerateRouterWarning,
    RouterDegeneracy,
    add_generalist_row,
    collect_router_inputs,
    mean_token_embeddings,
    router_degeneracy,
    router_from_embeddings,
    router_from_hidden,
    router_input_modules,
    router_random,
    warn_if_degenerate,
)

__all__ = [
    "DEGENERATE_COSINE",
    "MOE_FORMATS",
    "ROUTER_METHODS",
    "DegenerateRouterWarning",
    "DenseLayout",
    "MoeExportSummary",
    "MoeFormat",
    "MoeLayerNames",
    "RouterDegeneracy",
    "add_generalist_row",
    "build_moe_config",
    "collect_router_inputs",
    "expected_tensors",
    "expert_shared_tensors",
    "forced_routing",
    "mean_token_embeddings",
    "moe_blocks",
    "moe_format_for",
    "moe_layer_names",
    "router_degeneracy",
    "router_from_embeddings",
    "router_from_hidden",
    "router_input_modules",
    "router_random",
    "shared_tensor_names",
    "split_dense_names",
    "supported_families",
    "warn_if_degenerate",
    "write_moe_checkpoint",
]
