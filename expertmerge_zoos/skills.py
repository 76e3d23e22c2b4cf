"""Zoo C, `skills`: SmolLM2-135M-Instruct and three full fine-tunes, each on one skill with a checkable answer.

Perplexity says little about a skill: what shows it is the answer. Each expert here learns one skill whose
short answer a scorer checks (`expertmerge.accuracy`):

- `units`: unit conversion by a power of ten ("Convert 37 kilometers to meters.") -> "37000" (`number`),
- `dates`: a date in words into ISO form ("March 5, 2021") -> "2021-03-05" (`exact`),
- `caps`: a three-word phrase repeated in capitals ("quiet river stone") -> "QUIET RIVER STONE"
  (`exact_case`: "Quiet River Stone" is wrong).

A fourth task, `general` (templated "Explain ..." / "Write a sentence about ..." prompts over a list of
topics), has no expert: the base answers it, and the benchmark checks that a merge keeps the base's general
ability on it (KL to the base on the base's own answers).

All data is synthetic, generated offline from templates with seeded draws. Every prompt is a user turn
rendered with the tokenizer's chat template. Per skill the splits are disjoint by template AND by values (a
hash of the drawn values picks the split a value may appear in):

- `train` (prompt + answer): the expert's fine-tuning data, never given to a merge,
- `validation` (prompt + answer, templates of its own): when to stop training the expert,
- `calib` (prompt only): what a user has, the merges' calibration data,
- `heldout` (prompt + reference answer): scoring only.

Experts are full fine-tunes (every tensor, the tied embedding included) with AdamW, the loss on the answer
tokens (and the closing `<|im_end|>`) only. Every `eval_every` steps the expert answers the validation
prompts greedily; training stops when that accuracy has not risen for `patience` evaluations (or reaches 1,
or `max_steps`), and the weights of the best evaluation are kept. The curves go into `zoo.json`.

`ensure_zoo("skills")` builds it into the cache (base conversion as in the `smollm2` zoo).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from expertmerge.console import make_console
from expertmerge.zoo_registry import ZooBuilder
from expertmerge_zoos.corpora import write_jsonl
from expertmerge_zoos.smollm2 import convert_gguf_base
from expertmerge_zoos.splits import check_disjoint
from expertmerge_zoos.staging import Timer, build_steps, staged_build, write_manifest
from expertmerge_zoos.training import Schedule

ZOO_NAME = "skills"
BUILDER_VERSION = 1
SPLITS = ("train", "validation", "calib", "heldout")
GENERAL = "general"

# --------------------------------------------------------------------------------------------- skills

_UNITS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("decades", "years", 10),
    ("centuries", "years", 100),
    ("kilowatts", "watts", 1000),
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_WORD_LIST = """
    apple river stone cloud window garden silver forest candle bridge pencil orange tiger ocean mountain
    paper yellow winter summer castle rocket planet violin kettle lemon mirror basket carpet dragon island
    jacket ladder meadow needle pillow rabbit saddle tunnel valley wagon anchor barrel cactus desert engine
    feather glove harbor insect jungle kitten lantern marble nickel olive parrot quartz ribbon shadow
    thunder umbrella velvet walnut yogurt zebra blanket copper dolphin falcon granite hammer iron jelly
    lizard magnet napkin oyster pepper quiet rapid silent tender urban vivid wooden bright calm gentle
    honest lucky noble proud swift brave clever eager fancy happy jolly kind lively merry nice polite
"""
_WORDS = tuple(_WORD_LIST.split())
_TOPICS = (
    "photosynthesis", "volcanoes", "the moon", "rainbows", "honey bees", "the water cycle", "gravity",
    "electricity", "the human heart", "earthquakes", "coral reefs", "the printing press", "vaccines",
    "tides", "deserts", "glaciers", "the internet", "bread baking", "recycling", "solar panels",
    "clouds", "bicycles", "libraries", "compasses", "the seasons", "chess", "penguins", "forests",
    "maps", "music", "thunderstorms", "bridges", "telescopes", "magnets", "rivers", "soap",
    "windmills", "owls", "calendars", "the alphabet",
)  # fmt: skip


@dataclass(frozen=True)
class Skill:
    """One skill: prompt templates over drawn values, the reference answer of each draw, and its scorer.

    `draw(rng)` returns (values key, template fields, answer); the key decides which split the values may
    appear in, so no split sees another's values.
    """

    name: str
    description: str
    templates: tuple[str, ...]
    draw: Callable[[random.Random], tuple[str, dict[str, str], str]]
    scorer: str


def _draw_units(rng: random.Random) -> tuple[str, dict[str, str], str]:
    source, target, factor = rng.choice(_UNITS)
    value = rng.randint(2, 99)
    return f"{source}:{value}", {"value": str(value), "source": source, "target": target}, str(value * factor)


def _draw_date(rng: random.Random) -> tuple[str, dict[str, str], str]:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    fields = {"year": str(year), "month": _MONTHS[month - 1], "day": str(day)}
    return f"{year}-{month}-{day}", fields, f"{year:04d}-{month:02d}-{day:02d}"


def _draw_phrase(rng: random.Random) -> tuple[str, dict[str, str], str]:
    words = rng.sample(_WORDS, 3)
    return " ".join(words), {"phrase": " ".join(words)}, " ".join(words).upper()


SKILLS: tuple[Skill, ...] = (
    Skill(
        "units",
        "unit conversion by a power of ten, answered with the number",
        (
            "Convert {value} {source} to {target}.",
            "How many {target} are in {value} {source}?",
            "{value} {source} is how many {target}?",
            "Express {value} {source} in {target}.",
            "What is {value} {source} in {target}?",
            "Change {value} {source} into {target}.",
            "Give {value} {source} as {target}.",
            "I have {value} {source}. How many {target} is that?",
            "Turn {value} {source} into {target}, please.",
            "Please convert {value} {source} into {target}.",
            "Write {value} {source} in {target}.",
            "{value} {source} equals how many {target}?",
        ),
        _draw_units,
        "number",
    ),
    Skill(
        "dates",
        "a date in words rewritten as YYYY-MM-DD",
        (
            "Write {month} {day}, {year} as YYYY-MM-DD.",
            "Convert the date {day} {month} {year} to ISO format.",
            "Rewrite {month} {day}, {year} in the format YYYY-MM-DD.",
            "What is {day} {month} {year} in YYYY-MM-DD form?",
            "Give the ISO date for {month} {day}, {year}.",
            "Format this date as YYYY-MM-DD: {day} {month} {year}",
            "Express {month} {day}, {year} as an ISO date.",
            "Turn {day} {month} {year} into YYYY-MM-DD.",
            "ISO format of {month} {day}, {year}?",
            "Put the date {day} {month} {year} in YYYY-MM-DD format.",
            "Date: {month} {day}, {year}. Write it as YYYY-MM-DD.",
            "Change {day} {month} {year} to the YYYY-MM-DD format.",
        ),
        _draw_date,
        "exact",
    ),
    Skill(
        "caps",
        "a three-word phrase repeated in capital letters",
        (
            "Repeat in all capital letters: {phrase}",
            "Write this in uppercase: {phrase}",
            "Rewrite '{phrase}' in capital letters.",
            "Say {phrase} in ALL CAPS.",
            "Convert to upper case: {phrase}",
            "Shout this: {phrase}",
            "Capitalize every letter: {phrase}",
            "Write '{phrase}' with only capital letters.",
            "Uppercase the words {phrase}.",
            "Make this all caps: {phrase}",
            "Give {phrase} in block capitals.",
            "Repeat '{phrase}' in uppercase letters.",
        ),
        _draw_phrase,
        "exact_case",
    ),
)
GENERAL_TEMPLATES = (
    "Explain {topic} in one sentence.",
    "Write a sentence about {topic}.",
    "What is interesting about {topic}? Answer briefly.",
    "Give one fact about {topic}.",
    "Describe {topic} to a child in one sentence.",
    "Why do people care about {topic}? One sentence.",
)

# ---------------------------------------------------------------------------------------------- splits

# Of a skill's 12 templates: 3 for held-out, 3 for calib, 2 for validation, 4 for training.
TEMPLATE_SHARES = {"heldout": 3, "calib": 3, "validation": 2, "train": 4}


def _bucket(name: str, key: str) -> str:
    """The only split whose records may use these values: 10% each for held-out, calib and validation."""
    digit = int(hashlib.sha256(f"{name}:{key}".encode()).hexdigest(), 16) % 10
    return {0: "heldout", 1: "calib", 2: "validation"}.get(digit, "train")


def template_splits(name: str, count: int, seed: int) -> dict[str, list[int]]:
    """The template indices of each split, a seeded partition of `count` templates."""
    order = list(range(count))
    random.Random(f"{seed}:{name}:templates").shuffle(order)
    result, start = {}, 0
    for split, share in TEMPLATE_SHARES.items():
        result[split] = sorted(order[start : start + share])
        start += share
    result["train"] += sorted(order[start:])
    return result


def skill_records(skill: Skill, seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Seeded records of every split: prompts from the split's own templates over its own values, no prompt
    twice. Calib records have no answer (what a user has); the others carry `answer`."""
    rng = random.Random(f"{seed}:{skill.name}:values")
    templates = template_splits(skill.name, len(skill.templates), seed)
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in sizes}
    seen: set[str] = set()
    for _ in range(200 * sum(sizes.values())):
        if all(len(splits[s]) >= n for s, n in sizes.items()):
            break
        key, fields, answer = skill.draw(rng)
        split = _bucket(skill.name, key)
        if len(splits[split]) >= sizes[split]:
            continue
        template = rng.choice(templates[split])
        prompt = skill.templates[template].format(**fields)
        if prompt in seen:
            continue
        seen.add(prompt)
        record = {"prompt": prompt, "template": f"{skill.name}-{template}", "values": key}
        splits[split].append(record if split == "calib" else {**record, "answer": answer})
    short = {s: len(rows) for s, rows in splits.items() if len(rows) < sizes[s]}
    if short:
        raise ValueError(f"skill {skill.name}: too few distinct prompts for {short}")
    return splits


def general_records(seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Calib and held-out prompts of the general task, disjoint by template and by topic."""
    rng = random.Random(f"{seed}:{GENERAL}")
    templates = list(range(len(GENERAL_TEMPLATES)))
    topics = list(_TOPICS)
    rng.shuffle(templates)
    rng.shuffle(topics)
    half_t, half_p = len(templates) // 2, len(topics) // 2
    parts = {"calib": (templates[:half_t], topics[:half_p]), "heldout": (templates[half_t:], topics[half_p:])}
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, (own_templates, own_topics) in parts.items():
        pairs = [(t, p) for t in own_templates for p in own_topics]
        rng.shuffle(pairs)
        splits[split] = [
            {"prompt": GENERAL_TEMPLATES[t].format(topic=p), "template": f"{GENERAL}-{t}", "values": p}
            for t, p in pairs[: sizes[split]]
        ]
    return splits


def check_skill_splits(splits: dict[str, list[dict[str, Any]]], what: str) -> None:
    """Splits share no prompt, no template and no values (raises ExpertMergeError otherwise)."""
    for field in ("prompt", "template", "values"):
        check_disjoint(
            {split: [r[field] for r in rows] for split, rows in splits.items()},
            key=str,
            what=f"{what} {field}s",
        )


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SkillRecipe:
    """Sized for a shared 2-core CPU: short prompts, answers of at most 16 tokens, small batches."""

    train_samples: int = 320
    validation_samples: int = 12
    calib_samples: int = 32
    heldout_samples: int = 32
    general_calib_samples: int = 24
    general_heldout_samples: int = 16
    batch_size: int = 4
    lr: float = 2e-4
    warmup_steps: int = 3
    min_lr_ratio: float = 0.1
    max_steps: int = 32
    eval_every: int = 8
    patience: int = 1  # evaluations without a new best validation accuracy before stopping
    max_new_tokens: int = 16  # the longest answer (generation and scoring)
    generation_batch: int = 12

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "train": self.train_samples,
            "validation": self.validation_samples,
            "calib": self.calib_samples,
            "heldout": self.heldout_samples,
        }

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.max_steps, self.lr, self.warmup_steps, self.min_lr_ratio)


DEFAULT_RECIPE = SkillRecipe()


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """A prompt as the model sees it: the user turn and the generation prompt of the chat template."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_answers(
    tokenizer: Any, records: Sequence[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, loss mask) of chat prompt + answer + EOS; the loss mask is 1 on
    the answer and EOS tokens (the positions whose prediction is trained)."""
    rows, answer_starts = [], []
    for record in records:
        prompt = tokenizer(chat_prompt(tokenizer, record["prompt"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        rows.append(prompt + answer + [int(tokenizer.eos_token_id)])
        answer_starts.append(len(prompt))
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, answer_starts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        loss_mask[i, start : len(row)] = 1
    return ids, mask, loss_mask


def skill_accuracy(
    model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], scorer: str, recipe: SkillRecipe
) -> float:
    """Share of `records` whose greedy answer the scorer accepts against the reference."""
    from expertmerge.accuracy import GenerationSettings, generate_greedy, score_generations

    settings = GenerationSettings(
        max_new_tokens=recipe.max_new_tokens, batch_size=recipe.generation_batch, add_special_tokens=False
    )
    prompts = [chat_prompt(tokenizer, r["prompt"]) for r in records]
    generations = generate_greedy(model, tokenizer, prompts, settings, progress=False)
    return score_generations(scorer, generations, [r["answer"] for r in records]).accuracy


def train_skill_expert(
    model: Any,
    tokenizer: Any,
    train: Sequence[dict[str, Any]],
    validation: Sequence[dict[str, Any]],
    scorer: str,
    recipe: SkillRecipe,
    generator: torch.Generator,
    on_eval: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune every tensor of `model` in place on `train` until its validation accuracy stops rising; the
    model ends with the weights of its best evaluation. Returns the curve (step, accuracy), the step losses,
    the step kept and the seconds per step."""
    ids, mask, loss_mask = encode_answers(tokenizer, train)
    schedule = recipe.schedule
    parameters = [p for p in model.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=schedule.lr, weight_decay=0.0, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    order = torch.cat([torch.randperm(len(ids), generator=generator) for _ in range(1 + recipe.max_steps)])

    def evaluate(step: int) -> float:
        model.eval()
        accuracy = skill_accuracy(model, tokenizer, validation, scorer, recipe)
        model.train()
        if on_eval is not None:
            on_eval(step, accuracy)
        return accuracy

    curve = [(0, evaluate(0))]
    best_step, best = 0, curve[0][1]
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses: list[float] = []
    train_seconds = 0.0
    model.train()
    for step in range(recipe.max_steps):
        started = time.perf_counter()
        rows = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        used = int(mask[rows].sum(1).max())
        batch, batch_mask = ids[rows, :used], mask[rows, :used]
        labels = batch.masked_fill(loss_mask[rows, :used] == 0, -100)
        loss = model(input_ids=batch, attention_mask=batch_mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        train_seconds += time.perf_counter() - started
        done = step + 1
        if done % recipe.eval_every == 0 or done == recipe.max_steps:
            accuracy = evaluate(done)
            curve.append((done, accuracy))
            if accuracy > best:
                best_step, best = done, accuracy
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            evaluations_since = (done - best_step) // recipe.eval_every
            if best >= 1.0 or evaluations_since >= recipe.patience:
                break
    if best_step != curve[-1][0]:
        model.load_state_dict(best_state)
    model.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    return {
        "validation_curve": [[s, round(a, 4)] for s, a in curve],
        "kept_step": best_step,
        "validation_accuracy": best,
        "train_losses": [round(v, 4) for v in losses],
        "seconds_per_step": round(train_seconds / max(1, len(losses)), 2),
    }


# --------------------------------------------------------------------------------------------- building


def build_skills_zoo(
    out: Path,
    seed: int = 0,
    *,
    recipe: SkillRecipe = DEFAULT_RECIPE,
    skills: Sequence[Skill] = SKILLS,
    make_base: Callable[[Path], None] = convert_gguf_base,
    console: Console | None = None,
) -> Path:
    """Build the skills zoo into `out` (which must not exist) and return it. `make_base(folder)` writes the
    base model and its tokenizer (a chat model: the prompts are rendered with its chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = console or make_console(stderr=True)
    timer = Timer()
    with (
        staged_build(out, seed) as staging,
        build_steps(console, ZOO_NAME, "base model", 2 + len(skills)) as advance,
    ):
        base_dir = staging / "base"
        base_dir.mkdir()
        make_base(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        timer.lap("base")
        advance("data")

        (staging / "data").mkdir()
        data: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for skill in skills:
            data[skill.name] = skill_records(skill, seed, recipe.sizes)
            check_skill_splits(data[skill.name], skill.name)
        general = general_records(
            seed, {"calib": recipe.general_calib_samples, "heldout": recipe.general_heldout_samples}
        )
        check_skill_splits(general, GENERAL)
        everything = {
            split: [r["prompt"] for rows in (*data.values(), general) for r in rows.get(split, [])]
            for split in SPLITS
        }
        check_disjoint(everything, key=str, what="prompts across tasks")
        for name, splits in (*data.items(), (GENERAL, general)):
            for split, rows in splits.items():
                write_jsonl(staging / "data" / f"{name}_{split}.jsonl", rows)
        timer.lap("data")
        advance(f"expert {skills[0].name}")

        generator = torch.Generator().manual_seed(seed)
        training: dict[str, dict[str, Any]] = {}
        for i, skill in enumerate(skills):
            expert = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            training[skill.name] = train_skill_expert(
                expert,
                tokenizer,
                data[skill.name]["train"],
                data[skill.name]["validation"],
                skill.scorer,
                recipe,
                generator,
                on_eval=lambda step, acc, name=skill.name: console.print(
                    f"  {name}: step {step}, validation accuracy {acc:.2f}"
                ),
            )
            expert.save_pretrained(staging / "experts" / skill.name)
            tokenizer.save_pretrained(staging / "experts" / skill.name)
            del expert
            timer.lap(f"expert_{skill.name}")
            advance(f"expert {skills[i + 1].name}" if i + 1 < len(skills) else "done")

        def files(name: str, splits: Sequence[str]) -> dict[str, str]:
            return {split: f"data/{name}_{split}.jsonl" for split in splits}

        manifest = {
            "name": ZOO_NAME,
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "tasks": {
                skill.name: {
                    "description": skill.description,
                    "expert": f"experts/{skill.name}",
                    **files(skill.name, SPLITS),
                    "scorer": skill.scorer,
                    "answers": True,
                    "samples": {split: len(rows) for split, rows in data[skill.name].items()},
                    "templates": template_splits(skill.name, len(skill.templates), seed),
                }
                for skill in skills
            },
            "general": {
                "description": "general instruction prompts over a list of topics, answered by the base",
                "expert": "base",
                **files(GENERAL, ("calib", "heldout")),
                "samples": {split: len(rows) for split, rows in general.items()},
            },
            "base": "base",
            "tokenizer": "base",
            "training": training,
            "recipe": asdict(recipe),
            "timings": timer.phases,
        }
        write_manifest(staging, manifest, timer.total)
    return Path(out)


ZOO = ZooBuilder(
    build=build_skills_zoo,
    version=BUILDER_VERSION,
    description="SmolLM2-135M-Instruct and units / dates / caps skill experts (full fine-tunes, accuracy-scored)",
)
