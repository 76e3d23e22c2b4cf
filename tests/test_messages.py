"""Bad input that used to end in a traceback or an unclear message: each is now one line `error: ...` (exit 2)
naming the file or key and what to do, before any model is loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from expertmerge.cli import main
from tests.conftest import LEAN_FIT

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 and a single `error:` line without a traceback; return the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def fit_config(tmp_path: Path, tiny_models) -> Path:
    """A fit config over the tests' tiny models, with one calibration file per task."""
    # Words of the tiny tokenizer (w4 .. w63), distinct texts: every row is a usable sample.
    rows = "\n".join(f'{{"text": "w{4 + i} w5 w6 w7 w8 w9 w10 w{20 + i}"}}' for i in range(24))
    lines = ["model:", f"  base: {tiny_models.base}", "  experts:"]
    lines += [f"    {name}: {path}" for name, path in tiny_models.experts.items()]
    lines += ["data:", "  tasks:"]
    for name in tiny_models.experts:
        (tmp_path / f"{name}.jsonl").write_text(rows)
        lines.append(f"    - {{name: {name}, expert: {name}, sources: [{tmp_path / f'{name}.jsonl'}]}}")
    lines += ["export:", f"  output_dir: {tmp_path / 'out'}"]
    path = tmp_path / "fit.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _argv(command: str, config: Path, tmp_path: Path) -> list[str]:
    extra = {
        "merge": ["--out", str(tmp_path / "o")],
        "moe": ["--out", str(tmp_path / "o")],
        "evaluate": ["--models", str(tmp_path)],
        "sweep": ["--task_weights", "alpha=1,2"],
        "export": ["--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o")],
    }.get(command, [])
    return [command, "--config", str(config), *extra]


COMMANDS = ("fit", "merge", "moe", "symphony", "evaluate", "export", "sweep", "plan")


@pytest.mark.parametrize("command", COMMANDS)
def test_binary_config_names_the_file(command: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "x.ckpt").write_bytes(b"not read: the config is checked first")
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00model\x80")
    line = one_line_error(capsys, _argv(command, config, tmp_path))
    assert f"'{config}' is not UTF-8 text (byte 0xff at offset 0)" in line
    assert "UTF-8" in line and "give a YAML file" in line


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("model:\n  base: x\n experts: {a: b}\n", "line 3, column 2", "expected <block end>"),
        ("model: {base: x, experts: [a\n", "line 2, column 1", "expected ',' or ']'"),
    ],
)
def test_fit_yaml_syntax_error_names_file_and_line(text, where, problem, tmp_path: Path, capsys) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    line = one_line_error(capsys, ["fit", "--config", str(config)])
    assert line.startswith(f"error: --config '{config}': {where}: not valid YAML, {problem}")


@pytest.mark.parametrize(
    "text, said",
    [("", "is empty"), ("# only a comment\n", "is empty"), ("- a\n- b\n", "holds a list at the top level")],
)
def test_empty_or_list_fit_config_names_the_file(text: str, said: str, tmp_path: Path, capsys) -> None:
    config = tmp_path / "odd.yaml"
    config.write_text(text)
    line = one_line_error(capsys, ["fit", f"--config={config}"])
    assert f"--config '{config}' {said}" in line


@pytest.mark.parametrize("kind", ["device", "folder", "fifo"])
@pytest.mark.parametrize("command", ["fit", "merge", "moe", "symphony", "plan"])
def test_config_that_is_not_a_regular_file(kind: str, command: str, tmp_path: Path, capsys) -> None:
    if kind == "device":
        config = Path("/dev/zero")
    elif kind == "folder":
        config = tmp_path / "folder.yaml"
        config.mkdir()
    else:
        config = tmp_path / "pipe.yaml"
        os.mkfifo(config)
    line = one_line_error(capsys, _argv(command, config, tmp_path))
    named = {"device": "a device", "folder": "a folder", "fifo": "a named pipe"}[kind]
    assert f"'{config}' is {named}, not a regular file" in line


@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
def test_calibration_source_that_is_not_a_regular_file(source, fit_config, tmp_path: Path, capsys) -> None:
    if source == "fifo":
        source = str(tmp_path / "pipe.jsonl")
        os.mkfifo(source)
    tasks = f"[{{name: alpha, expert: alpha, sources: [{source}]}}]"
    line = one_line_error(capsys, ["fit", "--config", str(fit_config), "--data.tasks", tasks, *LEAN_FIT])
    kind = "a device" if source == "/dev/zero" else "a named pipe"
    assert line == (
        f"error: Task 'alpha': `data.tasks[0].sources` entry '{source}' is {kind}, not a regular file; give a file."
    )


def test_symphony_nan_router_lr_is_refused_up_front(tmp_path: Path, capsys) -> None:
    text = (REPO / "configs" / "symphony_diffinit.yaml").read_text()
    # Experts that do not exist: the config is refused before any of them is looked for.
    text = text.replace("zoo://diffinit/experts/", str(tmp_path / "missing-")).replace(
        "router_lr: 0.01", "router_lr: .nan"
    )
    config = tmp_path / "symphony.yaml"
    config.write_text(text)
    line = one_line_error(capsys, ["symphony", "--config", str(config)])
    assert line == f"error: {config}: `moe.router_lr`: Input should be a finite number."
    config.write_text(
        text.replace("router_lr: .nan", "router_lr: 0.01").replace("steps: 60", "steps: 60, lr: .inf")
    )
    line = one_line_error(capsys, ["symphony", "--config", str(config)])
    assert line == f"error: {config}: `backbone.learned.lr`: Input should be a finite number."


@pytest.mark.parametrize("key, value", [("noise_scale", ".nan"), ("residual_scale", ".inf")])
def test_moe_non_finite_scales_are_refused_up_front(key, value, tiny_models, tmp_path: Path, capsys) -> None:
    config = tmp_path / "moe.yaml"
    config.write_text(
        f"base_model: {tiny_models.base}\ngate_mode: random\nexperts:\n"
        f"  - source_model: {tiny_models.experts['alpha']}\n"
        f"  - source_model: {tiny_models.experts['beta']}\n    {key}: {value}\n"
    )
    line = one_line_error(capsys, ["moe", "--config", str(config), "--out", str(tmp_path / "o")])
    assert line == f"error: {config}: key 'experts.1.{key}': Input should be a finite number."
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_accumulate_grad_batches_below_one(value: str, fit_config: Path, capsys) -> None:
    argv = ["fit", "--config", str(fit_config), "--trainer.accumulate_grad_batches", value, *LEAN_FIT]
    line = one_line_error(capsys, argv)
    assert line == f"error: trainer.accumulate_grad_batches is {value}; it must be >= 1."


def test_expert_name_with_a_dot(fit_config: Path, tiny_models, tmp_path: Path, capsys) -> None:
    # The expert and its task renamed together: the fit used to stop at setup with torch's KeyError.
    text = fit_config.read_text().replace("    alpha:", "    al.pha:")
    fit_config.write_text(text.replace("name: alpha, expert: alpha", "name: al.pha, expert: al.pha"))
    argv = ["fit", "--config", str(fit_config), *LEAN_FIT]
    line = one_line_error(capsys, argv)
    assert (
        line
        == "error: model.experts name 'al.pha' contains '.'; rename it without '.' or '/' (e.g. with '_' or '-')."
    )


def test_task_name_with_a_slash(fit_config: Path, tmp_path: Path, capsys) -> None:
    tasks = f"[{{name: al/pha, expert: alpha, sources: [{tmp_path / 'alpha.jsonl'}]}}]"
    line = one_line_error(capsys, ["fit", "--config", str(fit_config), "--data.tasks", tasks, *LEAN_FIT])
    assert "`data.tasks[0].name` 'al/pha' contains '/'; rename it" in line


def test_symphony_expert_name_with_a_dot(tmp_path: Path, capsys) -> None:
    config = tmp_path / "symphony.yaml"
    config.write_text("experts: {a.b: x, c: y}\ndata: {tasks: []}\n")
    line = one_line_error(capsys, ["symphony", "--config", str(config)])
    assert f"{config}: `experts` name 'a.b' contains '.'" in line


def test_single_source_passthrough_names_the_key(tiny_models, tmp_path: Path, capsys) -> None:
    config = tmp_path / "passthrough.yaml"
    only = tiny_models.experts["alpha"]
    config.write_text(f"merge_method: passthrough\nmodels:\n  - model: {only}\n")
    line = one_line_error(capsys, ["merge", "--config", str(config), "--out", str(tmp_path / "o")])
    assert line.startswith(f"error: {config}: key 'models': the merge names one model only ('{only}'); ")
    assert "add the model it was fine-tuned from as `base_model`" in line
    assert not (tmp_path / "o").exists()


def test_plan_bad_device_memory_and_counts(fit_config: Path, capsys) -> None:
    plan = ["plan", "--config", str(fit_config)]
    line = one_line_error(capsys, [*plan, "--device_memory", "abc"])
    assert line == (
        "error: plan: --device_memory 'abc' is not a size; give a number of bytes with a unit, "
        "like 24GB, 500MB or 80GiB."
    )
    for flag, value in (("--batch_size", "-1"), ("--max_length", "0"), ("--experts", "0")):
        line = one_line_error(capsys, [*plan, flag, value])
        assert line == f"error: plan: {flag} must be at least 1, got {value}."


def test_plan_says_its_default_device_memory(fit_config: Path, capsys) -> None:
    assert main(["plan", "--config", str(fit_config)]) == 0
    out = capsys.readouterr().out
    assert "device memory: 80.0 GB per device (the default; set yours with --device_memory" in " ".join(
        out.split()
    )
    assert main(["plan", "--help"]) == 0
    assert "(default 80GB)" in " ".join(capsys.readouterr().out.split())


def test_misspelt_model_key_in_yaml_names_file_and_closest_key(fit_config: Path, capsys) -> None:
    fit_config.write_text(fit_config.read_text().replace("model:\n", "model:\n  ce_wieght: 3\n", 1))
    line = one_line_error(capsys, ["fit", "--config", str(fit_config)])
    assert line == (
        f"error: unknown key \"model.ce_wieght\" in '{fit_config}' (ExpertMergingModule takes no `ce_wieght`); "
        'did you mean "model.ce_weight"?'
    )


def test_unknown_model_key_on_the_command_line(fit_config: Path, capsys) -> None:
    line = one_line_error(capsys, ["fit", "--config", str(fit_config), "--model.nonexistent", "1"])
    assert line == (
        'error: unknown key "model.nonexistent" on the command line (ExpertMergingModule takes no `nonexistent`); '
        "`--model.help ExpertMergingModule` lists its keys."
    )
