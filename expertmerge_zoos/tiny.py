"""The `tiny` zoo, a tiny, real model zoo built offline in seconds: a base Llama and experts fine-tuned from it.

The tests, the demo and the README's first command need a base model and experts that disagree in a way a
merge can see. Downloading real checkpoints is slow and needs the network, so `build_tiny_zoo` trains one:

- a character-level tokenizer (a `tokenizers` byte-level BPE without merges) saved next to every model,
- `base/`: a 2-layer `LlamaForCausalLM` trained briefly from random init on a mixture of all tasks,
- `experts/<task>/`: full fine-tunes of the base, each on one synthetic task only,
- `data/<task>_{train,calib,heldout}.jsonl`: disjoint text splits (`{"text": ...}` per line),
- `zoo.json`: a manifest (tasks, paths, held-out loss table, task-vector statistics, seed, builder version).

`ensure_zoo("tiny")` (`expertmerge.zoo_registry`) builds it once into the cache and reuses it afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError
from expertmerge.zoo_registry import ZooBuilder
from expertmerge_zoos.corpora import write_jsonl
from expertmerge_zoos.evaluation import task_vector_stats, token_nll_sum
from expertmerge_zoos.staging import Timer, build_steps, staged_build, write_manifest
from expertmerge_zoos.training import Schedule, random_batches, train_causal_lm

# Bump whenever the data, the model or the training changes: cached zoos with another version are rebuilt.
BUILDER_VERSION = 2

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Split sizes. One sample is one line holding a few examples of its task (about 30-50 tokens).
TRAIN_SAMPLES = 2048
CALIB_SAMPLES = 64
HELDOUT_SAMPLES = 32

LETTERS = "abcdefgh"  # a small alphabet keeps the inputs' irreducible entropy low, so task skill shows


# ----------------------------------------------------------------------------------------------- tasks


def _arith_example(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}={a + b}"


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _reverse_example(rng: random.Random) -> str:
    word = _letters(rng)
    return f"r:{word}>{word[::-1]}"


def _sort_example(rng: random.Random) -> str:
    word = _letters(rng)
    return f"s:{word}>{''.join(sorted(word))}"


@dataclass(frozen=True)
class ZooTask:
    """A synthetic task: examples of it, joined by spaces, make one text sample."""

    name: str
    make_example: Callable[[random.Random], str]
    examples_per_sample: int
    description: str

    def sample(self, rng: random.Random) -> str:
        return " ".join(self.make_example(rng) for _ in range(self.examples_per_sample))


TASKS: tuple[ZooTask, ...] = (
    ZooTask("arith", _arith_example, 5, "two-number addition, e.g. 37+48=85"),
    ZooTask("reverse", _reverse_example, 4, "reverse a word, e.g. r:abcd>dcba"),
    ZooTask("sort", _sort_example, 4, "sort a word's letters, e.g. s:dbca>abcd"),
)


def _make_splits(task: ZooTask, seed: int) -> dict[str, list[str]]:
    """Disjoint train / calib / heldout samples of one task; deterministic for (task, seed)."""
    rng = random.Random(f"{seed}:{task.name}")  # string seeds hash stably, unlike hash(tuple)
    seen: set[str] = set()
    splits: dict[str, list[str]] = {}
    for split, size in (("heldout", HELDOUT_SAMPLES), ("calib", CALIB_SAMPLES), ("train", TRAIN_SAMPLES)):
        texts: list[str] = []
        while len(texts) < size:
            text = task.sample(rng)
            if text not in seen:  # rejection keeps the splits disjoint by construction
                seen.add(text)
                texts.append(text)
        splits[split] = texts
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not set(splits[first]) & set(splits[second]), f"{task.name}: {first} overlaps {second}"
    return splits


def _near_misses(answer: str, rng: random.Random, count: int = 3) -> list[str]:
    """`count` distinct wrong answers one slip away from `answer`: a sum off by one or ten, or a word with two
    neighbouring letters swapped or one letter changed, so a choice is won by the skill, not by the form."""
    found: list[str] = []
    while len(found) < count:
        if answer.isdigit():
            wrong = str(int(answer) + rng.choice((-10, -1, 1, 10)))
        elif rng.random() < 0.5 and len(set(answer)) > 1:
            i = rng.randrange(len(answer) - 1)
            wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        else:
            i = rng.randrange(len(answer))
            wrong = answer[:i] + rng.choice(LETTERS) + answer[i + 1 :]
        if wrong != answer and wrong not in found and not wrong.startswith("-"):
            found.append(wrong)
    return found


def lm_eval_records(task: ZooTask, seed: int = 0) -> list[dict[str, Any]]:
    """The held-out samples as records for lm-evaluation-harness (`lm_eval_tasks/tiny/`): the sample's last
    example is the question, cut after its `=` or `>`, and the examples before it are the in-context
    demonstrations the zoo's models were trained to continue. `choices` holds the answer (at `label`) among
    three near misses, for the multiple-choice tasks."""
    rng = random.Random(f"{seed}:{task.name}:lm_eval")
    records = []
    for text in _make_splits(task, seed)["heldout"]:
        *shots, last = text.split(" ")
        cut = max(last.rfind("="), last.rfind(">")) + 1
        answer = last[cut:]
        choices = [answer, *_near_misses(answer, rng)]
        rng.shuffle(choices)
        prompt = " ".join([*shots, last[:cut]])
        records.append(
            {"prompt": prompt, "answer": answer, "choices": choices, "label": choices.index(answer)}
        )
    return records


# ------------------------------------------------------------------------------------------ tokenizer


def train_char_tokenizer(texts: Sequence[str]) -> Any:
    """A byte-level BPE trained on the zoo's text, with exactly the byte alphabet and no merges.

    Merges would glue digits and letters into tokens that depend on their neighbours, which makes reversal,
    sorting and carries position-inconsistent for a 2-layer model; one token per character keeps the tasks
    learnable in seconds while the tokenizer stays a standard, loadable `tokenizers` BPE.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(specials),  # room for the alphabet only: no merges
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Llama-style: every encoded text starts with <s>, so the first real token is predicted from context.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )


# ------------------------------------------------------------------------------------------- training

MAX_POSITIONS = 128
INTERMEDIATE = 176
BATCH_SIZE = 32
# The base trains from scratch on all tasks, the experts from the base on one task each. The phase order
# is the one these zoos were first built with (see `Schedule.phase_order`).
BASE_SCHEDULE = Schedule(steps=300, lr=3e-3, warmup_steps=10, phase_order="pi*done/span")
EXPERT_SCHEDULE = Schedule(steps=150, lr=1e-3, warmup_steps=10, phase_order="pi*done/span")


def _encode(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Right-padded [n, length] ids: <s> text </s> <pad>...; pads never reach a real token (causal)."""
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    length = max(len(row) for row in rows)
    if length > MAX_POSITIONS:
        raise ExpertMergeError(f"zoo sample of {length} tokens exceeds {MAX_POSITIONS} positions")
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def _new_model(tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def _train(
    model: Any, ids: torch.Tensor, pad_id: int, schedule: Schedule, generator: torch.Generator
) -> list:
    """All of `model` trained on random batches (drawn with replacement) of right-padded `ids`."""
    batches = random_batches(len(ids), BATCH_SIZE, schedule.steps, generator)
    # No attention mask: the pads only ever follow a sample's </s>, so causal attention keeps them out.
    return train_causal_lm(model, ids, ids != pad_id, batches, schedule, pass_attention_mask=False)


@torch.no_grad()
def _heldout_loss(model: Any, ids: torch.Tensor, pad_id: int) -> float:
    """Mean next-token cross-entropy per real token (nats) over all samples."""
    nll, count = token_nll_sum(model(input_ids=ids, use_cache=False).logits, ids, ids != pad_id)
    return nll / count


# ------------------------------------------------------------------------------------------- building


def build_tiny_zoo(out: Path, seed: int = 0, *, console: Console | None = None) -> Path:
    """Build the tiny zoo into `out` (which must not exist) and return it.

    The zoo is built in a temporary sibling folder and renamed into place at the end, so an interrupted build
    never leaves a half zoo at `out`. Same seed on the same machine -> bit-identical weights.
    """
    from transformers import LlamaForCausalLM

    console = console or make_console(stderr=True)
    timer = Timer()
    with (
        staged_build(out, seed) as staging,
        build_steps(console, "tiny", "data", 5 + len(TASKS)) as advance,
    ):
        splits = {task.name: _make_splits(task, seed) for task in TASKS}
        (staging / "data").mkdir()
        for task, parts in splits.items():
            for split, texts in parts.items():
                write_jsonl(staging / "data" / f"{task}_{split}.jsonl", [{"text": text} for text in texts])
        advance("tokenizer")

        tokenizer = train_char_tokenizer([text for parts in splits.values() for text in parts["train"]])
        tokenizer.save_pretrained(staging / "tokenizer")
        pad_id = tokenizer.pad_token_id
        encoded = {
            task: {split: _encode(tokenizer, texts) for split, texts in parts.items()}
            for task, parts in splits.items()
        }
        generator = torch.Generator().manual_seed(seed)
        advance("base model")

        base = _new_model(tokenizer)
        mixture = torch.cat(
            [
                torch.nn.functional.pad(e["train"], (0, 64 - e["train"].shape[1]), value=pad_id)
                for e in encoded.values()
            ]
        )
        base_curve = _train(base, mixture, pad_id, BASE_SCHEDULE, generator)
        base_dir = staging / "base"
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        advance(f"expert {TASKS[0].name}")

        experts: dict[str, Any] = {}
        curves = {"base": base_curve}
        for i, task in enumerate(TASKS):
            expert = LlamaForCausalLM.from_pretrained(base_dir)  # an exact copy of the saved base
            curves[task.name] = _train(
                expert, encoded[task.name]["train"], pad_id, EXPERT_SCHEDULE, generator
            )
            expert_dir = staging / "experts" / task.name
            expert.save_pretrained(expert_dir)
            tokenizer.save_pretrained(expert_dir)
            experts[task.name] = expert
            advance(f"expert {TASKS[i + 1].name}" if i + 1 < len(TASKS) else "evaluation")

        models = {"base": base, **experts}
        losses = {
            task.name: {
                model_name: _heldout_loss(model, encoded[task.name]["heldout"], pad_id)
                for model_name, model in models.items()
            }
            for task in TASKS
        }
        advance("task vectors")
        stats = task_vector_stats(base, {task: dict(m.named_parameters()) for task, m in experts.items()})
        advance("done")
        manifest = {
            "name": "tiny",
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "tasks": {
                task.name: {
                    "description": task.description,
                    "expert": f"experts/{task.name}",
                    "train": f"data/{task.name}_train.jsonl",
                    "calib": f"data/{task.name}_calib.jsonl",
                    "heldout": f"data/{task.name}_heldout.jsonl",
                }
                for task in TASKS
            },
            "base": "base",
            "tokenizer": "tokenizer",
            "heldout_loss": losses,
            "task_vectors": stats,
            "final_train_loss": {name: sum(c[-10:]) / 10 for name, c in curves.items()},
        }
        write_manifest(staging, manifest, timer.total)
    return Path(out)


ZOO = ZooBuilder(
    build=build_tiny_zoo,
    version=BUILDER_VERSION,
    description="a 2-layer Llama and arith / reverse / sort experts trained from scratch (minutes)",
)
