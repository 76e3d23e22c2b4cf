"""Sequence-level mixture of whole expert models (MergeME, NAACL 2025): routing once per request.

A `SequenceMoEForCausalLM` holds N complete decoder stacks. For each request (row of the batch) a router
looks at the prompt once, picks the top-k experts and their weights, and every later token of that request
runs only those experts, each with its own KV cache. With k = 1 the output is that expert's logits; with
k > 1 it is the mixture of the experts' next-token distributions, `log sum_k w_k softmax(logits_k)`.

Routers:
- `perplexity` (MergeME's heuristic, no training): every expert scores the prompt; weights are the inverse
  perplexities of the top k, normalised. The prompt's forward pass of the chosen experts is kept as their
  KV cache, so routing costs the other experts' prompt passes only.
- `learned`: a linear layer on the mean of the router embedding over the prompt (RMS-normalised), trained
  on calibration data; only the chosen experts run.

Embeddings:
- `own`: each expert keeps its own embedding and head. Exact (forcing expert k reproduces expert k's logits)
  and works for any width, depth or family sharing the vocabulary.
- `shared` (MergeME's heterogeneous join): one embedding and head of the widest expert; each expert reads the
  shared embedding through an input projector and writes to the shared head through an output projector.
  The widest expert's projectors start as identities; the others start as least-squares fits and are
  trained by distillation to the expert's own logits.

Loading an export: `import expertmerge.moe.sequence` registers the model type with `AutoConfig` and
`AutoModelForCausalLM` (importing this module is the registration; `import expertmerge` alone does not
load torch or transformers, so it cannot register anything), after which
`AutoModelForCausalLM.from_pretrained(folder)` builds this module's `SequenceMoEForCausalLM`. This file
imports only torch and transformers: an export copies it next to the weights and names it in the config's
`auto_map`, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` also loads the folder
where expertmerge is not installed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "expertmerge_sequence_moe"
ROUTERS = ("perplexity", "learned")
EMBEDDINGS = ("own", "shared")


class SequenceMoEConfig(PreTrainedConfig):
    """`expert_configs`: each expert's own config as a dict (with its `model_type`); `hidden_size`: the shared
    width (the widest expert's); `router_expert`: whose embedding the learned router reads in `own` mode."""

    model_type = MODEL_TYPE

    expert_configs: list | None = None
    expert_names: list | None = None
    embeddings: str = "own"
    router: str = "perplexity"
    router_top_k: int = 1  # experts per request (not `top_k`: generation would read that as sampling's top-k)
    hidden_size: int = 0
    vocab_size: int = 0
    router_expert: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        experts = self.expert_configs or []
        if self.expert_names is None:
            self.expert_names = [f"expert_{i}" for i in range(len(experts))]
        if experts:
            if self.router not in ROUTERS:
                raise ValueError(f"router must be one of {ROUTERS}, got '{self.router}'")
            if self.embeddings not in EMBEDDINGS:
                raise ValueError(f"embeddings must be one of {EMBEDDINGS}, got '{self.embeddings}'")
            if not 1 <= self.router_top_k <= len(experts):
                raise ValueError(
                    f"router_top_k must be in [1, {len(experts)}] (the number of experts), got {self.router_top_k}"
                )
            if len(self.expert_names) != len(experts):
                raise ValueError("expert_names and expert_configs differ in length")

    def expert_config(self, index: int) -> PreTrainedConfig:
        fields = dict(self.expert_configs[index])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)


class SequenceMoECache:
    """Routing of each request plus one KV cache per chosen expert (over that expert's rows of the batch)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, weights: torch.Tensor, expert_caches: dict[int, Any], rows: dict[int, torch.Tensor]):
        self.weights = weights  # [B, N], zero outside each row's top k
        self.expert_caches = expert_caches
        self.rows = rows  # expert -> the batch rows it serves, in cache order
        self.seen_tokens = 0

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


class SequenceMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SequenceMoEConfig
    base_model_prefix = "sequence_moe"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    def __init__(self, config: SequenceMoEConfig):
        super().__init__(config)
        sub_configs = [config.expert_config(i) for i in range(len(config.expert_configs))]
        self.expert_widths = [c.get_text_config().hidden_size for c in sub_configs]
        if config.embeddings == "own":
            self.experts = nn.ModuleList(AutoModelForCausalLM.from_config(c) for c in sub_configs)
            router_width = self.expert_widths[config.router_expert]
        else:
            self.experts = nn.ModuleList(AutoModel.from_config(c) for c in sub_configs)
            for expert, width in zip(self.experts, self.expert_widths, strict=True):
                # Inputs arrive through the projectors; a one-row stand-in keeps the stack's own code paths valid.
                expert.set_input_embeddings(nn.Embedding(1, width))
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.input_projectors = nn.ModuleList(
                nn.Linear(config.hidden_size, width, bias=False) for width in self.expert_widths
            )
            self.output_projectors = nn.ModuleList(
                nn.Linear(width, config.hidden_size, bias=False) for width in self.expert_widths
            )
            router_width = config.hidden_size
        self.router = nn.Linear(router_width, len(sub_configs))
        self.post_init()
        # `post_init` gathers tied weights from direct children only; the experts sit in a ModuleList, so their
        # ties (e.g. lm_head = embed_tokens) are added here, or a reload would leave tied heads uninitialised.
        for index, expert in enumerate(self.experts):
            for target, source in (getattr(expert, "all_tied_weights_keys", None) or {}).items():
                self.all_tied_weights_keys[f"experts.{index}.{target}"] = f"experts.{index}.{source}"

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (one per chosen expert) on the first forward

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "router", None):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def router_embedding(self) -> nn.Embedding:
        if self.config.embeddings == "shared":
            return self.embed_tokens
        return self.experts[self.config.router_expert].get_input_embeddings()

    # ------------------------------------------------------------------------------------------ routing
    def router_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, D]: the RMS-normalised mean of the router embedding over each prompt's real tokens."""
        embedded = self.router_embedding()(input_ids).float()
        mask = attention_mask.to(embedded.dtype).unsqueeze(-1)
        mean = (embedded * mask).sum(1) / mask.sum(1).clamp_min(1)
        return mean * torch.rsqrt(mean.pow(2).mean(-1, keepdim=True) + 1e-6)

    def router_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.router_features(input_ids, attention_mask)
        return self.router(features.to(self.router.weight.dtype)).float()

    def _top_k_weights(self, scores: torch.Tensor, normalise: str) -> torch.Tensor:
        values, indices = scores.topk(self.config.router_top_k, dim=1)
        if normalise == "softmax":
            top = values.softmax(1)
        else:  # inverse perplexities, exp(-mean NLL), normalised over the chosen experts
            top = (values - values.max(1, keepdim=True).values).exp()
            top = top / top.sum(1, keepdim=True)
        return torch.zeros_like(scores).scatter(1, indices, top)

    @staticmethod
    def prompt_nll(
        logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """[B] mean next-token NLL over the prompt's real token pairs (0 where a prompt has one token)."""
        log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        pairs = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
        return (nll * pairs).sum(1) / pairs.sum(1).clamp_min(1)

    # -------------------------------------------------------------------------------------- one expert
    def expert_forward(
        self,
        index: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Logits [b, L, V] of expert `index` on these rows, and its updated cache."""
        own = self.config.embeddings == "own"
        inputs = (
            {"input_ids": input_ids}
            if own
            else {"inputs_embeds": self.input_projectors[index](self.embed_tokens(input_ids))}
        )
        out = self.experts[index](
            **inputs,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        if own:
            return out.logits, out.cache
        return self.lm_head(self.output_projectors[index](out.last_hidden_state)), out.cache

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SequenceMoECache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        expert_index: int | torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """`expert_index` (int or [B]) forces the experts; `routing_weights` [B, N] forces a mixture. Otherwise
        the first call of a request (no `cache`) routes on its input, and later calls reuse that routing."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(
                "SequenceMoEForCausalLM takes input_ids (experts may not share an embedding space)"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # Experts get the caller's mask (None stays None: their own code sizes it to cache + input).
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        batch = input_ids.shape[0]
        n = len(self.experts)
        prefill_logits: dict[int, torch.Tensor] = {}
        prefill_caches: dict[int, Any] = {}
        if cache is None:
            if expert_index is not None:
                index = torch.as_tensor(expert_index, device=input_ids.device).expand(batch)
                weights = F.one_hot(index.long(), n).float()
            elif routing_weights is not None:
                weights = routing_weights.float().to(input_ids.device)
            elif self.config.router == "learned":
                weights = self._top_k_weights(self.router_logits(input_ids, prompt_mask), "softmax")
            else:
                scores = []
                for k in range(n):
                    prefill_logits[k], prefill_caches[k] = self.expert_forward(
                        k, input_ids, attention_mask, position_ids, self._new_cache(use_cache), use_cache
                    )
                    scores.append(-self.prompt_nll(prefill_logits[k], input_ids, prompt_mask))
                weights = self._top_k_weights(torch.stack(scores, 1), "inverse_perplexity")
            rows = {
                k: (weights[:, k] > 0).nonzero().squeeze(1)
                for k in range(n)
                if bool((weights[:, k] > 0).any())
            }
            cache = SequenceMoECache(weights, {}, rows)
            for k, chosen in rows.items():
                if k in prefill_caches and prefill_caches[k] is not None and len(chosen) < batch:
                    prefill_caches[k].batch_select_indices(chosen)
        weights = cache.weights
        logits_per_expert: dict[int, torch.Tensor] = {}
        for k, chosen in cache.rows.items():
            if k in prefill_logits:
                logits_per_expert[k] = prefill_logits[k][chosen]
                cache.expert_caches[k] = prefill_caches[k]
                continue
            logits, expert_cache = self.expert_forward(
                k,
                input_ids[chosen],
                None if attention_mask is None else attention_mask[chosen],
                None if position_ids is None else position_ids[chosen],
                cache.expert_caches.get(k, self._new_cache(use_cache)),
                use_cache,
            )
            logits_per_expert[k] = logits
            cache.expert_caches[k] = expert_cache
        cache.seen_tokens += input_ids.shape[1]
        logits = self._combine(weights, cache.rows, logits_per_expert, input_ids.shape)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def _new_cache(self, use_cache: bool) -> DynamicCache | None:
        return DynamicCache() if use_cache else None

    @staticmethod
    def _combine(
        weights: torch.Tensor,
        rows: dict[int, torch.Tensor],
        logits_per_expert: dict[int, torch.Tensor],
        shape: torch.Size,
    ) -> torch.Tensor:
        """Raw logits where a request has one expert (exactness); log of the weighted mixture otherwise."""
        first = next(iter(logits_per_expert.values()))
        single = (weights > 0).sum(1) == 1
        out = first.new_zeros(shape[0], shape[1], first.shape[-1], dtype=torch.float32)
        mixed_log = torch.full_like(out, -math.inf)
        for k, chosen in rows.items():
            logits = logits_per_expert[k].float()
            alone = single[chosen]
            out[chosen[alone]] = logits[alone]
            if bool((~alone).any()):
                part = chosen[~alone]
                term = weights[part, k].log().view(-1, 1, 1) + F.log_softmax(logits[~alone], dim=-1)
                mixed_log[part] = torch.logaddexp(mixed_log[part], term)
        mixed = ~single
        out[mixed] = mixed_log[mixed]
        return out

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        for key in ("expert_index", "routing_weights"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def get_input_embeddings(self) -> nn.Module:
        return self.router_embedding()

    def routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] routing weights this model gives each prompt (runs the experts for `perplexity`)."""
        with torch.no_grad():
            out = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        return out.cache.weights


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know the model type (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, SequenceMoEConfig)
        AutoModelForCausalLM.register(SequenceMoEConfig, SequenceMoEForCausalLM)


# Importing the module that defines the model is what makes its exports loadable by the Auto classes; the copy
# an export carries registers the same way (idempotent, so whichever is imported first stays registered).
register()
