"""The learned merge as a library: options, data and a trainer factory in, a merged model out, no CLI involved,
and the same coefficients as `python -m expertmerge fit` with the same settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIT_TINY, LEAN_FIT, fit_args
from transformers import AutoModelForCausalLM

TASKS = ("arith", "reverse", "sort")


def test_run_fit_from_python_matches_the_fit_command(tiny_zoo: Path, tmp_path: Path) -> None:
    from calib_data import CalibrationDataModule
    from expertmerge.cli import main
    from expertmerge.fit import FitOptions, FitRun, LossOptions, run_fit
    from expertmerge.fit.outputs import export_dense
    from lightning_modules.trainer import plain_trainers

    # configs/fit_tiny.yaml, written as Python
    options = FitOptions(
        base=str(tiny_zoo / "base"),
        experts={task: str(tiny_zoo / "experts" / task) for task in TASKS},
        loss=LossOptions(ce_weight=1.0),
    )
    data = CalibrationDataModule(
        [{"name": t, "expert": t, "sources": [str(tiny_zoo / "data" / f"{t}_calib.jsonl")]} for t in TASKS],
        tokenizer=str(tiny_zoo / "base"),
        samples_per_task=32,
        eval_samples_per_task=16,
        max_length=64,
        batch_size=8,
    )
    result = run_fit(FitRun(options, data), plain_trainers(max_steps=6, accumulate_grad_batches=3))
    assert not result.interrupted and result.main_process and result.steps == "6"
    learned = result.learned
    out = export_dense(learned, tmp_path / "library", force=False)

    assert main(fit_args(tmp_path, "command", "--trainer.max_steps", "6", *LEAN_FIT, config=FIT_TINY)) == 0
    ours = json.loads((out / "coefficients.json").read_text())["coefficients"]
    command = json.loads((tmp_path / "command" / "coefficients.json").read_text())["coefficients"]
    assert ours.keys() == command.keys()
    for tensor, per_expert in ours.items():
        for expert, values in per_expert.items():
            assert values == pytest.approx(command[tensor][expert], abs=1e-6), (tensor, expert)
    moved = max(abs(v - 0.3) for per in ours.values() for values in per.values() for v in values)
    assert moved > 0.01  # six steps really trained

    # the exported folder is the in-memory merge
    samples = data.task_samples("sort", "eval")
    ids, mask = samples.input_ids[:4], samples.attention_mask[:4]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = learned.merged(ids, mask, output_hidden_states=False).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
