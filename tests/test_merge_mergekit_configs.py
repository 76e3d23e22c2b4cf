"""Whole mergekit YAMLs through `run_merge` against what real mergekit 0.1.5 wrote for them.

`tests/data/make_mergekit_config_reference.py` builds tiny Llama checkpoints from a seed, runs mergekit on
each config and stores its tensors, config.json keys and tokenizer vocabulary; here the same inputs are
rebuilt and merged by us. Cases: per-layer gradients, filtered values (with fall-through to the top level),
a gradient of `lambda`, a key the method ignores, same-range slices, a passthrough frankenmerge that changes
depth, a tokenizer union, and `tokenizer.tokens` rules with padding and a chat template.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from expertmerge.merge import run_merge

DATA = Path(__file__).with_name("data")
spec = importlib.util.spec_from_file_location(
    "mergekit_config_reference", DATA / "make_mergekit_config_reference.py"
)
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)

with safe_open(reference.OUTPUT, "pt") as handle:
    METADATA = handle.metadata()
EXPECTED_CASES = json.loads(METADATA["cases"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return reference.build_inputs(tmp_path_factory.mktemp("mergekit-inputs"))


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(reference.OUTPUT)


def _merge(case: str, inputs: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / f"{case}.yaml"
    path.write_text(reference.fill(reference.CASES[case], inputs))
    run_merge(path, out=tmp_path / case, progress=False)
    return tmp_path / case


def test_the_fixture_covers_every_case_with_the_generators_seed():
    assert sorted(EXPECTED_CASES) == sorted(reference.CASES)
    assert METADATA["seed"] == str(reference.SEED) and METADATA["mergekit_version"] == "0.1.5"


@pytest.mark.parametrize("case", list(reference.CASES))
def test_mergekit_config_gives_mergekits_tensors_config_and_tokenizer(case, inputs, expected, tmp_path):
    from transformers import AutoTokenizer

    out = _merge(case, inputs, tmp_path)
    written = {}
    for file in sorted(out.glob("*.safetensors")):
        written.update(load_file(file))
    theirs = {name.split("/", 1)[1]: t for name, t in expected.items() if name.startswith(f"{case}/")}
    assert sorted(written) == sorted(theirs)
    for name, tensor in theirs.items():
        assert written[name].dtype == tensor.dtype and written[name].shape == tensor.shape, name
        diff = (written[name].double() - tensor.double()).abs().max().item()
        assert diff <= 1e-6, f"{name}: max |diff| {diff:.3g}"
    stored = EXPECTED_CASES[case]
    config = json.loads((out / "config.json").read_text())
    assert {k: config.get(k) for k in stored["config"]} == stored["config"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == stored["vocab"]
    assert tokenizer.chat_template == stored["chat_template"]


def test_tokenizer_source_base_with_one_shared_tokenizer_copies_its_files(inputs, expected, tmp_path):
    # Every model has the base's tokenizer and as many tokens as rows: mergekit's permutations are the
    # identity, so the tensors are the plain merge's and the base's tokenizer files are copied unchanged.
    text = reference.CASES["gradient_linear"].replace(
        "dtype: float32", "dtype: float32\ntokenizer_source: base"
    )
    path = tmp_path / "base_tokenizer.yaml"
    path.write_text(reference.fill(text, inputs))
    run_merge(path, out=tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in written.items():
        assert (tensor - expected[f"gradient_linear/{name}"]).abs().max() <= 1e-6, name
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (inputs["a"] / "tokenizer.json").read_bytes()
