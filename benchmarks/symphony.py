"""Symphony-MoE variants on the diffinit zoo (no shared base): held-out KL of each task to its own expert.

    python benchmarks/symphony.py [--config configs/symphony_diffinit.yaml] [--steps 30] [--json out.json]

Rows: dense average / SLERP and the MoE, each without alignment, with the FFN permutation only (the paper's
alignment), the residual rotation only, both (ours), and both + attention heads; the MoE's backbone by SLERP
(the paper's), learned with oracle routing (ours; `--learned-steps`), by linear average, or the reference's
own (t = 0); the router as initialised (`hidden`) and after tuning. "reference" is the reference expert
alone, for scale. Lower is better; the experts themselves score 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "symphony_diffinit.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="router tuning steps of the tuned rows")
    parser.add_argument(
        "--learned-steps", type=int, default=60, help="optimiser steps of the learned backbone"
    )
    parser.add_argument("--json", help="also write the numbers here")
    options = parser.parse_args()

    import transformers
    from rich.table import Table

    from expertmerge.console import make_console
    from expertmerge.symphony import dense_model
    from expertmerge.symphony_run import BackboneOptions, load_symphony_config, prepare
    from expertmerge.zoo_registry import register_zoo
    from expertmerge_zoos.diffinit import ZOO

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    register_zoo("diffinit", ZOO)
    console = make_console()
    started = time.perf_counter()
    config = load_symphony_config(options.config)
    from lightning_modules.trainer import plain_trainers

    run = prepare(config, progress=False, trainer_factory=plain_trainers())
    rows: dict[str, dict[str, float]] = {}

    def record(name: str, scores: dict[str, float]) -> None:
        rows[name] = scores
        console.print(f"{name}: " + ", ".join(f"{t} {v:.4f}" for t, v in scores.items()))

    reference = dense_model(
        run.pool, {n: run.pool.expert_tensor(run.pool.reference, n) for n in run.pool.tensor_names}
    )
    record(f"reference expert ({run.pool.reference}) alone", run.heldout_kl(reference))
    settings = {
        "no alignment": None,
        "FFN permutation only": (False, True),
        "residual rotation only": (True, False),
        "residual rotation + FFN permutation": (True, True),
        "residual + FFN + attention heads": (True, True, True),
    }
    learned = config.backbone.learned.model_copy(update={"steps": options.learned_steps})
    fit_default_tensors = learned.model_copy(update={"learn_include": [r"\.\d+\."]})
    reports, fits = {}, {}
    for label, flags in settings.items():
        if flags is None:
            run.pool.alignments = {}
        else:
            run.align(*flags)
            reports[label] = run.reports
        record(f"dense average, {label}", run.score_dense("average"))
        record(f"dense SLERP, {label}", run.score_dense("slerp"))
        moe = run.score_moe(tuning_steps=options.steps)
        record(f"MoE SLERP backbone, {label}, router init", moe["init"])
        record(f"MoE SLERP backbone, {label}, router tuned", moe["tuned"])
        moe = run.score_moe(BackboneOptions(method="learned", learned=learned), tuning_steps=options.steps)
        fits[label] = run.backbone_report
        record(f"MoE learned backbone, {label}, router init", moe["init"])
        record(f"MoE learned backbone, {label}, router tuned", moe["tuned"])
        if flags == (True, True):
            fit_default = BackboneOptions(method="learned", learned=fit_default_tensors)
            moe = run.score_moe(fit_default, tuning_steps=options.steps)
            fits[f"{label}, block matrices only"] = run.backbone_report
            record(f"MoE learned backbone (block matrices only), {label}, router init", moe["init"])
            record(f"MoE learned backbone (block matrices only), {label}, router tuned", moe["tuned"])
            average = BackboneOptions(method="average")
            record(f"MoE average backbone, {label}, router init", run.score_moe(average)["init"])
            own = BackboneOptions(method="slerp", t=0.0)
            record(f"MoE reference backbone (t=0), {label}, router init", run.score_moe(own)["init"])

    table = Table(title="Symphony-MoE on the diffinit zoo: held-out KL to each task's own expert")
    tasks = run.task_names
    table.add_column("variant")
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for name, scores in rows.items():
        mean = sum(scores.values()) / len(scores)
        table.add_row(name, *(f"{scores[t]:.4f}" for t in tasks), f"{mean:.4f}")
    console.print(table)
    for label, per_expert in reports.items():
        for expert, report in per_expert.items():
            console.print(f"{label} / {expert}: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    for label, fit in fits.items():
        console.print(f"learned backbone, {label}: " + json.dumps(fit))
    console.print(f"wall time {time.perf_counter() - started:.0f} s")
    if options.json:
        numbers = {"rows": rows, "alignment": reports, "learned_backbone": fits}
        Path(options.json).write_text(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
