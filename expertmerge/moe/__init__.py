"""Fused Mixture-of-Experts: each expert's FFN becomes one MoE expert; shared tensors merged; routers initialised.

- `formats`: dense family -> MoE format (Mixtral, Qwen2-MoE, Qwen3-MoE), config, tensor names, forced routing.
- `plan`: the one fused-MoE tensor plan (names, shapes, dtypes, stacked experts) that every fused-MoE writer fills.
- `checkpoint`: `write_moe_checkpoint`, the streaming, atomic writer of a folder `transformers` loads as is.
- `forward`: the dense backbone with one expert's FFN swapped in (oracle routing), for router statistics.
- `router`: router initialisation maths (`hidden`, `cheap_embed`, `random`, the fit's linear discriminant).
- `router_inputs`: what the routers see on calibration data (one hook-based collection) and `initial_router_rows`.
- `router_tuning`: `tune_router`, training only the gates against the oracle-routed targets.
- `sequence`: the sequence-level MoE model class; importing it registers the model type with the Auto classes.

The names below are imported from their module on first use, so `import expertmerge.moe` starts no torch.
"""

from __future__ import annotations

from expertmerge.lazy import lazy_exports

_EXPORTS = {
    "MoeExportSummary": "expertmerge.moe.checkpoint",
    "expert_shared_tensors": "expertmerge.moe.checkpoint",
    "shared_tensor_names": "expertmerge.moe.checkpoint",
    "write_moe_checkpoint": "expertmerge.moe.checkpoint",
    "MOE_FORMATS": "expertmerge.moe.formats",
    "DenseLayout": "expertmerge.moe.formats",
    "MoeFormat": "expertmerge.moe.formats",
    "MoeLayerNames": "expertmerge.moe.formats",
    "build_moe_config": "expertmerge.moe.formats",
    "expected_tensors": "expertmerge.moe.formats",
    "moe_format_for": "expertmerge.moe.formats",
    "moe_layer_names": "expertmerge.moe.formats",
    "split_dense_names": "expertmerge.moe.formats",
    "supported_families": "expertmerge.moe.formats",
    "DEGENERATE_COSINE": "expertmerge.moe.router",
    "ROUTER_GAP": "expertmerge.moe.router",
    "ROUTER_METHODS": "expertmerge.moe.router",
    "DegenerateRouterWarning": "expertmerge.moe.router",
    "RouterDegeneracy": "expertmerge.moe.router",
    "add_generalist_row": "expertmerge.moe.router",
    "calibrate_margin": "expertmerge.moe.router",
    "pooled_within_scatter": "expertmerge.moe.router",
    "router_degeneracy": "expertmerge.moe.router",
    "router_from_discriminant": "expertmerge.moe.router",
    "router_from_embeddings": "expertmerge.moe.router",
    "router_from_hidden": "expertmerge.moe.router",
    "router_random": "expertmerge.moe.router",
    "warn_if_degenerate": "expertmerge.moe.router",
    "MoePlan": "expertmerge.moe.plan",
    "MoeSources": "expertmerge.moe.plan",
    "plan_moe": "expertmerge.moe.plan",
    "expert_ffn": "expertmerge.moe.forward",
    "moe_forward": "expertmerge.moe.forward",
    "RouterInputs": "expertmerge.moe.router_inputs",
    "initial_router_rows": "expertmerge.moe.router_inputs",
    "mean_token_embeddings": "expertmerge.moe.router_inputs",
    "router_input_modules": "expertmerge.moe.router_inputs",
    "router_input_statistics": "expertmerge.moe.router_inputs",
    "split_batches": "expertmerge.moe.router_inputs",
    "gate_parameters": "expertmerge.moe.router_tuning",
    "router_tuning_loss": "expertmerge.moe.router_tuning",
    "tune_router": "expertmerge.moe.router_tuning",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
