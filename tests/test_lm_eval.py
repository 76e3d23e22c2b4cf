"""`evaluate --lm_eval`: lm-evaluation-harness (the optional `eval` extra) on the tiny zoo's base and sort
expert, with the task files shipped in expertmerge_zoos/lm_eval_tasks/tiny; the extra's absence and an unknown
task name as one-line errors before any model loads."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

import expertmerge_zoos
from expertmerge.cli import main
from expertmerge.harness import MISSING
from expertmerge_zoos.tiny import TASKS, lm_eval_records

TASKS_DIR = Path(expertmerge_zoos.__file__).parent / "lm_eval_tasks" / "tiny"
LIMIT = 16


def test_shipped_records_are_the_zoo_heldout_questions() -> None:
    for task in TASKS:
        lines = (TASKS_DIR / f"{task.name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == lm_eval_records(task)
        for record in map(json.loads, lines):
            assert record["choices"][record["label"]] == record["answer"]
            assert len(set(record["choices"])) == 4


# A mark, not importorskip in the body: that would run after the session's zoo (minutes) had been built.
@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (the eval extra)"
)
def test_lm_eval_scores_the_sort_expert_above_the_base(
    tiny_zoo: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    monkeypatch.chdir(tmp_path)  # the shipped tasks find their jsonl from any working directory
    out = tmp_path / "scores.json"
    argv = [
        "evaluate",
        "--lm_eval",
        "tiny_sort,tiny_sort_gen",
        "--include_path",
        str(TASKS_DIR),
        "--model",
        f"base={tiny_zoo / 'base'}",
        "--model",
        f"sort={tiny_zoo / 'experts' / 'sort'}",
        "--limit",
        str(LIMIT),
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed, noise = capfd.readouterr()
    assert "tiny_sort_gen" in printed and "exact_match" in printed
    assert noise.strip() == "", (
        noise
    )  # no log lines, bars or git errors from lm-eval, datasets or transformers

    result = json.loads(out.read_text())["lm_eval"]
    assert result["tasks"] == ["tiny_sort", "tiny_sort_gen"] and result["limit"] == LIMIT
    scores = result["scores"]
    for per_task in scores.values():
        assert set(per_task) == {"tiny_sort", "tiny_sort_gen"}
        for task, metric in (("tiny_sort", "acc"), ("tiny_sort_gen", "exact_match")):
            value, stderr = per_task[task][metric]["value"], per_task[task][metric]["stderr"]
            assert 0.0 <= value <= 1.0 and (value * LIMIT).is_integer()  # a share of the 16 questions
            # lm-eval's standard error of a mean of 0/1 scores: the sample standard deviation over sqrt(n)
            assert stderr == pytest.approx(math.sqrt(value * (1 - value) / (LIMIT - 1)), abs=1e-12)
            assert f"{value:.4f} ± {stderr:.4f}" in printed
    base, sort = scores["base"], scores["sort"]
    # Trained on sorting, the expert writes the sorted letters far more often than the base does...
    assert (
        sort["tiny_sort_gen"]["exact_match"]["value"] >= base["tiny_sort_gen"]["exact_match"]["value"] + 0.4
    )
    # ...and prefers them over near misses at least as often (the base is already good at choosing).
    assert sort["tiny_sort"]["acc"]["value"] >= base["tiny_sort"]["acc"]["value"] >= 0.5


def test_missing_extra_is_one_line_before_any_model(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra finds
    missing = tmp_path / "no-such-model"
    assert main(["evaluate", "--lm_eval", "tiny_sort", "--model", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {MISSING}"


def test_unknown_task_names_it_and_the_include_path(tmp_path: Path, capsys) -> None:
    pytest.importorskip("lm_eval")
    missing = tmp_path / "no-such-model"  # the task names are checked before the models
    argv = ["evaluate", "--lm_eval", "tiny_sort,tiny_sorting", "--include_path", str(TASKS_DIR)]
    assert main([*argv, "--model", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: evaluate --lm_eval: unknown task 'tiny_sorting': not in --include_path '{TASKS_DIR}' or "
        "lm-eval's own tasks."
    )
