"""`python -m expertmerge fit --help`: the merge's own options first, grouped, one line each; Lightning's full
list of Trainer flags only on `--help-all`."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

PROG = "python -m expertmerge fit"

_INTRO = f"""usage: {PROG} --config FILE [--model.KEY VALUE ...] [--data.KEY VALUE ...] [--trainer.KEY VALUE ...]
           [--export.KEY VALUE ...] [--ckpt_path CKPT]

Learn merge coefficients on unlabeled calibration data (Expert Merging, and ++ with model.chunking) and export
the merged model. Every key can be set in the YAML of --config (model:, data:, trainer:, export:) or as a flag;
flags win. A sequence-MoE config names `model.class_path: lightning_modules.sequence_moe.SequenceMoEModule`.
"""

_TRAINER = (
    ("max_steps", "60", "optimiser steps of the layer-wise stage"),
    ("accumulate_grad_batches", "1", "batches per optimiser step (one per task: each step sees every task)"),
    ("val_check_interval", "1.0", "steps between held-out evaluations"),
    ("accelerator / devices / strategy", "auto", "where it runs: ddp, fsdp (layer-sharded) across devices"),
    ("default_root_dir", "outputs/fit-logs", "logs and checkpoints"),
)


def _first_sentence(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?)\.(\s|$)", text)
    text = match[1] if match else text
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def _docs(cls: type) -> dict[str, str]:
    """Each field's description from a dataclass's `Args:` section (read as jsonargparse reads it)."""
    import docstring_parser

    return {
        param.arg_name: param.description or "" for param in docstring_parser.parse(cls.__doc__ or "").params
    }


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(str(a) for a in args)
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def fit_help() -> str:
    """The help text: the merge's options by group, then data, export and the main Trainer flags."""
    from expertmerge.fit.options import _GROUPS, FitOptions

    lines = [_INTRO, "merge options (model.*):"]
    top = _docs(FitOptions)
    hints = typing.get_type_hints(FitOptions)
    for name in ("base", "experts", "trust_remote_code"):
        lines.append(f"  --model.{name} ({_type_name(hints[name])}): {_first_sentence(top[name])}")
    for group_name, group in _GROUPS.items():
        docs, group_hints = _docs(group), typing.get_type_hints(group)
        lines.append(f"\n  {group_name}: {_first_sentence(group.__doc__ or '')}")
        for field in dataclasses.fields(group):
            default = "" if field.default is dataclasses.MISSING else f", default {field.default!r}"
            kind = _type_name(group_hints[field.name])
            lines.append(
                f"    --model.{field.name} ({kind}{default}): {_first_sentence(docs.get(field.name, ''))}"
            )
    lines += [
        "\ndata options (data.*): tasks (name, expert, sources), samples_per_task, eval_samples_per_task,",
        "  max_length, batch_size, rounds, ... : `--data.help CalibrationDataModule` describes each.",
        "\nexport options (export.*): output_dir, force (replace it), evaluate, moe_output_dir, strict_health.",
        "\ntrainer options (trainer.*, Lightning's Trainer), the ones a fit sets most:",
    ]
    lines += [f"  --trainer.{name} (default {default}): {what}" for name, default, what in _TRAINER]
    lines += [
        f"\n`{PROG} --help-all` lists every flag (all of Lightning's); `--model.help ExpertMergingModule` the",
        "merge options in full; `--print_config` prints the resolved config.",
    ]
    return "\n".join(lines)
