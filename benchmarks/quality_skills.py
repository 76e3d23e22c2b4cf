"""The skills benchmark (`python benchmarks/quality.py --zoo skills`): accuracy by generation on zoo C.

Every row answers the same held-out prompts of every skill greedily (`expertmerge.accuracy`: left-padded
batches, KV cache, at most 16 new tokens), scored by the skill's scorer against the reference answer:

    accuracy gain retained = (acc_model - acc_base) / (acc_expert - acc_base)

Rows: the base; the experts (each on its own skill); task arithmetic at the default lambda and at the lambda
best on these very held-out prompts (the oracle row: a user cannot pick it); TIES at its defaults; RegMean
on the calibration prompts; Expert Merging calibrated on the prompts alone, and with the experts' own answers
(`answers: expert`). The Expert Merging rows run `fit` in a child process with an empty cache, so their wall
time includes the teacher pass and, for the second one, the answer writing.

The general task (the base's own greedy answers to held-out general prompts) checks what a merge keeps of the
base: the mean KL(base || model) per answer token. The difference between Expert Merging with answers and the
best training-free row (by mean gain) gets a paired bootstrap over the held-out prompts (the same resampled
prompts for both rows and the base and experts in each round), with its 95% percentile interval.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table

from expertmerge.accuracy import GenerationSettings, generate_greedy, score_one
from expertmerge.zoo_registry import ensure_zoo, read_manifest
from expertmerge_zoos.corpora import read_jsonl
from expertmerge_zoos.skills import GENERAL, chat_prompt
from expertmerge_zoos.splits import check_disjoint

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "skills.yaml"
ROWS = ("task arithmetic", "oracle", "TIES", "RegMean", "EM prompts only", "EM with answers")
TRAINING_FREE = ("task arithmetic", "TIES", "RegMean")
GENERAL_TOKENS = 24


def heldout_data(folder: Path, manifest: dict[str, Any], count: int) -> dict[str, list[dict[str, Any]]]:
    """Each skill's held-out records (at most `count`) and the general held-out prompts, checked unseen by
    any train, validation or calib split of any task (by prompt text)."""
    tasks = {**manifest["tasks"], GENERAL: manifest["general"]}
    seen, heldout = [], []
    for task in tasks.values():
        heldout += [r["prompt"] for r in read_jsonl(folder / task["heldout"])]
        for split in ("train", "validation", "calib"):
            if split in task:
                seen += [r["prompt"] for r in read_jsonl(folder / task[split])]
    check_disjoint({"heldout": heldout, "seen": seen}, key=str, what="held-out vs training / calib prompts")
    return {name: read_jsonl(folder / task["heldout"])[:count] for name, task in tasks.items()}


def plain_config(folder: Path, work: Path, name: str, answers: bool, drop: tuple[str, ...] = ()) -> Path:
    """configs/skills.yaml with the zoo's folder for `zoo://skills` (the fit runs in a child process that may
    not know the zoo), `answers: none` everywhere unless `answers`, without the tasks in `drop`."""
    text = CONFIG.read_text().replace("zoo://skills/", f"{folder}/")
    config = yaml.safe_load(text)
    tasks = []
    for task in config["data"]["tasks"]:
        if task["name"] in drop:
            continue
        task = dict(task)
        if not answers:
            for key in ("answers", "max_new_tokens"):
                task.pop(key, None)
        tasks.append(task)
    config["data"]["tasks"] = tasks
    config["trainer"]["accumulate_grad_batches"] = len(tasks)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_fit(config: Path, work: Path, slug: str, extra: list[str]) -> tuple[Path, float]:
    """`fit` in a child process with its own empty cache (nothing reused: teacher pass and answers timed)."""
    out = work / slug
    cache = work / f"{slug}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    command = [
        sys.executable, "-m", "expertmerge", "fit", "--config", str(config),
        "--export.output_dir", str(out), "--export.force", "true",
        "--trainer.default_root_dir", str(work / f"{slug}-logs"), *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "EXPERTMERGE_CACHE": str(cache),
    }
    log = work / f"{slug}.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"fit failed ({result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return out, seconds


def correct_per_prompt(
    model: Any, tokenizer: Any, skills: dict[str, dict[str, Any]], data: dict[str, list[dict[str, Any]]],
    names: list[str], max_new_tokens: int, batch_size: int,
) -> tuple[dict[str, list[bool]], dict[str, list[str]], float]:  # fmt: skip
    """Per skill in `names`: whether each held-out answer is right, the answers, and the generation seconds."""
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, batch_size=batch_size, add_special_tokens=False
    )
    correct, answers, seconds = {}, {}, 0.0
    for name in names:
        records = data[name]
        prompts = [chat_prompt(tokenizer, r["prompt"]) for r in records]
        started = time.perf_counter()
        answers[name] = generate_greedy(model, tokenizer, prompts, settings, progress=False)
        seconds += time.perf_counter() - started
        correct[name] = [
            score_one(skills[name]["scorer"], g, r["answer"], None)
            for g, r in zip(answers[name], records, strict=True)
        ]
    return correct, answers, seconds


def written_answers(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], max_new_tokens: int, batch_size: int = 8
) -> tuple[list[tuple[list[int], int]], float]:
    """`model`'s answers to the chat-rendered prompts as the fit's `answers: expert` writes them
    (`expertmerge.answers.generate_answers`): (prompt + answer token ids, prompt length) each, and the seconds
    the writing took."""
    from expertmerge.answers import AnswerSettings, generate_answers

    prompts = [
        tokenizer(chat_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"] for r in records
    ]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    started = time.perf_counter()
    written = generate_answers(
        model, ids, mask, AnswerSettings(max_new_tokens=max_new_tokens), ends=[int(tokenizer.eos_token_id)],
        pad_id=int(tokenizer.pad_token_id), decode=tokenizer.decode, batch_size=batch_size,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return [(p + a, len(p)) for p, a in zip(prompts, written.tokens, strict=True)], seconds


@torch.no_grad()
def answer_log_probs(model: Any, sequences: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Per sequence the model's next-token log-probabilities at the positions that predict an answer token."""
    result = []
    for ids, start in sequences:
        logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1].float()
        result.append(torch.log_softmax(logits, dim=-1))
    return result


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean KL(reference || other) per answer token."""
    total = sum(float((r.exp() * (r - o)).sum()) for r, o in zip(reference, other, strict=True))
    return total / sum(r.shape[0] for r in reference)


def gain(base: float, model: float, expert: float) -> float:
    return (model - base) / (expert - base) if expert != base else float("nan")


def bootstrap(
    rows: dict[str, dict[str, list[bool]]], a: str, b: str, skills: list[str], rounds: int, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Paired bootstrap of gain(a) - gain(b) per skill and for the mean over skills: (measured, 2.5%, 97.5%)."""
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for skill in skills:
        n = len(rows["base"][skill])
        draws = torch.randint(0, n, (rounds, n), generator=generator)
        draws[0] = torch.arange(n)  # round 0: the prompts as measured

        def accuracy(row: str, skill: str = skill, draws: torch.Tensor = draws) -> torch.Tensor:
            return torch.tensor(rows[row][skill], dtype=torch.float64)[draws].mean(1)

        base, expert = accuracy("base"), accuracy("experts")
        spread = (expert - base).where((expert - base) != 0, torch.tensor(float("nan"), dtype=torch.float64))
        differences[skill] = (accuracy(a) - accuracy(b)) / spread
    mean = torch.stack(list(differences.values())).mean(0)

    def interval(values: torch.Tensor) -> tuple[float, float, float]:
        values = values[~values.isnan()] if not values[0].isnan() else values
        return float(values[0]), float(values.quantile(0.025)), float(values.quantile(0.975))

    return {**{s: interval(v) for s, v in differences.items()}, "mean": interval(mean)}


def run(options: argparse.Namespace) -> int:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.quality import merge_configs, register_extra_zoos, regmean, run_training_free

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    console = Console(width=200)
    started = time.perf_counter()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    register_extra_zoos()
    folder = ensure_zoo("skills")
    manifest = read_manifest(folder)
    assert manifest is not None
    skills_info = manifest["tasks"]
    skills = list(skills_info)
    tokenizer = AutoTokenizer.from_pretrained(folder / manifest["tokenizer"])
    data = heldout_data(folder, manifest, options.heldout)
    max_new = int(manifest["recipe"]["max_new_tokens"])
    batch = options.generation_batch
    wanted = [r for r in (options.rows or ROWS) if r not in options.skip]
    work = options.work or Path(f"/tmp/quality-skills-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]skills[/] zoo at {folder}; merged models under {work}")

    def load(path: Path) -> Any:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    results: dict[str, dict[str, list[bool]]] = {}
    seconds: dict[str, float | None] = {}
    kl: dict[str, float] = {}
    generation_seconds: dict[str, float] = {}
    base = load(folder / "base")
    sequences, _ = written_answers(base, tokenizer, data[GENERAL], GENERAL_TOKENS)
    base_lp = answer_log_probs(base, sequences)
    results["base"], _, generation_seconds["base"] = correct_per_prompt(
        base, tokenizer, skills_info, data, skills, max_new, batch
    )
    seconds["base"], kl["base"] = None, 0.0
    del base
    results["experts"], seconds["experts"] = (
        {},
        sum(v for k, v in manifest["timings"].items() if k.startswith("expert_")),
    )
    per_expert_seconds = {}
    for skill in skills:
        expert = load(folder / "experts" / skill)
        correct, _, generation_seconds[f"expert {skill}"] = correct_per_prompt(
            expert, tokenizer, skills_info, data, [skill], max_new, batch
        )
        results["experts"][skill] = correct[skill]
        calib = read_jsonl(folder / skills_info[skill]["calib"])
        _, writing = written_answers(expert, tokenizer, calib, max_new)
        per_expert_seconds[skill] = 100 * writing / len(calib)
        del expert
    console.print(
        f"answer writing (`answers: expert`, batches of 8, at most {max_new} tokens), seconds per 100 "
        "calibration prompts: " + ", ".join(f"{s} {t:.1f}" for s, t in per_expert_seconds.items())
    )

    def score(row: str, path: Path) -> None:
        model = load(path)
        results[row], _, generation_seconds[row] = correct_per_prompt(
            model, tokenizer, skills_info, data, skills, max_new, batch
        )
        kl[row] = mean_kl(base_lp, answer_log_probs(model, sequences))
        del model
        partial = {"per_prompt": results, "general_kl": kl, "seconds": seconds}
        (work / "partial.json").write_text(json.dumps(partial, indent=1) + "\n")
        console.print(f"  {row}: " + ", ".join(f"{s} {sum(v) / len(v):.2f}" for s, v in results[row].items()))

    configs = merge_configs(folder, skills, options)
    # The rows the comparison needs first (a run cut short still has them: partial.json after every row).
    if "task arithmetic" in wanted or "oracle" in wanted:
        path = work / "task-arithmetic"
        seconds["task arithmetic"] = run_training_free(configs["task arithmetic"], path)
        score("task arithmetic", path)
    if "TIES" in wanted:
        path = work / "ties"
        seconds["TIES"] = run_training_free(configs["TIES"], path)
        score("TIES", path)
    for row, answers in (("EM with answers", True), ("EM prompts only", False)):
        if row in wanted:
            slug = "em-answers" if answers else "em-prompts"
            config = plain_config(folder, work, slug, answers=answers)
            path, seconds[row] = run_fit(config, work, slug, options.fit_overrides)
            score(row, path)
    if "oracle" in wanted:
        sweep = {1.0: "task arithmetic"}
        total = seconds["task arithmetic"] or 0.0
        for value in options.lambdas:
            key = f"task arithmetic (lambda {value:g})"
            config = copy.deepcopy(configs["task arithmetic"])
            config["parameters"] = {"lambda": value}
            path = work / re.sub(r"\W+", "-", key.lower())
            total += run_training_free(config, path)
            score(key, path)
            sweep[value] = key

        def mean_gain(row: str) -> float:
            values = [
                gain(*(sum(results[r][s]) / len(results[r][s]) for r in ("base", row, "experts")))
                for s in skills
            ]
            return sum(values) / len(values)

        best = max(sweep, key=lambda v: mean_gain(sweep[v]))
        label = f"task arithmetic (oracle lambda {best:g})"
        results[label], kl[label], seconds[label] = results[sweep[best]], kl[sweep[best]], total
        for key in sweep.values():
            if key != "task arithmetic":
                results.pop(key)
    if "RegMean" in wanted:
        from benchmarks import quality

        config = plain_config(folder, work, "regmean", answers=False, drop=(GENERAL,))
        path = regmean(config, work, options.regmean_alpha)
        seconds["RegMean"] = quality.timings["RegMean"]
        score("RegMean", path)
    order = (
        "base",
        "experts",
        "task arithmetic",
        "oracle",
        "TIES",
        "RegMean",
        "EM prompts only",
        "EM with answers",
    )
    results = dict(
        sorted(results.items(), key=lambda item: order.index("oracle" if "(oracle" in item[0] else item[0]))
    )

    summary: dict[str, Any] = {}
    for row, per_skill in results.items():
        accuracy = {s: sum(v) / len(v) for s, v in per_skill.items()}
        gains = {
            s: gain(sum(results["base"][s]) / len(results["base"][s]), accuracy[s],
                    sum(results["experts"][s]) / len(results["experts"][s]))
            for s in skills
        }  # fmt: skip
        summary[row] = {
            "accuracy": accuracy,
            "gain": gains,
            "mean_gain": sum(gains.values()) / len(gains),
            "general_kl": kl.get(row),
            "seconds": seconds.get(row),
        }
    table = Table(
        title="'skills' zoo: held-out accuracy by greedy generation; gain = (acc - acc_base) / (acc_expert - acc_base)"
    )
    table.add_column("model")
    for skill in skills:
        table.add_column(f"{skill} acc", justify="right")
        table.add_column(f"{skill} gain", justify="right")
    for column in ("mean gain", "general KL", "seconds"):
        table.add_column(column, justify="right")
    for row, values in summary.items():
        cells = []
        for skill in skills:
            cells += [f"{values['accuracy'][skill]:.2f}", f"{values['gain'][skill]:+.2f}"]
        cells.append(f"{values['mean_gain']:+.3f}")
        cells.append("" if values["general_kl"] is None else f"{values['general_kl']:.4f}")
        cells.append("" if values["seconds"] is None else f"{values['seconds']:.0f}")
        table.add_row(row, *cells)
    console.print(table)
    comparison = {}
    free = [r for r in TRAINING_FREE if r in summary]
    if "EM with answers" in summary and free:
        best_free = max(free, key=lambda r: summary[r]["mean_gain"])
        for other in dict.fromkeys([best_free, *[r for r in summary if "oracle" in r], "EM prompts only"]):
            if other in summary:
                comparison[other] = bootstrap(results, "EM with answers", other, skills, options.rounds)
                console.print(
                    f"EM with answers minus {other} (gain retained; paired bootstrap, {options.rounds} rounds): "
                    + "; ".join(
                        f"{k} {m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for k, (m, lo, hi) in comparison[other].items()
                    )
                )
    console.print(
        f"held-out: {', '.join(f'{s} {len(data[s])}' for s in skills)} prompts, general {len(data[GENERAL])}; "
        f"task arithmetic weight {options.ta_weight}, oracle lambdas 1, {', '.join(f'{v:g}' for v in options.lambdas)}; "
        f"TIES density {options.density}; RegMean alpha {options.regmean_alpha}; fit config {CONFIG.name}"
        + (f" {' '.join(options.fit_overrides)}" if options.fit_overrides else "")
    )
    console.print(f"total {time.perf_counter() - started:.0f} s")
    if options.json:
        options.json.write_text(
            json.dumps(
                {
                    "zoo": "skills",
                    "results": summary,
                    "per_prompt": results,
                    "bootstrap": comparison,
                    "answer_seconds_per_100_prompts": per_expert_seconds,
                    "generation_seconds": generation_seconds,
                },
                indent=1,
            )
            + "\n"
        )
    return 0
