"""How much of the experts' skill each merge keeps, on a zoo's held-out data, scored honestly.

    python benchmarks/quality.py --zoo smollm2        # zoo A: upper-layer experts (math / Python / French)
    python benchmarks/quality.py --zoo smollm2_full   # zoo B: full fine-tunes (German math / C / Python docs)
    python benchmarks/quality.py --zoo gemma3_full    # zoo G: zoo B's recipe on Gemma3-270M
    python benchmarks/quality.py --zoo tiny           # a quick look on the tiny zoo
    python benchmarks/quality.py --zoo skills         # zoo C: skill experts scored by accuracy (quality_skills.py)

Rows, all scored on the same held-out texts: the base; every expert; the training-free merges (average,
task arithmetic, TIES, DARE-TIES via `expertmerge.merge.run_merge`) at their default settings and at the
`lambda` (mergekit's scale of the merged task vector) that is best ON THE HELD-OUT DATA ("oracle" rows: a
user cannot pick that); RegMean (closed form per linear layer from each expert's input Gram matrices on the
calibration texts the learned merge uses, `expertmerge.regmean`); mixture training (one multi-task
fine-tune of the base on the union of the experts' training data with their total step budget,
`expertmerge_zoos.mixture`); Expert Merging and Expert Merging++ (`fit` with the zoo's shipped config, and
`--model.chunking true`); the fused MoE (`fit --model.moe true`) and the sequence-level MoE (whole experts,
routed per text by perplexity).

Prefix protocol: each held-out text's first quarter of tokens is a prefix. The sequence MoE routes on the
prefix only (each expert's perplexity on it); the fused MoE routes each token from the tokens before it.
EVERY row is scored on the tokens after the prefix only, so no router sees what it is scored on.

    gain = (loss_base - loss_model) / (loss_base - loss_expert)     (suffix loss in nats/token)

1 when the model is as good as that domain's own expert, 0 when it is no better than the base; the headline
is the mean over domains. `seconds` is the row's own cost (merge, fit or training; for oracle rows the whole
lambda sweep), not the scoring. Held-out data never overlaps calibration or expert-training data: checked
here, by text and by the token sequence the model sees, across all domains, before anything is scored.
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
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertmerge.zoo_registry import ensure_zoo, read_manifest, register_zoo, zoo_names  # noqa: E402
from expertmerge_zoos.corpora import final_number, read_jsonl  # noqa: E402
from expertmerge_zoos.evaluation import heldout_loss_table, token_nll_sum  # noqa: E402
from expertmerge_zoos.smollm2 import encode  # noqa: E402
from expertmerge_zoos.splits import calib_task, check_disjoint, token_key  # noqa: E402

# zoo -> (its shipped fit config, the config it is derived from for zoos without one, mixture zoo)
FIT_CONFIGS = {
    "smollm2": REPO / "configs" / "demo.yaml",
    "tiny": REPO / "configs" / "fit_tiny.yaml",
    "smollm2_full": REPO / "configs" / "demo.yaml",  # the demo's settings, models and data swapped in
    "gemma3_full": REPO / "configs" / "quality_gemma3.yaml",  # the same, teacher targets top-k written out
    "skills": REPO / "configs" / "skills.yaml",  # scored by accuracy, not loss: benchmarks/quality_skills.py
}
MIXTURE_ZOOS = {"smollm2": "smollm2_mixture", "smollm2_full": "smollm2_full_mixture"}
TRAINING_FREE = ("average", "task arithmetic", "TIES", "DARE-TIES")
MERGE_ROWS = (
    *TRAINING_FREE,
    "oracle",
    "RegMean",
    "mixture training",
    "Expert Merging",
    "Expert Merging++",
    "fused MoE",
    "sequence MoE",
)
timings: dict[str, float] = {}
refusals: dict[str, str] = {}  # row -> why the library refused to make it (the table shows the reason)


def register_extra_zoos() -> None:
    """Zoos B, G and C and the mixture zoos, for checkouts installed before their entry points existed."""
    from expertmerge_zoos import gemma3_full, mixture, skills, smollm2_full

    known = set(zoo_names())
    extra = {
        "smollm2_full": smollm2_full.ZOO,
        "gemma3_full": gemma3_full.ZOO,
        "skills": skills.ZOO,
        **mixture.ZOOS,
    }
    for name, builder in extra.items():
        if name not in known:
            register_zoo(name, builder)


def check_heldout_is_unseen(
    folder: Path,
    manifest: dict[str, Any],
    tokenizer: Any,
    max_length: int,
    replaced: dict[str, Path] | None = None,
) -> None:
    """Held-out texts of every domain (`replaced[domain]`: that file's instead of the zoo's) share nothing
    with any domain's train or calib texts."""
    seen: list[str] = []
    heldout: list[str] = []
    for name, task in manifest["tasks"].items():
        heldout += [r["text"] for r in read_jsonl((replaced or {}).get(name, folder / task["heldout"]))]
        for split in ("train", "calib"):
            seen += [r["text"] for r in read_jsonl(folder / task[split])]
    check_disjoint({"heldout": heldout, "train+calib": seen}, what="held-out vs training data")
    check_disjoint(
        {"heldout": heldout, "train+calib": seen},
        key=token_key(tokenizer, max_length),
        what="held-out vs training data (as tokens)",
    )


def prefix_starts(mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """[rows] first scored token of each text: after the first `fraction` of its real tokens (>= 1)."""
    return (mask.sum(1).float() * fraction).floor().long().clamp_min(1)


# ---------------------------------------------------------------------------------------------- rows


def merge_configs(folder: Path, tasks: list[str], options: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The training-free merges at their default settings (mergekit's, and weight / density where it has
    none: task arithmetic weight `--ta-weight` per expert; TIES / DARE-TIES weight 1, `--density`)."""
    experts = [str(folder / "experts" / t) for t in tasks]
    base = str(folder / "base")
    return {
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


def run_training_free(config: dict[str, Any], out: Path) -> float:
    from expertmerge.merge import run_merge

    started = time.perf_counter()
    run_merge({**config, "dtype": "float32"}, out, force=True, progress=False, console=Console(quiet=True))
    return time.perf_counter() - started


def fit_config(zoo: str, folder: Path, manifest: dict[str, Any], work: Path, given: Path | None) -> Path:
    """The fit config of the Expert Merging rows: given, the zoo's shipped one, or (zoo B) the demo's
    settings with this zoo's models and calibration files as plain paths (the fit runs in a child process,
    which may not know a zoo registered here)."""
    if given is not None:
        return given
    shipped = FIT_CONFIGS[zoo]
    if zoo in ("smollm2", "tiny"):
        return shipped
    config = yaml.safe_load(shipped.read_text())
    tasks = list(manifest["tasks"])
    config["model"]["base"] = str(folder / manifest["base"])
    config["model"]["experts"] = {t: str(folder / manifest["tasks"][t]["expert"]) for t in tasks}
    config["model"].pop("learn_include", None)  # full fine-tunes: every tensor has a task vector
    config["data"]["tasks"] = [calib_task(t, str(folder / manifest["tasks"][t]["calib"])) for t in tasks]
    path = work / f"fit_{zoo}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def expert_merging(config: Path, work: Path, row: str, extra: list[str]) -> Path:
    """Run `fit` in a subprocess (the repo's code: PYTHONPATH); for the fused MoE, the MoE it exports."""
    slug = {"Expert Merging": "expert-merging", "Expert Merging++": "expert-merging-pp"}.get(
        row, "fused-moe-fit"
    )
    out = work / slug
    command = [
        sys.executable, "-m", "expertmerge", "fit", "--config", str(config),
        "--export.output_dir", str(out), "--export.force", "true",
        "--trainer.default_root_dir", str(work / f"{slug}-logs"),
        *(["--model.chunking", "true"] if row == "Expert Merging++" else []),
        *(["--model.moe", "true", "--export.moe_output_dir", str(work / "fused-moe")] if row == "fused MoE" else []),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    log = work / f"{slug}.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
    timings[row] = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"fit failed ({result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return work / "fused-moe" if row == "fused MoE" else out


def fused_moe_refusal(base: Path) -> str | None:
    """The library's one-line refusal when the base's family has no fused MoE format (gemma3: none), else
    None; checked here so the row says why it is missing instead of failing the run after minutes of fit."""
    from transformers import AutoConfig

    from expertmerge.errors import ExpertMergeError
    from expertmerge.moe import moe_format_for

    try:
        moe_format_for(getattr(AutoConfig.from_pretrained(base), "model_type", None))
    except ExpertMergeError as error:
        return str(error)
    return None


def regmean(config_path: Path, work: Path, alpha: float) -> Path:
    """RegMean from each expert's input Grams on its task's calibration texts, exactly the fit's: the same
    datamodule settings pick the same `train` samples."""
    from transformers import AutoModelForCausalLM

    from calib_data.datamodule import CalibrationDataModule
    from expertmerge.regmean import input_grams, linear_weight_names, regmean_state_dict

    started = time.perf_counter()
    config = yaml.safe_load(config_path.read_text())
    model_cfg, data_cfg = config["model"], dict(config["data"])
    data = CalibrationDataModule(tokenizer=model_cfg["base"], **data_cfg)
    data.setup()

    def load(reference: str) -> Any:
        from expertmerge.zoo_registry import resolve_path

        return AutoModelForCausalLM.from_pretrained(resolve_path(reference), dtype=torch.float32).eval()

    base = load(model_cfg["base"])
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    states, grams = [], []
    for task in data.tasks:
        expert = load(model_cfg["experts"][task.expert])
        state = expert.state_dict()
        # only layers some expert changed need Grams (the others merge to the base's weight anyway)
        names = [
            n
            for n in linear_weight_names(expert)
            if not torch.equal(state[f"{n}.weight"], base_state[f"{n}.weight"])
        ]
        samples = data.task_samples(task.name, "train")
        grams.append(input_grams(expert, names, samples.input_ids, samples.attention_mask))
        states.append({k: v.clone() for k, v in state.items()})
        del expert
    shared = set.intersection(*(set(g) for g in grams)) if grams else set()
    grams = [{n: g[n] for n in shared} for g in grams]
    merged = regmean_state_dict(states, grams, alpha)
    base.load_state_dict(merged)
    out = work / "regmean"
    shutil.rmtree(out, ignore_errors=True)
    base.save_pretrained(out)
    timings["RegMean"] = time.perf_counter() - started
    return out


def sequence_moe(folder: Path, tasks: list[str], work: Path) -> Path:
    """The experts kept whole, routed per text by their perplexity on the prefix (MergeME; no training)."""
    from expertmerge.moe.sequence_build import build_sequence_moe

    out = work / "sequence-moe"
    started = time.perf_counter()
    model = build_sequence_moe({t: str(folder / "experts" / t) for t in tasks}, router="perplexity")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    timings["sequence MoE"] = time.perf_counter() - started
    return out


@torch.no_grad()
def sequence_moe_losses(
    model: Any,
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]],
    starts: dict[str, torch.Tensor],
    batch_size: int = 8,
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Suffix loss per domain of the sequence MoE routed on each text's prefix, and the chosen experts."""
    losses, choices = {}, {}
    for domain, (ids, mask) in encoded.items():
        total, count, chosen = 0.0, 0, []
        for first in range(0, len(ids), batch_size):
            rows = slice(first, first + batch_size)
            used = int(mask[rows].sum(1).max())
            b_ids, b_mask, b_start = ids[rows, :used], mask[rows, :used], starts[domain][rows]
            prefix_mask = b_mask * (torch.arange(used)[None, :] < b_start[:, None])
            weights = model.routing(b_ids, prefix_mask)
            chosen += weights.argmax(1).tolist()
            logits = model(
                input_ids=b_ids, attention_mask=b_mask, routing_weights=weights, use_cache=False
            ).logits
            nll, n = token_nll_sum(logits, b_ids, b_mask, b_start)
            total, count = total + nll, count + n
        losses[domain], choices[domain] = total / count, chosen
    return losses, choices


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
                correct += final_number(re.split(r"\n(?:Question|Frage)", answer)[0]) == record["final"]
    finally:
        tokenizer.padding_side = side
    return correct / len(records)


# ---------------------------------------------------------------------------------------------- main


def heldout_files(given: list[str], tasks: list[str]) -> dict[str, Path]:
    """`--heldout-file DOMAIN=PATH` values as {domain: path}, checked before anything runs."""
    files: dict[str, Path] = {}
    for item in given:
        domain, _, path = item.partition("=")
        if domain not in tasks or not path:
            raise SystemExit(
                f"--heldout-file {item!r}: give DOMAIN=PATH with DOMAIN one of {', '.join(tasks)}"
            )
        if not Path(path).is_file():
            raise SystemExit(f"--heldout-file {item!r}: no file {path}")
        files[domain] = Path(path)
    return files


class HeldOut(NamedTuple):
    folder: Path
    manifest: dict[str, Any]
    tasks: list[str]
    tokenizer: Any
    max_length: int
    rows: dict[str, list[dict[str, Any]]]  # per domain its held-out records
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per domain right-padded (ids, mask)
    starts: dict[str, torch.Tensor]  # per domain each text's first scored token (after the prefix)


def load_heldout(zoo: str, count: int, prefix: float, given_files: list[str]) -> HeldOut:
    """A zoo (built if needed) and its held-out texts as every row is scored: at most `count` per domain (a
    `--heldout-file DOMAIN=PATH` replaces a domain's), checked unseen by any train or calib split, tokenized,
    and each text's first scored token after its `prefix` share."""
    from transformers import AutoTokenizer

    register_extra_zoos()
    folder = ensure_zoo(zoo)
    manifest = read_manifest(folder)
    assert manifest is not None
    tasks = list(manifest["tasks"])
    max_length = int(manifest.get("recipe", {}).get("max_length", 128))
    tokenizer = AutoTokenizer.from_pretrained(folder / manifest["tokenizer"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    replaced = heldout_files(given_files, tasks)
    check_heldout_is_unseen(folder, manifest, tokenizer, max_length, replaced)
    rows = {t: read_jsonl(replaced.get(t, folder / manifest["tasks"][t]["heldout"]))[:count] for t in tasks}
    encoded = {t: encode(tokenizer, [r["text"] for r in texts], max_length) for t, texts in rows.items()}
    starts = {t: prefix_starts(mask, prefix) for t, (_, mask) in encoded.items()}
    return HeldOut(folder, manifest, tasks, tokenizer, max_length, rows, encoded, starts)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", default="smollm2", choices=sorted(FIT_CONFIGS), help="which zoo")
    parser.add_argument("--config", type=Path, help="fit config for Expert Merging (default: the zoo's)")
    parser.add_argument("--work", type=Path, help="folder for the merged models (default: a temporary one)")
    parser.add_argument("--heldout", type=int, default=48, help="held-out texts per domain (at most)")
    parser.add_argument(
        "--prefix", type=float, default=0.25, help="share of each text used as routing prefix"
    )
    parser.add_argument(
        "--em-problems", type=int, default=0, help="held-out problems for exact match (0: off)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=160, help="greedy answer length limit")
    parser.add_argument("--generation-batch", type=int, default=16)
    parser.add_argument("--ta-weight", type=float, default=0.3, help="task arithmetic weight per expert")
    parser.add_argument("--density", type=float, default=0.5, help="TIES / DARE-TIES density")
    parser.add_argument(
        "--lambdas", type=float, nargs="+", default=[0.5, 1.5, 2.0, 3.0],
        help="lambdas the oracle rows try besides the default 1 (task vector scale)",
    )  # fmt: skip
    parser.add_argument(
        "--oracle-for", nargs="+", choices=TRAINING_FREE[1:], default=list(TRAINING_FREE[1:]),
        help="the merges that get an oracle row (each costs a merge and a scoring per lambda)",
    )  # fmt: skip
    parser.add_argument("--regmean-alpha", type=float, default=0.9, help="RegMean's off-diagonal scale")
    rows = [*MERGE_ROWS, "EM prompts only", "EM with answers"]  # the last two: --zoo skills only
    parser.add_argument("--rows", nargs="+", choices=rows, help="only these rows (base, experts always)")
    parser.add_argument("--skip", nargs="+", choices=rows, default=[], help="leave these rows out")
    for row, flag in (
        ("Expert Merging", "--expert-merging"),
        ("Expert Merging++", "--expert-merging-pp"),
        ("fused MoE", "--fused-moe"),
    ):
        parser.add_argument(flag, type=Path, dest=row, help=f"use this exported model as the {row} row")
    parser.add_argument(
        "--add-row", action="append", default=[], metavar="LABEL=PATH",
        help="also score this exported model as a row (e.g. a fit with other settings); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--heldout-file", action="append", default=[], metavar="DOMAIN=PATH",
        help="score DOMAIN on this jsonl's texts instead of the zoo's held-out split (checked unseen too)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rounds", type=int, default=4000, help="paired bootstrap rounds (--zoo skills)")
    options, fit_overrides = parser.parse_known_args(argv)  # the rest goes to `fit`, e.g. --model.lr=0.05
    options.fit_overrides = fit_overrides
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    if options.zoo == "skills":
        from benchmarks.quality_skills import ROWS, run

        if unknown := [r for r in (options.rows or []) + options.skip if r not in ROWS]:
            raise SystemExit(f"--zoo skills has no rows {unknown}; its rows: {', '.join(ROWS)}")
        return run(options)
    extra_rows = {}
    for extra in options.add_row:  # checked before any long work
        label, _, path = extra.partition("=")
        if not label or not (Path(path) / "config.json").is_file():
            raise SystemExit(
                f"--add-row {extra!r}: expected LABEL=FOLDER of an exported model (with config.json)"
            )
        extra_rows[label] = Path(path)
    wanted = [r for r in (options.rows or MERGE_ROWS) if r not in options.skip]
    import transformers
    from transformers import AutoModelForCausalLM

    import expertmerge.moe.sequence  # noqa: F401  (an --add-row folder may be an exported sequence MoE)

    transformers.utils.logging.disable_progress_bar()  # one table at the end, no loading bars per model
    transformers.utils.logging.set_verbosity_error()
    console = Console(width=200)  # the table is wide; never wrap it, even in a log file
    started = time.perf_counter()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    held = load_heldout(options.zoo, options.heldout, options.prefix, options.heldout_file)
    folder, manifest, tasks, tokenizer = held.folder, held.manifest, held.tasks, held.tokenizer
    heldout, encoded, starts, max_length = held.rows, held.encoded, held.starts, held.max_length
    shared_layers = int(manifest.get("recipe", {}).get("first_trained_layer", 0))

    work_context = tempfile.TemporaryDirectory(prefix="quality-") if options.work is None else None
    work = Path(work_context.name) if work_context else options.work
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{options.zoo}[/] zoo at {folder}; merged models under {work}")
    models: dict[str, Path] = {"base": folder / "base"}
    models.update({f"expert {t}": folder / "experts" / t for t in tasks})
    configs = merge_configs(folder, tasks, options)
    sweeps: dict[str, list[str]] = {}  # method -> its lambda-sweep model names (not table rows)
    for name in TRAINING_FREE:
        if name in wanted:
            models[name] = work / re.sub(r"\W+", "-", name.lower())
            timings[name] = run_training_free(configs[name], models[name])
        if "oracle" in wanted and name in options.oracle_for:
            sweeps[name] = []
            for value in options.lambdas:
                key = f"{name} (lambda {value:g})"
                sweeps[name].append(key)
                config = {
                    **configs[name],
                    "parameters": {**configs[name].get("parameters", {}), "lambda": value},
                }
                models[key] = work / re.sub(r"\W+", "-", key.lower())
                timings[key] = run_training_free(config, models[key])
            if name not in models:
                models[name] = work / re.sub(r"\W+", "-", name.lower())
                timings[name] = run_training_free(configs[name], models[name])
    config = fit_config(options.zoo, folder, manifest, work, options.config)
    if "RegMean" in wanted:
        models["RegMean"] = regmean(config, work, options.regmean_alpha)
    if "mixture training" in wanted and options.zoo in MIXTURE_ZOOS:
        mixture_started = time.perf_counter()
        mixture_folder = ensure_zoo(MIXTURE_ZOOS[options.zoo])
        models["mixture training"] = mixture_folder / "mixture"
        built = read_manifest(mixture_folder) or {}
        timings["mixture training"] = built.get("build_seconds", time.perf_counter() - mixture_started)
    for row in ("Expert Merging", "Expert Merging++", "fused MoE"):
        if row == "fused MoE" and row in wanted and getattr(options, row) is None:
            refused = fused_moe_refusal(folder / manifest["base"])
            if refused:
                refusals[row] = refused
                continue
        if row in wanted:
            given = getattr(options, row)
            models[row] = (
                given if given is not None else expert_merging(config, work, row, options.fit_overrides)
            )
    models.update(extra_rows)
    if "sequence MoE" in wanted:
        seq_path = sequence_moe(folder, tasks, work)

    def load(name: str) -> Any:
        return AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()

    base = load("base")
    scoring = time.perf_counter()
    names = [m for m in models if m != "base"]
    losses = heldout_loss_table(base, load, names, encoded, shared_layers, score_from=starts)
    timings["scoring"] = time.perf_counter() - scoring
    routed: dict[str, list[int]] = {}
    if "sequence MoE" in wanted:
        seq_model = AutoModelForCausalLM.from_pretrained(seq_path, dtype=torch.float32).eval()
        seq_losses, routed = sequence_moe_losses(seq_model, encoded, starts)
        del seq_model
        for task in tasks:
            losses[task]["sequence MoE"] = seq_losses[task]
        models["sequence MoE"] = seq_path

    def gains(name: str) -> dict[str, float]:
        return {
            t: (losses[t]["base"] - losses[t][name]) / (losses[t]["base"] - losses[t][f"expert {t}"])
            for t in tasks
        }

    # the oracle rows: the lambda with the best mean gain on these very held-out texts
    swept = {key for keys in sweeps.values() for key in keys}
    rows_order = [m for m in models if m not in swept]  # an --add-row label may say "lambda" too
    oracle_rows: dict[str, str] = {}
    for method, keys in sweeps.items():
        candidates = [method, *keys]
        best = max(candidates, key=lambda m: sum(gains(m).values()))
        value = 1.0 if best == method else float(best.split("lambda ")[1].rstrip(")"))
        label = f"{method} (oracle lambda {value:g})"
        for task in tasks:
            losses[task][label] = losses[task][best]
        oracle_rows[label] = best
        timings[label] = sum(timings.get(m, 0.0) for m in candidates)
        rows_order.insert(rows_order.index(method) + 1, label)

    answer_tasks = (
        [t for t in tasks if manifest["tasks"][t].get("answers")][:1] if options.em_problems else []
    )
    accuracy: dict[str, dict[str, float]] = {name: {} for name in rows_order}
    for task in answer_tasks:
        problems = heldout[task][: options.em_problems]
        for name in rows_order:
            model_name = oracle_rows.get(name, name)
            model = (
                base
                if name == "base"
                else AutoModelForCausalLM.from_pretrained(models[model_name], dtype=torch.float32).eval()
            )
            accuracy[name][task] = exact_match(model, tokenizer, problems, options)

    results = {}
    for name in rows_order:
        row: dict[str, Any] = {"seconds": timings.get(name)}
        for task, gain in gains(name).items():
            row[task] = {"loss": losses[task][name], "perplexity": math.exp(losses[task][name]), "gain": gain}
            if task in accuracy[name]:
                row[task]["exact_match"] = accuracy[name][task]
        row["mean_gain"] = sum(row[t]["gain"] for t in tasks) / len(tasks)
        results[name] = row

    table = Table(
        title=f"'{options.zoo}' zoo, held-out suffixes (after a {options.prefix:.0%} prefix): gain retained = "
        "(loss_base - loss) / (loss_base - loss_expert)"
    )
    table.add_column("model")
    for task in tasks:
        table.add_column(f"{task} ppl", justify="right")
        table.add_column(f"{task} gain", justify="right")
        if task in answer_tasks:
            table.add_column(f"{task} EM", justify="right")
    table.add_column("mean gain", justify="right", style="bold")
    table.add_column("seconds", justify="right")
    for index, (name, row) in enumerate(results.items()):
        cells = []
        for task in tasks:
            cells += [f"{row[task]['perplexity']:.3f}", f"{row[task]['gain']:+.3f}"]
            if task in answer_tasks:
                cells.append(f"{row[task]['exact_match']:.0%}")
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        table.add_row(name, *cells, f"{row['mean_gain']:+.3f}", seconds, end_section=index in (0, len(tasks)))
    console.print(table)
    console.print(
        f"held-out: {', '.join(f'{t} {len(heldout[t])}' for t in tasks)} texts of <= {max_length} tokens, scored "
        f"after the first {options.prefix:.0%} of each; task arithmetic weight {options.ta_weight}; TIES / "
        f"DARE-TIES weight 1, density {options.density}; oracle lambdas tried: 1, "
        f"{', '.join(f'{v:g}' for v in options.lambdas)}; RegMean alpha {options.regmean_alpha}; "
        f"Expert Merging: {config}" + (f" {' '.join(options.fit_overrides)}" if options.fit_overrides else "")
    )
    for row, reason in refusals.items():
        console.print(f"{row}: not made: {reason}")
    if routed:
        console.print(
            "sequence MoE routing (prefix): "
            + "; ".join(
                f"{t}: " + ", ".join(f"{tasks[k]} {v.count(k)}" for k in range(len(tasks)))
                for t, v in routed.items()
            )
        )
    console.print(f"scoring {timings['scoring']:.0f} s; total: {time.perf_counter() - started:.0f} s")
    if options.json:
        options.json.write_text(
            json.dumps(
                {
                    "zoo": options.zoo,
                    "results": results,
                    "timings": timings,
                    "routing": routed,
                    "refused": refusals,
                },
                indent=1,
            )
            + "\n"
        )
    if work_context:
        work_context.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
