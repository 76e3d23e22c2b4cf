"""A model's sizes by their standard names, whatever its family calls them in `config.json`.

Families name the same value differently on disk (GPT-2, GPT-J, BLOOM and GPT-BigCode store the layer count as
`n_layer`, MPT as `n_layers`); each `transformers` config class maps the standard attribute
(`num_hidden_layers`, `hidden_size`, ...) to its own key through its `attribute_map`. So sizes are read from the
loaded config object, and a `config.json` is edited under the key that map gives. Multimodal wrappers keep the
decoder's sizes in a sub-config (`get_text_config`).
"""

from __future__ import annotations

from typing import Any

from expertmerge.errors import ExpertMergeError


def text_config(config: Any) -> Any:
    """The decoder's config: `config` itself, or a multimodal wrapper's text sub-config."""
    return config.get_text_config(decoder=True)


def layer_count(config: Any, owner: str = "the model") -> int:
    """The decoder's number of layers (`num_hidden_layers` under any of its names); `owner` names the model in
    the error when its config has none."""
    text = text_config(config)
    count = getattr(text, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ExpertMergeError(
            f"{owner}: its config ({type(text).__name__}) has no layer count (num_hidden_layers, stored in "
            f"config.json as '{json_key(text, 'num_hidden_layers')}')."
        )
    return count


def vocab_size(config: Any) -> int | None:
    """The decoder's vocabulary size (the rows of its embedding); None when it has none."""
    size = getattr(text_config(config), "vocab_size", None)
    return size if isinstance(size, int) else None


def json_key(config: Any, name: str) -> str:
    """The `config.json` key that `config`'s class stores the standard attribute `name` under: `n_layer` for
    GPT-2's `num_hidden_layers`, `name` itself where the class does not rename it."""
    return type(config).attribute_map.get(name, name)


# Where MoE configs give the number of routed experts per layer.
_ROUTED_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def routed_expert_count(config: Any) -> int | None:
    """Routed experts per MoE layer of `config` (its text config for multimodal wrappers); None for dense."""
    text = text_config(config)
    for key in _ROUTED_EXPERT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def ffn_width(config: Any, hidden: int) -> int:
    """The decoder's feed-forward width: `intermediate_size`, GPT-2's `n_inner` or OPT's `ffn_dim` where set,
    else the 4 x hidden those families default to."""
    text = text_config(config)
    for key in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * hidden
