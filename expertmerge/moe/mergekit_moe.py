"""mergekit-moe configs as they are: the schema, mergekit's gate modes, its choice of output family, the build.

`python -m expertmerge moe --config moe.yaml --out DIR` reads a `mergekit-moe` YAML unchanged and writes the same
checkpoint mergekit 0.1.5 writes (same tensors), through our one writer into an atomic output folder:

- shared tensors (embeddings, attention, norms, head) from `base_model`;
- routed expert e: the FFN (gate/up/down) of `experts[e].source_model`, plus `noise_scale` Gaussian noise, and
  its `down_proj` times `residual_scale` when set (mergekit applies both to any expert that sets them);
- Qwen2-MoE only: the FFN of `shared_experts[0]` as the always-on shared expert, its gate row from its prompts;
- router rows by `gate_mode` (mergekit's meaning, see `gate_rows`).

Output family (mergekit's `architecture` key and its inference): candidates Mixtral, DeepSeek, Qwen (Qwen2-MoE),
Qwen3 in that order, kept when `architecture` is a prefix of their name and when they support the config;
Mixtral wins when it is a candidate. Mixtral: Llama/Mistral sources, no shared experts. Qwen: Llama, Mistral or
Qwen2 sources and exactly one shared expert (with prompts unless the gates are random). Qwen3: Qwen3 sources, no
shared experts. DeepSeek-MoE (v1) has no class in `transformers` (mergekit writes it for remote code from the
hub), so a config that lands there is refused, naming what to change.

Our additions are opt-in, under an `expertmerge:` block of the same file (`ExpertMergeOptions`); without it the
result is mergekit's.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from expertmerge.errors import ExpertMergeError
from expertmerge.io.model_config import layer_count, text_config
from expertmerge.moe.formats import (
    MIXTRAL,
    MOE_FORMATS,
    QWEN2_MOE,
    QWEN3_MOE,
    MoeFormat,
    no_moe_format,
)
from expertmerge.pool import BASE, ExpertPool

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
RANDOM_GATE_MODES = ("random", "uniform_random")
# mergekit's output families in its own order (`mergekit.moe.ALL_OUTPUT_ARCHITECTURES`), with their names: the
# `architecture` key matches a prefix of the name, case-insensitively.
ARCHITECTURES = (
    ("Mixtral", "mixtral"),
    ("DeepSeek MoE", "deepseek"),
    ("Qwen MoE", "qwen"),
    ("Qwen3 MoE", "qwen3"),
)
_FORMATS = {"mixtral": MIXTRAL, "qwen": QWEN2_MOE, "qwen3": QWEN3_MOE}
CONFIG_COPY = "mergekit_moe_config.yml"  # mergekit's name for the copy of the config in the output


# ----------------------------------------------------------------------------------------------- schema
class MoeExpert(BaseModel):
    """One entry of `experts` / `shared_experts` (mergekit's `Expert`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no option means anything at NaN or inf

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

    @field_validator("source_model", mode="before")
    @classmethod
    def _plain_model(cls, value: Any) -> Any:
        if isinstance(value, str) and "+" in value:
            raise ValueError(
                f"'{value}' names a LoRA ('model+lora'); merge the adapter into the model first and give its folder"
            )
        if isinstance(value, dict):
            raise ValueError("give the model as a folder, zoo:// reference or hub id (a string)")
        return value


class RouterOptions(BaseModel):
    """`expertmerge: {router: ...}`: routers fitted to calibration data (and tuned) instead of mergekit's gates.

    - `calib`: calibration texts per expert: each entry is a `fit` config's `data.tasks` entry (`sources`,
      `text_field`, `template`, `chat_template`, ...; `name` optional) whose `expert` is the expert's index in
      `experts` or its `source_model`. An expert without one is represented by its `positive_prompts`.
    - `data`: the fit's `data:` settings for those texts (`samples_per_task`, `eval_samples_per_task`,
      `max_length`, `batch_size`, `seed`); the held-out part is never fitted on and scores the routers.
    - `init`: `discriminant` (the rows `fit`'s fused-MoE export starts from: per layer, the bias-free linear
      discriminant of what each expert's texts look like at the router, run through the shared tensors with that
      expert's FFN) or `gate_mode` (mergekit's rows for the config's `gate_mode`).
    - `tune_steps`: then train only the routers this many Adam steps (`lr`, `balance`: the load-balancing
      weight) against each text's own expert's logits (KL, teacher targets cached); needs `calib` texts.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no option means anything at NaN or inf

    calib: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    init: Literal["discriminant", "gate_mode"] = "discriminant"
    tune_steps: int = Field(0, ge=0)
    lr: float = Field(0.01, gt=0)
    balance: float = Field(0.01, ge=0)


class ExpertMergeOptions(BaseModel):
    """Our opt-in keys (`expertmerge:` block); nothing here changes a plain mergekit config's result.

    - `seed`: seeds torch's RNG before the random gates and the experts' `noise_scale` noise (mergekit's
      `--random-seed`); `random` with a seed gives mergekit's very rows for the same seed.
    - `shared_tensors`: a model folder (or `zoo://` / hub reference) of the same architecture whose non-FFN tensors
      (embeddings, attention, norms, head) the MoE takes instead of `base_model`'s: e.g. the dense export of a
      learned merge of these experts (`python -m expertmerge fit`, or `merge`). Its hidden states (or embeddings)
      then make the gates too, since they are what the MoE's routers will see.
    - `router`: routers fitted to calibration data and tuned (`RouterOptions`); the shared expert's gate (Qwen2-MoE)
      stays mergekit's.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no option means anything at NaN or inf

    seed: int | None = None
    shared_tensors: str | None = None
    router: RouterOptions | None = None


class MergekitMoeConfig(BaseModel):
    """A `mergekit-moe` YAML (mergekit's `MoEMergeConfig`), plus our opt-in `expertmerge` block."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no option means anything at NaN or inf

    base_model: str
    experts: list[MoeExpert]
    gate_mode: Literal[GATE_MODES] = "hidden"  # type: ignore[valid-type]
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[MoeExpert] | None = None
    architecture: str | None = None
    expertmerge: ExpertMergeOptions | None = None

    _base_field = field_validator("base_model", mode="before")(MoeExpert._plain_model.__func__)

    @property
    def options(self) -> ExpertMergeOptions:
        return self.expertmerge or ExpertMergeOptions()

    @property
    def gated(self) -> list[MoeExpert]:
        """The experts that get gate rows, in row order: routed ones, then shared ones when they are gated
        (mergekit: when they have prompts, or the gates are random)."""
        shared = list(self.shared_experts or [])
        prompted = any(e.positive_prompts for e in shared)
        if shared and any(bool(e.positive_prompts) != prompted for e in shared):
            raise ExpertMergeError(
                "shared_experts: give positive_prompts to every shared expert or to none, not a mix."
            )
        return list(self.experts) + (shared if prompted or self.gate_mode in RANDOM_GATE_MODES else [])


def _error_location(error: dict) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


class IgnoredKeyWarning(UserWarning):
    """A key mergekit-moe accepts and ignores (any unknown key): ignored here too, so its configs run unchanged."""


def _without_ignored_keys(data: dict, source: str) -> dict:
    """`data` without the keys mergekit's schema would silently drop, each named in an `IgnoredKeyWarning`."""

    def known(entry: Any, fields: Any, where: str) -> Any:
        if not isinstance(entry, dict):
            return entry
        for key in entry:
            if key not in fields:
                warnings.warn(
                    f"{source}: key '{where}{key}' is not a mergekit-moe key; ignored (as mergekit does).",
                    IgnoredKeyWarning,
                    stacklevel=4,
                )
        return {key: value for key, value in entry.items() if key in fields}

    cleaned = known(data, MergekitMoeConfig.model_fields, "")
    for group in ("experts", "shared_experts"):
        if isinstance(cleaned.get(group), list):
            cleaned[group] = [
                known(entry, MoeExpert.model_fields, f"{group}[{index}].")
                for index, entry in enumerate(cleaned[group])
            ]
    return cleaned


def parse_moe_config(data: Any, source: str = "config", allow_all_same: bool = False) -> MergekitMoeConfig:
    """Validate a loaded mergekit-moe YAML; `ExpertMergeError` naming the file and key otherwise."""
    if not isinstance(data, dict):
        raise ExpertMergeError(f"{source}: a mergekit-moe config is a mapping (base_model, experts, ...).")
    data = _without_ignored_keys(data, source)
    try:
        config = MergekitMoeConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = _error_location(first)
        if first["type"] == "extra_forbidden":
            if first["loc"][0] == "expertmerge":
                block, fields = "the expertmerge block", ExpertMergeOptions.model_fields
                if len(first["loc"]) > 2 and first["loc"][1] == "router":
                    block, fields = "expertmerge.router", RouterOptions.model_fields
                raise ExpertMergeError(
                    f"{source}: key '{where}' is not supported; {block} takes {', '.join(fields)}."
                ) from None
            allowed = ", ".join(
                MergekitMoeConfig.model_fields if len(first["loc"]) == 1 else MoeExpert.model_fields
            )
            raise ExpertMergeError(
                f"{source}: unknown key '{where}'; a mergekit-moe config takes {allowed}."
            ) from None
        raise ExpertMergeError(f"{source}: key '{where}': {first['msg']}.") from None
    check_moe_config(config, source, allow_all_same)
    return config


def load_moe_config(path: str | Path, allow_all_same: bool = False) -> tuple[MergekitMoeConfig, str]:
    """Read and validate a mergekit-moe YAML file; returns the config and the file's text."""
    from expertmerge.config_file import read_config_file

    data = read_config_file(path, "moe --config")
    return parse_moe_config(data, str(path), allow_all_same), Path(path).read_text()


def check_moe_config(config: MergekitMoeConfig, source: str = "config", allow_all_same: bool = False) -> None:
    """mergekit's `is_bad_config`, as one-line errors naming the key."""
    if config.experts_per_token < 1:
        raise ExpertMergeError(f"{source}: experts_per_token must be >= 1, got {config.experts_per_token}.")
    if len(config.experts) < config.experts_per_token:
        raise ExpertMergeError(
            f"{source}: experts_per_token is {config.experts_per_token} but there are only {len(config.experts)} "
            "experts; list at least as many experts."
        )
    config.gated  # noqa: B018 - raises for a mix of prompted and unprompted shared experts
    if config.gate_mode == "random":
        return
    for index, expert in enumerate(config.experts):
        if not expert.positive_prompts:
            raise ExpertMergeError(
                f"{source}: experts[{index}] has no positive_prompts; gate_mode {config.gate_mode} builds its "
                "router row from them (or use gate_mode: random)."
            )

    def prompts(expert: MoeExpert) -> tuple:
        return tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ())

    if len(config.experts) > 1 and all(prompts(e) == prompts(config.experts[0]) for e in config.experts[1:]):
        raise ExpertMergeError(
            f"{source}: every expert has the same positive_prompts and negative_prompts, so no router can tell "
            "them apart; give each expert prompts of what should go to it."
        )
    first = config.experts[0].source_model
    if (
        not allow_all_same
        and len(config.experts) > 1
        and all(e.source_model == first for e in config.experts)
    ):
        raise ExpertMergeError(
            f"{source}: every expert's source_model is '{config.experts[0].source_model}'; the MoE would compute "
            "the same as that model at more cost. Use gate_mode: random to upcycle for training, or pass "
            "--i-understand-this-is-not-useful-without-training."
        )


# ------------------------------------------------------------------------------------------ architecture
def _supports(key: str, config: MergekitMoeConfig, model_types: Sequence[str | None]) -> str | None:
    """None when the family `key` can write `config`, else why not (mergekit's `supports_config`)."""
    shared = config.shared_experts or []
    same = len(set(model_types)) == 1
    family = model_types[0]
    if key == "mixtral":
        if shared:
            return "Mixtral has no shared experts"
        if not same or family not in ("llama", "mistral"):
            return "Mixtral needs Llama or Mistral models, all of one type"
    elif key == "deepseek":
        if len(shared) > 1 or (shared and (shared[0].positive_prompts or shared[0].negative_prompts)):
            return "DeepSeek MoE takes at most one shared expert, without prompts"
        if not same or family not in ("llama", "mistral"):
            return "DeepSeek MoE needs Llama or Mistral models, all of one type"
    elif key == "qwen":
        if len(shared) != 1:
            return "Qwen MoE needs exactly one shared expert"
        if config.gate_mode != "random" and not shared[0].positive_prompts:
            return "Qwen MoE needs positive_prompts for its shared expert (its gate row)"
        if not same or family not in ("llama", "mistral", "qwen2"):
            return "Qwen MoE needs Qwen2, Llama or Mistral models, all of one type"
    else:
        if shared:
            return "Qwen3 MoE has no shared experts"
        if any(t != "qwen3" for t in model_types):
            return "Qwen3 MoE needs Qwen3 models"
    return None


def select_format(
    config: MergekitMoeConfig, model_types: Sequence[str | None], source: str = "config"
) -> MoeFormat:
    """The output family mergekit would choose for `config` (see the module docs)."""
    wanted = (config.architecture or "").lower()
    named = [(name, key) for name, key in ARCHITECTURES if name.lower().startswith(wanted)]
    if not named:
        raise ExpertMergeError(
            f"{source}: architecture '{config.architecture}' matches no output family; use one of "
            f"{', '.join(key for _, key in ARCHITECTURES)}."
        )
    # A family no output format takes is refused by its name alone: the per-format reasons would blame keys
    # (shared_experts, architecture) that no value could fix.
    unknown = sorted({str(t) for t in model_types if t not in MOE_FORMATS})
    if unknown:
        raise ExpertMergeError(f"{source}: {no_moe_format(', '.join(unknown))}")
    # Families with a fused MoE format that no mergekit output family takes (granite, olmo2): mergekit refuses them.
    ours = sorted({str(t) for t in model_types if MOE_FORMATS[t] not in _FORMATS.values()})
    if ours:
        formats = ", ".join(sorted({MOE_FORMATS[t].name for t in ours}))
        taken = ", ".join(dict.fromkeys(t for fmt in _FORMATS.values() for t in fmt.source_types))
        raise ExpertMergeError(
            f"{source}: model_type '{', '.join(ours)}' has no mergekit-moe output family (mergekit-moe takes "
            f"{taken} models); its fused MoE ({formats}) is written by `fit --model.moe true` or `export --moe`."
        )
    reasons = {key: _supports(key, config, model_types) for _, key in named}
    candidates = [key for key, reason in reasons.items() if reason is None]
    if not candidates:
        why = "; ".join(f"{key}: {reason}" for key, reason in reasons.items())
        raise ExpertMergeError(
            f"{source}: no output family fits these models (model_type {', '.join(sorted(set(map(str, model_types))))}) "
            f"and keys architecture / shared_experts: {why}."
        )
    chosen = "mixtral" if "mixtral" in candidates else candidates[0]
    if chosen == "deepseek":
        import transformers

        raise ExpertMergeError(
            f"{source}: this config makes a DeepSeek-MoE (architecture deepseek, or shared_experts without prompts on "
            f"Llama/Mistral models); transformers {transformers.__version__} has no DeepSeek-MoE (v1) class, mergekit "
            "writes it for remote code. Give the shared expert positive_prompts and set architecture: qwen "
            "(Qwen2-MoE), or drop shared_experts (Mixtral)."
        )
    return _FORMATS[chosen]


# ------------------------------------------------------------------------------------------- gate rows
def moe_tokenizer(base_dir: Path) -> Any:
    """The base's tokenizer set up as mergekit-moe does: left padding, padded with the BOS (else EOS) token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any) -> Any:
    """mergekit's prompt encoding: the BOS text prepended, no other special tokens, padded to the longest."""
    return tokenizer(
        [(tokenizer.bos_token or "") + prompt for prompt in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def cheap_embed_row(embedding: torch.Tensor, encoded: Any, num_layers: int) -> torch.Tensor:
    """`cheap_embed`: the sum of the prompts' token embeddings (padding excluded), unit norm, for every layer.

    Computed with mergekit's very operations (a one-hot product in fp32), so the rows agree to the last bit.
    """
    onehot = torch.nn.functional.one_hot(encoded["input_ids"], num_classes=embedding.shape[0])
    summed = (
        ((onehot.float() @ embedding.float()) * encoded["attention_mask"].unsqueeze(-1))
        .sum(1)
        .sum(0, keepdim=True)
    )
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)


@torch.no_grad()
def hidden_row(model: Any, encoded: Any, average: bool) -> torch.Tensor:
    """`hidden` / `hidden_last` (last token) and `hidden_avg` (mean over positions, padding included, as mergekit
    does): the hidden state entering each decoder layer, averaged over the prompts: `[layers, hidden]`."""
    output = model(**encoded.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # [layers, batch, sequence, hidden]: each layer's input
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def gate_rows(
    config: MergekitMoeConfig, base_dir: Path, tokenizer: Any, pool: ExpertPool, donor: str = BASE
) -> torch.Tensor:
    """Router rows `[layers, gated experts, hidden]` by `gate_mode`, as mergekit's `get_gate_params` makes them.

    - `random`: `torch.randn`; `uniform_random`: U(-1/sqrt(hidden), 1/sqrt(hidden)) (nn.Linear's init);
    - `cheap_embed`: `cheap_embed_row` of the positive prompts, minus that of the negative ones;
    - `hidden` / `hidden_last` / `hidden_avg`: the base model (bf16, as mergekit loads it) run on the prompts,
      `hidden_row` of the positive prompts minus that of the negative ones;
    then each row is scaled to unit norm. `base_dir` / `donor` (a pool model) give the model that is run or
    whose embeddings are read: the base, or the `shared_tensors` model.
    """
    experts = config.gated
    layers, hidden = layer_count(pool.config), int(text_config(pool.config).hidden_size)
    mode = config.gate_mode
    if mode == "random":
        return torch.randn((layers, len(experts), hidden))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, len(experts), hidden)) * 2 * scale - scale

    row: Callable[[Any], torch.Tensor]
    model = None
    if mode == "cheap_embed":
        embedding = (
            pool.base_tensor("model.embed_tokens.weight")
            if donor == BASE
            else pool.expert_tensor(donor, "model.embed_tokens.weight")
        )

        def row(encoded: Any) -> torch.Tensor:
            return cheap_embed_row(embedding, encoded, layers)

    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16).eval()

        def row(encoded: Any) -> torch.Tensor:
            return hidden_row(model, encoded, average=mode == "hidden_avg")

    vectors = []
    for expert in experts:
        states = row(tokenize_prompts(expert.positive_prompts or [], tokenizer))
        if expert.negative_prompts:
            states -= row(tokenize_prompts(expert.negative_prompts, tokenizer))
        states /= states.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(states)
    model = None  # the base model is freed before any tensor is written
    gc.collect()
    return torch.stack(vectors, dim=0).permute(1, 0, 2)


def degenerate_layers(rows: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose gate matrix has condition number above `threshold` (mergekit's warning: prompts too similar)."""
    return [
        layer for layer in range(rows.shape[0]) if float(torch.linalg.cond(rows[layer].float())) > threshold
    ]
