"""The health check after every written model: a finite but broken merge is a warning (or, strict, exit 2)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import LEAN_FIT, copy_model, fit_args
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from expertmerge.cli import main
from expertmerge.health import HealthCheck, check_folder

# Every weight x10: still finite in any dtype, but the model's next-token loss is ~20 nats/token above the base's
# (x1e37 on the tiny *random* models gives exactly uniform logits, perplexity 64 = their vocabulary, while their
# random base already sits at ~80 on these texts: only a trained base shows that case, see the zoo test).
BROKEN_SCALE = 10.0
CLOWNCAR = Path(__file__).resolve().parents[1] / "configs" / "mergekit_moe_clowncar.yaml"


def _scaled(folder: Path, scale: float) -> Path:
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({name: t * scale for name, t in tensors.items()}, file, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def broken_expert(tiny_models, tmp_path_factory) -> Path:
    return _scaled(
        copy_model(tiny_models.experts["beta"], tmp_path_factory.mktemp("broken") / "beta"), BROKEN_SCALE
    )


def _merge_yaml(tmp_path: Path, tiny_models, beta: Path) -> Path:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_models.base),
        "models": [
            {"model": str(tiny_models.experts["alpha"]), "parameters": {"weight": 0.5}},
            {"model": str(beta), "parameters": {"weight": 0.5}},
        ],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _card_numbers(folder: Path) -> tuple[float, float]:
    card = (folder / "README.md").read_text()
    output = re.search(r"\| output \| ([^ ]+) \|", card)
    base = re.search(r"\| base \| ([^ ]+) \|", card.split("## Health check")[1])
    return float(output[1]), float(base[1])


# ------------------------------------------------------------------------------------------------ threshold
@pytest.mark.parametrize(
    ("output", "base", "vocab", "problem"),
    [
        (20.0, 12.0, 1000, None),  # a little worse: fine
        (24.1, 12.0, 1000, "more than 2x the base's"),
        (math.nan, 12.0, 1000, "not finite"),
        (math.inf, 12.0, 1000, "not finite"),
        # < 2x the base, but at chance level where the base is not
        (520.0, 300.0, 1000, "above 0.5 x the vocabulary size"),
        (64.0, 83.0, 64, None),  # a base at chance level itself: only the ratio counts
        (1.4e4, 6913.0, 259, None),  # a narrow base worse than chance on the texts: 2x is noise ...
        (1.8e6, 6913.0, 259, "more than 259x the base's"),  # ... the vocabulary size times is not
        (64.0, 83.0, 64, "predicts the same next-token distribution"),  # ... or the collapse
    ],
)
def test_threshold(output: float, base: float, vocab: int, problem: str | None) -> None:
    spread = 0.0 if problem and "same" in problem else 0.05
    check = HealthCheck(output_perplexity=output, base_perplexity=base, vocab_size=vocab)
    check.output_spread, check.base_spread = spread, 0.05
    assert (check.problem is None) if problem is None else (problem in check.problem)


# ------------------------------------------------------------------------------------------------ merge
def test_healthy_merge_has_no_warning_and_the_card_gives_both_perplexities(
    tiny_models, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    config = _merge_yaml(tmp_path, tiny_models, tiny_models.experts["beta"])
    assert (
        main(["merge", "--config", str(config), "--out", str(out), "--no-progress", "--strict_health"]) == 0
    )
    printed = capsys.readouterr().out
    assert "health check" in printed and "WARNING" not in printed
    output_ppl, base_ppl = _card_numbers(out)
    assert 0.8 < output_ppl / base_ppl < 1.25  # experts 0.02 away from a random base: near its perplexity
    # the card's base number is the base folder's own perplexity on the same texts
    assert check_folder(tiny_models.base, tiny_models.base).output_perplexity == pytest.approx(
        base_ppl, rel=1e-3
    )
    assert "ok." in (out / "README.md").read_text()


def test_broken_merge_is_a_warning_in_the_summary_and_the_card(
    tiny_models, broken_expert, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    config = _merge_yaml(tmp_path, tiny_models, broken_expert)
    assert main(["merge", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "WARNING" in printed and "looks broken" in printed
    card = (out / "README.md").read_text()
    # the random base is worse than chance (perplexity 83, vocabulary 64): the bar is 64x
    assert "**WARNING: this model looks broken: its perplexity is more than 64x the base's.**" in card
    output_ppl, base_ppl = _card_numbers(out)
    assert output_ppl > 1e4 * base_ppl


def test_strict_health_exits_2_naming_the_kept_output_and_both_perplexities(
    tiny_models, broken_expert, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    config = _merge_yaml(tmp_path, tiny_models, broken_expert)
    code = main(["merge", "--config", str(config), "--out", str(out), "--no-progress", "--strict_health"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert str(out) in error and "vs the base's" in error and "kept for inspection" in error
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    output_ppl, base_ppl = _card_numbers(out)
    assert f"perplexity {output_ppl:.4g} vs the base's {base_ppl:.4g}" in error


# ------------------------------------------------------------------------------------------------ moe
def _moe_yaml(tmp_path: Path, tiny_models, beta: Path) -> Path:
    config = {
        "base_model": str(tiny_models.base),
        "gate_mode": "cheap_embed",
        "dtype": "float32",
        "experts": [
            {
                "source_model": str(tiny_models.experts["alpha"]),
                "positive_prompts": ["w4 w5 w6 w7 w8 w9 w10 w11"],
            },
            {"source_model": str(beta), "positive_prompts": ["w20 w21 w22 w23 w24 w25 w26 w27 w28"]},
        ],
    }
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_moe_health_uses_the_config_prompts(tiny_models, tmp_path, capsys) -> None:
    out = tmp_path / "moe"
    config = _moe_yaml(tmp_path, tiny_models, tiny_models.experts["beta"])
    assert main(["moe", "--config", str(config), "--out", str(out), "--no-progress", "--strict_health"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "ok.\n\nPerplexity on 8 config prompts and built-in texts" in card  # 2 short prompts: 6 more texts
    output_ppl, base_ppl = _card_numbers(out)
    assert 0.8 < output_ppl / base_ppl < 1.25


# ------------------------------------------------------------------------ the tiny zoo (a trained base)
# An expert x1e37, the case users report: the random tiny models above cannot show it (their base is at chance
# level already); the zoo's trained base is far below it, and the broken output sits exactly at chance.
@pytest.fixture(scope="module")
def zoo_broken_sort(tiny_zoo, tmp_path_factory) -> Path:
    from expertmerge.zoo_registry import resolve_path

    source = Path(resolve_path("zoo://tiny/experts/sort"))
    return _scaled(copy_model(source, tmp_path_factory.mktemp("zoo-broken") / "sort"), 1e37)


@pytest.fixture(scope="module")
def zoo_sort_x10(tiny_zoo, tmp_path_factory) -> Path:
    """For the fit: x1e37 makes its loss and gradients NaN at once (the writer then refuses the output)."""
    from expertmerge.zoo_registry import resolve_path

    source = Path(resolve_path("zoo://tiny/experts/sort"))
    return _scaled(copy_model(source, tmp_path_factory.mktemp("zoo-x10") / "sort"), BROKEN_SCALE)


def test_zoo_merge_with_an_expert_x1e37_is_at_chance_level_and_warned(
    tiny_zoo, zoo_broken_sort, tmp_path, capsys
) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "zoo://tiny/base",
        "models": [
            {"model": "zoo://tiny/experts/arith", "parameters": {"weight": 0.5}},
            {"model": str(zoo_broken_sort), "parameters": {"weight": 0.5}},
        ],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["merge", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "WARNING" in capsys.readouterr().out
    output_ppl, base_ppl = _card_numbers(out)
    # uniform logits: exactly chance level; the narrow base is worse than chance on the built-in English texts,
    # so only the collapse of the predictions shows it
    assert output_ppl == pytest.approx(AutoConfig.from_pretrained(str(out)).vocab_size, rel=1e-3)
    assert output_ppl < base_ppl
    assert "looks broken: it predicts the same next-token distribution" in (out / "README.md").read_text()


def test_zoo_moe_with_a_broken_expert_warns_and_strict_exits_2(
    tiny_zoo, zoo_broken_sort, tmp_path, capsys
) -> None:
    config = yaml.safe_load(CLOWNCAR.read_text())
    config["experts"][3]["source_model"] = str(zoo_broken_sort)
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "moe"
    assert main(["moe", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "WARNING" in capsys.readouterr().out
    assert "**WARNING: this model looks broken" in (out / "README.md").read_text()
    assert "config prompts" in (out / "README.md").read_text()
    code = main(
        ["moe", "--config", str(path), "--out", str(out), "--force", "--no-progress", "--strict_health"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(out) in error and (out / "README.md").is_file()


def test_fit_dense_export_checks_the_held_out_samples(tiny_zoo, zoo_sort_x10, tmp_path, capsys) -> None:
    """A healthy fit: no warning, numbers in the card; a broken expert: warning, then with strict exit 2."""
    short = ("--trainer.max_steps", "1", *LEAN_FIT)
    assert main(fit_args(tmp_path, "healthy", *short)) == 0
    assert "WARNING" not in capsys.readouterr().out
    card = (tmp_path / "healthy" / "README.md").read_text()
    assert "ok.\n\nPerplexity on 8 held-out calibration samples" in card
    output_ppl, base_ppl = _card_numbers(tmp_path / "healthy")
    assert output_ppl < 2 * base_ppl

    broken = ("--model.experts.sort", str(zoo_sort_x10), *short)
    assert main(fit_args(tmp_path, "broken", *broken)) == 0
    assert "WARNING" in capsys.readouterr().out
    assert "**WARNING: this model looks broken" in (tmp_path / "broken" / "README.md").read_text()
    code = main(fit_args(tmp_path, "strict", *broken, "--export.strict_health", "true"))
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(tmp_path / "strict") in error
    assert (tmp_path / "strict" / "model.safetensors").is_file()
