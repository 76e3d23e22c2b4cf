"""Slices on tiny real Llama checkpoints: a passthrough frankenmerge that changes depth loads and generates,
per-layer config lists follow the layers, `scale` and slice errors name their key, and `chat_template`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from expertmerge.errors import ExpertMergeError
from expertmerge.merge import run_merge
from expertmerge.merge_config.parse import parse_merge_config
from expertmerge.merge_config.slices import layer_config, plan_tensors


def _write(tmp_path: Path, config: dict, name: str = "slices.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _frankenmerge(tiny_models, scale=0.5) -> dict:
    return {
        "merge_method": "passthrough",
        "base_model": str(tiny_models.experts["alpha"]),
        "slices": [
            {"sources": [{"model": str(tiny_models.experts["alpha"]), "layer_range": [0, 2]}]},
            {
                "sources": [
                    {
                        "model": str(tiny_models.experts["beta"]),
                        "layer_range": [1, 2],
                        "parameters": {"scale": [{"filter": "o_proj", "value": scale}, {"value": 1.0}]},
                    }
                ]
            },
        ],
    }


def test_passthrough_frankenmerge_changes_depth_loads_and_generates(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    summary = run_merge(_write(tmp_path, _frankenmerge(tiny_models)), out=tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    alpha, beta = tiny_models.state_dicts["alpha"], tiny_models.state_dicts["beta"]
    # Layers 0-1 are alpha's, layer 2 is beta's layer 1 (its o_proj halved). Outside the layers, as in
    # mergekit: the embeddings come from the first slice's model, the final norm and lm_head from the last's.
    assert torch.equal(
        written["model.layers.1.mlp.up_proj.weight"], alpha["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(
        written["model.layers.2.mlp.up_proj.weight"], beta["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(
        written["model.layers.2.self_attn.o_proj.weight"],
        0.5 * beta["model.layers.1.self_attn.o_proj.weight"],
    )
    assert torch.equal(written["model.embed_tokens.weight"], alpha["model.embed_tokens.weight"])
    assert torch.equal(written["lm_head.weight"], beta["lm_head.weight"])
    assert torch.equal(written["model.norm.weight"], beta["model.norm.weight"])
    layers = {name.split(".")[2] for name in written if name.startswith("model.layers.")}
    assert layers == {"0", "1", "2"} and summary.num_experts == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_shipped_frankenmerge_config_validates_and_stacks_two_slices():
    from expertmerge.merge_config.parse import load_merge_config

    config = load_merge_config(Path(__file__).resolve().parents[1] / "configs" / "merge_passthrough.yaml")
    assert config.merge_method == "passthrough" and [s.num_layers for s in config.slices] == [2, 2]
    assert config.referenced_models == ["zoo://tiny/experts/arith", "zoo://tiny/experts/sort"]


def test_per_layer_config_lists_follow_the_layers_they_read():
    from transformers import LlamaConfig

    base = {"num_hidden_layers": 4, "layer_types": ["s", "f", "s", "f"], "architectures": ["X"] * 4}
    other = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"]}
    layers = [("base", 0), ("base", 1), ("other", 3)]
    written = layer_config(base, layers, {"base": base, "other": other}, LlamaConfig(num_hidden_layers=4))
    assert written["num_hidden_layers"] == 3 and written["layer_types"] == ["s", "f", "d"]
    assert written["architectures"] == ["X"] * 4  # not a per-layer list


def test_layer_count_is_written_under_the_familys_own_key():
    from transformers import GPT2Config

    base = {"model_type": "gpt2", "n_layer": 4, "n_embd": 32}
    written = layer_config(base, [("base", 0), ("base", 2)], {"base": base}, GPT2Config(n_layer=4, n_embd=32))
    assert written == {"model_type": "gpt2", "n_layer": 2, "n_embd": 32}


def test_plan_gives_each_output_layer_its_inputs_and_t():
    config = parse_merge_config(
        {
            "merge_method": "ties",
            "base_model": "org/base",
            "slices": [
                {
                    "sources": [
                        {"model": "org/base", "layer_range": [1, 4]},
                        {"model": "org/a", "layer_range": [0, 3]},
                    ]
                }
            ],
        }
    )
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.w" for i in range(4)), "model.norm.weight"]
    plan = {t.name: t for t in plan_tensors(config, "org/base", lambda model: names, lambda model: 4)}
    assert list(plan) == [
        names[0],
        "model.layers.0.mlp.w",
        "model.layers.1.mlp.w",
        "model.layers.2.mlp.w",
        names[-1],
    ]
    middle = plan["model.layers.1.mlp.w"]
    assert [(i.model, i.name) for i in middle.inputs] == [
        ("org/base", "model.layers.2.mlp.w"),
        ("org/a", "model.layers.1.mlp.w"),
    ]
    assert (middle.t, middle.base, plan["model.layers.2.mlp.w"].t, plan[names[0]].t) == (
        0.5,
        "org/base",
        1.0,
        0.0,
    )


@pytest.mark.parametrize(
    ("edit", "key", "says"),
    [
        (
            lambda c: c["slices"][1]["sources"][0].update(parameters={"scale": math.nan}),
            "slices[1].sources[0].parameters.scale",
            "finite",
        ),
        (
            lambda c: c["slices"][0]["sources"].append(
                dict(c["slices"][1]["sources"][0], layer_range=[0, 2])
            ),
            "slices[0].sources",
            "at most 1 source",
        ),
        (
            lambda c: c["slices"][0]["sources"][0].update(layer_range=[2, 1]),
            "slices[0].sources[0].layer_range",
            "start < end",
        ),
        (
            lambda c: c["slices"][0]["sources"][0].update(layer_range=[0, 5]),
            "slices[0].sources[0].layer_range",
            "past the 2 layer",
        ),
    ],
)
def test_bad_slices_fail_naming_the_key_before_writing(tiny_models, tmp_path, edit, key, says):
    config = _frankenmerge(tiny_models)
    edit(config)
    with pytest.raises(ExpertMergeError) as caught:
        run_merge(_write(tmp_path, config, "bad.yaml"), out=tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "bad.yaml" in message and f"'{key}'" in message and says in message, message
    assert not (tmp_path / "out").exists()


def test_same_range_slices_need_the_base_among_their_sources(tiny_models, tmp_path):
    config = {
        "merge_method": "ties",
        "base_model": str(tiny_models.base),
        "slices": [{"sources": [{"model": str(tiny_models.experts["alpha"]), "layer_range": [0, 2]}]}],
    }
    with pytest.raises(ExpertMergeError, match=r"'slices\[0\].sources'.*needs the base model"):
        run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)


def test_chat_template_by_name_is_written_with_the_tokenizer(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    config = {
        "merge_method": "linear",
        "models": [{"model": str(tiny_models.experts[n])} for n in ("alpha", "beta")],
        "chat_template": "chatml",
    }
    run_merge(_write(tmp_path, config), out=tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
