"""Learned merges of MoE fine-tunes (Mixtral, Qwen3-MoE): transformers 5 holds their routed experts fused into
3-D tensors while their checkpoints store one tensor per expert. The fit reads the fused tensors through
transformers' own conversions (io/layout.py), learns one coefficient per routed expert (`expert_axis`), and
writes the merge back in the checkpoints' per-expert layout."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from families import SMALL, fit_config, loads_and_generates, tokenizer  # noqa: E402

from expertmerge.cli import main  # noqa: E402
from expertmerge.io.layout import TensorLayout, meta_model  # noqa: E402
from expertmerge.io.reader import Checkpoint  # noqa: E402

ALPHA0 = 0.3
# Which routed expert each fine-tune changes (in every layer); the other routed experts keep the base's weights.
TOUCHED = {"e1": 0, "e2": 2}


def _fused(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [
        (n, p)
        for n, p in model.named_parameters()
        if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    ]


def _moe_models(family: str, root: Path):
    """Base + e1 + e2 of `family`: each fine-tune changes the attention and ONE routed expert (TOUCHED)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **SMALL)).eval()
    folders = {}
    for index, name in enumerate(["base", *TOUCHED]):
        model = copy.deepcopy(base)
        if name in TOUCHED:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for parameter_name, parameter in model.named_parameters():
                    if "self_attn" in parameter_name:
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
                for _, parameter in _fused(model):
                    parameter[TOUCHED[name]].add_(torch.randn(parameter[0].shape, generator=generator) * 0.2)
        model.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        folders[name] = root / name
    return SimpleNamespace(base=folders["base"], experts={n: folders[n] for n in TOUCHED})


def _fit(root: Path, models, *overrides: str) -> Path:
    (root / "fit.yaml").write_text(fit_config(models, root))
    args = ["fit", "--config", str(root / "fit.yaml"), "--export.output_dir", str(root / "out")]
    args += ["--trainer.default_root_dir", str(root / "logs"), "--trainer.max_steps", "3", *overrides]
    assert main(args) == 0
    return root / "out"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_layout_reads_what_from_pretrained_loads_and_writes_it_back(tmp_path: Path, family: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    models = _moe_models(family, tmp_path)
    folder = models.experts["e1"]
    checkpoint = Checkpoint(folder, "e1")
    layout = TensorLayout(
        meta_model(AutoConfig.from_pretrained(folder)),
        {name: checkpoint.shape(name) for name in checkpoint.names},
        "e1",
    )
    assert layout.converted and not layout.unused
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for name, tensor in loaded.items():
        assert name in layout, name
        assert torch.equal(layout.read(checkpoint.tensor, name, torch.float32), tensor), name
    fused = [name for name in loaded if name.endswith("experts.gate_up_proj")]
    assert fused and all(len(layout.sources(name)) == 2 * SMALL["num_experts"] for name in fused)
    back = layout.to_checkpoint(loaded)
    assert set(back) == set(checkpoint.names)
    for key in checkpoint.names:
        assert torch.equal(back[key], checkpoint.tensor(key, torch.float32)), key


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_learned_merge_of_moe_fine_tunes_has_a_coefficient_per_routed_expert(
    tmp_path: Path, family: str
) -> None:
    models = _moe_models(family, tmp_path)
    out = _fit(tmp_path, models, "--model.expert_axis", "true", "--model.alpha0", str(ALPHA0))
    assert loads_and_generates(out) == "ok"
    written, base = Checkpoint(out, "merge"), Checkpoint(models.base, "base")
    assert written.names == base.names  # the base's per-expert layout, not transformers' fused one

    table = json.loads((out / "coefficients.json").read_text())["coefficients"]
    fused = [name for name in table if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 2 * SMALL["num_hidden_layers"]
    for name in fused:
        for expert, touched in TOUCHED.items():
            values = table[name][expert]
            assert len(values) == SMALL["num_experts"]
            # A routed expert the fine-tune left alone has a zero task vector: no gradient, its coefficient stays.
            for routed, value in enumerate(values):
                if routed != touched:
                    assert value == pytest.approx(ALPHA0, abs=2e-6), (name, expert, routed)
            assert abs(values[touched] - ALPHA0) > 1e-3, (name, expert)

    # By hand: layer 0's routed expert 0 in the written per-expert tensors is base + c[e1, 0] * tau_e1, with tau
    # held in bf16 (`task_vector_dtype`) and c rounded to 6 decimals in coefficients.json.
    c = table["model.layers.0.mlp.experts.down_proj"]["e1"][0]
    expert = Checkpoint(models.experts["e1"], "e1")
    down = [
        k for k in base.names if ".layers.0." in k and ".experts.0." in k and ("w2" in k or "down_proj" in k)
    ]
    assert len(down) == 1
    theta0 = base.tensor(down[0], torch.float32)
    tau = (expert.tensor(down[0], torch.float32) - theta0).bfloat16().float()
    torch.testing.assert_close(written.tensor(down[0], torch.float32), theta0 + c * tau, atol=2e-6, rtol=0)


def test_expert_merging_plus_plus_cuts_fused_experts_along_the_expert_axis(tmp_path: Path) -> None:
    models = _moe_models("qwen3_moe", tmp_path)
    out = _fit(
        tmp_path,
        models,
        "--model.chunking",
        "true",
        "--model.stage2_steps",
        "2",
        "--model.stage2_select",
        "last",
        "--model.chunk_budget",
        "40",
    )
    assert loads_and_generates(out) == "ok"
    counts = json.loads((out / "coefficients.json").read_text())["chunk_counts"]
    fused = {n: c for n, c in counts.items() if n.endswith(("gate_up_proj", "down_proj"))}
    assert fused and all(1 <= c <= SMALL["num_experts"] for c in fused.values())
    assert sum(counts.values()) <= 40


def test_fused_moe_mode_on_an_moe_base_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    models = _moe_models("mixtral", tmp_path)
    (tmp_path / "fit.yaml").write_text(fit_config(models, tmp_path))
    code = main(
        [
            "fit",
            "--config",
            str(tmp_path / "fit.yaml"),
            "--export.output_dir",
            str(tmp_path / "o"),
            "--model.moe",
            "true",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "mixtral" in err[0] and "already" in err[0]


def test_export_from_a_checkpoint_rebuilds_the_expert_axis_merge(tmp_path: Path, capsys) -> None:
    models = _moe_models("mixtral", tmp_path)
    out = _fit(
        tmp_path,
        models,
        "--model.expert_axis",
        "true",
        "--trainer.enable_checkpointing",
        "true",
        "--trainer.logger",
        "true",
    )
    ckpt = next((tmp_path / "logs").rglob("*.ckpt"))
    config = str(tmp_path / "fit.yaml")
    exported = tmp_path / "exported"
    args = [
        "export",
        "--config",
        config,
        "--ckpt_path",
        str(ckpt),
        "--out",
        str(exported),
        "--model.expert_axis",
        "true",
    ]
    assert main(args) == 0
    fitted, again = Checkpoint(out, "fit"), Checkpoint(exported, "export")
    assert fitted.names == again.names
    for name in fitted.names:
        assert torch.equal(fitted.tensor(name), again.tensor(name)), name
    capsys.readouterr()
    code = main(["export", "--config", config, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.expert_axis off" in err[0]
    assert not (tmp_path / "other").exists()
