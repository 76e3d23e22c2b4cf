"""Importing expertmerge's packages has no side effects: no torch, no transformers, no Lightning, no model-type
registration; the re-exported names still resolve on first use, and importing `expertmerge.moe.sequence` is
what makes an exported sequence MoE load through `AutoModelForCausalLM`."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pytorch_lightning", "lightning_fabric", "datasets")
LAZY_PACKAGES = ("expertmerge", "expertmerge.moe", "expertmerge.methods", "expertmerge.io", "calib_data")
LAZY_PACKAGES += ("lightning_modules", "expertmerge.fit", "expertmerge.merge_config")


def run_python(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter (this repository first on the path); it prints one JSON object."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_errors_import_loads_no_torch_and_takes_under_half_a_second() -> None:
    result = run_python(
        "import json, sys, time\n"
        "started = time.perf_counter()\n"
        "import expertmerge.errors\n"
        "elapsed = time.perf_counter() - started\n"
        f"print(json.dumps({{'elapsed': elapsed, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    assert result["heavy"] == []
    assert result["elapsed"] < 0.5


def test_packages_import_without_heavy_modules_or_registration() -> None:
    result = run_python(
        "import importlib, json, sys\n"
        f"for name in {LAZY_PACKAGES!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], "
        "'sequence': 'expertmerge.moe.sequence' in sys.modules}))"
    )
    assert result == {"heavy": [], "sequence": False}


def test_fit_help_lists_the_merge_options_without_loading_lightning() -> None:
    """`fit --help` opens with the merge's own options (each with its type and default), not Lightning's flags."""
    result = run_python(
        "import contextlib, io, json, sys\n"
        "from expertmerge.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    code = main(['fit', '--help'])\n"
        "text = out.getvalue()\n"
        "print(json.dumps({'code': code, 'head': text.splitlines()[0], 'text': text, "
        "'heavy': [m for m in ('torch', 'transformers', 'pytorch_lightning') if m in sys.modules]}))"
    )
    assert result["code"] == 0 and result["head"].startswith("usage: python -m expertmerge fit --config FILE")
    assert result["heavy"] == []  # no torch, transformers or Lightning for a help text
    text = result["text"]
    assert "--model.gamma (float, default 0.05)" in text
    assert "--model.task_balance (none | start_kl | expert_gain, default 'expert_gain')" in text
    assert text.index("--model.alpha0") < text.index("--trainer.max_steps")  # the merge's options first
    assert "--help-all" in text


def test_help_imports_no_torch() -> None:
    result = run_python(
        "import contextlib, io, json, runpy, sys\n"
        "sys.argv = ['expertmerge', '--help']\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    runpy.run_module('expertmerge', run_name='__main__')\n"
        f"print(json.dumps({{'usage': out.getvalue().startswith('usage: python -m expertmerge'), "
        f"'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    assert result == {"usage": True, "heavy": []}


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_package_name_resolves_to_its_defining_object(package: str) -> None:
    module = importlib.import_module(package)
    for name in getattr(module, "__all__", ()):  # expertmerge.io has none: its modules are imported by name
        value = getattr(module, name)
        assert name in dir(module)
        home = getattr(value, "__module__", None)
        if isinstance(home, str) and home.startswith(package + "."):  # re-exported: the very object
            assert getattr(importlib.import_module(home), name) is value, (package, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def test_from_imports_of_package_names_still_work() -> None:
    from calib_data import CORPORA_DIR, CalibrationDataModule
    from calib_data.datamodule import CalibrationDataModule as defined
    from expertmerge.methods import METHODS, get_method
    from expertmerge.moe import moe_format_for, write_moe_checkpoint
    from lightning_modules import ExpertMergingModule
    from lightning_modules.merging import ExpertMergingModule as merging_module

    assert CalibrationDataModule is defined and ExpertMergingModule is merging_module
    assert Path(CORPORA_DIR).is_dir()
    assert get_method("linear") is METHODS["average"]
    assert callable(moe_format_for) and callable(write_moe_checkpoint)


def test_importing_the_sequence_module_makes_an_export_loadable(tiny_models, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from expertmerge.moe.sequence_build import build_sequence_moe, export_sequence_moe

    experts = {name: str(path) for name, path in tiny_models.experts.items()}
    model = build_sequence_moe(experts)
    folder = export_sequence_moe(
        model,
        tmp_path / "sequence-moe",
        force=False,
        tokenizer=AutoTokenizer.from_pretrained(tiny_models.base),
        experts={name: (path, "-") for name, path in experts.items()},
        parameters={},
    )
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    result = run_python(
        "import json, sys, torch\n"
        "import expertmerge\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "before = 'expertmerge_sequence_moe' in CONFIG_MAPPING\n"
        "import expertmerge.moe.sequence\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=ids, use_cache=False).logits\n"
        "print(json.dumps({'before': before, 'class': type(model).__module__ + '.' + type(model).__name__, "
        "'logits': logits.tolist()}))",
        str(folder),
    )
    assert result["before"] is False  # `import expertmerge` registers nothing
    assert result["class"] == "expertmerge.moe.sequence.SequenceMoEForCausalLM"
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=0, atol=1e-5)
