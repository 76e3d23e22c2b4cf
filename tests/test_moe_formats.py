"""Fused MoE export: formats load in `transformers` with no missing/unexpected keys, forced routing is exact,
routers are initialised from calibration statistics, and writing is atomic."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    EXPERT_NAMES,
    perturbed,
    save_model,
    tiny_llama_config,
    tiny_model_settings,
    tiny_tokenizer,
)
from moe_routing import forced_routing, router_of

from expertmerge.errors import ExpertMergeError
from expertmerge.moe import (
    DegenerateRouterWarning,
    build_moe_config,
    expert_shared_tensors,
    mean_token_embeddings,
    router_degeneracy,
    router_from_embeddings,
    router_from_hidden,
    router_input_statistics,
    router_random,
    shared_tensor_names,
    write_moe_checkpoint,
)
from expertmerge.pool import BASE, ExpertPool

HIDDEN, LAYERS, VOCAB = 32, 2, 64


@dataclass
class Family:
    """A tiny dense base and experts fine-tuned from it, saved as folders."""

    model_type: str
    architecture: str
    base: Path
    experts: dict[str, Path]

    def pool(self) -> ExpertPool:
        return ExpertPool(str(self.base), {name: str(folder) for name, folder in self.experts.items()})


# Granite's multipliers, none 1 and the attention's not 1/sqrt(head_dim): a GraniteMoE that dropped any of them
# would not reproduce the dense logits.
GRANITE_MULTIPLIERS = dict(
    embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5
)


def _tiny_dense(kind: str):
    from transformers import (
        GraniteConfig,
        GraniteForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    settings = tiny_model_settings(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS
    )
    settings.pop("tie_word_embeddings")
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**settings, tie_word_embeddings=False)).eval()
    if kind == "granite":
        # tied embeddings and attention biases, as in Granite 3
        config = GraniteConfig(
            **settings, **GRANITE_MULTIPLIERS, attention_bias=True, tie_word_embeddings=True
        )
        return GraniteForCausalLM(config).eval()
    if kind == "olmo2":
        return Olmo2ForCausalLM(Olmo2Config(**settings, tie_word_embeddings=False)).eval()
    # head_dim * heads != hidden and tied embeddings: both must survive the conversion
    return Qwen3ForCausalLM(Qwen3Config(**settings, head_dim=16, tie_word_embeddings=True)).eval()


ARCHITECTURES = {
    "qwen2": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3MoeForCausalLM",
    "granite": "GraniteMoeForCausalLM",
    "olmo2": "FlexOlmoForCausalLM",
}


@pytest.fixture(scope="module")
def families(tiny_models, tmp_path_factory) -> dict[str, Family]:
    found = {"llama": Family("llama", "MixtralForCausalLM", tiny_models.base, dict(tiny_models.experts))}
    tokenizer = tiny_tokenizer()
    for kind, architecture in ARCHITECTURES.items():
        root = tmp_path_factory.mktemp(kind)
        base = _tiny_dense(kind)
        folders = {"base": save_model(base, root / "base", tokenizer=tokenizer)}
        for k, name in enumerate(EXPERT_NAMES[:2]):
            folders[name] = save_model(
                perturbed(base, seed=10 + k, scale=0.05), root / name, tokenizer=tokenizer
            )
        experts = {name: folders[name] for name in EXPERT_NAMES[:2]}
        found[kind] = Family(kind, architecture, folders["base"], experts)
    return found


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(tmp_path_factory.mktemp("cache")))


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def _assert_loads_cleanly(info: dict) -> None:
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def _token_batches(seed: int, rows: int = 2, length: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=generator)


def _moe_block(model, layer: int):
    """Layer `layer`'s sparse MoE block (GraniteMoE's is `block_sparse_moe`)."""
    decoder = model.model.layers[layer]
    return getattr(decoder, "block_sparse_moe", None) or decoder.mlp


FAMILIES = ["llama", "qwen2", "qwen3", "granite", "olmo2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_export_loads_with_no_missing_or_unexpected_keys_and_generates(families, family, tmp_path):
    fam = families[family]
    pool = fam.pool()
    from transformers import AutoModelForCausalLM

    dense_base = AutoModelForCausalLM.from_pretrained(fam.base).eval()
    batches = {name: [(_token_batches(k), None)] for k, name in enumerate(fam.experts)}
    means = router_input_statistics(dense_base, batches).means.float()
    routers = router_from_hidden(means, scale=4.0, names=list(fam.experts))

    summary = write_moe_checkpoint(
        pool,
        tmp_path / "moe",
        expert_shared_tensors(pool, BASE),
        routers,
        include_base_expert=True,
        router_method="hidden",
        top_k=2,
    )
    model, info = _load(tmp_path / "moe")
    _assert_loads_cleanly(info)
    assert type(model).__name__ == fam.architecture
    num_routed = len(fam.experts) + (
        0 if family == "qwen2" else 1
    )  # Qwen2-MoE: the base is the shared expert
    assert model.config.num_experts_per_tok == 2
    assert getattr(model.config, "norm_topk_prob", True) is True  # Mixtral always renormalises the top-k
    assert summary.routed_experts == list(fam.experts) + ([] if family == "qwen2" else [BASE])
    intermediate = pool.config.intermediate_size
    assert _moe_block(model, 0).experts.gate_up_proj.shape == (num_routed, 2 * intermediate, HIDDEN)
    torch.testing.assert_close(router_of(_moe_block(model, 1)).weight[: len(fam.experts)], routers[1])

    prompt = _token_batches(99, rows=1, length=4)
    generated = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)

    # The file holds what save_pretrained writes for this family (one tensor per routed expert, the family's
    # checkpoint names), value for value.
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "saved")
    ours = {}
    for shard in sorted((tmp_path / "moe").glob("*.safetensors")):
        ours.update(load_file(shard))
    theirs = load_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in ours)
    for name, value in theirs.items():
        assert torch.equal(ours[name].to(value.dtype), value), name

    card = (tmp_path / "moe" / "README.md").read_text()
    assert '"router_method": "hidden"' in card and '"top_k": 2' in card
    assert (tmp_path / "moe" / "tokenizer.json").is_file() and (
        tmp_path / "moe" / "generation_config.json"
    ).is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_routing_reproduces_each_experts_dense_logits(families, family, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = families[family]
    pool = fam.pool()
    ids = _token_batches(5, rows=2, length=7)
    routers = router_random(len(fam.experts), LAYERS, HIDDEN, seed=1)
    for k, expert in enumerate(fam.experts):
        out = tmp_path / expert
        write_moe_checkpoint(pool, out, expert_shared_tensors(pool, expert), routers, top_k=2)
        moe, info = _load(out)
        _assert_loads_cleanly(info)
        dense = AutoModelForCausalLM.from_pretrained(fam.experts[expert]).eval()
        with torch.no_grad():
            expected = dense(ids).logits
            with forced_routing(moe, k):
                forced = moe(ids).logits
            unforced = moe(ids).logits
        torch.testing.assert_close(forced, expected, atol=1e-5, rtol=0)
        assert (unforced - expected).abs().max() > 1e-3  # the hooks are gone: routing mixes experts again


@pytest.mark.parametrize("family", FAMILIES)
def test_router_input_statistics_are_what_each_moe_router_sees(families, family, tmp_path):
    """The `hidden` router init measures each router's real input: the post-attention norm's output in most
    families, the un-normalised residual stream in OLMo2 / FlexOlmo (post-norm layers)."""
    fam = families[family]
    pool = fam.pool()
    write_moe_checkpoint(
        pool,
        tmp_path / "moe",
        expert_shared_tensors(pool, BASE),
        router_random(len(fam.experts), LAYERS, HIDDEN, seed=4),
    )
    moe, _ = _load(tmp_path / "moe")
    seen: dict[int, torch.Tensor] = {}
    for layer in range(LAYERS):
        router = router_of(_moe_block(moe, layer))
        router.register_forward_pre_hook(lambda _m, args, layer=layer: seen.__setitem__(layer, args[0]))
    ids = _token_batches(8)
    with torch.no_grad():
        moe(ids)
    measured = router_input_statistics(moe, {"all": [(ids, None)]}).means[0]
    expected = torch.stack([seen[layer].reshape(-1, HIDDEN).double().mean(0) for layer in range(LAYERS)])
    torch.testing.assert_close(measured, expected, atol=1e-6, rtol=1e-6)


def test_granite_multipliers_and_flex_olmo_renormalisation_carry_over(families):
    from transformers import AutoConfig

    granite = build_moe_config(AutoConfig.from_pretrained(families["granite"].base), num_experts=3, top_k=2)
    assert granite.model_type == "granitemoe"
    assert (granite.num_local_experts, granite.num_experts_per_tok) == (3, 2)
    assert {key: getattr(granite, key) for key in GRANITE_MULTIPLIERS} == GRANITE_MULTIPLIERS
    assert granite.attention_bias is True and granite.tie_word_embeddings is True
    olmo = build_moe_config(AutoConfig.from_pretrained(families["olmo2"].base), num_experts=3, top_k=2)
    assert (olmo.model_type, olmo.num_experts, olmo.norm_topk_prob) == ("flex_olmo", 3, True)
    assert (olmo.pad_token_id, olmo.eos_token_id, olmo.intermediate_size) == (0, 2, 48)
    with pytest.raises(ExpertMergeError, match="mlp_bias"):
        from transformers import GraniteConfig

        build_moe_config(GraniteConfig(**tiny_model_settings(mlp_bias=True)), num_experts=2)


def test_mergekit_moe_refuses_a_family_only_fit_can_fuse_in_one_line(families, tmp_path, capsys):
    import yaml

    from expertmerge.cli import main

    fam = families["granite"]
    config = {
        "base_model": str(fam.base),
        "gate_mode": "random",
        "experts": [{"source_model": str(folder)} for folder in fam.experts.values()],
    }
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    assert main(["moe", "--config", str(tmp_path / "moe.yaml"), "--out", str(tmp_path / "moe")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error
    assert "model_type 'granite' has no mergekit-moe output family" in error
    assert "granitemoe" in error and "fit --model.moe true" in error
    assert not (tmp_path / "moe").exists()


def test_forced_routing_to_the_base_expert_reproduces_the_base(families, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = families["llama"]
    pool = fam.pool()
    routers = router_random(len(fam.experts), LAYERS, HIDDEN, seed=2)  # the base's row is added by the writer
    write_moe_checkpoint(
        pool, tmp_path / "moe", expert_shared_tensors(pool, BASE), routers, include_base_expert=True, top_k=1
    )
    moe, _ = _load(tmp_path / "moe")
    assert moe.config.num_local_experts == len(fam.experts) + 1
    ids = _token_batches(6)
    with torch.no_grad(), forced_routing(moe, len(fam.experts)):
        forced = moe(ids).logits
    expected = AutoModelForCausalLM.from_pretrained(fam.base).eval()(ids).logits.detach()
    torch.testing.assert_close(forced, expected, atol=1e-5, rtol=0)


def test_qwen2_base_as_shared_expert_mixes_base_and_routed_ffn_by_the_configured_weight(families, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = families["qwen2"]
    pool = fam.pool()
    routers = router_random(len(fam.experts), LAYERS, HIDDEN, seed=3)
    write_moe_checkpoint(
        pool,
        tmp_path / "moe",
        expert_shared_tensors(pool, BASE),
        routers,
        include_base_expert=True,
        shared_expert_weight=0.25,
    )
    moe, _ = _load(tmp_path / "moe")
    base_ffn = AutoModelForCausalLM.from_pretrained(fam.base).model.layers[1].mlp
    expert_ffn = AutoModelForCausalLM.from_pretrained(fam.experts["beta"]).model.layers[1].mlp
    x = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), forced_routing(moe, 1):
        mixed = moe.model.layers[1].mlp(x)
        expected = 0.25 * base_ffn(x) + 0.75 * expert_ffn(x)
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=1e-5)


def test_sharded_moe_output_loads(families, tmp_path):
    fam = families["llama"]
    pool = fam.pool()
    summary = write_moe_checkpoint(
        pool,
        tmp_path / "moe",
        expert_shared_tensors(pool, "alpha"),
        router_random(3, LAYERS, HIDDEN),
        max_shard_size="40KB",
        dtype="bfloat16",
    )
    assert summary.num_shards > 1
    model, info = _load(tmp_path / "moe")
    _assert_loads_cleanly(info)
    assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ routers
def test_router_from_hidden_rows_are_unit_norm_and_distinct():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(3, LAYERS, HIDDEN, generator=generator) + 5.0  # a large common part, as in LLMs
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateRouterWarning)
        rows = router_from_hidden(means)
        centered = router_from_hidden(means, scale=2.0, center=True)
    assert rows.shape == (LAYERS, 3, HIDDEN)
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(LAYERS, 3))
    torch.testing.assert_close(centered.norm(dim=-1), torch.full((LAYERS, 3), 2.0))
    torch.testing.assert_close(rows[1, 2], means[2, 1] / means[2, 1].norm())
    assert router_degeneracy(rows).max_cosine < 0.98
    assert router_degeneracy(centered).max_cosine < router_degeneracy(rows).max_cosine


def test_degenerate_warning_fires_for_identical_tasks():
    means = torch.randn(2, LAYERS, HIDDEN, generator=torch.Generator().manual_seed(1))
    means[1] = means[0] * 1.5  # the same direction: no router can tell these tasks apart
    with pytest.warns(DegenerateRouterWarning, match=r"math and code .*cosine 1\.0000"):
        router_from_hidden(means, names=["math", "code"])
    report = router_degeneracy(router_from_hidden(means, threshold=1.5))  # threshold above 1: silent
    assert report.experts == (0, 1) and report.max_cosine == pytest.approx(1.0)


def test_random_router_is_seeded_and_unit_norm():
    first, again, other = (
        router_random(4, 3, HIDDEN, seed=7),
        router_random(4, 3, HIDDEN, seed=7),
        router_random(4, 3, HIDDEN, seed=8),
    )
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(3, 4))


def test_cheap_embed_router_uses_mean_embedding_of_non_padding_tokens():
    embedding = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    means = mean_token_embeddings(embedding, {"a": [(ids, mask)], "b": [(torch.tensor([[9, 10]]), None)]})
    torch.testing.assert_close(means[0], embedding[[5, 6, 7]].mean(0))
    torch.testing.assert_close(means[1], embedding[[9, 10]].mean(0))
    rows = router_from_embeddings(means, num_layers=3)
    assert rows.shape == (3, 2, HIDDEN) and torch.equal(rows[0], rows[2])


def test_router_input_statistics_ignore_padding(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models.base).eval()
    first, second = _token_batches(1, rows=1, length=6), _token_batches(2, rows=1, length=4)
    plain = router_input_statistics(
        model, {"t": [(first, None), (second, None)], "u": [(second, None)]}
    ).means
    # The same tokens in one right-padded batch, plus a row that is all padding.
    padded = torch.zeros(3, 6, dtype=torch.long)
    padded[0], padded[1, :4] = first[0], second[0]
    mask = torch.zeros(3, 6, dtype=torch.long)
    mask[0], mask[1, :4] = 1, 1
    batched = router_input_statistics(
        model, {"t": [(padded, mask)], "u": [(second, torch.ones_like(second))]}
    ).means
    assert plain.shape == (2, LAYERS, HIDDEN)
    torch.testing.assert_close(batched, plain, atol=1e-5, rtol=1e-5)
    assert (plain[0] - plain[1]).abs().max() > 1e-3  # different tasks, different means


# ------------------------------------------------------------------------------------------------ refusals
def test_unsupported_family_is_refused_naming_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32))
    save_model(base, tmp_path / "base")
    save_model(perturbed(base, seed=1), tmp_path / "expert")
    pool = ExpertPool(str(tmp_path / "base"), {"expert": str(tmp_path / "expert")})
    with pytest.raises(
        ExpertMergeError,
        match=r"'gpt2'.*llama, mistral -> mixtral; qwen2 -> qwen2_moe; qwen3 -> qwen3_moe; "
        r"granite -> granitemoe; olmo2 -> flex_olmo\)",
    ):
        write_moe_checkpoint(
            pool, tmp_path / "moe", expert_shared_tensors(pool, BASE), router_random(1, 2, HIDDEN)
        )
    assert not (tmp_path / "moe").exists()


def test_moe_config_refuses_what_the_format_cannot_express():
    from transformers import MistralConfig

    with pytest.raises(ExpertMergeError, match="mlp_bias"):
        build_moe_config(tiny_llama_config(mlp_bias=True), num_experts=2)
    with pytest.raises(ExpertMergeError, match="top_k"):
        build_moe_config(tiny_llama_config(), num_experts=2, top_k=3)
    mistral = MistralConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    )
    config = build_moe_config(mistral, num_experts=4, top_k=2)
    assert (config.model_type, config.sliding_window, config.num_local_experts) == ("mixtral", 16, 4)


def test_existing_output_is_refused_and_left_untouched(tiny_models, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    pool = ExpertPool(str(tiny_models.base), {n: str(p) for n, p in tiny_models.experts.items()})
    with pytest.raises(ExpertMergeError, match="already exists"):
        write_moe_checkpoint(pool, out, expert_shared_tensors(pool, BASE), router_random(3, LAYERS, HIDDEN))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_failure_mid_write_leaves_no_output_folder(tiny_models, tmp_path):
    pool = ExpertPool(str(tiny_models.base), {n: str(p) for n, p in tiny_models.experts.items()})
    names = shared_tensor_names(pool)
    assert (
        "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.up_proj.weight" not in names
    )
    read = []

    def shared(name: str) -> torch.Tensor:
        read.append(name)
        if name == "model.norm.weight":  # the last layer and most tensors are written by now
            raise RuntimeError("disk full")
        return pool.base_tensor(name)

    with pytest.raises(RuntimeError, match="disk full"):
        write_moe_checkpoint(pool, tmp_path / "moe", shared, router_random(3, LAYERS, HIDDEN))
    assert len(read) > 3
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder

    with pytest.raises(ExpertMergeError, match="lacks 1 shared tensor"):
        partial = {name: pool.base_tensor(name) for name in names if name != "model.norm.weight"}
        write_moe_checkpoint(pool, tmp_path / "moe", partial, router_random(3, LAYERS, HIDDEN))
    assert list(tmp_path.iterdir()) == []
