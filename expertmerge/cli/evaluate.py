"""`python -m expertmerge evaluate`: score model folders against the experts on a fit config's held-out samples."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from expertmerge.cli.fit import configured
from expertmerge.errors import ExpertMergeError


def check_json_target(path: str) -> None:
    """`--json` must name a file in an existing, writable folder (else the scores would be lost at the end)."""
    target = Path(path).expanduser()
    folder = target.parent
    if target.is_dir():
        raise ExpertMergeError(
            f"evaluate --json '{path}' is a folder; give a file name, e.g. '{target / 'scores.json'}'."
        )
    if not folder.is_dir():
        raise ExpertMergeError(
            f"evaluate --json '{path}': folder '{folder}' does not exist; create it first."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExpertMergeError(f"evaluate --json '{path}': folder '{folder}' is not writable.")


def evaluate_main(argv: Sequence[str]) -> int:
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from calib_data.tasks import BASE_TEACHER
    from expertmerge.evaluate import expert_scores, score_task, scores_table, scores_to_json
    from expertmerge.io.reader import Checkpoint
    from expertmerge.paths import resolve_path
    from expertmerge.pool import ExpertPool, model_dir
    from expertmerge.teachers import TeacherSettings, teacher_dirs, teacher_targets

    parser = argparse.ArgumentParser(
        prog="python -m expertmerge evaluate",
        description="Score model folders on a fit config's held-out samples.",
    )
    parser.add_argument("--config", required=True, help="a fit config: its tasks, data and experts are used")
    parser.add_argument(
        "--model", action="append", default=[], help="model folder to score (repeatable); NAME=PATH names it"
    )
    parser.add_argument("--json", help="also write the scores to this JSON file")
    options, overrides = parser.parse_known_args(argv)
    # The models to score and the JSON target are checked before the config's data and experts are touched.
    given = {}
    for item in options.model:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        folder = model_dir(path, f"evaluate --model {item}")
        # Its weights' headers (a .bin: its tensors, weights only) now, not in from_pretrained after the teachers.
        Checkpoint(folder, f"evaluate --model {item}")
        given[name or path] = str(folder)
    if options.json:
        check_json_target(options.json)
    module, datamodule = configured(options.config, overrides)
    hp = module.hparams
    named = {"base": resolve_path(hp.base), **given}
    pool = ExpertPool(hp.base, hp.experts, trust_remote_code=hp.trust_remote_code)
    pool.validate()
    datamodule.check([*module.expert_names, BASE_TEACHER])  # `expert: base` tasks: the base is the teacher
    datamodule.setup("validate")
    settings = TeacherSettings(hidden_layers=(), logit_topk=hp.logit_topk, temperature=hp.temperature)
    targets, _ = teacher_targets(
        datamodule,
        teacher_dirs(pool.base_dir, pool.expert_dirs, datamodule.tasks),
        settings,
        ("eval",),
        pool.content_hashes(),
        hp.trust_remote_code,
    )
    rows = {}
    for name, path in named.items():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=hp.trust_remote_code
        ).eval()
        rows[name] = {
            task: score_task(
                lambda ids, mask, m=model: m(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                datamodule.task_samples(task, "eval").input_ids,
                datamodule.task_samples(task, "eval").attention_mask,
                targets[(task, "eval")],
                hp.temperature,
            )
            for task in datamodule.task_names
        }
        del model
    rows["experts"] = {
        task: expert_scores(datamodule.task_samples(task, "eval").attention_mask, targets[(task, "eval")])
        for task in datamodule.task_names
    }
    Console().print(scores_table("Held-out calibration samples, per task", rows, datamodule.task_names))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(scores_to_json(rows), handle, indent=1)
    return 0
