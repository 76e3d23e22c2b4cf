"""A tiny, real model zoo built offline in seconds: a base Llama and experts fine-tuned from it.

The tests, the demo and the README's first command need a base model and experts that disagree in a way a
merge can see. Downloading real checkpoints is slow and needs the network, so `build_tiny_zoo` trains one:

- a character-level tokenizer (a `tokenizers` byte-level BPE without merges) saved next to every model,
- `base/`: a 2-layer `LlamaForCausalLM` trained briefly from random init on a mixture of all tasks,
- `experts/<task>/`: full fine-tunes of the base, each on one synthetic task only,
- `data/<task>_{train,calib,heldout}.jsonl`: disjoint text splits (`{"text": ...}` per line),
- `zoo.json`: a manifest (tasks, paths, held-out loss table, task-vector statistics, seed, builder version).

`ensure_zoo("tiny")` builds it once into the cache (under a file lock, atomically) and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from expertmerge.errors import ExpertMergeError
from expertmerge.paths import cache_dir

# Bump whenever the data, the model or the training changes: cached zoos with another version are rebuilt.
BUILDER_VERSION = 2
MANIFEST_NAME = "zoo.json"
KNOWN_ZOOS = ("tiny", "smollm2")

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


# ------------------------------------------------------------------------------------------ tokenizer


def _train_tokenizer(texts: Sequence[str]) -> Any:
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
BASE_STEPS = 300
BASE_LR = 3e-3
EXPERT_STEPS = 150
EXPERT_LR = 1e-3
WARMUP_STEPS = 10


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


def _labels(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    return ids.masked_fill(ids == pad_id, -100)


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
    model: Any, ids: torch.Tensor, pad_id: int, steps: int, lr: float, generator: torch.Generator
) -> list[float]:
    """Plain AdamW with warmup and cosine decay over random batches; returns the loss of every step."""
    model.train()
    # weight_decay=0: embedding rows of bytes that never occur get no gradient and should stay as initialised
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    for _ in range(steps):
        batch = ids[torch.randint(len(ids), (BATCH_SIZE,), generator=generator)]
        batch = batch[:, : int((batch != pad_id).sum(1).max())]  # trim the all-pad tail of this batch
        loss = model(input_ids=batch, labels=_labels(batch, pad_id), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def _heldout_loss(model: Any, ids: torch.Tensor, pad_id: int) -> float:
    """Mean next-token cross-entropy per real token (nats) over all samples."""
    labels = _labels(ids, pad_id)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(total / (targets != -100).sum())


def _task_vector_stats(base: Any, experts: dict[str, Any]) -> dict[str, Any]:
    """Norms of tau_k = theta_k - theta_0 relative to the base, and their pairwise cosine similarities."""
    base_state = {name: p.detach() for name, p in base.named_parameters()}
    base_norm = torch.sqrt(sum((p.double() ** 2).sum() for p in base_state.values()))
    flat = {
        task: torch.cat(
            [(p.detach() - base_state[name]).double().flatten() for name, p in m.named_parameters()]
        )
        for task, m in experts.items()
    }
    names = list(flat)
    cosine = {
        f"{a}|{b}": float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return {
        "relative_norm": {task: float(v.norm() / base_norm) for task, v in flat.items()},
        "cosine": cosine,
    }


# ------------------------------------------------------------------------------------------- building


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (model init uses it) without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _write_jsonl(path: Path, texts: Sequence[str]) -> None:
    with open(path, "w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def build_tiny_zoo(out: Path, seed: int = 0, *, console: Console | None = None) -> Path:
    """Build the tiny zoo into `out` (which must not exist) and return it.

    The zoo is built in a temporary sibling folder and renamed into place at the end, so an interrupted build
    never leaves a half zoo at `out`. Same seed on the same machine -> bit-identical weights.
    """
    from transformers import LlamaForCausalLM

    out = Path(out)
    if out.exists():
        raise ExpertMergeError(f"Zoo folder '{out}' already exists; remove it or pick another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    console = console or Console(stderr=True)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    transformers.utils.logging.disable_progress_bar()  # our own rich bar covers the build
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        with _seeded(seed), _progress(console) as progress:
            steps = 5 + len(TASKS)
            bar = progress.add_task("tiny zoo: data", total=steps)

            def advance(next_step: str) -> None:
                progress.update(bar, advance=1, description=f"tiny zoo: {next_step}")

            splits = {task.name: _make_splits(task, seed) for task in TASKS}
            (staging / "data").mkdir(parents=True)
            for task, parts in splits.items():
                for split, texts in parts.items():
                    _write_jsonl(staging / "data" / f"{task}_{split}.jsonl", texts)
            advance("tokenizer")

            tokenizer = _train_tokenizer([text for parts in splits.values() for text in parts["train"]])
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
            base_curve = _train(base, mixture, pad_id, BASE_STEPS, BASE_LR, generator)
            base_dir = staging / "base"
            base.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
            advance(f"expert {TASKS[0].name}")

            experts: dict[str, Any] = {}
            curves = {"base": base_curve}
            for i, task in enumerate(TASKS):
                expert = LlamaForCausalLM.from_pretrained(base_dir)  # an exact copy of the saved base
                curves[task.name] = _train(
                    expert, encoded[task.name]["train"], pad_id, EXPERT_STEPS, EXPERT_LR, generator
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
            stats = _task_vector_stats(base, experts)
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
                "build_seconds": round(time.perf_counter() - started, 2),
                "torch": torch.__version__,
            }
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The zoo's manifest, or None if the folder is not a complete zoo."""
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _builder(name: str) -> tuple[Callable[..., Path], int]:
    """The build function of zoo `name` (called as `build(out, seed=...)`) and its builder version."""
    if name == "smollm2":
        from expertmerge import smollm2_zoo

        return smollm2_zoo.build_smollm2_zoo, smollm2_zoo.BUILDER_VERSION
    return build_tiny_zoo, BUILDER_VERSION


def _is_current(folder: Path, name: str = "tiny") -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("builder_version") == _builder(name)[1]


def ensure_zoo(name: str, force: bool = False) -> Path:
    """Folder of the zoo `name`, built once into the cache and reused afterwards.

    Safe when several processes ask at once: one builds under an exclusive file lock, the others wait and
    then find it. A zoo from another builder version (or `force`) is rebuilt and swapped in atomically.
    """
    if name not in KNOWN_ZOOS:
        raise ExpertMergeError(f"Unknown zoo '{name}'; known zoos: {', '.join(KNOWN_ZOOS)}.")
    root = cache_dir() / "zoo"
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if not force and _is_current(target, name):
        return target  # the common case takes no lock
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not force and _is_current(target, name):
                return target  # another process built it while we waited
            if target.exists():
                # Move the stale zoo aside first so the rename below never meets a half-deleted folder.
                retired = root / f".{name}.old-{os.getpid()}"
                os.rename(target, retired)
                shutil.rmtree(retired, ignore_errors=True)
            return _builder(name)[0](target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ CLI


def loss_table(manifest: dict[str, Any]) -> Table:
    """Held-out loss per task (rows) for the base and every expert (columns); the task's own expert in bold."""
    tasks = list(manifest["tasks"])
    table = Table(title=f"zoo '{manifest['name']}': held-out loss (nats/token), lower is better")
    table.add_column("task")
    table.add_column("base", justify="right")
    for task in tasks:
        table.add_column(f"expert {task}", justify="right")
    table.add_column("own vs base", justify="right")
    for task in tasks:
        row = manifest["heldout_loss"][task]
        cells = [f"[bold green]{row[t]:.3f}[/]" if t == task else f"{row[t]:.3f}" for t in tasks]
        table.add_row(task, f"{row['base']:.3f}", *cells, f"{row[task] / row['base'] - 1:+.0%}")
    return table


def zoo_main(argv: list[str]) -> int:
    """`python -m expertmerge zoo [--name tiny] [--force] [--out DIR]`: build or find a zoo, show its losses."""
    parser = argparse.ArgumentParser(
        prog="python -m expertmerge zoo",
        description="Build (or find) an offline demo zoo: a base model and experts fine-tuned from it.",
    )
    parser.add_argument("--name", default="tiny", help=f"which zoo ({', '.join(KNOWN_ZOOS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a current zoo exists")
    parser.add_argument("--out", help="build into this folder instead of the cache")
    parser.add_argument("--seed", type=int, default=0, help="seed of a build into --out")
    options = parser.parse_args(argv)
    if options.out is None:
        folder = ensure_zoo(options.name, force=options.force)
    else:
        if options.name not in KNOWN_ZOOS:
            raise ExpertMergeError(f"Unknown zoo '{options.name}'; known zoos: {', '.join(KNOWN_ZOOS)}.")
        folder = Path(options.out)
        if folder.exists() and (options.force or not _is_current(folder, options.name)):
            if read_manifest(folder) is None and any(folder.iterdir()):
                raise ExpertMergeError(f"'{folder}' exists and is not a zoo; refusing to replace it.")
            shutil.rmtree(folder)
        if not folder.exists():
            _builder(options.name)[0](folder, seed=options.seed)
    manifest = read_manifest(folder)
    assert manifest is not None
    console = Console()
    console.print(loss_table(manifest))
    console.print(f"zoo folder: {escape(str(folder.resolve()))}  (built in {manifest['build_seconds']} s)")
    return 0
