"""Fused-MoE routers: the discriminant initialisation's maths on small tensors, the one router-input collection,
and router tuning (only the gates move, the KL to each task's own expert drops)."""

from __future__ import annotations

import warnings

import pytest
import torch
from moe_routing import forced_routing

from expertmerge.errors import ExpertMergeError
from expertmerge.moe import (
    DegenerateRouterWarning,
    add_generalist_row,
    calibrate_margin,
    expert_shared_tensors,
    gate_parameters,
    initial_router_rows,
    pooled_within_scatter,
    router_from_discriminant,
    router_input_statistics,
    router_random,
    router_tuning_loss,
    split_batches,
    tune_router,
    write_moe_checkpoint,
)
from expertmerge.moe.router import own_expert_margins
from expertmerge.pool import BASE, ExpertPool
from expertmerge.teachers import TeacherTargets

LAYERS, HIDDEN, VOCAB = 2, 32, 64


def _groups(seed: int = 0) -> list[torch.Tensor]:
    """Token states of three groups, `[layers, tokens, hidden]` each, with different means and sizes."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(LAYERS, tokens, 4, generator=generator, dtype=torch.float64) + shift
        for tokens, shift in ((5, 0.0), (7, 1.0), (4, -2.0))
    ]


def test_pooled_within_scatter_is_the_pooled_covariance_of_the_groups():
    groups = _groups()
    means = torch.stack([g.mean(1) for g in groups])
    products = torch.stack([g.transpose(1, 2) @ g for g in groups])
    counts = [g.shape[1] for g in groups]
    scatter = pooled_within_scatter(products, counts, means)
    centred = [g - g.mean(1, keepdim=True) for g in groups]
    expected = sum(c.transpose(1, 2) @ c for c in centred) / (sum(counts) - len(groups))
    torch.testing.assert_close(scatter, expected, atol=1e-12, rtol=1e-12)
    variances = pooled_within_scatter(torch.stack([(g * g).sum(1) for g in groups]), counts, means)
    torch.testing.assert_close(variances, torch.diagonal(expected, dim1=1, dim2=2), atol=1e-12, rtol=1e-12)


def test_calibrate_margin_sets_each_layers_mean_margin_to_the_gap():
    generator = torch.Generator().manual_seed(1)
    means = torch.randn(3, LAYERS, 8, generator=generator)
    rows = torch.nn.functional.normalize(means.transpose(0, 1), dim=-1)  # each expert points at its mean
    scaled = calibrate_margin(rows, means, gap=2.5)
    for layer in range(LAYERS):
        logits = means[:, layer] @ scaled[layer].T
        own = logits.diagonal()
        margin = (own - (logits.sum(1) - own) / 2).mean()
        assert float(margin) == pytest.approx(2.5, rel=1e-5)
    flipped = calibrate_margin(-rows, means)  # a negative margin: scaling cannot fix it, rows are kept
    torch.testing.assert_close(flipped, -rows)


def test_discriminant_rows_follow_the_low_variance_direction_that_separates_the_experts():
    # Two experts whose means differ by 1 along axes 0 and 1, with a large common part along axis 2 (as LLM
    # hidden states have); axis 0 is noisy (variance 100), axes 1 and 2 quiet (1).
    means = torch.tensor([[[0.0, 0.0, 4.0]], [[1.0, 1.0, 4.0]]])  # [experts, layers=1, hidden=3]
    within = torch.diag(torch.tensor([100.0, 1.0, 1.0], dtype=torch.float64))[None]
    rows = router_from_discriminant(means, within, gap=3.0)
    difference = rows[0, 1] - rows[0, 0]
    assert abs(float(difference[1])) > 10 * abs(float(difference[0]))  # the quiet axis decides
    diagonal = router_from_discriminant(means, torch.diagonal(within, dim1=1, dim2=2), gap=3.0)
    torch.testing.assert_close(diagonal, rows, atol=1e-6, rtol=1e-6)  # variances-only mode, same answer here


def _margin_case(seed: int = 2, experts: int = 3, hidden: int = 6):
    """Means with a large common offset (cosines ~0.98, as LLM router inputs have) and an anisotropic scatter."""
    generator = torch.Generator().manual_seed(seed)
    offset = 6.0 * torch.randn(hidden, generator=generator, dtype=torch.float64)
    means = offset + torch.randn(experts, LAYERS, hidden, generator=generator, dtype=torch.float64)
    factor = torch.randn(LAYERS, hidden, hidden, generator=generator, dtype=torch.float64)
    within = factor @ factor.transpose(1, 2) + 0.5 * torch.eye(hidden, dtype=torch.float64)
    return means, within


def test_the_calibrated_margin_holds_on_the_uncentred_means_the_router_sees():
    means, within = _margin_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateRouterWarning)  # the common offset makes the means parallel
        rows = router_from_discriminant(means, within, gap=3.0)
    margins = own_expert_margins(rows, means.float())  # [layers, classes, experts], no centring, no bias
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(margins[:, off_diagonal], torch.full((LAYERS, 6), 3.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(rows.sum(1), torch.zeros(LAYERS, 6), atol=1e-4, rtol=0)  # no common part
    # The old initialisation (centred means, rows normalised one by one, margin scaled on the centred means)
    # does not give these margins on what the router really sees: measured -19.1 to +26.5 logits here (a
    # negative margin: the wrong expert wins on that mean).
    centred = means - means.mean(0, keepdim=True)
    old = []
    for layer in range(LAYERS):
        ridge = 0.1 * within[layer].diagonal().mean()
        solve = torch.linalg.solve(
            within[layer] + ridge * torch.eye(6, dtype=torch.float64), centred[:, layer].T
        ).T
        old.append(torch.nn.functional.normalize(solve, dim=1))
    old_rows = calibrate_margin(torch.stack(old).float(), centred.float(), 3.0)
    old_margins = own_expert_margins(old_rows, means.float())[:, off_diagonal]
    assert float(old_margins.min()) < 0 < 10 < float(old_margins.max())


def test_the_discriminant_rows_have_the_least_within_expert_logit_variance_among_rows_with_that_margin():
    means, within = _margin_case(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateRouterWarning)
        rows = router_from_discriminant(means, within, gap=3.0, shrinkage=0.0).double()
    layer = 0
    variance = torch.einsum("eh,hg,eg->", rows[layer], within[layer], rows[layer])
    # Any other rows with the same margins: add directions orthogonal (in the metric) to every mean.
    generator = torch.Generator().manual_seed(9)
    for _ in range(5):
        noise = torch.randn(3, 6, generator=generator, dtype=torch.float64)
        m = means[:, layer]
        projector = torch.eye(6, dtype=torch.float64) - m.T @ torch.linalg.solve(m @ m.T, m)
        other = rows[layer] + noise @ projector  # the same logits on every mean
        torch.testing.assert_close(other @ m.T, rows[layer] @ m.T)
        assert float(torch.einsum("eh,hg,eg->", other, within[layer], other)) > float(variance)


def test_linearly_dependent_means_warn_that_the_margin_cannot_be_reached():
    means = torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]])  # parallel: a bias-free router cannot separate them
    with pytest.warns(DegenerateRouterWarning, match="linearly dependent"):
        rows = router_from_discriminant(means, torch.eye(2).double()[None], gap=3.0)
    assert torch.isfinite(rows).all()


def test_a_generalist_row_gets_the_experts_mean_logit_on_every_input():
    means, within = _margin_case(seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateRouterWarning)
        rows = router_from_discriminant(means, within, gap=3.0)
    with_base = add_generalist_row(rows)
    assert with_base.shape == (LAYERS, 4, 6)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    logits = x @ with_base[0].T
    torch.testing.assert_close(logits[:, 3], logits[:, :3].mean(1), atol=1e-5, rtol=0)
    # on each expert's mean: own first, the generalist second (by 3 / 3 = 1 logit over each other expert)
    margins = own_expert_margins(with_base, means.float())
    torch.testing.assert_close(margins[:, :, 3], torch.full((LAYERS, 3), 2.0), atol=1e-3, rtol=0)


def test_discriminant_refuses_statistics_of_the_wrong_shape_or_with_nan():
    means = torch.zeros(2, LAYERS, 4)
    with pytest.raises(ExpertMergeError, match="within must be"):
        router_from_discriminant(means, torch.eye(3).expand(LAYERS, 3, 3))
    means[0, 0, 0] = float("nan")
    with pytest.raises(ExpertMergeError, match="NaN"):
        router_from_discriminant(means, torch.eye(4).expand(LAYERS, 4, 4))


def _token_ids(seed: int, rows: int = 4, length: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_router_input_covariance_ignores_padding_and_matches_the_states(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models.base).eval()
    ids = _token_ids(3, rows=2, length=6)
    plain = router_input_statistics(model, {"t": [(ids[:1], None), (ids[1:, :4], None)]}, covariance=True)
    padded = ids.clone()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batched = router_input_statistics(
        model, {"t": split_batches(padded, mask, batch_size=8)}, covariance=True
    )
    assert plain.counts == batched.counts == [10]
    torch.testing.assert_close(batched.products, plain.products, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(batched.means, plain.means, atol=1e-6, rtol=1e-6)
    # the products are the states' outer products: their trace is the summed squared norm of the states
    states = []
    hooks = [
        model.model.layers[layer].post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out, layer=layer: states.append((layer, out.detach()))
        )
        for layer in range(LAYERS)
    ]
    with torch.no_grad():
        model(input_ids=ids[:1])
    for hook in hooks:
        hook.remove()
    first = dict(states)
    single = router_input_statistics(model, {"t": [(ids[:1], None)]}, covariance=True)
    for layer in range(LAYERS):
        x = first[layer][0].double()
        torch.testing.assert_close(single.products[0, layer], x.T @ x, atol=1e-6, rtol=1e-6)


def test_initial_router_rows_refuse_an_unknown_method_and_an_expert_without_data(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models.base).eval()
    data = [{"a": [(_token_ids(1), None)]}, {"b": [(_token_ids(2), None)]}]
    with pytest.raises(ExpertMergeError, match="not one of hidden, cheap_embed, random"):
        initial_router_rows("oracle", model, data)
    with pytest.raises(ExpertMergeError, match="Every expert needs"):
        initial_router_rows("hidden", model, [data[0], {}])
    rows = initial_router_rows("hidden", model, data, names=["a", "b"])
    assert rows.shape == (LAYERS, 2, HIDDEN)
    torch.testing.assert_close(
        initial_router_rows("random", model, data, seed=4), router_random(2, LAYERS, HIDDEN, 4)
    )


# --------------------------------------------------------------------------------------------- router tuning
@pytest.fixture(scope="module")
def moe_and_targets(tiny_models, tmp_path_factory):
    """A tiny Mixtral of the three experts (random routers), and per task the oracle-routed targets: the MoE's
    own logits with every token routed to that task's expert. Each task draws from its own part of the vocabulary,
    so a router can tell the tasks apart from the tokens. Top-2: with top-1 the renormalised routing weight is
    exactly 1 whatever the logits, so the KL would give the gates no gradient."""
    from transformers import AutoModelForCausalLM

    pool = ExpertPool(str(tiny_models.base), {n: str(f) for n, f in tiny_models.experts.items()})
    names = list(tiny_models.experts)
    folder = tmp_path_factory.mktemp("tuning") / "moe"
    write_moe_checkpoint(
        pool, folder, expert_shared_tensors(pool, BASE), router_random(3, LAYERS, HIDDEN, seed=5), top_k=2
    )
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    targets, batches = {}, []
    for k, name in enumerate(names):
        low = 3 + 20 * k
        ids = torch.randint(low, low + 20, (4, 8), generator=torch.Generator().manual_seed(20 + k))
        with torch.no_grad(), forced_routing(moe, k):
            targets[(name, "train")] = TeacherTargets({"logits": moe(input_ids=ids).logits})
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "task_index": torch.tensor(k),
                "sample_index": torch.arange(ids.shape[0]),
            }
        )
    return folder, targets, names, batches


def _mean_kl(moe, batches, targets, names) -> float:
    with torch.no_grad():
        return sum(float(router_tuning_loss(moe, b, targets, names).kl) for b in batches) / len(batches)


def _own_expert_probability(moe, batches) -> float:
    """The routers' mean probability of each task's own expert, over tokens and layers."""
    with torch.no_grad():
        probabilities = []
        for k, batch in enumerate(batches):
            out = moe(input_ids=batch["input_ids"], output_router_logits=True, use_cache=False)
            probabilities += [logits.softmax(-1)[:, k].mean() for logits in out.router_logits]
    return float(torch.stack(probabilities).mean())


def test_tuning_moves_only_the_gates_and_lowers_the_kl_to_the_oracle_routed_targets(moe_and_targets):
    from transformers import AutoModelForCausalLM

    folder, targets, names, batches = moe_and_targets
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    before = {name: p.detach().clone() for name, p in moe.named_parameters()}
    kl_before, own_before = _mean_kl(moe, batches, targets, names), _own_expert_probability(moe, batches)
    # balance 0: the tiny experts differ so little that the load-balancing term would outweigh the KL here
    losses = tune_router(moe, batches, targets, names, steps=30, lr=0.1, balance=0.0, progress=False)
    kl_after, own_after = _mean_kl(moe, batches, targets, names), _own_expert_probability(moe, batches)
    assert len(losses) == 30
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)  # measured: 2.2e-4 -> 6.2e-5
    assert own_before < 0.4 < 0.6 < own_after, (own_before, own_after)  # measured: 0.29 -> 0.75
    gates = set(gate_parameters(moe))
    assert len(gates) == LAYERS
    for name, parameter in moe.named_parameters():
        moved = not torch.equal(parameter, before[name])
        assert moved == (name in gates), name
        assert parameter.requires_grad  # as it was before tuning
    assert not moe.training


def test_a_round_of_task_batches_counts_as_the_mean_of_its_batches(moe_and_targets):
    from transformers import AutoModelForCausalLM

    folder, targets, names, batches = moe_and_targets
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    single = [tune_router(moe, [b], targets, names, steps=1, lr=0.0, progress=False)[0] for b in batches]
    (round_loss,) = tune_router(moe, [batches], targets, names, steps=1, lr=0.0, progress=False)
    assert round_loss == pytest.approx(sum(single) / len(single), rel=1e-6)
    with pytest.raises(ExpertMergeError, match="no calibration batches"):
        tune_router(moe, [], targets, names, steps=1, progress=False)
