"""How much of the experts' skill each merge keeps, on a demo zoo's held-out data.

    python benchmarks/quality.py                  # the SmolLM2 zoo (built on first use), fit with configs/demo.yaml
    python benchmarks/quality.py --zoo tiny       # the tiny zoo, fit with configs/fit_tiny.yaml (a few minutes)

One table, one row per model: the base, every expert, the training-free merges (average, task arithmetic,
TIES, DARE-TIES via `expertmerge.merge.run_merge`), Expert Merging and Expert Merging++ (the `fit` command in
a subprocess, `--model.chunking true` for ++), the fused MoE (`fit --model.moe true`: the experts' FFNs as MoE
experts, learned shared tensors, router from the calibration data) and the sequence-level MoE (whole experts,
routed per request by perplexity on the text; it runs every expert on the prompt). Columns per domain: held-out perplexity, and *gain retained*

    gain = (loss_base - loss_model) / (loss_base - loss_expert)     (held-out loss in nats/token)

i.e. 1 when the model is as good as that domain's own expert, 0 when it is no better than the base. Domains
whose held-out records carry answers (math) also get the exact-match accuracy of the final `#### n` number
in greedy generations for held-out problems. The headline is the mean gain retained over domains.

Held-out data never overlaps calibration or expert-training data: checked here, by text and by the token
sequence the model sees, across all domains, before anything is scored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertmerge.zoo_registry import ensure_zoo, read_manifest  # noqa: E402
from expertmerge_zoos.corpora import final_number, read_jsonl  # noqa: E402
from expertmerge_zoos.evaluation import heldout_loss_table  # noqa: E402
from expertmerge_zoos.smollm2 import encode  # noqa: E402
from expertmerge_zoos.splits import check_disjoint, token_key  # noqa: E402

FIT_CONFIGS = {"smollm2": REPO / "configs" / "demo.yaml", "tiny": REPO / "configs" / "fit_tiny.yaml"}
MERGE_ROWS = (
    "average",
    "task arithmetic",
    "TIES",
    "DARE-TIES",
    "Expert Merging",
    "Expert Merging++",
    "fused MoE",
    "sequence MoE (perplexity)",
)


def check_heldout_is_unseen(folder: Path, manifest: dict[str, Any], tokenizer: Any, max_length: int) -> None:
    """Held-out texts of every domain share nothing with any domain's train or calib texts."""
    seen: list[str] = []
    heldout: list[str] = []
    for task in manifest["tasks"].values():
        heldout += [r["text"] for r in read_jsonl(folder / task["heldout"])]
        for split in ("train", "calib"):
            seen += [r["text"] for r in read_jsonl(folder / task[split])]
    check_disjoint({"heldout": heldout, "train+calib": seen}, what="held-out vs training data")
    check_disjoint(
        {"heldout": heldout, "train+calib": seen},
        key=token_key(tokenizer, max_length),
        what="held-out vs training data (as tokens)",
    )


def training_free_merges(
    folder: Path, tasks: list[str], work: Path, options: argparse.Namespace
) -> dict[str, Path]:
    from expertmerge.merge import run_merge

    experts = [str(folder / "experts" / t) for t in tasks]
    base = str(folder / "base")
    configs = {
        "average": {"merge_method": "average", "models": [{"model": e} for e in experts]},
        "task arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": options.ta_weight}} for e in experts],
        },
        "TIES": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": e, "parameters": {"weight": 1.0, "density": options.density}} for e in experts
            ],
            "parameters": {"normalize": True},
        },
        "DARE-TIES": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [
                {"model": e, "parameters": {"weight": 1.0, "density": options.density}} for e in experts
            ],
            "parameters": {"normalize": True, "rescale": True},
            "random_seed": 0,
        },
    }
    outputs = {}
    for name, config in configs.items():
        if options.rows and name not in options.rows:
            continue
        out = work / re.sub(r"\W+", "-", name.lower())
        started = time.perf_counter()
        run_merge(
            {**config, "dtype": "float32"}, out, force=True, progress=False, console=Console(quiet=True)
        )
        timings[name] = time.perf_counter() - started
        outputs[name] = out
    return outputs


def expert_merging(config: Path, work: Path, chunking: bool, extra: list[str], moe: bool = False) -> Path:
    """Run `fit` in a subprocess; with `moe`, the fused MoE it exports next to the dense merge."""
    out = work / ("fused-moe-fit" if moe else "expert-merging-pp" if chunking else "expert-merging")
    command = [
        sys.executable,
        "-m",
        "expertmerge",
        "fit",
        "--config",
        str(config),
        "--export.output_dir",
        str(out),
        "--export.force",
        "true",
        "--trainer.default_root_dir",
        str(work / "fit-logs"),
        *(["--model.chunking", "true"] if chunking else []),
        *(["--model.moe", "true", "--export.moe_output_dir", str(work / "fused-moe")] if moe else []),
        *extra,
    ]
    started = time.perf_counter()
    log = work / f"{out.name}.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    timings["fused MoE" if moe else "Expert Merging++" if chunking else "Expert Merging"] = (
        time.perf_counter() - started
    )
    if result.returncode != 0:
        raise SystemExit(f"fit failed ({result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return work / "fused-moe" if moe else out


def sequence_moe(folder: Path, tasks: list[str], work: Path) -> Path:
    """The experts kept whole, routed per request by their perplexity on the prompt (MergeME; no training)."""
    from expertmerge.moe.sequence_build import build_sequence_moe

    out = work / "sequence-moe"
    started = time.perf_counter()
    model = build_sequence_moe({t: str(folder / "experts" / t) for t in tasks}, router="perplexity")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    timings["sequence MoE"] = time.perf_counter() - started
    return out


class _StopAfterAnswer:
    """Stop a greedy batch once every row has written `#### <number>` and ended that line (or EOS)."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=False)
        done = [bool(re.search(r"####\s*\S+\s*\n", t)) or self.tokenizer.eos_token in t for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def exact_match(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], options: argparse.Namespace
) -> float:
    """Share of problems whose greedy answer ends in the right `#### n` (prompt: the text up to the answer)."""
    from transformers import StoppingCriteriaList

    prompts = [r["text"][: r["text"].rindex(r["answer"])].rstrip(" ") for r in records]
    correct = 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), options.generation_batch):
            batch = tokenizer(
                prompts[start : start + options.generation_batch], return_tensors="pt", padding=True
            )
            length = batch["input_ids"].shape[1]
            generated = model.generate(
                **batch,
                max_new_tokens=options.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_StopAfterAnswer(tokenizer, length)]),
            )
            answers = tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
            for record, answer in zip(
                records[start : start + options.generation_batch], answers, strict=True
            ):
                correct += final_number(answer.split("\nQuestion")[0]) == record["final"]
    finally:
        tokenizer.padding_side = side
    return correct / len(records)


timings: dict[str, float] = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", default="smollm2", choices=sorted(FIT_CONFIGS), help="which demo zoo")
    parser.add_argument("--config", type=Path, help="fit config for Expert Merging (default: the zoo's)")
    parser.add_argument("--work", type=Path, help="folder for the merged models (default: a temporary one)")
    parser.add_argument("--heldout", type=int, default=48, help="held-out texts per domain (at most)")
    parser.add_argument("--em-problems", type=int, default=32, help="held-out problems for exact match")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="greedy answer length limit")
    parser.add_argument("--generation-batch", type=int, default=16)
    parser.add_argument("--ta-weight", type=float, default=0.3, help="task arithmetic weight per expert")
    parser.add_argument("--density", type=float, default=0.5, help="TIES / DARE-TIES density")
    parser.add_argument("--skip-fit", action="store_true", help="leave Expert Merging (and ++) out")
    parser.add_argument("--expert-merging", type=Path, help="use this exported fit instead of fitting")
    parser.add_argument("--expert-merging-pp", type=Path, help="use this exported chunked fit (++)")
    parser.add_argument("--skip-moe", action="store_true", help="leave the fused and sequence MoE rows out")
    parser.add_argument(
        "--rows", nargs="+", choices=MERGE_ROWS, help="score only these merges (base and experts always)"
    )
    parser.add_argument("--fused-moe", type=Path, help="use this exported fused MoE instead of fitting one")
    parser.add_argument("--json", type=Path, help="also write the results here")
    options, fit_overrides = parser.parse_known_args(argv)  # the rest goes to `fit`, e.g. --model.lr=0.05
    options.fit_overrides = fit_overrides

    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(width=200)  # the table is wide; never wrap it, even in a log file
    started = time.perf_counter()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    folder = ensure_zoo(options.zoo)
    manifest = read_manifest(folder)
    assert manifest is not None
    tasks = list(manifest["tasks"])
    recipe = manifest.get("recipe", {})
    max_length = int(recipe.get("max_length", 128))
    shared_layers = int(recipe.get("first_trained_layer", 0))
    tokenizer = AutoTokenizer.from_pretrained(folder / manifest["tokenizer"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_heldout_is_unseen(folder, manifest, tokenizer, max_length)
    heldout = {t: read_jsonl(folder / manifest["tasks"][t]["heldout"])[: options.heldout] for t in tasks}
    encoded = {t: encode(tokenizer, [r["text"] for r in rows], max_length) for t, rows in heldout.items()}

    work_context = tempfile.TemporaryDirectory(prefix="quality-") if options.work is None else None
    work = Path(work_context.name) if work_context else options.work
    work.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {"base": folder / "base"}
    models.update({f"expert {t}": folder / "experts" / t for t in tasks})
    console.print(f"[bold]{options.zoo}[/] zoo at {folder}; merged models under {work}")
    models.update(training_free_merges(folder, tasks, work, options))
    config = options.config or FIT_CONFIGS[options.zoo]
    for name, given, chunking in (
        ("Expert Merging", options.expert_merging, False),
        ("Expert Merging++", options.expert_merging_pp, True),
    ):
        if options.rows and name not in options.rows:
            continue
        if given is not None:
            models[name] = given
        elif not options.skip_fit:
            models[name] = expert_merging(config, work, chunking, options.fit_overrides)

    wanted = set(options.rows or MERGE_ROWS) - (
        {"fused MoE", "sequence MoE (perplexity)"} if options.skip_moe else set()
    )
    if "fused MoE" in wanted:
        if options.fused_moe is not None:
            models["fused MoE"] = options.fused_moe
        elif not options.skip_fit:
            models["fused MoE"] = expert_merging(config, work, False, options.fit_overrides, moe=True)
    if "sequence MoE (perplexity)" in wanted:
        models["sequence MoE (perplexity)"] = sequence_moe(folder, tasks, work)

    def load(name: str) -> Any:
        return AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()

    base = load("base")
    scoring = time.perf_counter()
    losses = heldout_loss_table(base, load, [m for m in models if m != "base"], encoded, shared_layers)
    timings["held-out losses"] = time.perf_counter() - scoring
    answer_tasks = [t for t in tasks if manifest["tasks"][t].get("answers")][:1]  # math: the first such task
    accuracy: dict[str, dict[str, float]] = {name: {} for name in models}
    for task in answer_tasks:
        problems = heldout[task][: options.em_problems]
        scoring = time.perf_counter()
        for name in models:
            model = base if name == "base" else load(name)
            accuracy[name][task] = exact_match(model, tokenizer, problems, options)
        timings[f"exact match ({task})"] = time.perf_counter() - scoring

    results = {}
    for name in models:
        row: dict[str, Any] = {}
        for task in tasks:
            loss, base_loss, own = losses[task][name], losses[task]["base"], losses[task][f"expert {task}"]
            row[task] = {
                "loss": loss,
                "perplexity": math.exp(loss),
                "gain": (base_loss - loss) / (base_loss - own) if base_loss != own else float("nan"),
                **({"exact_match": accuracy[name][task]} if task in accuracy[name] else {}),
            }
        row["mean_gain"] = sum(row[t]["gain"] for t in tasks) / len(tasks)
        results[name] = row

    table = Table(
        title=f"Held-out quality on the '{options.zoo}' zoo: perplexity (lower is better) and gain retained "
        "= (loss_base - loss) / (loss_base - loss_expert)"
    )
    table.add_column("model")
    for task in tasks:
        table.add_column(f"{task} ppl", justify="right")
        table.add_column(f"{task} gain", justify="right")
        if task in answer_tasks:
            table.add_column(f"{task} EM", justify="right")
    table.add_column("mean gain", justify="right", style="bold")
    for index, (name, row) in enumerate(results.items()):
        cells = []
        for task in tasks:
            cells += [f"{row[task]['perplexity']:.3f}", f"{row[task]['gain']:+.2f}"]
            if task in answer_tasks:
                cells.append(f"{row[task]['exact_match']:.0%}")
        table.add_row(name, *cells, f"{row['mean_gain']:+.3f}", end_section=index in (0, len(tasks)))
    console.print(table)
    notes = (
        f"held-out: {', '.join(f'{t} {len(heldout[t])}' for t in tasks)} texts of <= {max_length} tokens; "
        f"EM on {min(options.em_problems, len(heldout[answer_tasks[0]]))} {answer_tasks[0]} problems, greedy, "
        f"<= {options.max_new_tokens} new tokens"
        if answer_tasks
        else f"held-out: {len(heldout[tasks[0]])} texts per domain"
    )
    console.print(notes)
    console.print(
        f"task arithmetic: weight {options.ta_weight} per expert; TIES / DARE-TIES: weight 1, density "
        f"{options.density}, normalize; Expert Merging: {options.config or FIT_CONFIGS[options.zoo]}"
        + (f" {' '.join(options.fit_overrides)}" if options.fit_overrides else "")
    )
    console.print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    console.print(f"total: {time.perf_counter() - started:.0f} s")
    if options.json:
        options.json.write_text(json.dumps({"results": results, "timings": timings}, indent=1) + "\n")
    if work_context:
        work_context.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
