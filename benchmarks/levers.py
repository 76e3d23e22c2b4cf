"""Which settings make the learned merge good: one `fit` per lever setting, scored on calibration data only.

    python benchmarks/levers.py --zoo tiny                         # every tiny-zoo setting (~1-2 min each)
    python benchmarks/levers.py --zoo smollm2 --settings default mu=0.1 hidden=normalized_mse
    python benchmarks/levers.py --zoo smollm2 --table              # print the table of what has run
    python benchmarks/levers.py --zoo smollm2 --heldout default quality   # held-out gain, final choice only

Each setting is `fit` (a subprocess, this checkout's code) with a few `--model.*` / `--data.*` / `--trainer.*`
overrides on the zoo's config (tiny: configs/fit_tiny.yaml, smollm2: configs/demo.yaml, any other zoo: a
config written from its zoo.json in demo.yaml's shape). Selection uses the fit's own evaluation on its
held-out *calibration* samples (`eval_samples_per_task`, the same texts for every setting: the datamodule
takes the eval part first), never the zoo's held-out split:

- KL per task: the fit's KL to the task's expert on those samples (top-k with a tail bucket when the fit
  caches top-k logits, so it is the objective itself; compare settings with the same `logit_topk` by it);
- calib gain per task: `(ln ppl_base - ln ppl_merge) / (ln ppl_base - ln ppl_expert)` on the same samples,
  the benchmark's "gain retained" on calibration text, comparable across every setting. The mean of these
  is the selection score.

Results are appended to `<cache>/levers/<zoo>-v<builder version>.jsonl` (one line per run, one file per
zoo build), so a grid can be run in pieces;
`--heldout NAME...` scores those settings' exports (fitting them first when no export is left) on the zoo's held-out split
(gain from the zoo manifest's base / expert losses), for the settings finally chosen only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertmerge.paths import cache_dir  # noqa: E402
from expertmerge_zoos.splits import calib_task  # noqa: E402

CONFIGS = {"tiny": REPO / "configs" / "fit_tiny.yaml", "smollm2": REPO / "configs" / "demo.yaml"}

# name -> overrides (flat `section.key: value`) on top of the zoo's config. Only one lever moves per row,
# except the combined rows at the end, which put the winners together.
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},  # the shipped defaults (mu 0, ce_weight 1 since session 7)
    "old default": {"model.mu": 1.0, "model.ce_weight": 0.0},  # before session 7 (rows named "default" then)
    # 1. loss balance
    "mu=0": {"model.mu": 0.0},
    "mu=0.01": {"model.mu": 0.01},
    "mu=0.1": {"model.mu": 0.1},
    "hidden=normalized_mse": {"model.hidden_loss": "normalized_mse"},
    "hidden=normalized_mse,mu=0.3": {"model.hidden_loss": "normalized_mse", "model.mu": 0.3},
    "hidden=normalized_mse,mu=0.1": {"model.hidden_loss": "normalized_mse", "model.mu": 0.1},
    "hidden=normalized_mse,mu=3": {"model.hidden_loss": "normalized_mse", "model.mu": 3.0},
    "hidden=cosine": {"model.hidden_loss": "cosine"},
    # 1b. balance between tasks, and the calibration texts' own next tokens
    "balance=start_kl": {"model.task_balance": "start_kl"},
    "balance=start_kl,mu=0": {"model.task_balance": "start_kl", "model.mu": 0.0},
    "ce=0.5": {"model.ce_weight": 0.5},
    "ce=1": {"model.ce_weight": 1.0},
    "ce=1,mu=0": {"model.ce_weight": 1.0, "model.mu": 0.0},
    "balance=start_kl,ce=1": {"model.task_balance": "start_kl", "model.ce_weight": 1.0},
    "balance=start_kl,ce=3": {"model.task_balance": "start_kl", "model.ce_weight": 3.0},
    "balance=start_kl,ce=1,mu=0": {"model.task_balance": "start_kl", "model.ce_weight": 1.0, "model.mu": 0.0},
    "balance=start_kl,steps x3": {"model.task_balance": "start_kl", "trainer.max_steps": "x3"},
    "balance=start_kl,ce=1,steps x3": {
        "model.task_balance": "start_kl",
        "model.ce_weight": 1.0,
        "trainer.max_steps": "x3",
    },
    # 1c. the fit's objective as the gain retained per task (session 8)
    "balance=expert_gain": {"model.task_balance": "expert_gain"},
    "balance=expert_gain,ce=3": {"model.task_balance": "expert_gain", "model.ce_weight": 3.0},
    "balance=expert_gain,ce=0": {"model.task_balance": "expert_gain", "model.ce_weight": 0.0},
    "balance=expert_gain,steps x3": {"model.task_balance": "expert_gain", "trainer.max_steps": "x3"},
    "search": {"model.alpha0_search": "[0.1,0.2,0.3,0.5,0.7,0.9]"},
    "search,balance=expert_gain": {
        "model.alpha0_search": "[0.1,0.2,0.3,0.5,0.7,0.9]",
        "model.task_balance": "expert_gain",
    },
    "search,balance=expert_gain,ce=3": {
        "model.alpha0_search": "[0.1,0.2,0.3,0.5,0.7,0.9]",
        "model.task_balance": "expert_gain",
        "model.ce_weight": 3.0,
    },
    # 1d. the start among training-free merges (session 9); the shipped configs search both
    "search task arithmetic only": {"model.start_merges": "[task_arithmetic]"},
    "search task arithmetic and regmean": {"model.start_merges": "[task_arithmetic,regmean]"},
    "ce=3": {"model.ce_weight": 3.0},
    "ce=10": {"model.ce_weight": 10.0},
    "kl where expert better": {"model.kl_where": "expert_better"},  # KL only where the expert predicts better
    "steps x3": {"trainer.max_steps": "x3"},
    # 2. objective
    "topk=256": {"model.logit_topk": 256},
    "full-vocab KL": {"model.logit_topk": None},
    # 3. steps, samples, learning rate, regulariser
    "steps x2": {"trainer.max_steps": "x2"},
    "steps x4": {"trainer.max_steps": "x4"},
    "samples x2": {"data.samples_per_task": "x2"},
    "samples /2": {"data.samples_per_task": "/2"},
    "group balance": {"data.group_balance": "true"},  # training texts in rounds over their sources
    "lr /2": {"model.lr": "/2"},
    "lr x2": {"model.lr": "x2"},
    "gamma=0": {"model.gamma": 0.0},
    "gamma=0.15 (official scale, N=3)": {"model.gamma": 0.15},
    # 4. start point
    "alpha0=0.2": {"model.alpha0": 0.2},
    "alpha0=0.5": {"model.alpha0": 0.5},
    "alpha0=0.7": {"model.alpha0": 0.7},
    # 5. which tensors
    "fixed tensors at base": {"model.fixed_tensors": "base"},
    "learn norms": {"model.learn_matrices_only": "false"},  # the blocks' norms get coefficients too
    "learn every tensor": {  # the norms, the embeddings (tied lm_head) and the final norm too
        "model.learn_matrices_only": "false",
        "model.learn_include": "['.']",
    },
    # the recipe of configs/quality.yaml (session 10), as overrides of the demo: Expert Merging++
    "quality": {"model.chunking": "true"},
}


def zoo_folder(zoo: str) -> Path:
    return cache_dir() / "zoo" / zoo


def zoo_config(zoo: str, work: Path) -> Path:
    """The zoo's fit config: the shipped one, or (a new zoo) demo.yaml's settings over its zoo.json."""
    if zoo in CONFIGS:
        return CONFIGS[zoo]
    manifest = json.loads((zoo_folder(zoo) / "zoo.json").read_text())
    config = yaml.safe_load(CONFIGS["smollm2"].read_text())
    tasks = manifest["tasks"]
    config["model"]["base"] = f"zoo://{zoo}/{manifest.get('base', 'base')}"
    config["model"]["experts"] = {t: f"zoo://{zoo}/{spec['expert']}" for t, spec in tasks.items()}
    config["model"].pop("learn_include", None)  # full fine-tunes: every block matrix learns
    config["model"].pop("hidden_layers", None)  # the middle layer
    config["data"]["tasks"] = [
        calib_task(t, f"zoo://{zoo}/{spec['calib']}", str(zoo_folder(zoo) / spec["calib"]))
        for t, spec in tasks.items()
    ]
    path = work / f"{zoo}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def resolve(overrides: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Relative overrides ("x2", "/2") against the config's value."""
    resolved = {}
    for key, value in overrides.items():
        if isinstance(value, str) and value[:1] in "x/" and value[1:].replace(".", "").isdigit():
            section, name = key.split(".")
            current = config[section][name]
            factor = float(value[1:])
            new = current * factor if value[0] == "x" else current / factor
            value = int(round(new)) if isinstance(current, int) else new
        resolved[key] = value
    return resolved


def arguments(overrides: dict[str, Any]) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", "null" if value is None else str(value)]
    return args


def log_ppl(entry: dict[str, float]) -> float:
    return math.log(entry["perplexity"])


def run_setting(
    name: str, config: Path, common: dict[str, Any], work: Path, keep: bool = False
) -> dict[str, Any]:
    """Fit one setting; its calibration scores (from the fit's eval.json) and wall time."""
    base_config = yaml.safe_load(config.read_text())
    overrides = resolve({**common, **SETTINGS[name]}, base_config)
    out = work / ("fit-" + "".join(c if c.isalnum() else "-" for c in name))
    command = [
        sys.executable, "-m", "expertmerge", "fit", "--config", str(config),
        "--export.output_dir", str(out), "--export.force", "true",
        "--trainer.default_root_dir", str(work / "logs"), "--trainer.enable_checkpointing", "false",
        "--trainer.limit_val_batches", "0",
        *arguments(overrides),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    log = work / f"{out.name}.log"
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"setting {name!r} failed ({result.returncode}); see {log}:\n{log.read_text()[-3000:]}"
        )
    return score_fit(name, overrides, out, wall)


def score_fit(name: str, overrides: dict[str, Any], out: Path, wall: float) -> dict[str, Any]:
    """A row from an exported fit's eval.json: KL and calib gain per task of the learned merge and of TA."""
    scores = json.loads((out / "eval.json").read_text())
    tasks = list(scores["experts"])
    row = {"setting": name, "overrides": overrides, "wall_s": round(wall, 1), "export": str(out)}
    from expertmerge.fit.outputs import start_row_name

    for label, key in (("expert merging", "em"), (start_row_name(scores), "ta")):
        row[f"{key}_kl"] = {t: scores[label][t]["kl"] for t in tasks}
        row[f"{key}_gain"] = {
            t: (log_ppl(scores["base"][t]) - log_ppl(scores[label][t]))
            / (log_ppl(scores["base"][t]) - log_ppl(scores["experts"][t]))
            for t in tasks
        }
    return row


def results_file(zoo: str) -> Path:
    """One file per zoo build recipe (`-v<builder version>`): rows of a re-drawn zoo never mix with old ones."""
    from expertmerge.zoo_registry import zoo_builder

    path = cache_dir() / "levers" / f"{zoo}-v{zoo_builder(zoo).version}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def read_results(zoo: str) -> list[dict[str, Any]]:
    path = results_file(zoo)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def table(zoo: str, rows: list[dict[str, Any]]) -> Table:
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:  # a re-run replaces the earlier row of the same setting
        latest[row["setting"]] = row
    tasks = list(next(iter(latest.values()))["em_kl"]) if latest else []
    out = Table(title=f"Levers on zoo {zoo}: calibration eval samples (KL to expert / calib gain)")
    out.add_column("setting")
    for task in tasks:
        out.add_column(f"{task} KL", justify="right")
    out.add_column("mean KL", justify="right")
    for task in tasks:
        out.add_column(f"{task} gain", justify="right")
    out.add_column("mean gain", justify="right")
    out.add_column("TA gain", justify="right")
    out.add_column("wall s", justify="right")
    for name, row in latest.items():
        out.add_row(
            name,
            *[f"{row['em_kl'][t]:.4f}" for t in tasks],
            f"{mean(row['em_kl']):.4f}",
            *[f"{row['em_gain'][t]:.3f}" for t in tasks],
            f"{mean(row['em_gain']):.3f}",
            f"{mean(row['ta_gain']):.3f}",
            f"{row['wall_s']:.0f}",
        )
    return out


def merged_from_coefficients(zoo: str, row: dict[str, Any], work: Path) -> Path:
    """An in-process row's merge as a model folder: its learned coefficients on its tensors, task arithmetic
    at its alpha0 on every other tensor (what `fit` exports)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = zoo_folder(zoo)
    manifest = json.loads((folder / "zoo.json").read_text())
    names = list(manifest["tasks"])
    base = AutoModelForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    alpha0 = row["overrides"].get("model.alpha0", 0.3)
    for task in names:
        expert = AutoModelForCausalLM.from_pretrained(
            str(folder / manifest["tasks"][task]["expert"]), dtype=torch.float32
        )
        for name, value in expert.state_dict().items():
            learned = row["coefficients"].get(name, {}).get(task)
            weight = learned[0] if learned else alpha0
            state[name] += weight * (value - base.state_dict()[name])
        del expert
    base.load_state_dict(state)
    out = work / ("merged-" + "".join(c if c.isalnum() else "-" for c in row["setting"]))
    base.save_pretrained(out)
    return out


def heldout_gains(zoo: str, exports: dict[str, Path], max_length: int) -> dict[str, dict[str, float]]:
    """Gain retained on the zoo's held-out split for each exported merge (base / expert losses from zoo.json)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertmerge_zoos.corpora import read_jsonl
    from expertmerge_zoos.evaluation import heldout_loss_table
    from expertmerge_zoos.smollm2 import encode

    folder = zoo_folder(zoo)
    manifest = json.loads((folder / "zoo.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder / manifest.get("tokenizer", "base")))
    encoded = {
        t: encode(tokenizer, [r["text"] for r in read_jsonl(folder / spec["heldout"])], max_length)
        for t, spec in manifest["tasks"].items()
    }
    base = AutoModelForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32).eval()
    with torch.no_grad():
        losses = heldout_loss_table(
            base,
            lambda n: AutoModelForCausalLM.from_pretrained(str(exports[n]), dtype=torch.float32).eval(),
            list(exports),
            encoded,
            shared_layers=0,
        )
    reference = manifest["heldout_loss"]
    return {
        name: {
            t: (reference[t]["base"] - losses[t][name]) / (reference[t]["base"] - reference[t][t])
            for t in manifest["tasks"]
        }
        for name in exports
    }


# what the in-process runner can change between fits without new data or new teacher targets
IN_PROCESS_KEYS = {
    "model.task_balance",
    "model.ce_weight",
    "model.mu",
    "model.hidden_loss",
    "model.gamma",
    "model.lr",
    "model.alpha0",
    "trainer.max_steps",
}


def gains(scores: dict[str, Any], base: dict[str, Any], experts: dict[str, Any]) -> dict[str, float]:
    return {
        t: (math.log(base[t].perplexity) - math.log(scores[t].perplexity))
        / (math.log(base[t].perplexity) - math.log(experts[t].perplexity))
        for t in scores
    }


def run_in_process(
    config: Path, names: list[str], common: dict[str, Any], zoo: str, console: Console
) -> None:
    """Many settings over one prepared merge: the base, task vectors and teacher targets are read once
    (on SmolLM2 under load that set-up costs more than a 10-step fit), then each setting is a fresh Lightning
    fit of fresh coefficients with the fit's own training_step and optimiser, scored like `fit` scores."""
    import pytorch_lightning as pl

    from expertmerge.cli.fit import quiet_lightning, read_fit_config
    from expertmerge.fit.outputs import evaluate_fit, start_row
    from expertmerge.teachers import mean_next_token_nll

    settings = yaml.safe_load(config.read_text())
    for key, value in common.items():
        section, name = key.split(".")
        settings[section][name] = value
    fit = read_fit_config(str(config), arguments(common))  # the Lightning module and data as `fit` has them
    module, datamodule = fit.model, fit.datamodule
    run = module.run
    run.datamodule = datamodule
    started = time.perf_counter()
    learned = run.prepare()
    calibration = learned.calibration
    if not calibration.base_nll:
        # expert_gain settings need the pure base's NLL (the prepared model holds folded tensors)
        base = learned.pool.load_model()
        calibration.base_nll = {
            t: mean_next_token_nll(
                base, datamodule.task_samples(t, "train"), learned.options.loss.teacher_batch_size
            )
            for t in learned.task_names
        }
        del base
    reference = evaluate_fit(learned)  # base and experts once; their scores do not depend on the setting
    console.print(f"prepared in {time.perf_counter() - started:.0f} s")
    prepared = learned.options
    for name in names:
        overrides = resolve(SETTINGS[name], settings)
        if set(overrides) - IN_PROCESS_KEYS:
            console.print(
                f"skipped {name!r}: {sorted(set(overrides) - IN_PROCESS_KEYS)} need a fit of their own"
            )
            continue
        started = time.perf_counter()
        options = prepared.replace(
            **{k.split(".")[1]: v for k, v in overrides.items() if k.startswith("model.")}
        )
        run.restart(options)
        if "model.alpha0" in overrides:
            # restart keeps the prepared start; this setting's coefficients start at its own alpha0 (the
            # tensors without coefficients stay merged at the config's)
            learned.merged.start_coefficients(options.start.alpha0)
        learned.objective.task_scales = None  # task_balance: measured again at this setting's start point
        pl.seed_everything(0, verbose=False)
        with quiet_lightning():  # the fit command's own filter: no Lightning tips or device inventory
            trainer = pl.Trainer(
                max_steps=int(overrides.get("trainer.max_steps", settings["trainer"]["max_steps"])),
                accumulate_grad_batches=int(settings["trainer"].get("accumulate_grad_batches", 1)),
                limit_val_batches=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                use_distributed_sampler=False,
            )
            trainer.fit(module, datamodule=datamodule)
        scores = evaluate_fit(learned, include_base=False)
        base, experts = reference["base"], reference["experts"]
        row = {
            "setting": name,
            "overrides": overrides,
            "wall_s": round(time.perf_counter() - started, 1),
            "export": "",
            "zoo": zoo,
            "in_process": True,
            "em_kl": {t: scores["expert merging"][t].kl for t in learned.task_names},
            "ta_kl": {t: start_row(scores)[t].kl for t in learned.task_names},
            "em_gain": gains(scores["expert merging"], base, experts),
            "ta_gain": gains(start_row(scores), base, experts),
            "coefficients": learned.merged.coefficients.to_dict(learned.expert_names),
        }
        with open(results_file(zoo), "a") as handle:
            handle.write(json.dumps(row) + "\n")
        console.print(
            f"{name}: mean KL {mean(row['em_kl']):.4f}, calib gain {mean(row['em_gain']):.3f} "
            f"(TA {mean(row['ta_gain']):.3f}), {row['wall_s']:.0f} s"
        )


def log1mexp(x: Any) -> Any:
    """log(1 - exp(x)) for x <= 0, stable at both ends (as the top-k KL's tail bucket computes it)."""
    import torch

    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def explain_objective(config: Path, export: Path) -> Table:
    """Why top-k KL and perplexity can disagree: per task, on the held-out calibration samples, where the
    teacher's mass lies and how task arithmetic (alpha0) and the learned merge (`export`'s coefficients) do on
    the next tokens inside and outside the teacher's top k. Uses cached targets; no expert is loaded."""
    import torch

    from expertmerge.cli.fit import read_fit_config
    from expertmerge.fit.outputs import START_ROWS
    from expertmerge.losses import kl_to_teacher, masked_mean

    fit = read_fit_config(str(config))
    datamodule = fit.datamodule
    fit.model.run.datamodule = datamodule
    learned = fit.model.run.prepare()
    merged = learned.merged
    saved = json.loads((export / "coefficients.json").read_text())["coefficients"]
    values = {
        name: torch.tensor([per_expert[e][0] for e in merged.expert_names])
        for name, per_expert in saved.items()
    }
    models = {
        START_ROWS[merged.start_merge]: merged.alpha0_coefficients,
        "expert merging": merged.layerwise_coefficients(values),
    }
    out = Table(title=f"Objective vs perplexity, held-out calibration samples ({config.name})")
    for column in (
        "task",
        "model",
        "top-k KL",
        "tail mass T/S",
        "NLL in top-k",
        "NLL outside",
        "share outside",
        "hidden MS",
    ):
        out.add_column(column, justify="left" if column in ("task", "model") else "right")
    with torch.no_grad():
        for task in learned.task_names:
            samples = datamodule.task_samples(task, "eval")
            ids, mask = samples.input_ids, samples.attention_mask
            targets = learned.calibration.targets[(task, "eval")].rows(torch.arange(len(ids)), ids.shape[1])
            nxt = ids[:, 1:]
            real = (mask[:, 1:] * mask[:, :-1]).bool()
            inside = (targets["topk_indices"][:, :-1] == nxt.unsqueeze(-1)).any(-1) & real
            outside = real & ~inside
            teacher_lp = targets["topk_values"].float() - targets["logsumexp"].unsqueeze(-1)
            teacher_tail = 1 - teacher_lp.exp().sum(-1)
            hidden = [k for k in targets if k.startswith("hidden.")][0]
            ms = float(masked_mean(targets[hidden].pow(2), mask))
            expert_nll = targets["nll"][:, :-1]
            out.add_row(
                task, "expert", "0", f"{float(teacher_tail[mask.bool()].mean()):.3f}",
                f"{float(expert_nll[inside].mean()):.3f}", f"{float(expert_nll[outside].mean()):.3f}",
                f"{float(outside.sum() / real.sum()):.3f}", f"{ms:.1f}",
            )  # fmt: skip
            for label, coefficients in models.items():
                logits = merged(
                    ids, mask, coefficients=coefficients, output_hidden_states=False
                ).logits.float()
                kl = masked_mean(kl_to_teacher(logits, targets), mask)
                log_probs = torch.log_softmax(logits, -1)
                student_tail = log1mexp(
                    torch.logsumexp(log_probs.gather(-1, targets["topk_indices"].long()), -1)
                ).exp()
                nll = -log_probs[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
                out.add_row(
                    "", label, f"{float(kl):.4f}", f"{float(student_tail[mask.bool()].mean()):.3f}",
                    f"{float(nll[inside].mean()):.3f}", f"{float(nll[outside].mean()):.3f}", "", "",
                )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", default="tiny", help="tiny, smollm2, or any built zoo's name")
    parser.add_argument("--settings", nargs="*", help=f"which settings (default: all): {list(SETTINGS)}")
    parser.add_argument("--eval-samples", type=int, help="held-out calibration samples per task (all rows)")
    parser.add_argument("--table", action="store_true", help="only print the table of the recorded runs")
    parser.add_argument(
        "--heldout", nargs="*", help="settings to re-fit and score on the zoo's held-out split"
    )
    parser.add_argument(
        "--record", nargs=3, metavar=("SETTING", "FOLDER", "WALL_S"), help="record a fit that ran elsewhere"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="prepare once, fit each setting in this process (model keys only)",
    )
    parser.add_argument("--explain", type=Path, metavar="EXPORT", help="objective vs perplexity for this fit")
    parser.add_argument("--work", type=Path, help="folder for fits (default: a temporary one)")
    options = parser.parse_args()
    console = Console(width=200)
    if options.record:
        name, folder, wall = options.record
        row = {**score_fit(name, SETTINGS.get(name, {}), Path(folder), float(wall)), "zoo": options.zoo}
        with open(results_file(options.zoo), "a") as handle:
            handle.write(json.dumps(row) + "\n")
        options.table = True
    if options.table:
        console.print(table(options.zoo, read_results(options.zoo)))
        return
    work = options.work or Path(tempfile.mkdtemp(prefix=f"levers-{options.zoo}-"))
    work.mkdir(parents=True, exist_ok=True)
    config = zoo_config(options.zoo, work)
    common = {"data.eval_samples_per_task": options.eval_samples} if options.eval_samples else {}
    if options.explain:
        console.print(explain_objective(config, options.explain))
        return
    if options.heldout:
        # a setting already fitted (its export still on disk) is scored as it is, not fitted again
        recorded = {r["setting"]: r for r in read_results(options.zoo)}
        rows = {}
        for name in options.heldout:
            row = recorded.get(name)
            if row and row.get("export") and Path(row["export"]).is_dir():
                rows[name] = row
            elif row and row.get("coefficients"):
                rows[name] = {**row, "export": str(merged_from_coefficients(options.zoo, row, work))}
            else:
                rows[name] = run_setting(name, config, common, work)
        max_length = int(yaml.safe_load(config.read_text())["data"]["max_length"])
        gains = heldout_gains(options.zoo, {n: Path(r["export"]) for n, r in rows.items()}, max_length)
        result = Table(title=f"Zoo {options.zoo}: held-out gain retained (final settings only)")
        tasks = list(next(iter(gains.values())))
        for column in ["setting", *tasks, "mean", "calib gain (mean)"]:
            result.add_column(column, justify="left" if column == "setting" else "right")
        for name, per_task in gains.items():
            result.add_row(
                name,
                *[f"{per_task[t]:.3f}" for t in tasks],
                f"{mean(per_task):.3f}",
                f"{mean(rows[name]['em_gain']):.3f}",
            )
        console.print(result)
        with open(results_file(options.zoo).with_suffix(".heldout.jsonl"), "a") as handle:
            for name, per_task in gains.items():
                handle.write(
                    json.dumps(
                        {"setting": name, "overrides": rows[name]["overrides"], "heldout_gain": per_task}
                    )
                    + "\n"
                )
        return
    for name in options.settings or list(SETTINGS):
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; choose from {list(SETTINGS)}")
    if options.in_process:
        run_in_process(config, options.settings or list(SETTINGS), common, options.zoo, console)
        console.print(table(options.zoo, read_results(options.zoo)))
        return
    for name in options.settings or list(SETTINGS):
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; choose from {list(SETTINGS)}")
        row = run_setting(name, config, common, work)
        row["zoo"] = options.zoo
        with open(results_file(options.zoo), "a") as handle:
            handle.write(json.dumps(row) + "\n")
        console.print(
            f"{name}: mean KL {mean(row['em_kl']):.4f}, calib gain {mean(row['em_gain']):.3f} "
            f"(TA {mean(row['ta_gain']):.3f}), {row['wall_s']:.0f} s"
        )
    console.print(table(options.zoo, read_results(options.zoo)))


if __name__ == "__main__":
    main()
