"""Functional alignment of models that share an architecture but no pretraining run (pure maths, no I/O).

Two models trained from different random initialisations compute similar functions in different coordinates:
the FFN neurons of a layer come in another order, and the residual stream is expressed in another basis.
Both are symmetries of a Llama-style decoder, so an expert can be moved into the reference's coordinates
without changing a single output:

- FFN neurons (Symphony-MoE's alignment): a permutation `perm` of layer l's intermediate units, applied to the
  rows of `gate_proj` / `up_proj` and the columns of `down_proj`. It is found by matching each reference unit
  to the expert unit whose activation `act(gate(x)) * up(x)` correlates best with it on the same calibration
  tokens, an assignment problem (`scipy.optimize.linear_sum_assignment`).
- The residual stream (**ours**; needed when no base is shared at all): an orthogonal `R` with `h_ref ~ R h`,
  the Procrustes solution on the hidden states of every layer. RMSNorm is equivariant under a rotation only
  without its gain, so each norm's gain is first folded into the linear maps that read its output
  (q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm`, `lm_head` after the final norm)
  and set to one; then every map reading the residual stream is multiplied by `R^T` on the right and every map
  writing to it (`o_proj`, `down_proj`) by `R` on the left; embeddings rows are rotated.

`aligned_tensor(name, read, alignment)` gives one tensor of the aligned expert from the original's tensors,
so an aligned model is never materialised: the MoE writer reads it tensor by tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from expertmerge.errors import ExpertMergeError

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class Alignment:
    """How one expert maps onto the reference: residual rotation (or None) and FFN permutations per layer.

    `ffn[l][i]` is the expert's intermediate unit that becomes unit i of layer l; `residual` is `R` with
    `h_reference ~ R @ h_expert` (orthogonal, `[hidden, hidden]`).
    """

    residual: torch.Tensor | None = None
    ffn: Mapping[int, torch.Tensor] = field(default_factory=dict)
    # Attention heads of layer l: `heads[l][i]` is the expert's query head that becomes head i, and
    # `kv_heads[l]` the matching key/value heads (a GQA group moves as a whole, with its query heads).
    heads: Mapping[int, torch.Tensor] = field(default_factory=dict)
    kv_heads: Mapping[int, torch.Tensor] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return self.residual is None and not self.ffn and not self.heads


IDENTITY = Alignment()


# ------------------------------------------------------------------------------------- statistics maths
@dataclass
class CrossMoments:
    """Running sums over tokens of two activation sets `a` `[tokens, n]` and `b` `[tokens, m]` (fp64)."""

    count: int = 0
    sum_a: torch.Tensor | None = None
    sum_b: torch.Tensor | None = None
    sq_a: torch.Tensor | None = None
    sq_b: torch.Tensor | None = None
    cross: torch.Tensor | None = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate one batch of paired token activations (rows: the same tokens, padding removed)."""
        if a.shape[0] != b.shape[0]:
            raise ExpertMergeError(f"paired activations differ in tokens: {a.shape[0]} vs {b.shape[0]}")
        a, b = a.double(), b.double()
        parts = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b)
        if self.sum_a is None:
            self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross = parts
        else:
            self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross = (
                old + new
                for old, new in zip(
                    (self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross), parts, strict=True
                )
            )
        self.count += int(a.shape[0])

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation `[n, m]` of every unit of `a` with every unit of `b` (dead units: 0)."""
        if self.cross is None or self.count < 2:
            raise ExpertMergeError("correlation needs paired activations of at least two tokens")
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - mean_a[:, None] * mean_b[None, :]
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        return cov / (std_a[:, None] * std_b[None, :]).clamp_min(eps)


def match_units(correlation: torch.Tensor) -> torch.Tensor:
    """The permutation `perm` maximising `sum_i correlation[i, perm[i]]` (reference unit i <- unit perm[i])."""
    from scipy.optimize import linear_sum_assignment

    if correlation.dim() != 2 or correlation.shape[0] != correlation.shape[1]:
        raise ExpertMergeError(f"correlation must be square, got {list(correlation.shape)}")
    if not torch.isfinite(correlation).all():
        raise ExpertMergeError("correlation holds NaN or Inf; are some calibration tokens non-finite?")
    rows, cols = linear_sum_assignment(correlation.double().cpu().numpy(), maximize=True)
    perm = torch.empty(correlation.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def match_heads(similarity: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-head and key/value-head permutations maximising the summed `similarity[i, perm[i]]` of query
    heads, where query heads move only with their GQA group: the groups are matched first (each pair of
    groups scored by the best matching of their query heads), then the query heads within matched groups.

    Permuting whole heads is exact under RoPE (it rotates within a head's dimensions, the same for all heads).
    """
    heads = similarity.shape[0]
    if similarity.shape != (heads, heads) or kv_heads < 1 or heads % kv_heads:
        raise ExpertMergeError(f"head similarity {list(similarity.shape)} does not fit {kv_heads} kv heads")
    size = heads // kv_heads
    blocks = similarity.reshape(kv_heads, size, kv_heads, size).permute(0, 2, 1, 3)  # [g, g', i, j]
    inner: dict[tuple[int, int], torch.Tensor] = {}
    score = torch.zeros(kv_heads, kv_heads, dtype=torch.float64)
    for g in range(kv_heads):
        for h in range(kv_heads):
            inner[(g, h)] = match_units(blocks[g, h])
            score[g, h] = blocks[g, h][torch.arange(size), inner[(g, h)]].sum()
    groups = match_units(score) if kv_heads > 1 else torch.zeros(1, dtype=torch.long)
    query = torch.cat([groups[g] * size + inner[(g, int(groups[g]))] for g in range(kv_heads)])
    return query, groups


def procrustes_rotation(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal `R` maximising `trace(R^T cross)` for `cross = sum_t h_ref(t) h(t)^T`: `R h ~ h_ref`."""
    if cross.dim() != 2 or cross.shape[0] != cross.shape[1]:
        raise ExpertMergeError(f"cross moments must be square, got {list(cross.shape)}")
    u, _, vh = torch.linalg.svd(cross.double())
    return (u @ vh).float()


def matched_correlation(correlation: torch.Tensor, perm: torch.Tensor | None = None) -> float:
    """Mean correlation of matched units (`perm`; identity if None): how alike the two coordinate systems are."""
    index = torch.arange(correlation.shape[0]) if perm is None else perm
    return float(correlation[torch.arange(correlation.shape[0]), index].mean())


# ---------------------------------------------------------------------------------------- tensor maths
_ROLE = (
    ("embed", re.compile(r"(?:^|\.)embed_tokens\.weight$")),
    ("head", re.compile(r"(?:^|\.)lm_head\.weight$")),
    ("final_norm", re.compile(r"^(?:model\.)?norm\.weight$")),
    ("input_norm", re.compile(r"\.input_layernorm\.weight$")),
    ("post_norm", re.compile(r"\.post_attention_layernorm\.weight$")),
    ("qkv", re.compile(r"\.self_attn\.[qkv]_proj\.weight$")),
    ("qkv_bias", re.compile(r"\.self_attn\.[qkv]_proj\.bias$")),
    ("head_norm", re.compile(r"\.self_attn\.[qk]_norm\.weight$")),
    ("o", re.compile(r"\.self_attn\.o_proj\.weight$")),
    ("gate_up", re.compile(r"\.mlp\.(?:gate|up)_proj\.weight$")),
    ("down", re.compile(r"\.mlp\.down_proj\.weight$")),
)


def tensor_role(name: str) -> str | None:
    """What a tensor of a Llama-style decoder does under alignment (None: not one the alignment knows)."""
    return next((role for role, pattern in _ROLE if pattern.search(name)), None)


def _layer(name: str) -> int:
    match = _LAYER.search(name)
    if match is None:
        raise ExpertMergeError(f"tensor '{name}' has no layer number")
    return int(match.group(1))


def _norm_name(name: str, role: str) -> str:
    """The RMSNorm whose output the linear map `name` reads (its gain is folded into the map)."""
    if role == "head":
        return re.sub(r"lm_head\.weight$", "model.norm.weight", name)
    prefix = name[: _LAYER.search(name).end()]
    return prefix + ("input_layernorm.weight" if role == "qkv" else "post_attention_layernorm.weight")


def aligned_tensor(
    name: str, read: Callable[[str], torch.Tensor], alignment: Alignment, *, tied: bool = False
) -> torch.Tensor:
    """Tensor `name` of the aligned expert, in fp32, from `read(name)` (the original expert's fp32 tensors).

    The aligned expert computes exactly the original's function (up to float rounding). Raises an
    ExpertMergeError for a tensor the residual rotation would have to touch but does not know, and for tied
    embeddings (the head's folded norm gain cannot be shared with the embedding).
    """
    tensor = read(name).float()
    if alignment.is_identity:
        return tensor
    role = tensor_role(name)
    rotation = alignment.residual
    if rotation is not None:
        if tied:
            raise ExpertMergeError(
                f"residual alignment needs untied embeddings (tensor '{name}'); use residual: none."
            )
        if role is None and tensor.dim() >= 1 and rotation.shape[0] in tensor.shape:
            raise ExpertMergeError(
                f"tensor '{name}' {list(tensor.shape)} reads or writes the residual stream in a way the "
                "residual alignment does not know; use residual: none."
            )
        if role in ("final_norm", "input_norm", "post_norm"):
            tensor = torch.ones_like(tensor)  # the gain now lives in the maps that read the norm's output
        elif role == "embed":
            tensor = tensor @ rotation.T
        elif role in ("qkv", "gate_up", "head"):
            tensor = (tensor * read(_norm_name(name, role)).float()[None, :]) @ rotation.T
        elif role in ("o", "down"):
            tensor = rotation @ tensor
    if role in ("qkv", "qkv_bias", "o") and alignment.heads:
        tensor = _permute_heads(name, tensor, alignment)
    if role in ("gate_up", "down"):
        perm = alignment.ffn.get(_layer(name))
        if perm is not None:
            tensor = tensor[perm] if role == "gate_up" else tensor[:, perm]
    return tensor.contiguous()


def _permute_heads(name: str, tensor: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    layer = _layer(name)
    if layer not in alignment.heads:
        return tensor
    is_query = ".q_proj." in name or ".o_proj." in name
    perm = alignment.heads[layer] if is_query else alignment.kv_heads[layer]
    if ".o_proj." in name:  # columns: [hidden, heads * head_dim]
        rows = tensor.shape[0]
        return tensor.reshape(rows, len(perm), -1)[:, perm].reshape(rows, -1)
    shape = tensor.shape
    return tensor.reshape(len(perm), -1, *shape[1:])[perm].reshape(shape)


def aligned_state(
    tensors: Mapping[str, torch.Tensor], alignment: Alignment, *, tied: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of `tensors` aligned (`aligned_tensor`), e.g. a model's `state_dict()`."""
    return {
        name: aligned_tensor(name, tensors.__getitem__, alignment, tied=tied)
        if tensors[name].is_floating_point()
        else tensors[name]
        for name in tensors
    }
