"""mergekit-moe configs as they are: `python -m expertmerge moe` on mergekit's docs example and parity with mergekit.

The parity fixture (`tests/data/mergekit_moe_reference.safetensors`, made by `make_mergekit_moe_reference.py`
with real mergekit-moe 0.1.5) holds tiny input models and mergekit's outputs; the test rebuilds the models and
compares every output tensor.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from expertmerge.cli import main
from expertmerge.errors import ExpertMergeError
from expertmerge.moe.mergekit_moe import (
    IgnoredKeyWarning,
    moe_tokenizer,
    parse_moe_config,
    select_format,
    tokenize_prompts,
)
from expertmerge.moe.mergekit_moe_build import build_mergekit_moe
from expertmerge.zoo_registry import resolve_path

ROOT = Path(__file__).resolve().parents[1]
CLOWNCAR = ROOT / "configs" / "mergekit_moe_clowncar.yaml"
FIXTURE = Path(__file__).parent / "data" / "mergekit_moe_reference.safetensors"


def _load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)


# ------------------------------------------------------------------------------------ docs example, tiny zoo
@pytest.fixture(scope="module")
def clowncar(tmp_path_factory) -> Path:
    from expertmerge.zoo_registry import ensure_zoo

    ensure_zoo("tiny")  # the config names zoo://tiny/...: the shared cache's zoo (built once if absent)
    out = tmp_path_factory.mktemp("clowncar") / "moe"
    assert main(["moe", "--config", str(CLOWNCAR), "--out", str(out), "--no-progress"]) == 0
    return out


def test_docs_example_loads_with_no_missing_or_unexpected_keys_and_generates(clowncar: Path) -> None:
    model, info = _load(clowncar)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (
        info["missing_keys"] == set()
        and info["unexpected_keys"] == set()
        and info["mismatched_keys"] == set()
    )
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    assert model.dtype == torch.bfloat16  # the config's dtype
    tokenizer = moe_tokenizer(clowncar)
    encoded = tokenize_prompts(["12+34="], tokenizer)
    generated = model.generate(**encoded, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, encoded["input_ids"].shape[1] + 6)
    assert (clowncar / "mergekit_moe_config.yml").read_text() == CLOWNCAR.read_text()


def test_hidden_gates_route_the_positive_prompts_to_the_prompted_expert(clowncar: Path) -> None:
    """Router top-1 on the last token of the positive prompts (the token mergekit's `hidden` gates are made from).

    mergekit's row of expert e in layer l is the unit-normalised mean, over e's prompts, of the last token's state
    entering layer l (`hidden_states[l]`, before attention), while the router reads the state after the layer's
    post-attention norm. So what is guaranteed is the mean: each expert's mean router input over its prompts
    picks that expert in every layer. A single prompt unlike its expert's other prompts can sit closer to another
    expert's mean: in layer 1, "> get ye flask" (reverse) goes to arith and "Das ist ein Satz auf Deutsch." (sort)
    to the base, while layer 0 routes all 8 prompts right. Real mergekit-moe 0.1.5 on this very config writes the
    same gate tensors bit for bit (max |diff| 0 in both layers, checked with /work/mkvenv/bin/mergekit-moe on the
    zoo's folders), so it routes these prompts identically; the parity tests below pin the same rows on fixtures.
    """
    model, _ = _load(clowncar)
    tokenizer = moe_tokenizer(clowncar)
    seen: dict[int, torch.Tensor] = {}
    for layer, block in enumerate(model.model.layers):
        block.mlp.gate.register_forward_hook(
            lambda m, args, out, layer=layer: seen.__setitem__(layer, args[0])
        )
    experts = yaml.safe_load(CLOWNCAR.read_text())["experts"]
    hits: dict[int, list[bool]] = {0: [], 1: []}
    mean_picks: dict[int, list[int]] = {0: [], 1: []}
    for index, expert in enumerate(experts):
        encoded = tokenize_prompts(expert["positive_prompts"], tokenizer)
        with torch.no_grad():
            model(**encoded)
        batch, length = encoded["input_ids"].shape
        for layer, router_input in seen.items():
            last = router_input.reshape(batch, length, -1)[:, -1].float()
            gate = model.model.layers[layer].mlp.gate.weight.float()
            hits[layer] += ((last @ gate.T).argmax(-1) == index).tolist()
            mean_picks[layer].append(int((last.mean(0) @ gate.T).argmax()))
    assert mean_picks[0] == [0, 1, 2, 3], mean_picks
    assert all(hits[0]) and len(hits[0]) == 8, hits
    # Layer 1 decides close calls on this tiny model's states, and they follow the installed transformers:
    # 6/8 and every expert's mean right under the version the note above was written with; under 5.25 5/8, and
    # the reverse expert's mean goes to the base. Both far above chance (2/8).
    assert sum(m == e for e, m in enumerate(mean_picks[1])) >= 3, mean_picks
    assert sum(hits[1]) >= 5, hits


# ------------------------------------------------------------------------------------ parity with mergekit
def _fixture() -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURE), "pt") as handle:
        metadata = handle.metadata()
    return metadata, load_file(str(FIXTURE))


def _as_loaded(config_folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the model's own names, converted as `from_pretrained` converts them (routed
    experts stored one by one are fused; tensors stored fused stay as they are)."""
    from transformers import AutoConfig

    from expertmerge.io.layout import TensorLayout, meta_model

    stored = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    layout = TensorLayout(meta_model(AutoConfig.from_pretrained(config_folder)), stored, str(config_folder))
    names = [name for name in layout.model.state_dict() if name in layout]
    return {name: layout.read(tensors.__getitem__, name) for name in names}


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory) -> tuple[Path, list[dict], dict[str, torch.Tensor]]:
    metadata, tensors = _fixture()
    root = tmp_path_factory.mktemp("mergekit_moe_inputs")
    configs = json.loads(metadata["model_configs"])
    tokenizer = json.loads(metadata["tokenizer_files"])
    models: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("inputs/"):
            _, family, model, name = key.split("/", 3)
            models.setdefault((family, model), {})[name] = tensor
    for (family, model), state in models.items():
        folder = root / family / model
        folder.mkdir(parents=True)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(configs[family]))
        for filename, text in tokenizer.items():
            (folder / filename).write_text(text)
    return root, json.loads(metadata["cases"]), tensors


CASES = [
    "mixtral_cheap_embed_fp32",
    "mixtral_hidden_bf16_top1",
    "qwen_hidden_avg_shared_fp32",
    "qwen3_cheap_embed_fp32",
    "mixtral_random_seeded",
]


@pytest.mark.parametrize("case_id", CASES)
def test_same_tensors_as_mergekit_moe(case_id: str, parity_models, tmp_path: Path) -> None:
    root, cases, tensors = parity_models
    case = next(c for c in cases if c["id"] == case_id)
    text = json.dumps(case["config"])
    for family in ("llama", "qwen3"):
        text = text.replace("{" + family + "}", str(root / family))
    config = json.loads(text)
    if case.get("random_seed") is not None:  # mergekit's --random-seed is our opt-in `expertmerge: {seed}`
        config["expertmerge"] = {"seed": case["random_seed"]}
    out = tmp_path / "moe"
    build_mergekit_moe(parse_moe_config(config), out, progress=False)

    prefix = f"cases/{case_id}/"
    # Both read as transformers 5 loads them: the fixture holds mergekit's output (some cases with the routed
    # experts fused), ours is written as save_pretrained writes it (one tensor per routed expert).
    expected = _as_loaded(out, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    ours = _as_loaded(out, load_file(str(out / "model.safetensors")))
    assert set(ours) == set(expected)
    differences = {name: (ours[name].double() - expected[name].double()).abs().max().item() for name in ours}
    assert max(differences.values()) == 0.0, {k: v for k, v in differences.items() if v}
    assert all(ours[name].dtype == expected[name].dtype for name in ours)
    model, info = _load(out)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert type(model).__name__ == {"mixtral": "MixtralForCausalLM", "qwen": "Qwen2MoeForCausalLM"}.get(
        case_id.split("_")[0], "Qwen3MoeForCausalLM"
    )


# ------------------------------------------------------------------------------------------------ errors
def _config(**changes) -> dict:
    config = {
        "base_model": "base",
        "experts": [
            {"source_model": "a", "positive_prompts": ["one"]},
            {"source_model": "b", "positive_prompts": ["two"]},
        ],
    }
    config.update(changes)
    return config


def test_a_key_mergekit_ignores_is_a_warning_naming_it() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = parse_moe_config(_config(merge_method="ties"))
    assert config.gate_mode == "hidden" and config.experts_per_token == 2
    assert [str(w.message) for w in caught if w.category is IgnoredKeyWarning] == [
        "config: key 'merge_method' is not a mergekit-moe key; ignored (as mergekit does)."
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"experts_per_token": 3}, "experts_per_token is 3 but there are only 2 experts"),
        ({"experts": [{"source_model": "a"}, {"source_model": "b"}]}, "experts[0] has no positive_prompts"),
        ({"gate_mode": "learned"}, "key 'gate_mode'"),
        ({"expertmerge": {"shared_merge": "ties"}}, "key 'expertmerge.shared_merge' is not supported"),
        ({"base_model": "base+lora"}, "names a LoRA"),
    ],
)
def test_config_mistakes_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ExpertMergeError) as error:
        parse_moe_config(_config(**changes))
    assert message in str(error.value)


def test_deepseek_output_is_refused_naming_the_alternatives() -> None:
    config = parse_moe_config(_config(shared_experts=[{"source_model": "base"}]))
    with pytest.raises(ExpertMergeError, match="no DeepSeek-MoE .* architecture: qwen"):
        select_format(config, ["llama"] * 4)
    assert select_format(parse_moe_config(_config()), ["llama"] * 3).name == "mixtral"
    with pytest.raises(ExpertMergeError, match="no output family fits"):
        select_format(parse_moe_config(_config(architecture="qwen3")), ["llama"] * 3)


def test_opt_in_shared_tensors_come_from_the_named_model(clowncar: Path, tmp_path: Path) -> None:
    """`expertmerge: {shared_tensors: DIR}` (e.g. a learned merge): attention etc. from DIR, FFNs from the experts."""
    from expertmerge.zoo_registry import resolve_path

    config = yaml.safe_load(CLOWNCAR.read_text())
    config["expertmerge"] = {"shared_tensors": "zoo://tiny/experts/sort"}
    out = tmp_path / "moe"
    build_mergekit_moe(parse_moe_config(config), out, progress=False)
    ours, plain = load_file(str(out / "model.safetensors")), load_file(str(clowncar / "model.safetensors"))
    donor = load_file(str(Path(resolve_path("zoo://tiny/experts/sort")) / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(ours[name], donor[name].to(torch.bfloat16))
    assert not torch.equal(ours[name], plain[name])  # the plain config takes the base's
    experts = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert torch.equal(ours[experts], plain[experts])
    router = "model.layers.1.block_sparse_moe.gate.weight"
    assert (ours[router].float() - plain[router].float()).abs().max() > 1e-3  # gates from the donor's states


# ------------------------------------------------------------------------- opt-in router fitted to calib data
CLOWNCAR_ROUTER = (
    ROOT / "configs" / "mergekit_moe_clowncar_router.yaml"
)  # the docs example + expertmerge.router


def _router_config(**router) -> dict:
    config = yaml.safe_load(CLOWNCAR_ROUTER.read_text())
    config["expertmerge"]["router"].update(router)
    return config


def _calib_reader():
    """calib_data's reading of `router.calib` texts, given to the build as the `moe` command gives it."""
    from calib_data.datamodule import CalibrationDataModule
    from calib_data.tasks import TaskSpec
    from expertmerge.moe.mergekit_moe_router import CalibrationReader

    return CalibrationReader(TaskSpec, CalibrationDataModule)


@torch.no_grad()
def _routing(folder: Path, datamodule) -> tuple[dict[str, float], float]:
    """Held-out KL to each task's own expert, and the share of (token, layer) routes whose top-1 is that expert."""
    from expertmerge.moe.mergekit_moe_router import heldout_kl
    from expertmerge.teachers import TeacherSettings, teacher_targets

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    teachers = {
        f"expert{i}": resolve_path(e["source_model"]) for i, e in enumerate(_router_config()["experts"])
    }
    targets, _ = teacher_targets(datamodule, teachers, TeacherSettings(hidden_layers=()), splits=("eval",))
    seen: dict[int, torch.Tensor] = {}
    for layer, block in enumerate(model.model.layers):
        block.mlp.gate.register_forward_hook(
            lambda m, args, out, layer=layer: seen.__setitem__(layer, args[0])
        )
    hits = total = 0
    for spec in datamodule.tasks:
        samples = datamodule.task_samples(spec.name, "eval")
        own = int(spec.expert.removeprefix("expert"))
        model(input_ids=samples.input_ids, attention_mask=samples.attention_mask)
        real = samples.attention_mask.bool().reshape(-1)
        for layer, router_input in seen.items():
            top1 = (router_input @ model.model.layers[layer].mlp.gate.weight.T).argmax(-1).reshape(-1)[real]
            hits, total = hits + int((top1 == own).sum()), total + int(real.sum())
    return heldout_kl(model, datamodule, targets), hits / total


def test_router_fitted_and_tuned_on_calibration_data_beats_mergekit_gates_on_heldout_texts(
    clowncar: Path, tmp_path: Path
) -> None:
    """`expertmerge: {router: {calib, tune_steps}}` on the docs example: the routers start from the discriminant of
    each expert's calibration texts (through the shared tensors with that expert's FFN) and are tuned against the
    experts' logits. On held-out texts (never fitted on) the mean KL to each text's own expert falls from
    mergekit's `hidden` gates (0.159) to fitted (0.133) to tuned (0.092), it is lower for the base, reverse and
    sort experts (e.g. base 0.197 -> 0.005), and the top-1 route goes to the text's own expert far more often
    (0.25 -> 0.55 of token-layer routes).

    Not for arith (0.061 with mergekit's gates, 0.074 tuned, 0.110 fitted): the shared attention is the base's,
    and arith's texts are served best by a mix of FFNs, not by arith's own: mergekit's gates send them at layer 1
    to (arith, sort), which tuning (top-2 routing gives no gradient toward experts it does not pick) does not
    find from the fitted rows, nor keep from mergekit's rows (it trades arith for the other experts: 0.075).
    """
    from expertmerge.moe.mergekit_moe_router import router_data

    config = parse_moe_config(_router_config())
    assert {k: v for k, v in _router_config().items() if k != "expertmerge"} == yaml.safe_load(
        CLOWNCAR.read_text()
    )
    out = tmp_path / "moe"
    summary = build_mergekit_moe(config, out, progress=False, calibration=_calib_reader())
    assert summary.router == "fitted to calibration data (discriminant), tuned 30 steps"
    kl = summary.router_kl
    assert list(kl) == ["mergekit gates", "fitted", "tuned"]
    assert kl["tuned"] < 0.8 * kl["fitted"] and kl["fitted"] < 0.9 * kl["mergekit gates"], kl
    datamodule = router_data(config, Path(resolve_path("zoo://tiny/base")), reader=_calib_reader())
    hidden_kl, hidden_accuracy = _routing(clowncar, datamodule)
    tuned_kl, tuned_accuracy = _routing(out, datamodule)
    # The build scored mergekit's rows on the same held-out texts and weights (fp32 of the bf16 tensors).
    assert kl["mergekit gates"] == pytest.approx(sum(hidden_kl.values()) / 4, rel=1e-4)
    assert sum(tuned_kl.values()) < 0.7 * sum(hidden_kl.values())
    assert all(tuned_kl[e] < hidden_kl[e] for e in ("expert0", "expert2", "expert3")), (hidden_kl, tuned_kl)
    assert tuned_kl["expert0"] < 0.1 * hidden_kl["expert0"]
    assert tuned_accuracy > 1.5 * hidden_accuracy, (hidden_accuracy, tuned_accuracy)
    # Only the routers differ from the plain config's output.
    ours, plain = load_file(str(out / "model.safetensors")), load_file(str(clowncar / "model.safetensors"))
    assert set(ours) == set(plain)
    assert all(
        torch.equal(ours[n], plain[n])
        for n in plain
        if not n.endswith(("block_sparse_moe.gate.weight", ".mlp.gate.weight"))
    )


def test_router_key_mistakes_name_the_key() -> None:
    with pytest.raises(
        ExpertMergeError, match=r"'expertmerge.router.tune' is not supported; expertmerge.router takes"
    ):
        parse_moe_config(_router_config(tune=3))
    with pytest.raises(ExpertMergeError, match=r"router.calib\[1\].expert is 'zoo://nope'"):
        build_mergekit_moe(
            parse_moe_config(
                _router_config(
                    calib=[
                        {"expert": 0, "sources": ["x.jsonl"]},
                        {"expert": "zoo://nope", "sources": ["x.jsonl"]},
                    ]
                )
            ),
            "/tmp/never-written",
            progress=False,
        )
    # moe/ reads calibration texts through the reader its caller gives (it imports no calib_data).
    with pytest.raises(ExpertMergeError, match=r"expertmerge.router.calib needs a calibration reader"):
        build_mergekit_moe(parse_moe_config(_router_config()), "/tmp/never-written", progress=False)
