"""The `diffinit` zoo: small Llamas with NO shared base, each pretrained from its own random init on its own text.

Symphony-MoE (`expertmerge.symphony`) merges models that share an architecture and a tokenizer but not a
pretraining run. Task vectors need a common base, so none of the other zoos can test it. This one trains:

- `experts/<task>/`: a 2-layer `LlamaForCausalLM` per task (math word problems, Python code, prose), each
  from a different random initialisation (seed `seed * 1000 + index`) on its own corpus only,
- the tiny zoo's character tokenizer (`expertmerge_zoos.tiny.train_char_tokenizer`), the same for every model,
- `data/<task>_{train,calib,heldout}.jsonl`: windows of the shipped corpora (`calib_data/corpora/`), split
  by source record so that no window of a held-out record was trained or calibrated on,
- `zoo.json`: the manifest (tasks, paths, held-out loss of every model on every task, seed, version).

`ensure_zoo("diffinit")` builds it once into the cache (about a minute on one core).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from expertmerge.console import make_console
from expertmerge.zoo_registry import ZooBuilder
from expertmerge_zoos.corpora import read_jsonl, write_jsonl
from expertmerge_zoos.evaluation import token_nll_sum
from expertmerge_zoos.splits import split_records
from expertmerge_zoos.staging import Timer, build_steps, staged_build, write_manifest
from expertmerge_zoos.tiny import _encode, train_char_tokenizer
from expertmerge_zoos.training import Schedule, random_batches, train_causal_lm

BUILDER_VERSION = 1

CORPORA_DIR = Path(__file__).resolve().parents[1] / "calib_data" / "corpora"
TASKS = {  # task -> shipped corpus it is pretrained on
    "math": "math_word_problems.jsonl",
    "code": "python_code.jsonl",
    "prose": "prose.jsonl",
}
WINDOW_CHARS = 64  # one sample: a window of one record, so every sample is ~65 tokens (char tokenizer)
SPLIT_SIZES = {"heldout": 32, "calib": 48, "train": 100_000}
MAX_POSITIONS = 128
HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 2
BATCH_SIZE = 16
SCHEDULE = Schedule(steps=200, lr=3e-3, warmup_steps=10)


def windows(records: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Non-overlapping `WINDOW_CHARS` windows of each record, grouped by record (splits stay disjoint)."""
    out = []
    for index, record in enumerate(records):
        text = record["text"]
        for start in range(0, max(1, len(text) - WINDOW_CHARS // 2), WINDOW_CHARS):
            piece = text[start : start + WINDOW_CHARS]
            if len(piece) >= WINDOW_CHARS // 2:
                out.append({"text": piece, "group": f"{task}:{index}"})
    return out


def new_model(tokenizer: Any, seed: int) -> Any:
    """A fresh Llama whose initial weights are drawn from `seed` alone (so every expert starts elsewhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@torch.no_grad()
def heldout_loss(model: Any, ids: torch.Tensor, pad_id: int) -> float:
    nll, count = token_nll_sum(model(input_ids=ids, use_cache=False).logits, ids, ids != pad_id)
    return nll / count


def build_diffinit_zoo(out: Path, seed: int = 0, *, console: Console | None = None) -> Path:
    """Build the zoo into `out` (which must not exist), atomically; same seed -> the same weights."""
    console = console or make_console(stderr=True)
    timer = Timer()
    with (
        staged_build(out, seed) as staging,
        build_steps(console, "diffinit", "data", 2 + len(TASKS)) as advance,
    ):
        splits = {
            task: split_records(windows(read_jsonl(CORPORA_DIR / name), task), seed, SPLIT_SIZES)
            for task, name in TASKS.items()
        }
        (staging / "data").mkdir()
        for task, parts in splits.items():
            for split, rows in parts.items():
                write_jsonl(staging / "data" / f"{task}_{split}.jsonl", [{"text": r["text"]} for r in rows])
        texts = [r["text"] for parts in splits.values() for rows in parts.values() for r in rows]
        tokenizer = train_char_tokenizer(texts)
        tokenizer.save_pretrained(staging / "tokenizer")
        pad_id = tokenizer.pad_token_id
        encoded = {
            task: {split: _encode(tokenizer, [r["text"] for r in rows]) for split, rows in parts.items()}
            for task, parts in splits.items()
        }
        generator = torch.Generator().manual_seed(seed)
        advance(f"expert {next(iter(TASKS))}")

        experts: dict[str, Any] = {}
        final_loss: dict[str, float] = {}
        for index, task in enumerate(TASKS):
            model = new_model(tokenizer, seed * 1000 + index)
            ids = encoded[task]["train"]
            batches = random_batches(len(ids), BATCH_SIZE, SCHEDULE.steps, generator)
            curve = train_causal_lm(model, ids, ids != pad_id, batches, SCHEDULE, pass_attention_mask=False)
            final_loss[task] = sum(curve[-10:]) / 10
            model.save_pretrained(staging / "experts" / task)
            tokenizer.save_pretrained(staging / "experts" / task)
            experts[task] = model
            timer.lap(f"expert {task}")
            advance("evaluation")
        losses = {
            task: {name: heldout_loss(m, encoded[task]["heldout"], pad_id) for name, m in experts.items()}
            for task in TASKS
        }
        advance("done")
        manifest = {
            "name": "diffinit",
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "tasks": {
                task: {
                    "description": f"pretrained from scratch on {corpus}",
                    "expert": f"experts/{task}",
                    "train": f"data/{task}_train.jsonl",
                    "calib": f"data/{task}_calib.jsonl",
                    "heldout": f"data/{task}_heldout.jsonl",
                }
                for task, corpus in TASKS.items()
            },
            "tokenizer": "tokenizer",
            "heldout_loss": losses,
            "final_train_loss": final_loss,
            "phases": timer.phases,
        }
        write_manifest(staging, manifest, timer.total)
    return Path(out)


ZOO = ZooBuilder(
    build=build_diffinit_zoo,
    version=BUILDER_VERSION,
    description="three 2-layer Llamas pretrained from different random inits on math / code / prose",
)
