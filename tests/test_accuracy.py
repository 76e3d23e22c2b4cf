"""Accuracy by generation: the scorers on hand cases, the pass@1 sandbox, batched greedy generation, and
`evaluate` scoring held-out records that name their reference answers."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_tokenizer
from transformers import AutoModelForCausalLM

from expertmerge.accuracy import (
    GenerationSettings,
    accuracy_gain_retained,
    contains,
    exact_case_match,
    exact_match,
    extract_code,
    final_number,
    generate_greedy,
    number_match,
    run_tests,
    score_generations,
)
from expertmerge.cli import main


# ------------------------------------------------------------------------------------------------ scorers
def test_exact_match_normalises_case_whitespace_and_trailing_punctuation() -> None:
    assert exact_match("  Paris.\n", "paris")
    assert exact_match("New   York!", "new york")
    assert exact_match("A\tB C", "a b c")
    assert not exact_match("Paris, France", "Paris")
    assert not exact_match("", "x")
    assert not exact_match("3.5", "35")  # only trailing punctuation goes


def test_exact_case_match_keeps_case_and_normalises_the_rest() -> None:
    assert exact_case_match("  QUIET  RIVER.\n", "QUIET RIVER")
    assert not exact_case_match("Quiet River", "QUIET RIVER")
    assert not exact_case_match("quiet river", "QUIET RIVER")
    assert exact_match("quiet river", "QUIET RIVER")  # the plain `exact` ignores case


def test_contains_finds_the_normalised_reference() -> None:
    assert contains("The answer is  PARIS, of course.", "paris")
    assert not contains("The answer is Lyon.", "paris")
    assert not contains("anything", "  ")  # an empty reference matches nothing


def test_number_takes_the_final_number_with_commas_and_signs() -> None:
    assert final_number("She has 3 apples, then 1,234 more: 1,237.") == Decimal("1237")
    assert final_number("it drops to -5 degrees") == Decimal("-5")
    assert final_number("costs $3.50 in total") == Decimal("3.50")
    assert final_number("3, 4") == Decimal("4")  # a comma without three digits after it separates numbers
    assert final_number("no digits here") is None
    assert number_match("so the total is 72.", "#### 72")  # GSM8K reference
    assert number_match("1,000,000", "1000000")
    assert number_match("x = 3.50", "3.5")
    assert number_match("answer: -12", "-12")
    assert not number_match("answer: 12", "-12")
    assert not number_match("7 and then 8", "7")  # the final number counts
    assert not number_match("no number", "7")


def test_gain_retained_is_none_where_the_expert_gains_nothing() -> None:
    assert accuracy_gain_retained(0.2, 0.5, 0.8) == pytest.approx(0.5)
    assert accuracy_gain_retained(0.2, 0.1, 0.8) == pytest.approx(-1 / 6)
    assert accuracy_gain_retained(0.4, 0.6, 0.4) is None  # no division by zero: n/a


# ------------------------------------------------------------------------------------------------ pass@1
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_pass_at_1_runs_code_and_tests_in_a_sandboxed_process() -> None:
    assert run_tests("def add(a, b):\n    return a + b\n", ADD_TESTS)
    assert not run_tests("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert not run_tests("def add(a, b) return a + b", ADD_TESTS)  # a syntax error fails
    generation = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(generation) == "def add(a, b):\n    return a + b\n"
    result = score_generations(
        "pass@1", [generation, "def add(a, b): return 0"], [None, None], [ADD_TESTS] * 2
    )
    assert (result.correct, result.total) == (1, 2)


def test_pass_at_1_times_out_an_endless_loop_as_a_failure() -> None:
    start = time.monotonic()
    assert not run_tests("while True:\n    pass\n", "", timeout=1.5)
    assert time.monotonic() - start < 10


def test_pass_at_1_code_reaches_no_network_and_no_proxy_settings() -> None:
    for module in ("socket", "_socket"):  # the public module and the C one beneath its guard
        code = f"import {module}\ns = {module}.socket()\ns.settimeout(3)\ns.connect(('1.1.1.1', 80))\n"
        assert not run_tests(code, "", timeout=8)
    assert run_tests(
        "import os\nassert not any('proxy' in k.lower() for k in os.environ)\nassert os.getcwd() == os.environ['HOME']\n",
        "",
    )


def test_pass_at_1_never_runs_code_in_this_process() -> None:
    marker = "expertmerge_pass_at_1_marker"
    assert run_tests(f"import builtins\nbuiltins.{marker} = 1\n", "")
    assert not hasattr(__builtins__ if isinstance(__builtins__, dict) else __builtins__, marker)


# --------------------------------------------------------------------------------------------- generation
def test_batched_left_padded_generation_equals_one_by_one(tiny_models) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models.experts["alpha"]), dtype=torch.float32)
    tokenizer = tiny_tokenizer()
    generator = torch.Generator().manual_seed(3)
    prompts = [
        " ".join(f"w{int(i)}" for i in torch.randint(4, 64, (length,), generator=generator))
        for length in (3, 9, 1, 6, 12, 4, 7)
    ]
    batched = generate_greedy(model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=4))
    alone = [
        generate_greedy(model, tokenizer, [p], GenerationSettings(max_new_tokens=6, batch_size=1))[0]
        for p in prompts
    ]
    assert batched == alone
    lengths = [len(text.split()) for text in batched]
    assert max(lengths) == 6 and min(lengths) >= 1  # some rows end at EOS early, the others at max_new_tokens

    # A stop string cuts the answer before it; the batch is unchanged otherwise.
    stop = batched[0].split()[1]
    cut = generate_greedy(model, tokenizer, prompts[:1], GenerationSettings(max_new_tokens=6, stop=(stop,)))
    assert cut == [batched[0][: batched[0].find(stop)]]


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(cache))
    return cache


def _question_answer_files(zoo: Path, tmp: Path) -> dict[str, Path]:
    """The zoo's held-out texts as records: all examples but the last, then the last one's input, as the
    prompt; the last one's output as the reference answer."""
    files = {}
    for task, separator in (("arith", "="), ("reverse", ">"), ("sort", ">")):
        rows = []
        for line in (zoo / "data" / f"{task}_heldout.jsonl").read_text().splitlines():
            *earlier, last = json.loads(line)["text"].split(" ")
            question, answer = last.split(separator)
            rows.append({"prompt": " ".join([*earlier, question + separator]), "answer": answer})
        files[task] = tmp / f"{task}_qa.jsonl"
        files[task].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


def _zoo_config(zoo: Path, tmp: Path, files: dict[str, Path], **task_options) -> Path:
    tasks = [
        {
            "name": task,
            "expert": task,
            "sources": [str(path)],
            "text_field": "prompt",
            "answer_field": "answer",
            "scorer": "number" if task == "arith" else "exact",
            "eval_stop": [" "],
            "eval_max_new_tokens": 8,
            **task_options,
        }
        for task, path in files.items()
    ]
    config = {
        "model": {
            "base": str(zoo / "base"),
            "experts": {task: str(zoo / "experts" / task) for task in files},
        },
        "data": {"tasks": tasks, "samples_per_task": 8, "eval_samples_per_task": 16, "max_length": 64},
    }
    path = tmp / "accuracy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_evaluate_scores_accuracy_by_generation_on_records_with_answers(
    tiny_zoo: Path, private_cache: Path, tmp_path: Path, capsys
) -> None:
    files = _question_answer_files(tiny_zoo, tmp_path)
    config = _zoo_config(tiny_zoo, tmp_path, files)
    out = tmp_path / "scores.json"
    sorter = tiny_zoo / "experts" / "sort"
    assert main(["evaluate", "--config", str(config), "--model", f"sorter={sorter}", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Accuracy by greedy generation" in printed
    scores = json.loads(out.read_text())
    for model in ("base", "sorter", "experts"):
        for task in files:
            entry = scores[model][task]
            assert entry["total"] == 16 and 0 <= entry["correct"] <= 16
            assert entry["accuracy"] == entry["correct"] / 16
            assert "perplexity" in entry  # the held-out perplexity columns are still there
    # The sort expert scored as a --model is the experts row on its own task: gain retained exactly 1.
    assert scores["sorter"]["sort"]["correct"] == scores["experts"]["sort"]["correct"]
    assert scores["sorter"]["sort"]["accuracy_gain_retained"] == 1.0
    assert scores["base"]["sort"]["accuracy_gain_retained"] == 0.0
    # The tiny sort expert does sort: far more of its answers are right than the base's.
    assert scores["experts"]["sort"]["accuracy"] >= scores["base"]["sort"]["accuracy"] + 0.5
    for task in files:  # n/a (null) exactly where the expert is no more accurate than the base
        same = scores["experts"][task]["correct"] == scores["base"][task]["correct"]
        assert (scores["sorter"][task]["accuracy_gain_retained"] is None) == same


def test_evaluate_refuses_an_unknown_scorer_or_a_missing_answer_column_before_any_work(
    tiny_models, private_cache: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"q": f"w{i} w{i + 1} w{i + 2}", "a": f"w{i + 3}"}) + "\n" for i in range(4, 20))
    )
    task = {"name": "qa", "expert": "alpha", "sources": [str(data)], "text_field": "q"}
    for options, expected in (
        (
            {"answer_field": "a", "scorer": "fuzzy"},
            "`data.tasks[0].scorer` of task 'qa' is 'fuzzy'; use one of",
        ),
        ({"answer_field": "answer"}, "has no column 'answer' (named by `data.tasks[0].answer_field`"),
        ({"answer_field": "a", "scorer": "pass@1"}, "name their column with `data.tasks[0].tests_field`"),
        ({"answer_field": "a", "tests_field": "a"}, "only `scorer: pass@1` runs tests"),
    ):
        config = tmp_path / "bad.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {
                        "base": str(tiny_models.base),
                        "experts": {"alpha": str(tiny_models.experts["alpha"])},
                    },
                    "data": {
                        "tasks": [{**task, **options}],
                        "samples_per_task": 8,
                        "eval_samples_per_task": 4,
                    },
                }
            )
        )
        assert main(["evaluate", "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, err
        assert not (private_cache / "teachers").exists()  # refused before any teacher pass or generation


def test_fit_table_scores_accuracy_and_the_exported_merge_scores_the_same(
    tiny_zoo: Path, private_cache: Path, tmp_path: Path, capsys
) -> None:
    files = _question_answer_files(tiny_zoo, tmp_path)
    config = _zoo_config(tiny_zoo, tmp_path, files)
    fit = yaml.safe_load(config.read_text())
    fit["trainer"] = {"max_steps": 6, "accumulate_grad_batches": 3, "limit_val_batches": 0, "logger": False}
    fit["trainer"]["enable_checkpointing"] = False
    fit["export"] = {"output_dir": str(tmp_path / "merge")}
    config.write_text(yaml.safe_dump(fit))
    assert main(["fit", "--config", str(config)]) == 0
    assert "Accuracy by greedy generation" in capsys.readouterr().out
    table = json.loads((tmp_path / "merge" / "eval.json").read_text())
    assert {"base", "task arithmetic (alpha0)", "expert merging", "experts"} <= set(table)
    # The merge generated in the fit (its tensors written into a copy of the model) is the exported folder.
    out = tmp_path / "scores.json"
    assert (
        main(["evaluate", "--config", str(config), "--model", f"em={tmp_path / 'merge'}", "--json", str(out)])
        == 0
    )
    scores = json.loads(out.read_text())
    for task in files:
        for field in ("correct", "accuracy_gain_retained"):
            assert scores["em"][task][field] == table["expert merging"][task][field]
        assert scores["experts"][task]["correct"] == table["experts"][task]["correct"]
