"""Checkpoints are read as plain data, and only onto the models they were learned on.

A crafted `torch.save` file runs code when it is unpickled (`weights_only=False`). Each case gives one to a
real command (`expertmerge.cli.main`) with a payload that would leave a marker file: the command must fail
with one `error:` line, exit 2, before any model loads, and the marker must not exist.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from expertmerge.errors import ExpertMergeError
from expertmerge.fit.run import FitRun
from expertmerge.io.fit_checkpoint import MODEL_HASHES
from expertmerge.pool import ExpertPool
from tests.test_validation import CONFIG, _tripwire, _written, assert_clean_error, fit_args, run


class _Payload:
    """Unpickled, it creates `marker`: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint, with the payload among its values."""
    torch.save({"state_dict": {}, "hyper_parameters": {"note": _Payload(marker)}}, path)
    return path


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FitRun, "prepare", _tripwire("loading the models"))


def test_payload_runs_when_unpickled(tmp_path: Path) -> None:
    # The check of the checks: the crafted file does create its marker under weights_only=False.
    marker = tmp_path / "marker"
    torch.load(crafted_checkpoint(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_export_of_a_crafted_checkpoint_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_models: None
) -> None:
    marker = tmp_path / "marker"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    out = tmp_path / "out"
    code, stderr = run(capsys, ["export", "--config", CONFIG, "--ckpt_path", str(ckpt), "--out", str(out)])
    assert_clean_error(code, stderr, f"export --ckpt_path '{ckpt}'", "'exec'", "could run code")
    assert not marker.exists()
    assert not out.exists()


def _plain_dict(path: Path) -> Path:
    torch.save({"weights": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (
            lambda d: crafted_checkpoint(d / "evil.ckpt", d / "marker"),
            "holds the Python object 'exec'",
        ),
        (lambda d: d / "missing.ckpt", "does not exist"),
        (lambda d: _written(d / "empty.ckpt", b""), "is empty"),
        (lambda d: _written(d / "notes.ckpt", b"hello\n"), "is not a checkpoint written by"),
        (lambda d: d, "is a folder"),
        (lambda d: _plain_dict(d / "tensors.ckpt"), "is not a Lightning checkpoint"),
    ],
    ids=["crafted", "missing", "empty", "text", "folder", "no-state-dict"],
)
def test_bad_fit_ckpt_path_is_one_line_before_models_load(
    tiny_zoo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_models: None,
    make: Any,
    named: str,
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ckpt = make(inputs)
    out = tmp_path / "out"
    code, stderr = run(capsys, fit_args(out, "--ckpt_path", str(ckpt)))
    assert_clean_error(code, stderr, f"--ckpt_path '{ckpt}'", named)
    assert not (inputs / "marker").exists()
    assert not out.exists()


def _crafted_bin_model(tiny_models: Any, folder: Path, marker: Path) -> Path:
    shutil.copytree(tiny_models.bin_expert, folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = _Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_evaluate_of_a_crafted_bin_model_runs_nothing(
    tiny_models: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_models: None
) -> None:
    marker = tmp_path / "marker"
    folder = _crafted_bin_model(tiny_models, tmp_path / "evil", marker)
    code, stderr = run(capsys, ["evaluate", "--config", CONFIG, "--model", f"evil={folder}"])
    line = assert_clean_error(
        code, stderr, "evaluate --model evil=", str(folder / "pytorch_model.bin"), "not a plain tensor file"
    )
    assert line.endswith("re-save it as safetensors.")
    assert not marker.exists()


def test_crafted_bin_expert_is_one_clear_error_in_the_pool(tiny_models: Any, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    folder = _crafted_bin_model(tiny_models, tmp_path / "evil", marker)
    with pytest.raises(ExpertMergeError) as raised:
        ExpertPool(str(tiny_models.base), {"evil": str(folder)}).validate()
    message = str(raised.value)
    assert "\n" not in message
    assert "not a plain tensor file" in message and "'exec'" in message
    assert not marker.exists()


# ------------------------------------------------------------------------- other weights, same names
def test_checkpoint_of_other_experts_with_the_same_names_is_refused(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_zoo / "base", models / "base")
    for name in ("arith", "reverse", "sort"):
        shutil.copytree(tiny_zoo / "experts" / name, models / name)
    config = yaml.safe_load(Path(CONFIG).read_text())
    config["model"]["base"] = str(models / "base")
    config["model"]["experts"] = {name: str(models / name) for name in ("arith", "reverse", "sort")}
    config_file = tmp_path / "fit.yaml"
    config_file.write_text(yaml.safe_dump(config))
    checkpoints = (
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.callbacks.dirpath", str(tmp_path / "checkpoints"), "--trainer.limit_val_batches", "0",
    )  # fmt: skip
    assert run(capsys, fit_args(tmp_path / "fit", *checkpoints, config=str(config_file)))[0] == 0
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(stored["expertmerge"][MODEL_HASHES]) == {"base", "arith", "reverse", "sort"}

    # The same names, other weights: 'reverse' re-trained (here: its weights moved a little; a copy of another
    # expert's weights would be refused as a duplicate before the checkpoint is compared).
    weights = models / "reverse" / "model.safetensors"
    save_file({name: tensor * 1.01 for name, tensor in load_file(str(weights)).items()}, str(weights))
    monkeypatch.setattr(FitRun, "prepare", _tripwire("loading the models"))
    out = tmp_path / "export"
    export = ["export", "--config", str(config_file), "--ckpt_path", str(ckpt), "--out", str(out)]
    line = assert_clean_error(*run(capsys, export), f"checkpoint '{ckpt}'", "expert 'reverse'")
    assert str(models / "reverse") in line
    assert not out.exists()
    resumed = fit_args(tmp_path / "resumed", "--ckpt_path", str(ckpt), config=str(config_file))
    assert_clean_error(*run(capsys, resumed), "--ckpt_path", "expert 'reverse'")
    assert not (tmp_path / "resumed").exists()

    # A checkpoint from before the hashes were stored is taken as it is.
    monkeypatch.undo()
    del stored["expertmerge"][MODEL_HASHES]
    old = tmp_path / "old.ckpt"
    torch.save(stored, old)
    assert run(capsys, [*export[:4], str(old), "--out", str(out)])[0] == 0
    assert (out / "model.safetensors").is_file()
