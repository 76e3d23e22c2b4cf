"""A quick health check of a written model: its perplexity on a few short texts against the base's.

A merge can be finite and still broken: one expert stored with weights scaled by 1e37 (or a wrong `weight`)
gives a model whose perplexity sits at about the vocabulary size on every text, i.e. it predicts no better than
chance. Nothing else in a merge notices, so every command that writes a model (`merge`, `moe`, the `fit`
exports) runs the output and its base once on a few texts and compares.

The threshold (`HealthCheck.problem`): the output is called broken when
- its perplexity is not finite (NaN or inf logits), or
- it is more than `RATIO_LIMIT` (2) times the base's on the same texts, i.e. its mean next-token loss is more
  than ln 2 = 0.69 nats per token above the base's (a healthy merge of experts of one base stays within a few
  percent of it on neutral text, a broken one is orders of magnitude above); where the base itself is no
  better than chance on the texts (perplexity >= the vocabulary size: a narrow model on text outside its
  domain, an untrained one) a 2x difference is noise, and the bar is the vocabulary size times the base's, or
- it is above half the vocabulary size while the base's is not (a base that is itself there on these texts, an
  untrained model or texts it cannot read, leaves only the ratio to go by), or
- it predicts the same next-token distribution after every token of every text (total variation from their mean
  below 1e-3) while the base's predictions do vary: the x1e37 case, whose logits come out uniform; a narrow
  base can be worse than chance on texts outside its domain, so only this tells such an output apart there.

Cost: at most `MAX_TEXTS` texts of at most `MAX_TOKENS` tokens, one forward of the base, then one of the output,
one model in memory at a time, in the output's dtype where it is bf16, else fp32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError

RATIO_LIMIT = 2.0  # output perplexity / base perplexity above this: broken
VOCAB_FRACTION = 0.5  # output perplexity above this share of the vocabulary (and the base's below): broken
MAX_TEXTS = 8
MAX_TOKENS = 64
COLLAPSE_SPREAD = 1e-3  # every position's prediction within this total variation of their mean: broken
MIN_TOKENS = 16  # fewer predicted tokens than this from a config's texts: the built-in texts are added

THRESHOLD_TEXT = (
    f"broken when the perplexity is not finite, more than {RATIO_LIMIT:g}x the base's "
    f"(log-perplexity more than ln {RATIO_LIMIT:g} = {math.log(RATIO_LIMIT):.2f} nats/token above; vocabulary size "
    "x the base's where the base is no better than chance on the texts), or above "
    f"{VOCAB_FRACTION:g} x the vocabulary size while the base's is not, or when it predicts the same "
    f"distribution after every token (total variation below {COLLAPSE_SPREAD:g}) while the base's do not"
)

# Plain neutral text, prose and code, for outputs whose config names no texts of its own.
BUILTIN_TEXTS = (
    "The library opens at nine in the morning and closes at six in the evening, except on Sundays.",
    "Water boils at one hundred degrees Celsius at sea level, and at a lower temperature in the mountains.",
    "She put the keys on the kitchen table, picked up her coat, and walked to the station in the rain.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for (int i = 0; i < n; i++) {\n    total += values[i];\n}",
    "The committee will meet again next week to discuss the budget for the coming year.",
)
BUILTIN_SOURCE = "built-in texts"


@dataclass(frozen=True)
class HealthSamples:
    """Right-padded token ids of the check's texts (the output's tokenizer), and where they came from."""

    input_ids: torch.Tensor  # [n, t] long
    attention_mask: torch.Tensor  # [n, t] long, 1 on real tokens
    source: str

    @property
    def predicted_tokens(self) -> int:
        return int((self.attention_mask[:, 1:] * self.attention_mask[:, :-1]).sum())


@dataclass
class HealthCheck:
    """The output's and the base's perplexity on the same texts, or why the check could not run."""

    output_perplexity: float = math.nan
    base_perplexity: float = math.nan
    vocab_size: int = 0
    texts: int = 0
    tokens: int = 0  # predicted tokens, pooled over the texts
    source: str = ""
    seconds: float = 0.0
    skipped: str | None = None  # why the check did not run (no tokenizer, a model transformers cannot run)
    output_spread: float = math.nan  # `score`'s spread of the output's predictions (0: the same everywhere)
    base_spread: float = math.nan

    @property
    def problem(self) -> str | None:
        """Why the output looks broken (`THRESHOLD_TEXT`), or None."""
        if self.skipped is not None:
            return None
        out, base = self.output_perplexity, self.base_perplexity
        if not math.isfinite(out):
            return "its perplexity is not finite"
        if self.output_spread < COLLAPSE_SPREAD <= self.base_spread:
            return "it predicts the same next-token distribution after every token (it ignores its input)"
        # A base no better than chance on these texts (a narrow or untrained model) makes a 2x difference noise.
        ratio = RATIO_LIMIT if not self.vocab_size or base < self.vocab_size else float(self.vocab_size)
        if math.isfinite(base) and out > ratio * base:
            return f"its perplexity is more than {ratio:g}x the base's"
        limit = VOCAB_FRACTION * self.vocab_size
        if self.vocab_size and out > limit and not base > limit:
            return f"its perplexity is above {VOCAB_FRACTION:g} x the vocabulary size ({self.vocab_size})"
        return None

    @property
    def healthy(self) -> bool:
        return self.problem is None

    def numbers(self) -> str:
        return (
            f"perplexity {_number(self.output_perplexity)} vs the base's {_number(self.base_perplexity)} on "
            f"{self.texts} {self.source} ({self.tokens} tokens)"
        )

    def summary_row(self) -> str:
        """The value of the command summary's `health check` row (rich markup)."""
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        if self.problem is None:
            return f"ok: {self.numbers()}, {self.seconds:.2f} s"
        return f"[bold red]WARNING[/bold red]: the output looks broken, {self.problem}: {self.numbers()}"

    def card_section(self) -> str:
        """The merge card's `Health check` section (markdown)."""
        if self.skipped is not None:
            return f"Skipped: {self.skipped}."
        verdict = (
            "ok."
            if self.problem is None
            else f"**WARNING: this model looks broken: {self.problem}.** Check the inputs and the merge settings."
        )
        return "\n".join(
            [
                verdict,
                "",
                f"Perplexity on {self.texts} {self.source} ({self.tokens} predicted tokens, the output's tokenizer):",
                "",
                "| model | perplexity |",
                "|---|---|",
                f"| output | {_number(self.output_perplexity)} |",
                f"| base | {_number(self.base_perplexity)} |",
                "",
                "Spread of the predictions (largest total variation from their mean): output "
                f"{_number(self.output_spread)}, base {_number(self.base_spread)}.",
                "",
                f"Threshold: {THRESHOLD_TEXT}; vocabulary size {self.vocab_size}.",
            ]
        )

    def error(self, output: str | Path) -> ExpertMergeError:
        """`--strict_health`'s error: one line naming the output folder (kept) and both perplexities."""
        return ExpertMergeError(
            f"the output '{output}' looks broken ({self.problem}): {self.numbers()}; it was written and kept for "
            "inspection. Without --strict_health this is a warning."
        )


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def encode_texts(tokenizer: Any, texts: Sequence[str], source: str) -> HealthSamples:
    """At most `MAX_TEXTS` texts, each cut to `MAX_TOKENS` tokens (the tokenizer's special tokens included)."""
    rows = [tokenizer(text)["input_ids"][:MAX_TOKENS] for text in list(texts)[:MAX_TEXTS]]
    return _padded([torch.tensor(row, dtype=torch.long) for row in rows if row], source)


def samples_from_ids(
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    attention_mask: torch.Tensor | Sequence[torch.Tensor],
    source: str,
) -> HealthSamples:
    """Already tokenized texts (e.g. a fit's held-out samples; rows of any lengths), cut to the check's size."""
    rows = [ids[mask.bool()][:MAX_TOKENS] for ids, mask in zip(input_ids, attention_mask, strict=True)]
    return _padded([row for row in rows if row.numel()][:MAX_TEXTS], source)


def _padded(rows: list[torch.Tensor], source: str) -> HealthSamples:
    length = max((row.numel() for row in rows), default=0)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : row.numel()] = row
        mask[index, : row.numel()] = 1
    return HealthSamples(ids, mask, source)


@torch.no_grad()
def score(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], samples: HealthSamples
) -> tuple[float, float]:
    """The perplexity (exp of the mean next-token loss over every real token of every text, fp32 softmax) and
    the spread of the predictions: the largest total-variation distance of one position's next-token
    distribution from their mean (0 when the model says the same after every token, e.g. uniform logits)."""
    logits = logits_of(samples.input_ids, samples.attention_mask)[:, :-1].float()
    targets = samples.input_ids[:, 1:].to(logits.device)
    counted = (samples.attention_mask[:, 1:] * samples.attention_mask[:, :-1]).bool().to(logits.device)
    log_probs = torch.log_softmax(logits, dim=-1)
    losses = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mean = float(losses[counted].mean())
    probs = log_probs[counted].exp()
    spread = float(0.5 * (probs - probs.mean(0)).abs().sum(-1).max())
    return (math.exp(mean) if mean < 700 else math.inf), spread  # NaN stays NaN


def perplexity(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], samples: HealthSamples
) -> float:
    return score(logits_of, samples)[0]


def _load_dtype(folder: Path, trust_remote_code: bool) -> torch.dtype:
    from transformers import AutoConfig

    dtype = getattr(
        AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code), "dtype", None
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def load_model(folder: Path, trust_remote_code: bool = False, device: str | torch.device = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=_load_dtype(folder, trust_remote_code), trust_remote_code=trust_remote_code
    )
    return model.eval().to(device)


def _model_logits(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    device = next(model.parameters()).device
    return lambda ids, mask: (
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    )


def _vocab_size(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _free(model: Any) -> None:
    """Release the weights now, even if the model sits in a reference cycle (a full `gc.collect` costs seconds
    in a process that imported transformers)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def _base_perplexity(
    base: Path,
    samples: HealthSamples,
    output_tokenizer_dir: Path | None,
    trust_remote_code: bool,
    device: Any,
) -> tuple[float, float]:
    """The base on the same texts; re-tokenized with its own tokenizer where the output's ids exceed its
    vocabulary (`tokenizer_source: union` grows it)."""
    model = load_model(base, trust_remote_code, device)
    try:
        if samples.input_ids.numel() and int(samples.input_ids.max()) >= _vocab_size(model):
            from expertmerge.io.tokenizer import load_tokenizer

            texts = [
                load_tokenizer(output_tokenizer_dir or base, trust_remote_code).decode(
                    row[mask.bool()], skip_special_tokens=True
                )
                for row, mask in zip(samples.input_ids, samples.attention_mask, strict=True)
            ]
            samples = encode_texts(load_tokenizer(base, trust_remote_code), texts, samples.source)
        return score(_model_logits(model), samples)
    finally:
        _free(model)


def texts_or_builtin(texts: Sequence[str], source: str, tokenizer: Any) -> HealthSamples:
    """The config's texts, with the built-in ones added when they give fewer than `MIN_TOKENS` predictions."""
    unique = list(dict.fromkeys(t for t in texts if t and t.strip()))
    samples = encode_texts(tokenizer, unique, source) if unique else None
    if samples is not None and samples.predicted_tokens >= MIN_TOKENS:
        return samples
    if samples is None or not samples.input_ids.numel():
        return encode_texts(tokenizer, BUILTIN_TEXTS, BUILTIN_SOURCE)
    return encode_texts(tokenizer, [*unique, *BUILTIN_TEXTS], f"{source} and {BUILTIN_SOURCE}")


def _measured(
    samples: HealthSamples,
    output: tuple[float, float],
    base: tuple[float, float],
    vocab_size: int,
    started: float,
) -> HealthCheck:
    """The check's record: (perplexity, spread) of the output and of the base on `samples`."""
    return HealthCheck(
        output_perplexity=output[0],
        output_spread=output[1],
        base_perplexity=base[0],
        base_spread=base[1],
        vocab_size=vocab_size,
        texts=int(samples.input_ids.shape[0]),
        tokens=samples.predicted_tokens,
        source=samples.source,
        seconds=time.perf_counter() - started,
    )


def check_folder(
    output: Path,
    base: Path,
    texts: Sequence[str] = (),
    source: str = "",
    trust_remote_code: bool = False,
    samples: HealthSamples | None = None,
) -> HealthCheck:
    """The written model folder `output` (weights, config, tokenizer) against `base`, on CPU.

    `texts` (the config's own, e.g. a mergekit-moe config's prompts; else the built-in ones) are tokenized with
    the output's tokenizer; `samples` are texts tokenized already (a fit's held-out samples). The base runs first
    and is freed before the output is loaded.
    """
    started = time.perf_counter()
    try:
        from expertmerge.io.tokenizer import load_tokenizer

        if samples is None:
            names = ("tokenizer.json", "tokenizer_config.json")
            if not any((output / name).is_file() for name in names):
                return HealthCheck(skipped="the output has no tokenizer to read the texts with")
            samples = texts_or_builtin(texts, source, load_tokenizer(output, trust_remote_code))
        if samples.predicted_tokens == 0:
            return HealthCheck(skipped="the texts give no token to predict")
        base_ppl, base_spread = _base_perplexity(base, samples, output, trust_remote_code, "cpu")
        model = load_model(output, trust_remote_code)
        vocab = _vocab_size(model)
        try:
            out_ppl, spread = score(_model_logits(model), samples)
        finally:
            _free(model)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as error:
        # An output transformers cannot load or run here (remote code, a new architecture): not our verdict.
        return HealthCheck(
            skipped=f"could not run the model ({type(error).__name__}: {error})".split("\n")[0]
        )
    return _measured(samples, (out_ppl, spread), (base_ppl, base_spread), vocab, started)


def check_model(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    vocab_size: int,
    base: Path,
    samples: HealthSamples,
    device: Any = "cpu",
) -> HealthCheck:
    """An in-memory output (the fit's merged model, `logits_of(ids, mask)`) against the `base` folder."""
    started = time.perf_counter()
    if samples.predicted_tokens == 0:
        return HealthCheck(skipped="the texts give no token to predict")
    base_ppl, base_spread = _base_perplexity(base, samples, None, False, device)
    out_ppl, spread = score(logits_of, samples)
    return _measured(samples, (out_ppl, spread), (base_ppl, base_spread), vocab_size, started)
