"""The "mixture training" reference of a zoo: one multi-task fine-tune of the base on the union of the
experts' training data, with the experts' total step budget (arXiv 2509.25712 compares merges with it).

It uses the zoo's own expert recipe (which tensors train, learning rate, schedule, batch size, sequence
length) and its training splits as written in the zoo, so the only difference from the experts is the data
mixed in one run and `steps * number_of_experts` steps. Batches are drawn from the union without repetition
until it is used up (`training.epoch_batches`), so every batch mixes the domains.

Zoos: `smollm2_mixture` (zoo A's reference) and `smollm2_full_mixture` (zoo B's), each a folder with
`mixture/` (model and tokenizer) and a `zoo.json` naming the source zoo and the recipe.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

from expertmerge.console import make_console
from expertmerge.zoo_registry import ZooBuilder, ensure_zoo, read_manifest
from expertmerge_zoos.corpora import read_jsonl
from expertmerge_zoos.smollm2 import DEFAULT_RECIPE, Recipe, encode
from expertmerge_zoos.smollm2_full import FULL_RECIPE
from expertmerge_zoos.staging import Timer, build_steps, staged_build, write_manifest
from expertmerge_zoos.training import epoch_batches, train_causal_lm

RECIPES: dict[str, Recipe] = {"smollm2": DEFAULT_RECIPE, "smollm2_full": FULL_RECIPE}
# one version per source zoo: bump a source's entry when that zoo's training texts change (zoo B's builder
# version 2 re-drew its splits)
BUILDER_VERSIONS: dict[str, int] = {"smollm2": 1, "smollm2_full": 2}


def build_mixture_zoo(out: Path, seed: int = 0, *, source: str, console: Console | None = None) -> Path:
    """Train the mixture reference of zoo `source` (built first if needed) into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = console or make_console(stderr=True)
    recipe = RECIPES[source]
    folder = ensure_zoo(source)
    manifest = read_manifest(folder)
    assert manifest is not None
    tasks = list(manifest["tasks"])
    timer = Timer()
    with (
        staged_build(out, seed) as staging,
        build_steps(console, f"{source}_mixture", "training", 1) as advance,
    ):
        tokenizer = AutoTokenizer.from_pretrained(folder / manifest["tokenizer"])
        texts = [r["text"] for t in tasks for r in read_jsonl(folder / manifest["tasks"][t]["train"])]
        ids, mask = encode(tokenizer, texts, recipe.max_length)
        steps = recipe.steps * len(tasks)
        schedule = type(recipe.schedule)(steps, recipe.lr, recipe.warmup_steps, recipe.min_lr_ratio)
        model = AutoModelForCausalLM.from_pretrained(folder / manifest["base"], dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        batches = epoch_batches(len(ids), recipe.batch_size, steps, generator)
        curve = train_causal_lm(model, ids, mask, batches, schedule, trains=recipe.trains)
        model.save_pretrained(staging / "mixture")
        tokenizer.save_pretrained(staging / "mixture")
        timer.lap("training")
        advance("done")
        write_manifest(
            staging,
            {
                "name": f"{source}_mixture",
                "builder_version": BUILDER_VERSIONS[source],
                "seed": seed,
                "source_zoo": source,
                "tasks": tasks,
                "train_samples": len(texts),
                "steps": steps,
                "train_curve": [round(v, 4) for v in curve],
                "recipe": asdict(recipe),
                "timings": timer.phases,
            },
            timer.total,
        )
    return Path(out)


ZOOS = {
    f"{source}_mixture": ZooBuilder(
        build=partial(build_mixture_zoo, source=source),
        version=BUILDER_VERSIONS[source],
        description=f"mixture-training reference of the {source} zoo (one multi-task fine-tune)",
    )
    for source in RECIPES
}
SMOLLM2_MIXTURE = ZOOS["smollm2_mixture"]
SMOLLM2_FULL_MIXTURE = ZOOS["smollm2_full_mixture"]
