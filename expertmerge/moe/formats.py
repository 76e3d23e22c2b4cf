"""From a dense family to its fused Mixture-of-Experts format: config, tensor names, forced routing.

Which dense families map to which MoE format (the `transformers` classes they load as):

| dense `model_type` | MoE format | class | shared expert |
|---|---|---|---|
| `llama`, `mistral` | `mixtral` | `MixtralForCausalLM` | none |
| `qwen2` | `qwen2_moe` | `Qwen2MoeForCausalLM` | one, always on (gated) |
| `qwen3` | `qwen3_moe` | `Qwen3MoeForCausalLM` | none |
| `granite` | `granitemoe` | `GraniteMoeForCausalLM` | none |
| `olmo2` | `flex_olmo` | `FlexOlmoForCausalLM` | none |

A pair is listed only where the MoE class's attention, norms, rotary embedding and residual path are the dense
family's exactly, so that only the FFN changes. Granite's four multipliers (`embedding_multiplier`,
`residual_multiplier`, `attention_multiplier`, `logits_scaling`) carry over to GraniteMoE unchanged. FlexOlmo is
OLMo2's attention (q/k RMSNorms over all heads' width) and post-norm layers around an OLMoE router. Not listed:
`phi3` -> PhiMoE (PhiMoE normalises with LayerNorm, mean-subtracting and biased, where Phi3 has RMSNorm; it routes
with sparsemixer) and `olmo2` -> OLMoE (OLMoE is pre-norm with an `input_layernorm`; OLMo2 normalises each
sub-layer's output).

Layout of the model the installed `transformers` (5.x) builds (the files hold what its `save_pretrained` writes:
one tensor per routed expert, see `moe/plan.py`), per decoder layer `l` (`P = model.layers.{l}.mlp`; GraniteMoE:
`P = model.layers.{l}.block_sparse_moe`, its router named `P.router.weight`):

- `P.gate.weight` `[E, hidden]`: the router, logits `x @ W.T` on the input `x` of the layer's FFN (the output of
  the post-attention norm; OLMo2 / FlexOlmo: the residual stream, which that family does not normalise first);
- `P.experts.gate_up_proj` `[E, 2 * I, hidden]`: expert `e`'s dense `gate_proj.weight` stacked over its `up_proj.weight`
  (the forward splits `x @ gate_up_proj[e].T` into gate then up with `chunk(2)`);
- `P.experts.down_proj` `[E, hidden, I]`: expert `e`'s dense `down_proj.weight`;
- Qwen2-MoE only: `P.shared_expert.{gate,up,down}_proj.weight` (a dense FFN) and `P.shared_expert_gate.weight`
  `[1, hidden]`; the block adds `sigmoid(x @ shared_expert_gate.T) * shared_expert(x)` to the routed output.

Every other tensor (embeddings, attention, norms, head) keeps the dense name.

Routing semantics and the settings that make an MoE reproduce one dense expert exactly:

- Mixtral: `softmax` over all router logits (fp32), top-k, then the top-k weights are always renormalised to
  sum to 1; GraniteMoE takes the top-k logits first and softmaxes those (the same weights). Qwen2-MoE /
  Qwen3-MoE / FlexOlmo renormalise only when `norm_topk_prob` is true; we always write
  `norm_topk_prob: true`, because each routed expert is a whole dense FFN and the routed output must stay a convex
  combination of FFNs (with `false`, top-2 of 3 experts would shrink the FFN output by the left-out probability).
- "Forced" routing to expert k: when expert k's logit exceeds every other by more than ~104, the others' fp32
  softmax probabilities underflow to exactly 0, expert k's is exactly 1, and after renormalisation its weight is
  exactly 1 and every other selected expert's exactly 0, for any `top_k`. With `top_k == 1` the renormalised
  weight is exactly 1 for any logits (p / p). No router of these formats has a bias, so a weight matrix alone cannot
  give one expert the top logit for every possible input; the tests' `forced_routing` (tests/moe_routing.py)
  therefore feeds each router a fixed probe vector and sets its rows so expert k's logit is `logit` (default 1e4)
  and every other is 0, leaving the softmax / top-k / renormalisation code of the format untouched.
- Qwen2-MoE's shared expert is always on. Without a base expert it is written as zeros (an FFN of width
  `min(intermediate_size, 256)`, its gate row zero), so it adds exactly 0 and the exactness above holds. With the
  base FFN as the shared expert, see `write_moe_checkpoint`'s `shared_expert_weight`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError

# The largest Qwen2-MoE shared expert written as zeros (when the format must have one but we have nothing to put
# there): small, and divisible by every usual tensor-parallel degree.
ZERO_SHARED_EXPERT_WIDTH = 256

# Dense config keys every supported MoE config takes unchanged.
_COMMON_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)

_FFN_NAME = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp)\.(?P<proj>gate|up|down)_proj\.(?P<kind>weight|bias)$"
)
_PROJECTIONS = ("gate", "up", "down")
# Buffers some older dense checkpoints carry that no current model loads.
_IGNORED_DENSE = re.compile(r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class MoeFormat:
    """A fused MoE output format: its `model_type`, the class it loads as, and the dense families it comes from."""

    name: str
    architecture: str
    source_types: tuple[str, ...]
    shared_expert: bool  # an always-on shared expert next to the routed ones (Qwen2-MoE)
    # The decoder layer's attribute holding the MoE block (the dense layer's `mlp`), and the block's router.
    block: str = "mlp"
    router: str = "gate"


MIXTRAL = MoeFormat("mixtral", "MixtralForCausalLM", ("llama", "mistral"), shared_expert=False)
QWEN2_MOE = MoeFormat("qwen2_moe", "Qwen2MoeForCausalLM", ("qwen2",), shared_expert=True)
QWEN3_MOE = MoeFormat("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), shared_expert=False)
GRANITE_MOE = MoeFormat(
    "granitemoe",
    "GraniteMoeForCausalLM",
    ("granite",),
    shared_expert=False,
    block="block_sparse_moe",
    router="router",
)
FLEX_OLMO = MoeFormat("flex_olmo", "FlexOlmoForCausalLM", ("olmo2",), shared_expert=False)
MOE_FORMATS: dict[str, MoeFormat] = {
    source: fmt
    for fmt in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, GRANITE_MOE, FLEX_OLMO)
    for source in fmt.source_types
}


def supported_families(formats: Sequence[MoeFormat] | None = None) -> str:
    """`"llama, mistral -> mixtral; qwen2 -> qwen2_moe; ..."` for `formats` (default: all), for messages and help."""
    chosen = list(dict.fromkeys(MOE_FORMATS.values())) if formats is None else formats
    return "; ".join(f"{', '.join(fmt.source_types)} -> {fmt.name}" for fmt in chosen)


def no_moe_format(model_type: str | None) -> str:
    """The one-line refusal for a dense family no fused MoE format takes: the family, those that have a format,
    and what works for any family instead."""
    return (
        f"model_type '{model_type}' has no fused MoE format (the families that have one: {supported_families()}); "
        "what works for any family: `fit` as a dense learned merge (without model.moe), or as a sequence MoE "
        "(the model class of configs/sequence_moe_tiny.yaml)."
    )


def moe_format_for(model_type: str | None) -> MoeFormat:
    """The MoE format for a dense `model_type`; `ExpertMergeError` naming the supported families otherwise."""
    if model_type not in MOE_FORMATS:
        raise ExpertMergeError(no_moe_format(model_type))
    return MOE_FORMATS[model_type]


# ------------------------------------------------------------------------------------------------- config
def build_moe_config(
    dense_config: Any,
    num_experts: int,
    top_k: int = 2,
    *,
    shared_expert_size: int | None = None,
    target: MoeFormat | None = None,
) -> Any:
    """The `transformers` config of the MoE made from `dense_config`'s family, with `num_experts` routed experts.

    Each routed expert has the dense FFN's width. `top_k` routed experts run per token; their weights are
    renormalised to sum to 1 in every format (Mixtral always does; Qwen formats get `norm_topk_prob=True`).
    `shared_expert_size` is the width of Qwen2-MoE's shared expert (default: the dense FFN width); other formats
    have none and refuse it. `target` chooses another format than the family's own (mergekit-moe writes Qwen2-MoE
    from Llama/Mistral sources too; their missing attention biases are then zeros). Raises `ExpertMergeError` for an unsupported family or a dense setting the MoE format
    cannot express (biases in the FFN or attention of a Llama, mixed sliding/full attention layers in Qwen3).
    """
    fmt = target or moe_format_for(getattr(dense_config, "model_type", None))
    dense = dense_config.to_dict()
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ExpertMergeError(f"num_experts must be a positive integer, got {num_experts!r}.")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ExpertMergeError(
            f"top_k must be an integer from 1 to the number of experts ({num_experts}), got {top_k!r}."
        )
    if shared_expert_size is not None and not fmt.shared_expert:
        raise ExpertMergeError(
            f"The {fmt.name} format has no shared expert; shared_expert_size must be None."
        )

    settings: dict[str, Any] = {key: dense[key] for key in _COMMON_KEYS if key in dense}
    if dense.get("head_dim") is not None:
        settings["head_dim"] = dense["head_dim"]
    settings.update(intermediate_size=dense["intermediate_size"], num_experts_per_tok=top_k)
    build = {
        MIXTRAL: _mixtral_config,
        QWEN2_MOE: _qwen2_moe_config,
        QWEN3_MOE: _qwen3_moe_config,
        GRANITE_MOE: _granite_moe_config,
        FLEX_OLMO: _flex_olmo_config,
    }[fmt]
    config = build(dense, settings, num_experts, shared_expert_size)
    config.architectures = [fmt.architecture]
    return config


def _mixtral_config(
    dense: dict[str, Any], settings: dict[str, Any], num_experts: int, shared_expert_size: int | None
) -> Any:
    from transformers import MixtralConfig

    for flag in ("attention_bias", "mlp_bias"):
        if dense.get(flag):
            raise ExpertMergeError(
                f"The dense {dense['model_type']} model has {flag}=true; Mixtral has no biases in attention or "
                "experts, so this model cannot become a Mixtral MoE."
            )
    return MixtralConfig(
        **settings,
        num_local_experts=num_experts,
        sliding_window=dense.get("sliding_window"),
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def _qwen2_moe_config(
    dense: dict[str, Any], settings: dict[str, Any], num_experts: int, shared_expert_size: int | None
) -> Any:
    from transformers import Qwen2MoeConfig

    intermediate = dense["intermediate_size"]  # the dense `intermediate_size` is only for dense layers (none)
    use_sliding = bool(dense.get("use_sliding_window", False))
    return Qwen2MoeConfig(
        **settings,
        moe_intermediate_size=intermediate,
        shared_expert_intermediate_size=intermediate if shared_expert_size is None else shared_expert_size,
        num_experts=num_experts,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,  # Qwen2 attention always has q/k/v biases
        use_sliding_window=use_sliding,
        sliding_window=dense.get("sliding_window") if use_sliding else None,
        max_window_layers=dense.get("max_window_layers", dense["num_hidden_layers"]),
        layer_types=list(dense["layer_types"]) if dense.get("layer_types") else None,
        output_router_logits=False,
    )


def _qwen3_moe_config(
    dense: dict[str, Any], settings: dict[str, Any], num_experts: int, shared_expert_size: int | None
) -> Any:
    from transformers import Qwen3MoeConfig

    layer_types = set(dense.get("layer_types") or ["full_attention"])
    if len(layer_types) > 1:
        raise ExpertMergeError(
            "The dense qwen3 model mixes sliding-window and full attention layers (layer_types); Qwen3-MoE "
            "applies one attention type to every layer, so it cannot reproduce this model."
        )
    use_sliding = layer_types == {"sliding_attention"}
    return Qwen3MoeConfig(
        **settings,
        moe_intermediate_size=dense["intermediate_size"],
        num_experts=num_experts,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=bool(dense.get("attention_bias", False)),
        use_sliding_window=use_sliding,
        sliding_window=dense.get("sliding_window") if use_sliding else None,
        output_router_logits=False,
    )


def _granite_moe_config(
    dense: dict[str, Any], settings: dict[str, Any], num_experts: int, shared_expert_size: int | None
) -> Any:
    from transformers import GraniteMoeConfig

    if dense.get("mlp_bias"):
        raise ExpertMergeError(
            "The dense granite model has mlp_bias=true; GraniteMoE experts have no biases, so this model cannot "
            "become a GraniteMoE."
        )
    # The multipliers scale the embeddings, each residual branch, the attention scores and the logits exactly as
    # in the dense Granite; without them the MoE would compute another function.
    multipliers = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    return GraniteMoeConfig(
        **settings,
        **{key: dense[key] for key in multipliers},
        attention_bias=bool(dense.get("attention_bias", False)),
        num_local_experts=num_experts,
        output_router_logits=False,
    )


def _flex_olmo_config(
    dense: dict[str, Any], settings: dict[str, Any], num_experts: int, shared_expert_size: int | None
) -> Any:
    from transformers import FlexOlmoConfig

    return FlexOlmoConfig(
        **settings,
        attention_bias=bool(dense.get("attention_bias", False)),
        num_experts=num_experts,
        norm_topk_prob=True,
        output_router_logits=False,
    )


# ------------------------------------------------------------------------------------------------- names
@dataclass
class DenseLayout:
    """A dense checkpoint's tensor names split into the FFN of each layer and everything else (shared)."""

    shared: list[str]
    ffn: dict[int, dict[str, str]]  # layer -> {"gate"|"up"|"down": dense tensor name}
    mlp_prefix: dict[int, str]  # layer -> "model.layers.{l}.mlp"
    ignored: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.ffn)


def split_dense_names(names: Sequence[str]) -> DenseLayout:
    """Split dense tensor names into per-layer FFN weights (which become experts) and shared tensors.

    Raises `ExpertMergeError` when an FFN has a bias (no supported MoE expert has one), a layer lacks one of
    gate/up/down, or layer numbers have gaps.
    """
    shared: list[str] = []
    ignored: list[str] = []
    ffn: dict[int, dict[str, str]] = {}
    prefix: dict[int, str] = {}
    for name in names:
        match = _FFN_NAME.match(name)
        if match is None:
            (ignored if _IGNORED_DENSE.search(name) else shared).append(name)
            continue
        if match["kind"] == "bias":
            raise ExpertMergeError(
                f"The dense FFN has a bias ('{name}'); experts of the supported MoE formats have none."
            )
        layer = int(match["layer"])
        ffn.setdefault(layer, {})[match["proj"]] = name
        prefix[layer] = match["prefix"]
    if not ffn:
        raise ExpertMergeError(
            "No FFN weights named like 'model.layers.N.mlp.{gate,up,down}_proj.weight' found; cannot build experts."
        )
    if sorted(ffn) != list(range(len(ffn))):
        raise ExpertMergeError(f"FFN layers are not numbered 0..{len(ffn) - 1}: found {sorted(ffn)}.")
    for layer, projections in ffn.items():
        lacking = [p for p in _PROJECTIONS if p not in projections]
        if lacking:
            raise ExpertMergeError(f"Layer {layer}'s FFN lacks {', '.join(p + '_proj' for p in lacking)}.")
    return DenseLayout(shared=shared, ffn=dict(sorted(ffn.items())), mlp_prefix=prefix, ignored=ignored)


@dataclass(frozen=True)
class MoeLayerNames:
    """The MoE tensor names of one decoder layer."""

    router: str
    gate_up: str
    down: str
    shared_gate: str | None = None  # Qwen2-MoE: shared_expert.gate_proj.weight
    shared_up: str | None = None
    shared_down: str | None = None
    shared_expert_gate: str | None = None  # Qwen2-MoE: the sigmoid gate of the shared expert


def moe_layer_names(fmt: MoeFormat, mlp_prefix: str) -> MoeLayerNames:
    """Names of one layer's MoE tensors from its dense FFN's prefix (`model.layers.3.mlp`), e.g.
    `model.layers.3.mlp.experts.gate_up_proj` (GraniteMoE: `model.layers.3.block_sparse_moe.experts.gate_up_proj`)."""
    block = f"{mlp_prefix.rsplit('.', 1)[0]}.{fmt.block}"
    names = {
        "router": f"{block}.{fmt.router}.weight",
        "gate_up": f"{block}.experts.gate_up_proj",
        "down": f"{block}.experts.down_proj",
    }
    if fmt.shared_expert:
        names.update(
            shared_gate=f"{block}.shared_expert.gate_proj.weight",
            shared_up=f"{block}.shared_expert.up_proj.weight",
            shared_down=f"{block}.shared_expert.down_proj.weight",
            shared_expert_gate=f"{block}.shared_expert_gate.weight",
        )
    return MoeLayerNames(**names)


def expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes the installed `transformers` expects for `config` (from a model built on the meta device).

    A tied `lm_head.weight` is left out: checkpoints of tied models do not store it.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes
