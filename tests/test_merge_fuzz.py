"""Fuzzing `python -m expertmerge merge`: every option of every method, hostile values, never a traceback.

Each case takes a valid config, puts one random value (non-finite, zero, negative, huge, tiny, or a wrong
type) into one option, and runs the command. It must either refuse with exit code 2 and one `error:` line
naming the file (and the key), before writing anything, or write a model whose tensors are all finite.
Most cases fail at validation (milliseconds); a few valid edge cases per method run the whole merge.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import EXPERT_NAMES
from safetensors.torch import load_file

from expertmerge.cli import main as cli_main
from expertmerge.methods import METHODS

SEED = 20261201
# passthrough copies one model (its `scale` is fuzzed in tests/test_merge_slices.py); the others take three.
FUZZED = [name for name in METHODS if name != "passthrough"]
CASES_PER_OPTION = 4
MERGES_PER_METHOD = 2  # full merges of valid edge cases; the rest stop after validation

# Where each option lives in the config, as (path of keys, the key as error messages name it).
OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "model weight": (("models", 0, "parameters", "weight"), "models[0].parameters.weight"),
    "model density": (("models", 1, "parameters", "density"), "models[1].parameters.density"),
    "global weight": (("parameters", "weight"), "parameters.weight"),
    "global density": (("parameters", "density"), "parameters.density"),
    "lambda": (("parameters", "lambda"), "parameters.lambda"),
    "normalize": (("parameters", "normalize"), "parameters.normalize"),
    "rescale": (("parameters", "rescale"), "parameters.rescale"),
    "int8_mask": (("parameters", "int8_mask"), "parameters.int8_mask"),
    "random_seed": (("random_seed",), "random_seed"),
    "dtype": (("dtype",), "dtype"),
    "out_dtype": (("out_dtype",), "out_dtype"),
    "trust_remote_code": (("trust_remote_code",), "trust_remote_code"),
}
NUMBERS = [math.nan, math.inf, -math.inf, 0, 0.0, -0.0, -1, -0.5, 1e300, -1e300, 1e-300, 1e6, 1e-6, 0.3, 1, 2]
WRONG_TYPES = [True, False, None, "half", "1.0", "nan", [0.1, 0.5], [], {"filter": "mlp", "value": 0.5}, {}]
DTYPE_NAMES = ["float32", "bf16", "float16", "fp32", "float64", "int8", "", "BFLOAT16"]


def _valid_config(tiny_models, method: str) -> dict:
    declared = METHODS[method]
    model_parameters = {"weight": 0.6} if declared.parameter("weight") is not None else {}
    if declared.parameter("density") is not None:
        model_parameters["density"] = 0.5
    sources = [str(tiny_models.experts[n]) for n in EXPERT_NAMES]
    limit = getattr(declared, "max_experts", None)
    if limit == 1:  # slerp and its kind: the base listed too (as mergekit configs do), so models[1] exists
        sources = [str(tiny_models.base), sources[0]]
    elif limit is not None:
        sources = sources[:limit]
    return {
        "merge_method": method,
        "base_model": str(tiny_models.base),
        "models": [{"model": m, "parameters": dict(model_parameters)} for m in sources],
        "parameters": {"t": 0.3} if declared.parameter("t") is not None else {},
        "random_seed": 3,
    }


def _put(config: dict, where: tuple[Any, ...], value: Any) -> None:
    target = config
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value


def _cases() -> list[tuple[str, str | None, Any]]:
    rng = random.Random(SEED)
    cases = []
    for method in FUZZED:
        cases.append((method, None, None))  # the valid config itself: every method merges at least once
        for option in OPTIONS:
            pool = DTYPE_NAMES + WRONG_TYPES[:6] if "dtype" in option else NUMBERS + WRONG_TYPES
            cases += [(method, option, value) for value in rng.sample(pool, CASES_PER_OPTION)]
    return cases


def _is_edge(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and value in (0, -1, -0.5, 1e6, 1e-6)
    )


def test_every_option_of_every_method_gives_a_clean_error_or_a_finite_model(tiny_models, tmp_path, capsys):
    outcomes = {"refused": 0, "merged": 0, "validated only": 0}
    merges: dict[str, int] = dict.fromkeys(FUZZED, 0)
    for number, (method, option, value) in enumerate(_cases()):
        config = _valid_config(tiny_models, method)
        if option is None:
            key = "-"
        else:
            where, key = OPTIONS[option]
            _put(config, where, value)
        path = tmp_path / f"case{number}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        out = tmp_path / f"out{number}"
        case = f"{method}: {key} = {value!r}"

        from expertmerge.merge_config.parse import load_merge_config

        try:
            load_merge_config(path)
            valid = True
        except Exception:  # the command below must turn this into one clean line
            valid = False
        edge = option is None or _is_edge(value)
        if valid and not (edge and merges[method] < MERGES_PER_METHOD):
            outcomes["validated only"] += 1
            continue

        code = cli_main(["merge", "--config", str(path), "--out", str(out), "--no-progress"])
        captured = capsys.readouterr()
        error = " ".join(captured.err.split())  # rich wraps long lines; the words are what count
        assert "Traceback" not in captured.err, case
        if code == 2:
            assert captured.err.count("error:") == 1 and error.startswith("error:"), (case, captured.err)
            assert path.name in error, (case, error)
            assert key in error or "sum of weights" in error, (case, error)
            assert not out.exists(), case
            outcomes["refused"] += 1
            continue
        assert code == 0, (case, captured.err)
        merges[method] += 1
        outcomes["merged"] += 1
        tensors = load_file(out / "model.safetensors")
        bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
        assert not bad, (case, bad)
    # The fuzz covered both sides: refusals and real merges of every method.
    assert outcomes["refused"] > 100 and outcomes["validated only"] > 10, outcomes
    assert all(count >= 1 for count in merges.values()), {m: c for m, c in merges.items() if c < 1}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (math.nan, "expected a finite number, got nan"),
        (math.inf, "expected a finite number, got inf"),
        (1e300, "overflows float32"),
        (1e-300, "underflows float32"),
        ("half", "expected a number, got 'half'"),  # number-like strings (YAML's 1e-3) are numbers
        (True, "expected a number, got True"),
    ],
)
def test_non_finite_and_wrong_typed_lambda_is_refused_naming_key_and_value(
    tiny_models, tmp_path, value, says
):
    from expertmerge.errors import ExpertMergeError
    from expertmerge.merge_config.parse import parse_merge_config

    config = _valid_config(tiny_models, "task_arithmetic")
    config["parameters"]["lambda"] = value
    with pytest.raises(ExpertMergeError) as caught:
        parse_merge_config(config, "lambda.yaml")
    message = str(caught.value)
    assert message.startswith("lambda.yaml: key 'parameters.lambda': ") and says in message, message


def test_average_weights_summing_to_zero_are_refused_before_any_model_is_read(tiny_models, tmp_path):
    from expertmerge.errors import ExpertMergeError
    from expertmerge.merge_config.parse import parse_merge_config

    config = _valid_config(tiny_models, "average")
    for entry, weight in zip(config["models"], (1.0, -0.5, -0.5), strict=True):
        entry["parameters"]["weight"] = weight
    with pytest.raises(ExpertMergeError, match="sum of weights, which is 0"):
        parse_merge_config(config, Path("zero.yaml").name)
