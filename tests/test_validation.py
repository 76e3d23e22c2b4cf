"""Bad input fails before work with one line naming the key or file, exit code 2, and nothing written.

Every case runs the real CLI (`expertmerge.cli.main`) on the tiny zoo. A tripwire on the teacher pass (and
on the export's model loading) turns "failed late" into a test failure: a case must stop before them.
"""

from __future__ import annotations

import random
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from calib_data import CalibrationDataModule
from expertmerge.cli import main
from expertmerge.errors import ExpertMergeError
from expertmerge.fit.options import flat_parameters
from expertmerge.fit.run import FitRun
from tests.test_robustness import subprocess_env

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "fit_tiny.yaml")
SEQUENCE_CONFIG = str(REPO / "configs" / "sequence_moe_tiny.yaml")


def fit_args(out: Path, *overrides: str, config: str = CONFIG) -> list[str]:
    """A fit as small as the tiny zoo allows: one step, 4 + 2 samples per task, no evaluation, no logs."""
    return [
        "fit",
        "--config",
        config,
        "--export.output_dir",
        str(out),
        "--export.evaluate",
        "false",
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(out.parent / "logs"),
        "--data.samples_per_task",
        "4",
        "--data.eval_samples_per_task",
        "2",
        *overrides,
    ]


def run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    """Exit code and stderr of one in-process run (a traceback would propagate out of `main`)."""
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _tripwire(what: str):
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{what} started: the bad input was not caught before work")

    return fail


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher passes must not start in these tests."""
    monkeypatch.setattr("expertmerge.fit.prepare.teacher_targets", _tripwire("the teacher pass"))
    monkeypatch.setattr("lightning_modules.sequence_moe.teacher_targets", _tripwire("the teacher pass"))
    monkeypatch.setattr("expertmerge.teachers.teacher_targets", _tripwire("the teacher pass"))


def assert_clean_error(code: int, stderr: str, *named: str) -> str:
    assert code == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ fit options
@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("--model.temperature", "0", "model.temperature is 0.0; it must be in (0, 1000]"),
        ("--model.temperature", "1e30", "model.temperature is 1e+30"),  # T^2 overflows float32: a NaN model
        ("--model.gamma", ".nan", "model.gamma must be a finite number, got nan"),
        (
            "--model.alpha0",
            "[0.2, 0.3]",
            "model.alpha0 has 2 values but there are 3 experts (arith, reverse, sort)",
        ),
        ("--model.alpha0", "[0.2, .nan, 0.3]", "model.alpha0[1] (reverse) must be a finite number, got nan"),
        ("--model.lr", "-0.1", "model.lr is -0.1; it must be > 0"),
        ("--model.logit_topk", "0", "model.logit_topk is 0; it must be >= 1"),
        ("--model.teacher_batch_size", "0", "model.teacher_batch_size is 0; it must be >= 1"),
        ("--model.task_weights", "{arith: 0, reverse: -1}", "model.task_weights.reverse is -1"),
        (
            "--model.learn_include",
            "['layers.[0']",
            "model.learn_include[0] 'layers.[0' is not a regular expression",
        ),
        ("--model.lr", "abc", 'Parser key "model.lr"'),  # jsonargparse's type check, as one line
        ("--trainer.max_steps", "-5", "trainer: `max_steps` must be a non-negative integer"),
    ],
)
def test_bad_fit_option_is_one_line_naming_the_key_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None, key: str, value: str, named: str
) -> None:
    code, stderr = run(capsys, fit_args(tmp_path / "out", key, value))
    assert_clean_error(code, stderr, named)
    assert not (tmp_path / "out").exists()


def test_chunking_without_layerwise_steps_fails_before_the_teacher_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    code, stderr = run(
        capsys, fit_args(tmp_path / "out", "--model.chunking", "true", "--trainer.max_steps", "0")
    )
    assert_clean_error(code, stderr, "trainer.max_steps is 0; model.chunking needs it >= 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("--model.init_args.router_lr", "0", "model.router_lr is 0.0; it must be > 0"),
        ("--model.init_args.min_prefix", ".nan", "model.min_prefix must be a finite number, got nan"),
        ("--model.init_args.temperature", "-1", "model.temperature is -1.0; it must be in (0, 1000]"),
        ("--model.init_args.top_k", "4", "model.top_k is 4; it must be between 1 and 3"),
    ],
)
def test_bad_sequence_moe_option_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None, key: str, value: str, named: str
) -> None:
    code, stderr = run(capsys, fit_args(tmp_path / "out", key, value, config=SEQUENCE_CONFIG))
    assert_clean_error(code, stderr, named)
    assert not (tmp_path / "out").exists()


def test_debug_flag_and_environment_variable_show_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_work: None
) -> None:
    with pytest.raises(Exception) as raised:
        main(["--debug", *fit_args(tmp_path / "out", "--model.lr", "-1")])
    chain, cause = [], raised.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert any(isinstance(e, ExpertMergeError) and "model.lr" in str(e) for e in chain)
    monkeypatch.setenv("EXPERTMERGE_DEBUG", "1")
    with pytest.raises(Exception, match="model.temperature|Parser key"):
        main(fit_args(tmp_path / "out", "--model.temperature", "abc"))


def test_user_error_in_a_real_process_is_exit_2_and_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "expertmerge", *fit_args(tmp_path / "out", "--model.temperature", "0")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == ["error: model.temperature is 0.0; it must be in (0, 1000]."]
    assert tree(tmp_path) == []


# ------------------------------------------------------------------------------------------------ export
def _export(capsys: pytest.CaptureFixture[str], tmp_path: Path, ckpt: Path) -> tuple[int, str]:
    return run(
        capsys, ["export", "--config", CONFIG, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")]
    )


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _other_config_checkpoint(path: Path) -> Path:
    """A checkpoint file as `fit` writes it, but of a fit with two experts (the config has three)."""
    model = yaml.safe_load(Path(CONFIG).read_text())["model"]
    model["experts"] = {"arith": model["experts"]["arith"], "sort": model["experts"]["sort"]}
    torch.save(
        {"state_dict": {}, "hyper_parameters": model, "expertmerge": {"expert_names": ["arith", "sort"]}},
        path,
    )
    return path


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda d: d / "missing.ckpt", "does not exist"),
        (lambda d: _written(d / "empty.ckpt", b""), "is empty"),
        (lambda d: _written(d / "notes.ckpt", b"hello\n"), "is not a checkpoint written by"),
        (lambda d: d, "is a folder"),
        (lambda d: _other_config_checkpoint(d / "other.ckpt"), "has experts"),
    ],
    ids=["missing", "empty", "text", "folder", "other-config"],
)
def test_bad_export_checkpoint_is_one_line_before_models_load(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_work: None,
    make: Any,
    named: str,
) -> None:
    monkeypatch.setattr(FitRun, "prepare", _tripwire("loading the models"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ckpt = make(inputs)
    before = tree(tmp_path)
    code, stderr = _export(capsys, tmp_path, ckpt)
    line = assert_clean_error(code, stderr, "--ckpt_path" if named != "has experts" else "checkpoint", named)
    assert str(ckpt) in line
    assert tree(tmp_path) == before  # no output folder, no temporary folder


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_missing_model_folder_fails_before_any_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    missing = tmp_path / "nowhere" / "model"
    code, stderr = run(capsys, ["evaluate", "--config", CONFIG, "--model", f"x={missing}"])
    assert_clean_error(code, stderr, "evaluate --model x=", str(missing), "does not exist")


def test_evaluate_folder_without_config_json_fails_before_any_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    (tmp_path / "weights").mkdir()
    code, stderr = run(capsys, ["evaluate", "--config", CONFIG, "--model", str(tmp_path / "weights")])
    assert_clean_error(code, stderr, "has no config.json")


def test_evaluate_json_in_a_missing_folder_fails_before_any_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    target = tmp_path / "no-such-dir" / "scores.json"
    code, stderr = run(capsys, ["evaluate", "--config", CONFIG, "--json", str(target)])
    assert_clean_error(code, stderr, "evaluate --json", str(target.parent), "does not exist")
    assert tree(tmp_path) == []


def test_error_messages_print_brackets_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    # `[bold]` is rich markup: unescaped, the message would show another path ('.../v2/expert').
    folder = tmp_path / "[bold]v2" / "expert"
    code, stderr = run(capsys, ["evaluate", "--config", CONFIG, "--model", f"v2={folder}"])
    assert_clean_error(code, stderr, f"'{folder}' does not exist")


# -------------------------------------------------------------------------------------------------- fuzz
# Non-finite, zero, negative, huge, and wrong types (string, list, bool, null); "3" and some zeros are valid.
FUZZ_VALUES = [".nan", ".inf", "-.inf", "0", "-1", "1e30", "-1e30", "abc", "[1, 2]", "true", "null", "3"]


def _holds_number(hint: Any) -> bool:
    if hint in (int, float):
        return True
    return any(_holds_number(arg) for arg in typing.get_args(hint))


def numeric_options() -> dict[str, Any]:
    """Every model.* and data.* option whose type holds a number, read from the constructors (a new option
    is fuzzed without editing this test)."""
    options = {}
    model = {p.name: p.annotation for p in flat_parameters()}  # the module's flat options
    for prefix, hints in (("model", model), ("data", typing.get_type_hints(CalibrationDataModule.__init__))):
        for name, hint in hints.items():
            if name != "return" and _holds_number(hint):
                options[f"{prefix}.{name}"] = hint
    return options


def fuzz_value(key: str, value: str) -> str:
    if key == "model.task_weights":
        return f"{{arith: {value}}}"
    if key == "model.hidden_layers":
        return f"[{value}]"
    return value


def test_fuzzed_numeric_fit_options_give_a_clean_error_or_a_finite_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(11)  # this seed draws one valid value (stage2_steps 3): one fit runs end to end
    options = numeric_options()
    assert {"model.alpha0", "model.lr", "model.temperature", "data.batch_size"} <= set(options)
    outcomes = {"error": 0, "fit": 0}
    for index, key in enumerate(sorted(options)):
        value = fuzz_value(key, rng.choice(FUZZ_VALUES))
        out = tmp_path / f"out{index}"
        code, stderr = run(capsys, fit_args(out, f"--{key}", value))
        case = f"--{key} {value}: {stderr[-2000:]}"
        if code == 0:  # a valid value: the fit ran; its model must be finite
            outcomes["fit"] += 1
            tensors = load_file(out / "model.safetensors")
            assert all(torch.isfinite(t.float()).all() for t in tensors.values()), case
        else:
            outcomes["error"] += 1
            assert code == 2, case
            assert len(error_lines(stderr)) == 1 and "Traceback" not in stderr, case
            assert not out.exists(), case
    assert outcomes["error"] >= len(options) // 2, outcomes  # most draws are invalid: validation is exercised
