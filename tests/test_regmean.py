"""RegMean's closed form against a direct least-squares solve, and its Gram matrices from a real model."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from expertmerge.regmean import input_grams, linear_weight_names, regmean_state_dict, regmean_weight


def test_regmean_at_alpha_one_is_the_least_squares_merge_of_the_experts_outputs():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in range(3)]
    inputs = [torch.randn(40, 7, generator=generator, dtype=torch.float64) * (k + 1) for k in range(3)]
    merged = regmean_weight(weights, [x.T @ x for x in inputs], alpha=1.0)
    # min_W sum_k ||X_k W^T - X_k W_k^T||^2 as one stacked least-squares problem
    design = torch.cat(inputs)
    targets = torch.cat([x @ w.T for x, w in zip(inputs, weights, strict=True)])
    direct = torch.linalg.lstsq(design, targets).solution.T
    assert torch.allclose(merged, direct, atol=1e-10)


def test_regmean_at_alpha_zero_with_equal_grams_is_the_average():
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    x = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    merged = regmean_weight(weights, [x.T @ x, x.T @ x], alpha=0.0)
    assert torch.allclose(merged, (weights[0] + weights[1]) / 2, atol=1e-12)


def test_gram_of_a_real_llama_layer_counts_only_real_tokens_and_merges_identical_models_to_themselves():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(64, (3, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # right padding
    names = linear_weight_names(model)
    grams = input_grams(model, names, ids, attention, batch_size=2)
    assert set(names) == set(grams) and len(names) == 7
    captured = []
    layer = model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().double()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    handle.remove()
    x = captured[0][attention.bool()]
    assert torch.allclose(grams["model.layers.0.mlp.down_proj"], x.T @ x, rtol=1e-6, atol=1e-8)
    state = model.state_dict()
    merged = regmean_state_dict([state, state], [grams, grams], alpha=0.9)
    for name, tensor in state.items():
        assert torch.allclose(merged[name], tensor, atol=1e-5), name


def test_regmean_start_refuses_a_singular_gram_instead_of_a_non_finite_start():
    """An input feature that no calibration token uses makes the summed Gram singular (its diagonal is 0 at
    any alpha): the start offsets raise a clear error naming the layer rather than returning NaN/Inf weights;
    with every feature used they are finite."""
    import pytest

    from expertmerge.errors import ExpertMergeError
    from expertmerge.regmean import regmean_start_offsets

    class Tiny(torch.nn.Module):
        def __init__(self, seed: int, dead: bool) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(6, 3)
            self.proj = torch.nn.Linear(3, 2)
            if dead:
                with torch.no_grad():
                    self.embed.weight[:, 2] = 0.0  # feature 2 is never used

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.proj(self.embed(input_ids))

    ids = torch.tensor([[1, 2, 3, 4]])
    sets = [[(ids, torch.ones_like(ids))]] * 2
    for dead in (False, True):
        experts = [lambda dead=dead: Tiny(1, dead), lambda dead=dead: Tiny(2, dead)]
        if not dead:
            offsets = regmean_start_offsets(Tiny(0, dead), experts, sets, ["proj"], alpha=0.9)
            assert torch.isfinite(offsets["proj.weight"]).all() and offsets["proj.weight"].abs().max() > 0
            continue
        with pytest.raises(ExpertMergeError, match="input Gram of 'proj' is singular"):
            regmean_start_offsets(Tiny(0, dead), experts, sets, ["proj"], alpha=0.9)
