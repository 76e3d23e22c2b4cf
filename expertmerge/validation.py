"""Checks of numeric options, run before any work: each names the key as the user writes it (`model.lr`).

Pure functions without I/O. Each returns the value it checked (as a float or an int), so callers can write
`lr = positive("model.lr", lr)`. A bool is never a number here (YAML `true` would otherwise pass as 1), and
NaN and infinities are refused everywhere: no option of this tool means anything at a non-finite value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from expertmerge.errors import ExpertMergeError


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def finite(key: str, value: Any) -> float:
    """`value` as a float; refuses non-numbers, bools, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExpertMergeError(f"{key} must be a number, got {_shown(value)} ({type(value).__name__}).")
    number = float(value)
    if not math.isfinite(number):
        raise ExpertMergeError(f"{key} must be a finite number, got {_shown(value)}.")
    return number


def in_range(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite float within [low, high]; `low_open` / `high_open` exclude that end."""
    number = finite(key, value)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ExpertMergeError(
            f"{key} is {_shown(value)}; it must be {_interval(low, high, low_open, high_open)}."
        )
    return number


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def positive(key: str, value: Any) -> float:
    """A finite float > 0 (learning rates)."""
    return in_range(key, value, 0.0, low_open=True)


MAX_TEMPERATURE = 1000.0  # T^2 * KL is computed in float32: T = 1e30 gave a NaN model, T = 1000 a finite one


def temperature(key: str, value: Any) -> float:
    """A distillation temperature: > 0, and small enough that T^2 stays finite in float32."""
    return in_range(key, value, 0.0, MAX_TEMPERATURE, low_open=True)


def non_negative(key: str, value: Any) -> float:
    """A finite float >= 0 (loss weights)."""
    return in_range(key, value, 0.0)


def integer(key: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool, not a float) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExpertMergeError(f"{key} must be an integer, got {_shown(value)} ({type(value).__name__}).")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ExpertMergeError(f"{key} is {value}; it must be {bound}.")
    return value


def positive_int(key: str, value: Any) -> int:
    """An int >= 1 (sizes, counts, k)."""
    return integer(key, value, minimum=1)


def per_name(key: str, value: Any, names: Sequence[str], check: Any, what: str = "names") -> list[float]:
    """One number, or a list with one number per name (in order), each passed through `check(key, v)`.

    Returns one value per name."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ExpertMergeError(
                f"{key} has {len(value)} values but there are {len(names)} {what} ({', '.join(names)}): "
                f"give one value, or one per {what.rstrip('s')} in that order."
            )
        return [
            check(f"{key}[{index}] ({name})", v)
            for index, (name, v) in enumerate(zip(names, value, strict=True))
        ]
    return [check(key, value)] * len(names)


def weights(key: str, value: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, float]:
    """Finite, non-negative weights by name. With `names` (every name, unlisted ones weigh 1), they must not
    all be 0: a weighting that silences every term would fit nothing."""
    if not isinstance(value, Mapping):
        raise ExpertMergeError(f"{key} must map names to numbers, got {_shown(value)}.")
    checked = {name: non_negative(f"{key}.{name}", v) for name, v in value.items()}
    if names is not None and names and not any(checked.get(name, 1.0) for name in names):
        raise ExpertMergeError(f"{key} gives every task weight 0: at least one must be positive.")
    return checked


def optional(check: Any) -> Any:
    """`check` that lets None (the option's "not set") through."""
    return lambda key, value, *args: None if value is None else check(key, value, *args)


def patterns(key: str, value: Sequence[str] | None) -> None:
    """Regular expressions that compile (a typo such as `layers.[0` would fail only once tensors are read)."""
    import re

    for index, pattern in enumerate(value or ()):
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ExpertMergeError(
                f"{key}[{index}] {_shown(pattern)} is not a regular expression: {error}."
            ) from None


def module_name(key: str, value: Any) -> str:
    """An expert or task name: it becomes a torch module name and a file name, where '.' and '/' break."""
    if not isinstance(value, str) or not value.strip():
        raise ExpertMergeError(f"{key} is {_shown(value)}; give a non-empty name.")
    bad = [c for c in "./" if c in value]
    if bad:
        raise ExpertMergeError(
            f"{key} '{value}' contains {' and '.join(repr(c) for c in bad)}; rename it without '.' or '/' "
            "(e.g. with '_' or '-')."
        )
    return value


def expert_names(key: str, experts: Any) -> None:
    """The keys of a `{name: model}` mapping of experts (a list names none: its names are made up)."""
    if isinstance(experts, Mapping):
        for expert in experts:
            module_name(f"{key} name", expert)


def check_merging_options(hp: Mapping[str, Any]) -> None:
    """Every numeric option of `ExpertMergingModule` (its constructor arguments), before any work."""
    expert_names("model.experts", hp["experts"])
    experts = list(hp["experts"])
    per_name("model.alpha0", hp["alpha0"], experts, lambda k, v: in_range(k, v, 0, 1, True, True), "experts")
    search = hp.get("alpha0_search")
    if search is not None:
        if not isinstance(search, (list, tuple)) or not search:
            raise ExpertMergeError(
                f"model.alpha0_search must be a non-empty list of start values in (0, 1), got {_shown(search)}."
            )
        for index, value in enumerate(search):
            in_range(f"model.alpha0_search[{index}]", value, 0, 1, True, True)
    merges = hp.get("start_merges")
    if merges is not None:
        known = ("task_arithmetic", "regmean")
        if not isinstance(merges, (list, tuple)) or not merges or any(m not in known for m in merges):
            raise ExpertMergeError(
                f"model.start_merges must be a non-empty list of {list(known)}, got {_shown(merges)}."
            )
        if len(set(merges)) != len(merges):
            raise ExpertMergeError(f"model.start_merges names a merge twice: {_shown(merges)}.")
        if "regmean" in merges and isinstance(hp["alpha0"], (list, tuple)) and not search:
            raise ExpertMergeError(
                "model.start_merges: a regmean start scales one merge by one value; give model.alpha0 as one "
                "number (or use model.alpha0_search)."
            )
    in_range("model.regmean_alpha", hp.get("regmean_alpha", 0.9), 0, 1)
    non_negative("model.gamma", hp["gamma"])
    non_negative("model.mu", hp["mu"])
    non_negative("model.ce_weight", hp.get("ce_weight", 0.0))
    if hp.get("kl_where", "all") == "expert_better" and not hp.get("ce_weight"):
        raise ExpertMergeError(
            "model.kl_where: expert_better drops the KL where the merge predicts the text better than its "
            "expert, so the text's own loss must be on: set model.ce_weight > 0 (or kl_where: all)."
        )
    temperature("model.temperature", hp["temperature"])
    if hp["hidden_layers"] is not None:
        if not isinstance(hp["hidden_layers"], (list, tuple)):
            raise ExpertMergeError(
                f"model.hidden_layers must be a list of layer indices, got {hp['hidden_layers']}."
            )
        for index, layer in enumerate(hp["hidden_layers"]):
            integer(f"model.hidden_layers[{index}]", layer)
    weights("model.task_weights", hp["task_weights"] or {})
    patterns("model.learn_include", hp["learn_include"])
    patterns("model.learn_exclude", hp["learn_exclude"])
    optional(positive_int)("model.logit_topk", hp["logit_topk"])
    positive("model.lr", hp["lr"])
    integer("model.warmup_steps", hp["warmup_steps"], minimum=0)
    positive_int("model.teacher_batch_size", hp["teacher_batch_size"])
    optional(integer)("model.chunk_budget", hp["chunk_budget"], 0)
    # kappa = 0 is meaningful (I^0 = 1 spreads the chunks evenly); only negative or non-finite is nonsense.
    non_negative("model.chunk_kappa", hp["chunk_kappa"])
    integer(
        "model.stage2_steps", hp["stage2_steps"], minimum=1 if hp["chunking"] or hp["stage1_result"] else 0
    )
    optional(positive)("model.stage2_lr", hp["stage2_lr"])
    # The MoE has one expert per fine-tuned expert, plus the base FFN when asked; k beyond that means nothing.
    experts_in_moe = len(experts) + (1 if hp["moe_include_base_expert"] else 0)
    if hp["moe"]:
        integer("model.moe_top_k", hp["moe_top_k"], 1, experts_in_moe)
    else:  # `export --moe` may still build an MoE from this config, with how many experts is known only then
        positive_int("model.moe_top_k", hp["moe_top_k"])
    integer("model.router_tuning_steps", hp["router_tuning_steps"], minimum=0)
    positive("model.router_lr", hp["router_lr"])
    non_negative("model.router_balance", hp["router_balance"])


def check_sequence_moe_options(hp: Mapping[str, Any]) -> None:
    """Every numeric option of `SequenceMoEModule`, before any expert is resolved or loaded."""
    expert_names("model.experts", hp["experts"])
    integer("model.top_k", hp["top_k"], 1, len(hp["experts"]))
    positive("model.router_lr", hp["router_lr"])
    positive("model.projector_lr", hp["projector_lr"])
    in_range("model.min_prefix", hp["min_prefix"], 0, 1, low_open=True)
    optional(positive_int)("model.logit_topk", hp["logit_topk"])
    temperature("model.temperature", hp["temperature"])
