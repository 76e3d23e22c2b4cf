"""Families whose config.json renames the standard sizes (GPT-2, BLOOM, GPT-BigCode and GPT-J store the layer
count as `n_layer`): merges read sizes through the `transformers` config and write them under the family's own
key; a family with no fused MoE format is refused in one line naming what works instead."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import families
import pytest
import torch
import yaml
from safetensors.torch import load_file

from expertmerge import methods
from expertmerge.cli import main
from expertmerge.merge import run_merge

FAMILIES = ("gpt2", "bloom", "gpt_bigcode", "gptj", "gpt_neox")  # the tiny models of tests/families.py
WEIGHTS, DENSITY = (0.7, 0.3), 0.5


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> Callable[[str], dict[str, Path]]:
    """`family -> {"base", "e1", "e2": folder}`: a random base and two experts with small seeded deltas."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, dict[str, Path]] = {}

    def build(family: str) -> dict[str, Path]:
        if family not in built:
            models = families.build(family, root / family)
            built[family] = {"base": models.base, **models.experts}
        return built[family]

    return build


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _ties_by_hand(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """TIES from its definition: keep each task vector's top-`DENSITY` magnitudes, elect each entry's sign from
    the weighted sum, average the weighted entries that agree with it by their weights."""
    weighted = []
    for expert, weight in zip(experts, WEIGHTS, strict=True):
        delta = (expert - base).flatten()
        kept = torch.zeros_like(delta)
        top = delta.abs().topk(int(DENSITY * delta.numel())).indices
        kept[top] = delta[top]
        weighted.append(kept * weight)
    stacked = torch.stack(weighted)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == sign
    divisor = (agree * torch.tensor(WEIGHTS)[:, None]).sum(0)
    divisor[divisor == 0] = 1
    return base + ((stacked * agree).sum(0) / divisor).reshape(base.shape)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ties_merge_of_each_family_equals_the_methods_loads_and_generates(family, family_models, tmp_path):
    folders = family_models(family)
    config = {
        "merge_method": "ties",
        "base_model": str(folders["base"]),
        "models": [
            {"model": str(folders[name]), "parameters": {"weight": weight, "density": DENSITY}}
            for name, weight in zip(("e1", "e2"), WEIGHTS, strict=True)
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    states = {name: load_file(folder / "model.safetensors") for name, folder in folders.items()}
    assert set(written) == set(states["base"])
    method = methods.get_method("ties")
    params = [methods.ExpertParams(weight, DENSITY) for weight in WEIGHTS]
    for name, base in states["base"].items():
        expected = methods.merge_tensor(
            method,
            base,
            [states["e1"][name], states["e2"][name]],
            params,
            methods.MethodParams(normalize=True),
        )
        assert torch.equal(written[name], expected), name
    # One layer matrix from the definition, and the merge moved it off the base.
    name = next(n for n in sorted(states["base"]) if ".0." in n and states["base"][n].dim() == 2)
    by_hand = _ties_by_hand(states["base"][name], [states["e1"][name], states["e2"][name]])
    assert torch.allclose(written[name], by_hand, rtol=0, atol=1e-6), name
    assert (written[name] - states["base"][name]).abs().max() > 1e-3
    model = _load(tmp_path / "out")
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_passthrough_keeping_one_gpt2_layer_writes_n_layer_1_and_loads(family_models, tmp_path):
    folders = family_models("gpt2")
    config = {
        "merge_method": "passthrough",
        "base_model": str(folders["base"]),
        "slices": [{"sources": [{"model": str(folders["e1"]), "layer_range": [1, 2]}]}],
        "dtype": "float32",
    }
    run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    written_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written_config["n_layer"] == 1 and "num_hidden_layers" not in written_config
    written = load_file(tmp_path / "out" / "model.safetensors")
    expert = load_file(folders["e1"] / "model.safetensors")
    layer_names = [n for n in written if n.startswith("transformer.h.")]
    assert layer_names and all(n.startswith("transformer.h.0.") for n in layer_names)
    for name in layer_names:
        assert torch.equal(written[name], expert[name.replace(".h.0.", ".h.1.")]), name
    model = _load(tmp_path / "out")
    assert model.config.num_hidden_layers == 1 and len(model.transformer.h) == 1
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_plan_reads_a_gpt2_configs_sizes(family_models, tmp_path):
    from expertmerge.plan import activation_bytes, describe, inputs_from_fit_config, plan

    folders = family_models("gpt2")
    fit = {"model": {"base": str(folders["base"]), "experts": {"a": str(folders["e1"])}, "mu": 1.0}}
    inputs = inputs_from_fit_config(_write(tmp_path, fit))
    model, _, _ = plan(inputs)
    assert describe(model) == {
        "type": "gpt2",
        "parameters": model.num_parameters(),
        "layers": 2,
        "hidden": 32,
    }
    assert inputs.hidden_layers == 1  # mu > 0 aligns the middle layer (2 // 2) of the 2
    # 4 h + 2 A + 2 KV + 4 I + heads + 2 per token and layer: h = A = 32, KV = 2 key/value heads of 8 = 16 (the
    # tiny config's num_key_value_heads), I = n_inner = 64
    per_layer = 4 * 32 + 2 * 32 + 2 * 16 + 4 * 64 + 4 + 2
    assert activation_bytes(inputs.config, 1, 10) == 4 * 10 * 2 * per_layer


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_mergekit_moe_of_a_family_without_a_format_is_one_line_naming_what_works(
    family, family_models, tmp_path, capsys
):
    folders = family_models(family)
    capsys.readouterr()  # the models' building (progress bars when built by this test) is not the command's output
    config = {
        "base_model": str(folders["base"]),
        "gate_mode": "random",
        "experts": [
            {"source_model": str(folders["e1"]), "positive_prompts": ["w5 w6"]},
            {"source_model": str(folders["e2"]), "positive_prompts": ["w7 w8"]},
        ],
    }
    assert main(["moe", "--config", str(_write(tmp_path, config)), "--out", str(tmp_path / "moe")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error
    assert f"model_type '{family}' has no fused MoE format" in error
    for works in (
        "llama, mistral -> mixtral",
        "qwen2 -> qwen2_moe",
        "qwen3 -> qwen3_moe",
        "dense",
        "sequence MoE",
    ):
        assert works in error
    assert "shared expert" not in error  # not the per-format reasons, which no key could satisfy
    assert not (tmp_path / "moe").exists()
