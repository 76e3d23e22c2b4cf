"""The merge card's evaluation table: per model, the mean gain retained (the number the README says to read
first), then the mean perplexity, KL and top-1 agreement."""

from __future__ import annotations

import math

from expertmerge.evaluate import TaskScores, card_evaluation_lines, mean_gain_retained


def _scores(losses: dict[str, float], kl: float = 0.0, top1: float = 1.0) -> dict[str, TaskScores]:
    return {task: TaskScores(perplexity=math.exp(loss), kl=kl, top1=top1) for task, loss in losses.items()}


ROWS = {  # held-out losses (log perplexity) per task; task `prose` is taught by the base (expert = base)
    "base": _scores({"math": 2.0, "code": 3.0, "prose": 1.0}, kl=0.9, top1=0.5),
    "experts": _scores({"math": 1.0, "code": 2.0, "prose": 1.0}),
    "learned merge": _scores({"math": 1.5, "code": 2.25, "prose": 1.3}, kl=0.3, top1=0.75),
}


def test_mean_gain_retained_skips_the_task_the_base_teaches() -> None:
    # math (2 - 1.5) / (2 - 1) = 0.5, code (3 - 2.25) / (3 - 2) = 0.75; prose has no gain to retain
    assert mean_gain_retained(ROWS, "learned merge") == 0.625
    assert mean_gain_retained(ROWS, "base") == 0.0 and mean_gain_retained(ROWS, "experts") == 1.0
    assert math.isnan(mean_gain_retained(ROWS, "learned merge", ["prose"]))


def test_card_lines_lead_with_the_mean_gain_retained() -> None:
    assert card_evaluation_lines(ROWS) == [
        "| model | mean gain retained | mean perplexity | mean KL to expert | mean top-1 agree |",
        "|---|---|---|---|---|",
        f"| base | +0.000 | {math.exp(2.0):.3f} | 0.9000 | 50.0% |",
        f"| experts | +1.000 | {math.exp(4 / 3):.3f} | 0.0000 | 100.0% |",
        f"| learned merge | +0.625 | {math.exp(5.05 / 3):.3f} | 0.3000 | 75.0% |",
    ]


def test_card_lines_without_base_and_experts_rows_have_no_gain_column() -> None:
    assert card_evaluation_lines({"learned merge": ROWS["learned merge"]}) == [
        "| model | mean perplexity | mean KL to expert | mean top-1 agree |",
        "|---|---|---|---|",
        f"| learned merge | {math.exp(5.05 / 3):.3f} | 0.3000 | 75.0% |",
    ]
