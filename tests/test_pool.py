"""ExpertPool on tiny real Llama checkpoints: reading, task vectors, and each compatibility error."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from conftest import EXPERT_NAMES, copy_model, perturbed, save_model, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

from expertmerge.errors import ExpertMergeError
from expertmerge.pool import ExpertPool, natural_key


def _pool(tiny_models, **kwargs) -> ExpertPool:
    return ExpertPool(str(tiny_models.base), {n: str(p) for n, p in tiny_models.experts.items()}, **kwargs)


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _broken_pool(tiny_models, tmp_path, expert: str = "beta") -> tuple[ExpertPool, Path]:
    """A pool whose expert `expert` is a private copy the test may break."""
    experts = {n: str(p) for n, p in tiny_models.experts.items()}
    broken = copy_model(tiny_models.experts[expert], tmp_path / expert)
    experts[expert] = str(broken)
    return ExpertPool(str(tiny_models.base), experts), broken


# ------------------------------------------------------------------------------------------- reading


def test_task_vectors_equal_expert_minus_base_in_fp32(tiny_models):
    pool = _pool(tiny_models).validate()
    base = tiny_models.state_dicts["base"]
    for name in pool.merged_names:
        vectors = pool.task_vectors(name, dtype=torch.float32)
        assert len(vectors) == len(EXPERT_NAMES)
        for expert, vector in zip(pool.expert_names, vectors, strict=True):
            expected = tiny_models.state_dicts[expert][name] - base[name]
            torch.testing.assert_close(vector, expected, rtol=0, atol=0)


def test_task_vectors_default_to_bf16_cast_of_the_fp32_difference(tiny_models):
    pool = _pool(tiny_models)
    name = "model.layers.1.mlp.down_proj.weight"
    vectors = pool.task_vectors(name)
    assert all(v.dtype == torch.bfloat16 for v in vectors)
    expected = (tiny_models.state_dicts["gamma"][name] - tiny_models.state_dicts["base"][name]).bfloat16()
    assert torch.equal(vectors[2], expected)


def test_names_shapes_and_dtypes_come_from_the_base_checkpoint(tiny_models):
    pool = _pool(tiny_models)
    state = tiny_models.state_dicts["base"]
    assert sorted(pool.tensor_names) == sorted(state)
    names = pool.tensor_names
    assert names.index("model.layers.0.post_attention_layernorm.weight") < names.index(
        "model.layers.1.mlp.up_proj.weight"
    )
    assert pool.shape("model.embed_tokens.weight") == (64, 32)
    assert pool.stored_dtype("model.norm.weight") == torch.float32
    assert pool.config.model_type == "llama"
    assert pool.base_tensor("model.norm.weight", torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(
        pool.expert_tensor("beta", "lm_head.weight"), tiny_models.state_dicts["beta"]["lm_head.weight"]
    )


def test_sharded_checkpoints_read_the_same_as_single_files(tiny_models):
    single = _pool(tiny_models).validate()
    sharded = ExpertPool(
        str(tiny_models.sharded_base), {n: str(p) for n, p in tiny_models.sharded_experts.items()}
    ).validate()
    assert len(list(tiny_models.sharded_base.glob("model-*.safetensors"))) > 1
    assert sharded.tensor_names == single.tensor_names
    for (name, base_a, experts_a), (name_b, base_b, experts_b) in zip(
        single.iter_tensors(), sharded.iter_tensors(), strict=True
    ):
        assert name == name_b
        assert torch.equal(base_a, base_b)
        assert all(torch.equal(a, b) for a, b in zip(experts_a, experts_b, strict=True))


def test_bin_checkpoint_reads_the_same_as_safetensors(tiny_models):
    pool = ExpertPool(str(tiny_models.base), {"alpha": str(tiny_models.bin_expert)}).validate()
    assert pool.checkpoint("alpha").format == "bin"
    for name in pool.tensor_names:
        assert torch.equal(pool.expert_tensor("alpha", name), tiny_models.state_dicts["alpha"][name])


def test_iter_tensors_is_lazy_and_yields_base_then_experts_in_order(tiny_models):
    pool = _pool(tiny_models)
    stream = pool.iter_tensors(dtype=torch.float64)
    assert isinstance(stream, types.GeneratorType)
    name, base, experts = next(stream)
    assert name == pool.merged_names[0]
    assert base.dtype == torch.float64 and len(experts) == 3
    assert torch.equal(experts[1], tiny_models.state_dicts["beta"][name].double())


def test_list_of_experts_is_named_after_folders_and_clashes_get_parent_prefixes(tiny_models, tmp_path):
    pool = ExpertPool(str(tiny_models.base), [str(p) for p in tiny_models.experts.values()])
    assert pool.expert_names == list(EXPERT_NAMES)
    run_a = copy_model(tiny_models.experts["alpha"], tmp_path / "runA" / "ckpt")
    run_b = copy_model(tiny_models.experts["beta"], tmp_path / "runB" / "ckpt")
    pool = ExpertPool(str(tiny_models.base), [str(run_a), str(run_b)])
    assert pool.expert_names == ["runA-ckpt", "runB-ckpt"]
    assert pool.expert_dirs["runB-ckpt"] == run_b
    zoo_names = ExpertPool("b", ["zoo://tiny/experts/arith", "zoo://tiny/experts/sort"]).expert_names
    assert zoo_names == ["arith", "sort"]


def test_include_exclude_choose_merged_tensors_and_default_to_all(tiny_models):
    everything = _pool(tiny_models)
    assert everything.merged_names == everything.tensor_names
    attention_only = _pool(tiny_models, include=[r"self_attn\."], exclude=[r"\.v_proj\."])
    assert attention_only.merged_names
    assert all("self_attn" in n and "v_proj" not in n for n in attention_only.merged_names)
    assert len(attention_only.merged_names) == 2 * 3


def test_content_hashes_key_base_and_each_expert(tiny_models):
    hashes = _pool(tiny_models).content_hashes()
    assert list(hashes) == ["base", *EXPERT_NAMES]
    assert len(set(hashes.values())) == 4


def test_hub_id_is_downloaded_with_snapshot_download(tiny_models, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(repo_id)
        return str(tiny_models.experts["alpha"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pool = ExpertPool(str(tiny_models.base), {"hub": "some-org/some-expert"}).validate()
    assert calls == ["some-org/some-expert"]
    assert pool.expert_dirs["hub"] == tiny_models.experts["alpha"]


def test_tensor_order_sorts_layer_numbers_numerically():
    names = ["model.layers.10.w", "model.layers.2.w", "lm_head.weight", "model.layers.1.w"]
    assert sorted(names, key=natural_key) == [
        "lm_head.weight",
        "model.layers.1.w",
        "model.layers.2.w",
        "model.layers.10.w",
    ]


# ---------------------------------------------------------------------------------------- validation


def test_missing_expert_folder_is_named(tiny_models, tmp_path):
    pool = ExpertPool(str(tiny_models.base), {"ghost": str(tmp_path / "nowhere")})
    with pytest.raises(ExpertMergeError, match=r"expert 'ghost'.*nowhere.*does not exist"):
        pool.validate()


def test_folder_without_config_is_named(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    pool = ExpertPool(str(tiny_models.base), {"empty": str(tmp_path / "empty")})
    with pytest.raises(ExpertMergeError, match=r"expert 'empty'.*no config.json"):
        pool.validate()


def test_folder_without_weights_is_named(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ExpertMergeError, match=r"expert 'beta'.*no weights found"):
        pool.validate()


def test_different_model_type_is_named(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path)
    _edit_config(broken, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ExpertMergeError, match=r"expert 'beta'.*model_type 'mistral'.*'llama'"):
        pool.validate()


def test_different_vocab_size_is_named(tiny_models, tmp_path):
    save_model(perturbed(tiny_llama(seed=0, vocab_size=80), seed=5), tmp_path / "wide")
    pool = ExpertPool(str(tiny_models.base), {"wide": str(tmp_path / "wide")})
    with pytest.raises(ExpertMergeError, match=r"expert 'wide'.*vocab_size=80.*64"):
        pool.validate()


def test_tied_against_untied_embeddings_is_named(tiny_models, tmp_path):
    save_model(tiny_llama(seed=0, tie_word_embeddings=True), tmp_path / "tied")
    pool = ExpertPool(str(tiny_models.base), {"tied": str(tmp_path / "tied")})
    with pytest.raises(ExpertMergeError, match=r"expert 'tied'.*tie_word_embeddings=True.*False"):
        pool.validate()


def test_different_tokenizer_is_named_and_missing_tokenizer_is_only_noted(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path)
    tokenizer = json.loads((broken / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["w4"], vocab["w5"] = vocab["w5"], vocab["w4"]
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExpertMergeError, match=r"expert 'beta'.*different tokenizer.*tokenizer.json"):
        pool.validate()

    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    pool = ExpertPool(str(tiny_models.base), {"beta": str(broken)}).validate()
    assert any("beta" in note and "no tokenizer" in note for note in pool.notes)


def test_reformatted_tokenizer_with_same_ids_is_accepted(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path)
    tiny_tokenizer().save_pretrained(broken)
    tokenizer = json.loads((broken / "tokenizer.json").read_text())
    tokenizer["truncation"] = {
        "max_length": 16,
        "strategy": "LongestFirst",
        "stride": 0,
        "direction": "Right",
    }
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))
    pool.validate()


def test_extra_tensor_is_named(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path)
    _edit_weights(broken, lambda t: t.update({"model.layers.0.mlp.extra_adapter.weight": torch.zeros(4, 4)}))
    with pytest.raises(
        ExpertMergeError, match=r"expert 'beta'.*1 tensor\(s\) that the base lacks.*extra_adapter"
    ):
        pool.validate()


def test_missing_tensor_is_named(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path)
    _edit_weights(broken, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ExpertMergeError, match=r"expert 'beta'.*lacks 1 tensor.*layers.1.self_attn.k_proj"):
        pool.validate()


def test_shape_mismatch_is_named(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path, expert="gamma")
    _edit_weights(broken, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(48, 32)}))
    with pytest.raises(
        ExpertMergeError, match=r"expert 'gamma'.*'model.layers.0.mlp.up_proj.weight'.*\[48, 32\].*\[64, 32\]"
    ):
        pool.validate()


def test_nan_is_reported_when_the_tensor_is_read(tiny_models, tmp_path):
    pool, broken = _broken_pool(tiny_models, tmp_path)

    def poison(tensors):
        tensors["model.layers.1.mlp.gate_proj.weight"][3, 5] = float("nan")

    _edit_weights(broken, poison)
    pool.validate()  # headers only: values are checked when read
    with pytest.raises(
        ExpertMergeError, match=r"expert 'beta'.*'model.layers.1.mlp.gate_proj.weight'.*NaN/Inf"
    ):
        pool.task_vectors("model.layers.1.mlp.gate_proj.weight")
    pool.task_vectors("model.layers.0.mlp.gate_proj.weight")  # other tensors still read


def test_duplicate_sources_reserved_name_and_no_experts_are_refused(tiny_models):
    expert = str(tiny_models.experts["alpha"])
    with pytest.raises(ExpertMergeError, match="more than once"):
        ExpertPool(str(tiny_models.base), [expert, expert])
    with pytest.raises(ExpertMergeError, match="reserved"):
        ExpertPool(str(tiny_models.base), {"base": expert})
    with pytest.raises(ExpertMergeError, match="At least one expert"):
        ExpertPool(str(tiny_models.base), [])


def test_bad_or_empty_patterns_are_refused(tiny_models):
    with pytest.raises(ExpertMergeError, match=r"include: '\[' is not a valid regular expression"):
        _pool(tiny_models, include=["["])
    with pytest.raises(ExpertMergeError, match="No tensor matches"):
        _pool(tiny_models, include=["no_such_tensor"]).validate()


def test_a_tokenizer_json_replaced_with_the_same_size_and_mtime_is_read_anew(tiny_models, tmp_path):
    import os

    from expertmerge.io.tokenizer_ids import tokenizer_json_ids

    path = copy_model(tiny_models.base, tmp_path / "base") / "tokenizer.json"
    before = path.stat()
    vocab, _ = tokenizer_json_ids(path)
    assert (vocab["w4"], vocab["w5"]) == (4, 5)
    data = json.loads(path.read_text())
    data["model"]["vocab"]["w4"], data["model"]["vocab"]["w5"] = 5, 4  # two ids swapped: same byte count
    replacement = tmp_path / "tokenizer.json"
    replacement.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    assert replacement.stat().st_size == before.st_size
    os.replace(replacement, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    vocab, _ = tokenizer_json_ids(path)
    assert (vocab["w4"], vocab["w5"]) == (5, 4)


def test_an_expert_that_is_the_base_or_another_expert_is_refused(tiny_models, tmp_path):
    base, alpha = tiny_models.base, tiny_models.experts["alpha"]
    (tmp_path / "link").symlink_to(base)
    edited = copy_model(base, tmp_path / "base-copy")
    _edit_config(edited, _name_or_path="my-finetune")  # only the config differs: the task vector is zero
    cases = [
        ({"a": str(alpha), "b": f"{base}/."}, r"expert 'b' \(.*\) is the same folder as the base model"),
        (
            {"a": str(alpha), "b": str(tmp_path / "link")},
            r"expert 'b' .* is the same folder as the base model",
        ),
        (
            {"a": str(alpha), "b": str(edited)},
            r"expert 'b' .* has the same weights as the base model .*task vector is zero",
        ),
        (
            {"a": str(alpha), "b": f"{alpha}/"},
            r"expert 'b' .* is the same folder as expert 'a' .*list each expert once",
        ),
        (
            {"a": str(alpha), "b": str(copy_model(alpha, tmp_path / "alpha-copy"))},
            r"has the same weights as expert 'a'",
        ),
    ]
    for experts, expected in cases:
        with pytest.raises(ExpertMergeError, match=expected):
            ExpertPool(str(base), experts).validate()
        ExpertPool(str(base), experts, distinct=False).validate()  # mergekit's merges and MoEs allow it
    ExpertPool(str(base), {"a": str(alpha), "b": str(tiny_models.experts["beta"])}).validate()


def test_symphony_reference_is_its_own_base_but_two_equal_experts_are_refused(tiny_models, tmp_path):
    from expertmerge.symphony import SymphonyPool

    alpha, beta = str(tiny_models.experts["alpha"]), str(tiny_models.experts["beta"])
    SymphonyPool({"a": alpha, "b": beta}, "b").validate()  # the reference is the base: same folder, by design
    twin = str(copy_model(tiny_models.experts["beta"], tmp_path / "beta-twin"))
    with pytest.raises(
        ExpertMergeError, match=r"expert 'c' .* has the same weights as expert 'b' .*list each expert once"
    ):
        SymphonyPool({"a": alpha, "b": beta, "c": twin}, "b").validate()
