"""`python -m expertmerge evaluate`: score model folders against the experts on a fit config's held-out samples."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.console import Console

from expertmerge.cli.fit import _fit_inputs, configured
from expertmerge.io.folder import check_output_file, write_json_output

JSON_LABEL = "evaluate --json"


def evaluate_main(argv: Sequence[str]) -> int:
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
    parser.add_argument("--force", action="store_true", help="replace the --json file of an earlier evaluate")
    options, overrides = parser.parse_known_args(argv)
    # The models to score and the JSON target are checked before the config's data and experts are touched.
    given = {}
    for item in options.model:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        folder = model_dir(path, f"evaluate --model {item}")
        # Its weights' headers (a .bin: its tensors, weights only) now, not in from_pretrained after the teachers.
        Checkpoint(folder, f"evaluate --model {item}")
        given[name or path] = str(folder)
    inputs = [options.config, *given.values()]
    if options.json:
        check_output_file(options.json, options.force, inputs, JSON_LABEL, existing=False)
    module, datamodule = configured(options.config, overrides)
    hp = module.hparams
    named = {"base": resolve_path(hp.base), **given}
    pool = ExpertPool(hp.base, hp.experts, trust_remote_code=hp.trust_remote_code)
    inputs += [*_fit_inputs(hp, datamodule)[0], pool.base_dir, *pool.expert_dirs.values()]
    if options.json:  # now the config's base, experts and calibration files are known too
        check_output_file(options.json, options.force, inputs, JSON_LABEL)
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
        write_json_output(options.json, scores_to_json(rows), "evaluate", options.force, inputs, JSON_LABEL)
    return 0
