"""`python -m expertmerge evaluate`: score model folders against the experts on a fit config's held-out samples,
and by the accuracy of their greedy answers where a task names its records' reference answers (`answer_field`);
or, with `--lm_eval TASKS`, on lm-evaluation-harness tasks instead (the optional `eval` extra)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expertmerge.cli.fit import read_fit_config
from expertmerge.cli.fit_steps import fit_inputs
from expertmerge.console import make_console
from expertmerge.errors import ExpertMergeError
from expertmerge.io.folder import check_output_file, write_json_output

JSON_LABEL = "evaluate --json"


def finite_logits(logits: Any, label: str) -> Any:
    """Finite weights can still overflow (e.g. half precision): such logits score as nonsense, not as a row."""
    import torch

    if not bool(torch.isfinite(logits).all()):
        raise ExpertMergeError(
            f"{label}: the model gives NaN/Inf logits on the held-out samples, so it cannot be scored; check its "
            "weights and dtype."
        )
    return logits


def check_scorable(
    path: str, label: str, base_vocab: int | None, base_label: str, trust_remote_code: bool = False
) -> None:
    """A model is scored on the base's token ids, so it must have the base's vocabulary and finite weights;
    otherwise its row would be a table of meaningless numbers. Reads the config and then the weights one
    tensor at a time (NaN/Inf raise, naming the tensor), before any teacher pass."""
    from transformers import AutoConfig

    from expertmerge.io.model_config import vocab_size
    from expertmerge.io.reader import Checkpoint

    try:
        vocab = vocab_size(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    except Exception as error:  # transformers raises several types for an unreadable or unknown config
        raise ExpertMergeError(f"{label}: cannot load the config of '{path}': {error}") from error
    if base_vocab is not None and vocab is not None and vocab != base_vocab:
        raise ExpertMergeError(
            f"{label}: '{path}' has vocab_size={vocab} but the {base_label} has {base_vocab}; the held-out samples "
            "are the base's token ids, so a model with another vocabulary cannot be scored on them."
        )
    checkpoint = Checkpoint(Path(path), label)
    try:
        for name in checkpoint.names:
            checkpoint.tensor(name)
    finally:
        checkpoint.close()


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m expertmerge evaluate",
        description="Score model folders on a fit config's held-out samples.",
    )
    parser.add_argument(
        "--config",
        help="a fit config: its tasks, data and experts are used (with --lm_eval: only its base and experts)",
    )
    parser.add_argument(
        "--model", action="append", default=[], help="model folder to score (repeatable); NAME=PATH names it"
    )
    parser.add_argument("--json", help="also write the scores to this JSON file")
    parser.add_argument("--force", action="store_true", help="replace the --json file of an earlier evaluate")
    harness = parser.add_argument_group(
        "lm-evaluation-harness (pip install -e '.[eval]')",
        "score the models on lm-eval tasks instead of the held-out samples; offline, so tasks read local data",
    )
    harness.add_argument(
        "--lm_eval", metavar="TASKS", help="comma-separated lm-eval task, group or tag names"
    )
    harness.add_argument(
        "--include_path", metavar="DIR", help="a folder of lm-eval task YAML to search first"
    )
    harness.add_argument(
        "--limit", type=float, help="at most this many samples per task (a fraction below 1: of each task)"
    )
    harness.add_argument("--batch_size", type=int, default=8, help="lm-eval's batch size (default: 8)")
    options, overrides = parser.parse_known_args(argv)
    if options.config is None and options.lm_eval is None:
        parser.error("the following arguments are required: --config (or --lm_eval TASKS)")
    for name in ("include_path", "limit"):
        if getattr(options, name) is not None and options.lm_eval is None:
            parser.error(f"--{name} needs --lm_eval")
    if options.lm_eval is not None and options.config is None and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    return options, overrides


def _given_models(model_options: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The `--model` folders by name (NAME=PATH, else the path), and the option each name came from."""
    from expertmerge.io.reader import Checkpoint
    from expertmerge.sources import model_dir

    given, items = {}, {}
    for item in model_options:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        folder = model_dir(path, f"evaluate --model {item}")
        # Its weights' headers (a .bin: its tensors, weights only) now, not in from_pretrained after the teachers.
        Checkpoint(folder, f"evaluate --model {item}").close()
        given[name or path] = str(folder)
        items[name or path] = item
    return given, items


def _load(path: str, hp: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=hp.trust_remote_code
    ).eval()


def _score_models(
    named: dict[str, str],
    labels: dict[str, str],
    datamodule: Any,
    targets: dict[Any, Any],
    hp: Any,
    accuracy_tasks: list[Any],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Each model's scores per task and, on the scored tasks, its accuracy by generation; one model in memory
    at a time."""
    from expertmerge.accuracy import model_accuracy
    from expertmerge.evaluate import score_task

    rows, accuracy = {}, {}
    for name, path in named.items():
        model = _load(path, hp)
        rows[name] = {
            task: score_task(
                lambda ids, mask, m=model, n=name: finite_logits(
                    m(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels[n]
                ),
                datamodule.task_samples(task, "eval").input_ids,
                datamodule.task_samples(task, "eval").attention_mask,
                targets[(task, "eval")],
                hp.loss.temperature,
            )
            for task in datamodule.task_names
        }
        if accuracy_tasks:
            accuracy[name] = model_accuracy(model, datamodule.tokenizer, accuracy_tasks, name)
        del model
    return rows, accuracy


def evaluate_main(argv: Sequence[str]) -> int:
    import expertmerge.moe.sequence  # noqa: F401  (a scored folder may be an exported sequence MoE)
    from calib_data.tasks import BASE_TEACHER
    from expertmerge.accuracy import accuracy_table, accuracy_tasks, experts_accuracy, merge_accuracy_json
    from expertmerge.evaluate import expert_scores, scores_table, scores_to_json
    from expertmerge.io.model_config import vocab_size
    from expertmerge.pool import ExpertPool
    from expertmerge.teachers import TeacherSettings, teacher_dirs, teacher_targets
    from expertmerge.zoo_registry import resolve_path

    options, overrides = _parse(argv)
    if options.lm_eval is not None:
        return _lm_eval_main(options, overrides)
    # The models to score and the JSON target are checked before the config's data and experts are touched.
    given, items = _given_models(options.model)
    inputs = [options.config, *given.values()]
    if options.json:
        check_output_file(options.json, options.force, inputs, JSON_LABEL, existing=False)
    fit_config = read_fit_config(options.config, overrides)
    datamodule = fit_config.datamodule
    if not hasattr(fit_config.model, "run"):
        raise ExpertMergeError(
            f"evaluate needs an Expert Merging config (a base and experts); '{options.config}' fits "
            f"{type(fit_config.model).__name__}."
        )
    hp = fit_config.model.run.options
    named = {"base": resolve_path(hp.base), **given}
    pool = ExpertPool(hp.base, hp.experts, trust_remote_code=hp.trust_remote_code)
    inputs += [*fit_inputs(hp, datamodule)[0], pool.base_dir, *pool.expert_dirs.values()]
    if options.json:  # now the config's base, experts and calibration files are known too
        check_output_file(options.json, options.force, inputs, JSON_LABEL)
    pool.validate()
    labels = {
        "base": pool.label("base"),
        **{name: f"evaluate --model {item}" for name, item in items.items()},
    }
    for name, path in named.items():
        folder = str(pool.base_dir) if name == "base" and path == resolve_path(hp.base) else path
        check_scorable(
            folder, labels[name], vocab_size(pool.config), pool.label("base"), hp.trust_remote_code
        )
    datamodule.check([*hp.expert_names, BASE_TEACHER])  # `expert: base` tasks: the base is the teacher
    datamodule.setup("validate")
    settings = TeacherSettings(
        hidden_layers=(), logit_topk=hp.loss.logit_topk, temperature=hp.loss.temperature
    )
    targets, _ = teacher_targets(
        datamodule,
        teacher_dirs(pool.base_dir, pool.expert_dirs, datamodule.tasks),
        settings,
        ("eval",),
        pool.content_hashes(),
        hp.trust_remote_code,
    )
    tasks = accuracy_tasks(datamodule)
    rows, accuracy = _score_models(named, labels, datamodule, targets, hp, tasks)
    rows["experts"] = {
        task: expert_scores(datamodule.task_samples(task, "eval").attention_mask, targets[(task, "eval")])
        for task in datamodule.task_names
    }
    console = make_console()
    console.print(scores_table("Held-out calibration samples, per task", rows, datamodule.task_names))
    result = scores_to_json(rows)
    if tasks:
        folders = teacher_dirs(pool.base_dir, pool.expert_dirs, datamodule.tasks)
        accuracy["experts"] = experts_accuracy(
            tasks,
            {spec.name: spec.expert for spec in datamodule.tasks},
            lambda teacher: _load(str(folders[teacher]), hp),
            datamodule.tokenizer,
            known={BASE_TEACHER: accuracy["base"]} if "base" not in given else None,
        )
        title = "Accuracy by greedy generation on the held-out records, per task"
        console.print(accuracy_table(title, accuracy, [task.name for task in tasks]))
        result = merge_accuracy_json(result, accuracy)
    if options.json:
        write_json_output(options.json, result, "evaluate", options.force, inputs, JSON_LABEL)
    return 0


def _lm_eval_main(options: argparse.Namespace, overrides: list[str]) -> int:
    """`--lm_eval`: each model (the config's base and experts, then the `--model` folders) loaded in turn and
    scored by lm-evaluation-harness; the extra and the task names are checked before any model loads."""
    from expertmerge.harness import harness_scores, harness_table, require_harness, task_manager
    from expertmerge.zoo_registry import resolve_path

    require_harness()
    tasks = [task.strip() for task in options.lm_eval.split(",") if task.strip()]
    if not tasks:
        raise ExpertMergeError("evaluate --lm_eval: name at least one task.")
    if options.limit is not None and options.limit <= 0:
        raise ExpertMergeError(f"evaluate --limit: must be above 0, got {options.limit:g}.")
    if options.batch_size < 1:
        raise ExpertMergeError(f"evaluate --batch_size: must be at least 1, got {options.batch_size}.")
    include_path = None
    if options.include_path is not None:
        include_path = resolve_path(options.include_path)
        if not Path(include_path).is_dir():
            raise ExpertMergeError(f"evaluate --include_path: '{options.include_path}' is not a folder.")
    manager = task_manager(tasks, include_path)
    given, _ = _given_models(options.model)
    named: dict[str, str] = {}
    trust_remote_code = False
    if options.config is not None:
        from expertmerge.pool import ExpertPool

        fit_model = read_fit_config(options.config, overrides).model
        if not hasattr(fit_model, "run"):
            raise ExpertMergeError(
                f"evaluate needs an Expert Merging config (a base and experts); '{options.config}' fits "
                f"{type(fit_model).__name__}."
            )
        hp = fit_model.run.options
        trust_remote_code = hp.trust_remote_code
        pool = ExpertPool(hp.base, hp.experts, trust_remote_code=trust_remote_code)
        named = {"base": str(pool.base_dir), **{name: str(d) for name, d in pool.expert_dirs.items()}}
    named.update(given)
    if not named:
        raise ExpertMergeError(
            "evaluate --lm_eval: name the models to score (--model NAME=DIR, or --config)."
        )
    inputs = [options.config, include_path, *named.values()]
    if options.json:
        check_output_file(options.json, options.force, inputs, JSON_LABEL)
    limit = None if options.limit is None else (int(options.limit) if options.limit >= 1 else options.limit)
    scores = {}
    with _models_progress(len(named)) as (bar, step):
        for name, path in named.items():
            bar.update(step, description=f"lm-eval: {name}")
            bar.refresh()
            model, tokenizer = _load_with_tokenizer(path, named.get("base"), trust_remote_code)
            scores[name] = harness_scores(model, tokenizer, tasks, manager, limit, options.batch_size)
            del model
            bar.advance(step)
    make_console().print(harness_table(f"lm-evaluation-harness: {', '.join(tasks)}", scores))
    if options.json:
        result = {"lm_eval": {"tasks": tasks, "include_path": include_path, "limit": limit, "scores": scores}}
        write_json_output(options.json, result, "evaluate", options.force, inputs, JSON_LABEL)
    return 0


def _models_progress(total: int) -> Any:
    """A bar over the models, refreshed by hand between them: lm-eval runs with file descriptor 2 silenced,
    where a refresh from rich's timer thread would be lost."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar() -> Any:
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=make_console(stderr=True),
            auto_refresh=False,
            transient=True,
        )
        with progress:
            yield progress, progress.add_task("lm-eval", total=total)

    return bar()


def _load_with_tokenizer(path: str, base: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    """A model folder's model and tokenizer, the base's tokenizer where the folder has none (a fit's merged
    model shares the base's vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if base is None or base == path:
            raise ExpertMergeError(f"evaluate --lm_eval: '{path}' has no tokenizer: {error}") from error
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    return model, tokenizer
