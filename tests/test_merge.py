"""The `merge` command end to end on tiny real Llama checkpoints: outputs, sharding, config errors, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXPERT_NAMES, copy_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertmerge import methods
from expertmerge.cli import main as cli_main
from expertmerge.cli.merge import merge_main
from expertmerge.errors import ExpertMergeError
from expertmerge.io.writer import PlannedTensor, parse_size, plan_shards
from expertmerge.merge import load_merge_config, run_merge

REPO = Path(__file__).resolve().parents[1]
METHOD_PARAMETERS = {
    "average": ({"weight": 1.0}, {}),
    "task_arithmetic": ({"weight": 0.6}, {"lambda": 0.8}),
    "ties": ({"weight": 1.0, "density": 0.5}, {"normalize": True}),
    "dare_linear": ({"weight": 0.7, "density": 0.6}, {"rescale": True}),
    "dare_ties": ({"weight": 1.0, "density": 0.6}, {}),
}


def _config(tiny_models, method: str = "ties", experts=EXPERT_NAMES, **top) -> dict:
    model_parameters, global_parameters = METHOD_PARAMETERS[method]
    config = {
        "merge_method": method,
        "base_model": str(tiny_models.base),
        "models": [
            {"model": str(tiny_models.experts[n]), "parameters": dict(model_parameters)} for n in experts
        ],
        "parameters": dict(global_parameters),
        "random_seed": 7,
    }
    config.update(top)
    return config


def _write(tmp_path: Path, config: dict, name: str = "merge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _direct(tiny_models, config: dict, experts=EXPERT_NAMES, read_dtype=None) -> dict[str, torch.Tensor]:
    """What calling `merge_tensor` on each tensor gives, with the config's parameters (inputs rounded to
    `read_dtype` first, as mergekit's `dtype` reads them)."""
    method = methods.get_method(config["merge_method"])
    model_parameters = [m.get("parameters", {}) for m in config["models"]]
    expert_params = [
        methods.ExpertParams(p.get("weight", 1.0), p.get("density", 1.0)) for p in model_parameters
    ]
    g = config.get("parameters", {})
    params = methods.MethodParams(
        normalize=g.get("normalize"),
        lambda_=g.get("lambda", 1.0),
        rescale=g.get("rescale"),
        int8_mask=g.get("int8_mask", False),
    )
    seed = config.get("random_seed", 0)
    states = tiny_models.state_dicts
    if read_dtype is not None:
        states = {m: {k: v.to(read_dtype).float() for k, v in state.items()} for m, state in states.items()}
    return {
        name: methods.merge_tensor(
            method,
            base,
            [states[e][name] for e in experts],
            expert_params,
            params,
            methods.tensor_generator(seed, name),
        )
        for name, base in states["base"].items()
    }


# --------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("method", list(METHOD_PARAMETERS))
def test_merged_folder_loads_generates_and_equals_merge_tensor(tiny_models, tmp_path, method):
    from transformers import AutoModelForCausalLM

    config = _config(tiny_models, method)
    summary = run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    expected = _direct(tiny_models, config)
    written = _read_all(tmp_path / "out")
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    if method != "average":  # every expert moved every tensor, so the merge moves them too
        assert not torch.equal(written["lm_head.weight"], tiny_models.state_dicts["base"]["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    generated = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    assert summary.tensors_merged == len(expected) and summary.tensors_copied == 0
    assert summary.num_experts == 3 and summary.num_shards == 1


def test_task_arithmetic_weight_one_on_one_expert_reproduces_it(tiny_models, tmp_path):
    config = _config(tiny_models, "task_arithmetic", experts=["beta"], parameters={})
    config["models"][0]["parameters"] = {"weight": 1.0}
    run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    written = _read_all(tmp_path / "out")
    for name, tensor in tiny_models.state_dicts["beta"].items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6)


def test_output_folder_has_config_tokenizer_card_and_resolved_config(tiny_models, tmp_path):
    config = _config(tiny_models, "ties", dtype="bfloat16")
    run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
    } <= files
    assert "merge_config.yaml" in files
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (tiny_models.base / "tokenizer.json").read_bytes()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert all(handle.get_slice(k).get_dtype() == "BF16" for k in handle.keys())  # noqa: SIM118
    card = (out / "README.md").read_text()
    from expertmerge.hashing import model_content_hash

    assert "ties" in card and model_content_hash(tiny_models.experts["gamma"]) in card
    resolved = load_merge_config(out / "merge_config.yaml")
    assert resolved.merge_method == "ties" and resolved.parameters["normalize"] is True and resolved.seed == 7
    assert [m.density for m in resolved.models] == [0.5] * 3


def test_sharded_output_equals_unsharded_and_loads(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    path = _write(tmp_path, _config(tiny_models, "dare_ties"))
    run_merge(path, out=tmp_path / "single", progress=False)
    summary = run_merge(path, out=tmp_path / "sharded", max_shard_bytes="30KB", progress=False)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert summary.num_shards == len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    single, sharded = _read_all(tmp_path / "single"), _read_all(tmp_path / "sharded")
    assert set(single) == set(sharded)
    assert all(torch.equal(single[n], sharded[n]) for n in single)
    assert all(f.stat().st_size <= 30_000 for f in (tmp_path / "sharded").glob("model-*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    assert torch.equal(model.state_dict()["model.norm.weight"], single["model.norm.weight"])


def test_include_exclude_copy_the_other_tensors_from_the_base(tiny_models, tmp_path):
    config = _config(tiny_models, "task_arithmetic", include=[r"\.mlp\."], exclude=[r"layers\.1\."])
    summary = run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    written, base, expected = (
        _read_all(tmp_path / "out"),
        tiny_models.state_dicts["base"],
        _direct(tiny_models, config),
    )
    merged = [n for n in written if ".mlp." in n and "layers.1." not in n]
    assert summary.tensors_merged == len(merged) == 3
    for name in written:
        assert torch.equal(written[name], expected[name] if name in merged else base[name]), name


def test_mergekit_ties_config_gives_the_same_tensors_as_the_methods(tiny_models, tmp_path):
    # A config as mergekit's README writes it: base listed among the models without parameters,
    # global density default, int8_mask, bfloat16 output.
    text = f"""
models:
  - model: {tiny_models.base}
    # no parameters necessary for base model
  - model: {tiny_models.experts["alpha"]}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {tiny_models.experts["gamma"]}
    parameters:
      weight: 0.3
merge_method: ties
base_model: {tiny_models.base}
parameters:
  normalize: true
  int8_mask: true
  density: 0.7
dtype: bfloat16
"""
    path = tmp_path / "mergekit.yaml"
    path.write_text(text)
    summary = run_merge(path, out=tmp_path / "out", progress=False)
    assert summary.num_experts == 2  # the base's own task vector is zero and is skipped, as in mergekit
    direct = _direct(
        tiny_models,
        {
            "merge_method": "ties",
            "models": [
                {"parameters": {"density": 0.5, "weight": 0.5}},
                {"parameters": {"density": 0.7, "weight": 0.3}},
            ],
            "parameters": {"normalize": True, "int8_mask": True},
        },
        experts=["alpha", "gamma"],
        read_dtype=torch.bfloat16,  # mergekit's `dtype`: the precision inputs are read in
    )
    written = _read_all(tmp_path / "out")
    for name, tensor in direct.items():
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], tensor.to(torch.bfloat16)), name


def test_average_without_base_uses_the_first_model_for_structure(tiny_models, tmp_path):
    config = _config(tiny_models, "average")
    del config["base_model"]
    run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    written, states = _read_all(tmp_path / "out"), tiny_models.state_dicts
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(written[name], sum(states[e][name] for e in EXPERT_NAMES) / 3)


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("edit", "key", "says"),
    [
        (lambda c: c.update(merge_method="slurp"), "merge_method", "Unknown merge method 'slurp'"),
        (lambda c: c.pop("base_model"), "base_model", "needs a base model"),
        (lambda c: c.update(slices=[{"sources": []}]), "slices[0].sources", "non-empty list"),
        (
            lambda c: c["models"][1]["parameters"].update(weight=[0.1, "x"]),
            "models[1].parameters.weight",
            "number",
        ),
        (
            lambda c: c["models"][0]["parameters"].update(
                density=[{"filter": "mlp", "value": 1.5}, {"value": 1}]
            ),
            "models[0].parameters.density",
            "out of range",
        ),
        (
            lambda c: c["parameters"].update(weight={"filter": "self_attn"}),
            "parameters.weight",
            "a filtered value is",
        ),
        (lambda c: c.update(tokenizer_source="org/other"), "tokenizer_source", "none of base, union"),
        (
            lambda c: c.update(tokenizer={"source": "base", "pad_to_multiple_of": 0}),
            "tokenizer.pad_to_multiple_of",
            "positive",
        ),
        (
            lambda c: c["models"][2]["parameters"].update(density="half"),
            "models[2].parameters.density",
            "number",
        ),
        (
            lambda c: c["models"][2]["parameters"].update(density=1.5),
            "models[2].parameters.density",
            "out of range",
        ),
        (
            lambda c: c["models"][1].update(model="/no/such/expert"),
            "models[1].model",
            "not an existing folder",
        ),
        (lambda c: c.update(dtype="float64"), "dtype", "not one of"),
        (lambda c: c.update(seed=1), "seed", "disagree"),
        (lambda c: c["parameters"].update(normalize="yes"), "parameters.normalize", "true or false"),
        (lambda c: c.update(include=["("]), "include", "not a valid regular expression"),
        (lambda c: c.update(chat_template="vicuna"), "chat_template", "paste the Jinja template"),
    ],
)
def test_bad_config_fails_naming_file_and_key_before_writing(tiny_models, tmp_path, edit, key, says):
    config = _config(tiny_models, "ties")
    edit(config)
    path = _write(tmp_path, config, "bad.yaml")
    with pytest.raises(ExpertMergeError) as caught:
        run_merge(path, out=tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "bad.yaml" in message and f"'{key}'" in message and says in message, message
    assert not (tmp_path / "out").exists()


def test_parameters_a_method_ignores_are_one_warning_line_and_the_merge_runs(tiny_models, tmp_path):
    import io

    from rich.console import Console

    config = _config(tiny_models, "task_arithmetic")
    config["models"][0]["parameters"]["density"] = 0.5  # mergekit's task_arithmetic ignores it
    console = Console(file=io.StringIO(), width=300)
    run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False, console=console)
    lines = [line for line in console.file.getvalue().splitlines() if "warning" in line]
    assert len(lines) == 1 and "'models[0].parameters.density'" in lines[0] and "ignored" in lines[0]
    del config["models"][0]["parameters"]["density"]
    written, direct = _read_all(tmp_path / "out"), _direct(tiny_models, config)
    assert all(torch.equal(written[name], tensor) for name, tensor in direct.items())


def test_incompatible_expert_fails_before_any_output(tiny_models, tmp_path):
    broken = copy_model(tiny_models.experts["beta"], tmp_path / "beta")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    config = _config(tiny_models, "ties")
    config["models"][1]["model"] = str(broken)
    with pytest.raises(ExpertMergeError, match=r"expert 'beta'.*up_proj.*\[48, 32\]"):
        run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- atomicity


def test_existing_output_is_refused_without_force_and_left_untouched(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = _write(tmp_path, _config(tiny_models, "ties"))
    with pytest.raises(ExpertMergeError, match="already exists.*--force"):
        run_merge(path, out=out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # --force replaces only what expertmerge wrote (issue 18): a user's folder is refused and kept.
    with pytest.raises(ExpertMergeError, match="not written by expertmerge"):
        run_merge(path, out=out, force=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    previous = tmp_path / "previous"
    assert merge_main(["--config", str(path), "--out", str(previous), "--no-progress"]) == 0
    (previous / "keep.txt").write_text("mine")
    assert merge_main(["--config", str(path), "--out", str(previous), "--force", "--no-progress"]) == 0
    assert not (previous / "keep.txt").exists() and (previous / "model.safetensors").exists()


def test_failing_merge_leaves_no_output_and_no_temporary_folder(tiny_models, tmp_path):
    broken = copy_model(tiny_models.experts["gamma"], tmp_path / "models" / "gamma")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"][0] = float("inf")  # headers are fine: found only when read, mid-merge
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    config = _config(tiny_models, "ties")
    config["models"][2]["model"] = str(broken)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(ExpertMergeError, match=r"expert 'gamma'.*'model.norm.weight'.*NaN/Inf"):
        run_merge(_write(tmp_path, config), out=outputs / "merged", max_shard_bytes="30KB", progress=False)
    assert list(outputs.iterdir()) == []


def test_cli_merge_reports_errors_without_traceback(tiny_models, tmp_path, capsys):
    config = _config(tiny_models, "ties")
    config["models"][0]["parameters"]["weight"] = [0.2, "x"]
    path = _write(tmp_path, config, "gradient.yaml")
    assert cli_main(["merge", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "gradient.yaml" in error and "models[0].parameters.weight" in error and "Traceback" not in error
    assert (
        cli_main(
            ["merge", "--config", str(_write(tmp_path, _config(tiny_models))), "--out", str(tmp_path / "ok")]
        )
        == 0
    )
    assert "merge summary" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_shipped_config_validates_and_points_at_the_zoo(method):
    config = load_merge_config(REPO / "configs" / f"merge_{method}.yaml")
    assert config.merge_method == method
    assert config.base_model == "zoo://tiny/base"
    assert [m.source for m in config.models] == [
        f"zoo://tiny/experts/{t}" for t in ("arith", "reverse", "sort")
    ]


def test_shard_plan_and_sizes():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    with pytest.raises(ExpertMergeError, match="not a size"):
        parse_size("lots")

    def planned(name: str, size: int, dtype: torch.dtype) -> PlannedTensor:
        return PlannedTensor(name, (size,), dtype, lambda: torch.zeros(size, dtype=dtype))

    tensors = [planned(f"t{i}", 10, torch.float32) for i in range(5)] + [
        planned("big", 100, torch.float32),
        planned("ids", 3, torch.int64),
    ]
    shards = plan_shards(tensors, 100)
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"], ["ids"]]
