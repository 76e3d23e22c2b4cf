"""The mergekit methods beyond the task-arithmetic core: each against a direct computation on small tensors.

Parity with mergekit itself (every method, several settings, every entry) is `test_matches_mergekit` in
tests/test_methods.py; here the meaning is checked from first principles, written independently of the
library code: Python floats and `math` where it is short, hand-derived numbers where they are known.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from expertmerge.errors import ExpertMergeError
from expertmerge.merge import run_merge
from expertmerge.merge_config.parse import parse_merge_config
from expertmerge.methods import METHODS, della_mask, get_method, magnitude_mask, outlier_mask, sparsify


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def merge(name: str, base, experts, models=None, **shared) -> torch.Tensor:
    """`name`'s merge with mergekit-style values: `models` per-model dicts, `shared` the global ones."""
    method = get_method(name)
    models = models or [{} for _ in experts]
    model_values = [{**method.defaults("model"), **m} for m in models]
    return method.merge(base, experts, model_values, {**method.defaults("global"), **shared}, None)


# ---------------------------------------------------------------- registry: mergekit's names and defaults

# mergekit 0.1.5's declared parameters: (name, scope, default), None = required; passthrough is `mkconfig`'s.
MERGEKIT_PARAMETERS = {
    "slerp": {("t", "global", None)},
    "nuslerp": {
        ("weight", "model", None),
        ("nuslerp_row_wise", "global", False),
        ("nuslerp_flatten", "global", True),
    },
    "multislerp": {("weight", "model", None), ("normalize_weights", "global", True), ("eps", "global", 1e-8)},
    "karcher": {("max_iter", "global", 10), ("tol", "global", 1e-5)},
    "model_stock": {("filter_wise", "global", False)},
    "nearswap": {("t", "global", None)},
    "arcee_fusion": set(),
    "ram": {("epsilon", "global", 1e-5)},
    "ramplus_tl": {("r", "global", 0.1), ("alpha", "global", 0.2), ("epsilon", "global", 1e-5)},
    "sce": {("int8_mask", "global", False), ("select_topk", "global", 1.0)},
}
FAMILY = {  # (normalize, rescale, extra per-model parameter)
    "breadcrumbs": (False, False, ("gamma", 0.01)),
    "breadcrumbs_ties": (False, False, ("gamma", 0.01)),
    "della": (True, True, ("epsilon", 0.15)),
    "della_linear": (False, True, ("epsilon", 0.15)),
}


def test_registry_has_every_mergekit_method():
    mergekit = {
        "passthrough",
        "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
        "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "ram", "ramplus_tl", "sce",
        "slerp", "task_arithmetic", "ties",
    }  # fmt: skip
    for name in mergekit:
        assert get_method(name).name in METHODS
    assert len(METHODS) == len(mergekit)


@pytest.mark.parametrize("name", list(MERGEKIT_PARAMETERS))
def test_parameters_and_defaults_are_mergekits(name):
    method = get_method(name)
    assert {(p.name, p.scope, p.default) for p in method.parameters} == MERGEKIT_PARAMETERS[name]


@pytest.mark.parametrize("name", list(FAMILY))
def test_breadcrumbs_and_della_defaults_are_mergekits(name):
    normalize, rescale, (extra, default) = FAMILY[name]
    method = get_method(name)
    assert method.defaults("global")["normalize"] is normalize
    assert method.defaults("global")["rescale"] is rescale
    assert method.defaults("model") == {"weight": 1.0, "density": 1.0, extra: default}
    assert method.consensus == ("sum" if name in ("breadcrumbs_ties", "della") else None)


def test_base_policies_are_mergekits():
    policy = {m.name: m.base_policy for m in METHODS.values()}
    assert policy["nuslerp"] == policy["multislerp"] == "optional"
    assert policy["karcher"] == policy["average"] == "ignored"
    assert all(
        policy[n] == "required" for n in ("slerp", "nearswap", "model_stock", "arcee_fusion", "sce", "ram")
    )


# ---------------------------------------------------------------- spherical


def test_slerp_follows_the_great_circle_and_ends_at_both_models():
    base, model = t(2.0, 0.0), t(0.0, 3.0)  # orthogonal: theta = pi / 2
    third = merge("slerp", base, [model], t=1 / 3)
    # sin((1 - t) theta) / sin(theta) = sin(pi/3), sin(t theta) / sin(theta) = sin(pi/6)
    assert torch.allclose(third, t(2 * math.sin(math.pi / 3), 3 * math.sin(math.pi / 6)), atol=1e-6)
    assert torch.allclose(merge("slerp", base, [model], t=0.0), base)
    assert torch.allclose(merge("slerp", base, [model], t=1.0), model, atol=1e-6)


def test_slerp_takes_the_whole_tensor_as_one_vector():
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    model = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # as flat vectors: orthogonal (dot 0)
    half = merge("slerp", base, [model], t=0.5)
    assert torch.allclose(half, (base + model) * math.sin(math.pi / 4), atol=1e-6)


@pytest.mark.parametrize("scale", [2.5, -1.0])
def test_slerp_of_colinear_or_antipodal_models_is_linear(scale):
    base = t(0.3, -0.4, 1.2)
    merged = merge("slerp", base, [scale * base], t=0.25)
    assert torch.allclose(merged, 0.75 * base + 0.25 * scale * base, atol=1e-6)


def _slerp_python(t_: float, a: list[float], b: list[float]) -> list[float]:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    cos = max(-1.0, min(1.0, sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t_) * x + t_ * y for x, y in zip(a, b, strict=True)]
    theta = math.acos(cos)
    ca, cb = math.sin((1 - t_) * theta) / math.sin(theta), math.sin(t_ * theta) / math.sin(theta)
    return [ca * x + cb * y for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize(
    ("flatten", "row_wise"), [(True, False), (False, False), (False, True)], ids=["flat", "rows", "columns"]
)
def test_nuslerp_interpolates_the_whole_tensor_rows_or_columns_by_the_weights(flatten, row_wise):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=gen)
    a, b = base + torch.randn(3, 4, generator=gen), base + torch.randn(3, 4, generator=gen)
    weights = [{"weight": 1.0}, {"weight": 3.0}]  # t = 3 / 4
    flags = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    merged = merge("nuslerp", base, [a, b], weights, **flags)
    da, db = (a - base).tolist(), (b - base).tolist()
    if flatten:
        flat = _slerp_python(0.75, sum(da, []), sum(db, []))
        expected = [flat[4 * i : 4 * i + 4] for i in range(3)]
    elif not row_wise:  # along the last dim: each row
        expected = [_slerp_python(0.75, ra, rb) for ra, rb in zip(da, db, strict=True)]
    else:  # along dim 0: each column
        columns = [_slerp_python(0.75, [r[j] for r in da], [r[j] for r in db]) for j in range(4)]
        expected = [[columns[j][i] for j in range(4)] for i in range(3)]
    assert torch.allclose(merged, base + torch.tensor(expected), atol=1e-5)
    without_base = merge("nuslerp", None, [a, b], weights, **flags)
    assert not torch.allclose(without_base, merged)  # on the models themselves, not their task vectors


def test_nuslerp_weights_summing_to_zero_interpolate_halfway():
    a, b = t(1.0, 0.0), t(0.0, 1.0)
    merged = merge("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}])
    assert torch.allclose(merged, t(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-6)


def test_multislerp_of_two_equal_norm_models_with_equal_weights_is_the_midpoint():
    a, b = t(2.0, 0.0, 0.0), t(0.0, 2.0, 0.0)
    merged = merge("multislerp", None, [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.allclose(merged, t(math.sqrt(2), math.sqrt(2), 0.0), atol=1e-5)


def test_multislerp_maps_the_weighted_tangent_back_to_the_sphere():
    # Python floats: units, their weighted mean direction m, tangents u - (u.m) m, exp map, mean norm.
    xs = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]]
    ws = [0.5, 0.3, 0.2]
    norms = [math.sqrt(sum(v * v for v in x)) for x in xs]
    units = [[v / n for v in x] for x, n in zip(xs, norms, strict=True)]
    mean = [sum(w * u[i] for w, u in zip(ws, units, strict=True)) for i in range(3)]
    mean = [v / math.sqrt(sum(m * m for m in mean)) for v in mean]
    tangent = [0.0] * 3
    for w, u in zip(ws, units, strict=True):
        dot = sum(a * b for a, b in zip(u, mean, strict=True))
        tangent = [tv + w * (a - dot * m) for tv, a, m in zip(tangent, u, mean, strict=True)]
    size = math.sqrt(sum(v * v for v in tangent))
    point = [m * math.cos(size) + v * math.sin(size) / size for m, v in zip(mean, tangent, strict=True)]
    scale = sum(w * n for w, n in zip(ws, norms, strict=True))
    base = t(0.1, 0.1, 0.1)
    merged = merge("multislerp", base, [base + torch.tensor(x) for x in xs], [{"weight": w} for w in ws])
    assert torch.allclose(merged, base + torch.tensor(point) * scale, atol=1e-5)


def test_karcher_mean_of_directions_in_a_plane_is_their_mean_angle():
    # On a circle (points within a half-turn) the equally weighted Karcher mean is the mean angle.
    angles, lengths = [0.0, math.radians(30), math.radians(90)], [1.0, 2.0, 3.0]
    experts = [
        torch.tensor([r * math.cos(a), r * math.sin(a), 0.0]) for a, r in zip(angles, lengths, strict=True)
    ]
    merged = merge("karcher", None, experts)
    mean_angle, mean_length = sum(angles) / 3, sum(lengths) / 3
    expected = t(mean_length * math.cos(mean_angle), mean_length * math.sin(mean_angle), 0.0)
    assert torch.allclose(merged, expected, atol=1e-4)
    one_step = merge("karcher", None, experts, max_iter=0)  # the normalised Euclidean mean's direction
    assert not torch.allclose(one_step, expected, atol=1e-3)


# ---------------------------------------------------------------- model stock, nearswap, arcee fusion


@pytest.mark.parametrize(
    ("second", "ratio"),
    [((0.0, 1.0), 0.0), ((1.0, 0.0), 1.0), ((0.5, math.sqrt(3) / 2), 2 / 3)],
    ids=["orthogonal", "parallel", "60-degrees"],
)
def test_model_stock_ratio_follows_the_angle_between_task_vectors(second, ratio):
    base = t(1.0, 1.0)
    experts = [base + t(1.0, 0.0), base + t(*second)]
    merged = merge("model_stock", base, experts)
    # t = N cos / (1 + (N - 1) cos) with N = 2; result t * mean + (1 - t) * base
    assert torch.allclose(merged, ratio * (experts[0] + experts[1]) / 2 + (1 - ratio) * base, atol=1e-6)


def test_model_stock_filter_wise_takes_one_angle_per_row():
    base = torch.zeros(2, 2)
    experts = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    per_row = merge("model_stock", base, experts, filter_wise=True)
    assert torch.allclose(per_row, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # row 0 orthogonal, row 1 parallel
    whole = merge("model_stock", base, experts)  # cos = 1 / 2 over the tensor: t = 2 / 3
    assert torch.allclose(whole, (2 / 3) * (experts[0] + experts[1]) / 2)


def test_nearswap_swaps_close_entries_and_barely_moves_far_ones():
    base, model = t(0.0, 0.0, 0.0, 1.0), t(0.005, 0.1, -1.0, 1.0)
    merged = merge("nearswap", base, [model], t=0.01)
    # weights clamp(0.01 / |diff|, 0, 1): 1, 0.1, 0.01 and (diff 0 -> 1e-6) 1
    assert torch.allclose(merged, t(0.005, 0.01, -0.01, 1.0))


def test_arcee_fusion_keeps_only_changes_whose_importance_is_an_outlier():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 50, generator=gen)
    model = base + 0.01 * torch.randn(4, 50, generator=gen)
    model[2, 7] += 3.0  # one large change
    importance = []
    for row_b, row_m in zip(base.tolist(), model.tolist(), strict=True):
        zb, zm = sum(math.exp(x) for x in row_b), sum(math.exp(x) for x in row_m)
        p = [math.exp(x) / zm + 1e-8 for x in row_m]
        q = [math.exp(x) / zb + 1e-8 for x in row_b]
        kl = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
        importance.append([abs(m - b) * kl for m, b in zip(row_m, row_b, strict=True)])
    ordered = sorted(sum(importance, []))
    q1, median, q3 = (ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75))
    keep = [[v >= median + 1.5 * (q3 - q1) for v in row] for row in importance]
    merged = merge("arcee_fusion", base, [model])
    expected = torch.where(torch.tensor(keep), model, base)
    # the KL factor is per row: the row with the large change stands out, most entries keep the base
    assert keep[2][7] and sum(map(sum, keep)) < len(ordered) / 2
    assert torch.allclose(merged, expected, atol=1e-6)


# ---------------------------------------------------------------- RAM, RAM+, SCE


def test_ram_takes_unique_changes_whole_and_averages_shared_ones():
    base = torch.zeros(4)
    experts = [t(1.0, 0.0, 2.0, 5.0), t(3.0, 0.0, 0.0, 0.0), t(0.0, 0.0, 4.0, 0.0)]
    assert torch.equal(merge("ram", base, experts), t(2.0, 0.0, 3.0, 5.0))
    # below epsilon an entry counts as unchanged
    assert torch.equal(merge("ram", base, experts, epsilon=1.5), t(3.0, 0.0, 3.0, 5.0))


def test_ramplus_boosts_unique_changes_by_the_overlap_ratio():
    base = torch.zeros(4)
    experts = [t(1.0, 0.0, 2.0, 5.0), t(3.0, 0.0, 0.0, 0.0), t(0.0, 0.0, 4.0, 0.0)]
    # expert 0: 2 shared, 1 unique -> rho 2 clamped to alpha; others have no unique entries.
    merged = merge("ramplus_tl", base, experts, r=0.5, alpha=0.4)
    assert torch.allclose(merged, t(2.0, 0.0, 3.0, 5.0 * (1 + 0.5 * 0.4)))


def test_sce_weights_by_mean_square_and_erases_minority_signs():
    base = torch.zeros(3)
    experts = [t(1.0, 2.0, -1.0), t(3.0, -1.0, 0.0)]
    # weights: mean squares 2 and 10/3, normalised; entry 1: +2*w0 - 1*w1 > 0 elects +, expert 1 erased.
    w0, w1 = 2 / (2 + 10 / 3), (10 / 3) / (2 + 10 / 3)
    expected = t((1 * w0 + 3 * w1) / (w0 + w1), 2.0, -1.0)  # entry 2: expert 1 is 0, never agrees
    assert torch.allclose(merge("sce", base, experts), expected, atol=1e-6)


def test_sce_select_keeps_the_entries_of_largest_variance():
    base = torch.zeros(5)
    experts = [t(1.0, 0.0, 4.0, 1.0, 0.0), t(-1.0, 0.0, 0.0, 1.0, 2.0)]
    # variances: 1, 0, 4, 0, 1 -> 3 non-zero, int(3 * 0.67) = 2 kept: entry 2 and one of the tied 1s.
    merged = merge("sce", base, experts, select_topk=0.67)
    assert merged[2] != 0 and merged[1] == 0 and merged[3] == 0
    assert int((merged[[0, 4]] != 0).sum()) == 1


# ---------------------------------------------------------------- breadcrumbs, DELLA, TIES ties


def test_breadcrumbs_trims_outliers_then_small_entries():
    delta = t(*[float(v) for v in range(1, 11)])  # magnitudes 1..10
    assert outlier_mask(delta, 0.5, 0.2).tolist() == [False] * 3 + [True] * 5 + [False] * 2
    # density + gamma > 1: the outlier cut shrinks to keep int(density * numel) entries
    assert outlier_mask(-delta, 0.9, 0.2).tolist() == [True] * 9 + [False]  # only 1 outlier dropped
    assert outlier_mask(delta, 0.05, 0.01).sum() == 0  # int(0.5) = 0: nothing kept, unlike TIES
    merged = merge("breadcrumbs", torch.zeros(10), [delta], [{"density": 0.5, "gamma": 0.2}])
    assert torch.equal(merged, delta * outlier_mask(delta, 0.5, 0.2))


def test_della_keep_probability_rises_with_magnitude_rank_within_each_row():
    row = torch.arange(1, 101, dtype=torch.float32)  # ranks 1..100 -> p from 0.3 to 0.7
    rows = torch.stack([row, row.flip(0)])
    gen = torch.Generator().manual_seed(0)
    kept = torch.stack([della_mask(rows, 0.5, 0.2, gen).float() for _ in range(400)]).mean(0)
    expected = 0.3 + 0.4 * (row - 1) / 99
    assert (kept[0] - expected).abs().max() < 0.1  # binomial std over 400 draws <= 0.025
    assert (kept[1] - expected.flip(0)).abs().max() < 0.1
    assert abs(kept.mean().item() - 0.5) < 0.01
    # the draw is one bernoulli over those probabilities (as mergekit's): the same seed gives the same mask
    probabilities = torch.stack([expected, expected.flip(0)])
    replay = torch.bernoulli(probabilities, generator=torch.Generator().manual_seed(5)).bool()
    assert torch.equal(della_mask(rows, 0.5, 0.2, torch.Generator().manual_seed(5)), replay)


def test_della_rescale_restores_the_l1_norm_and_bad_epsilon_is_refused():
    delta = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    kept = sparsify(delta, 0.4, "della_magprune", True, torch.Generator().manual_seed(2), epsilon=0.1)
    assert torch.isclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-5)
    assert 0.3 < (kept != 0).float().mean().item() < 0.5
    with pytest.raises(ExpertMergeError, match=r"density 0.9 \+/- epsilon 0.15"):
        merge("della", torch.zeros(4), [torch.ones(4)], [{"density": 0.9}])


def test_ties_breaks_ties_at_the_cut_as_mergekits_sort_does():
    # 6000 entries, 5 magnitudes: the cut falls inside a block of ~1200 equal values.
    gen = torch.Generator().manual_seed(0)
    delta = ((torch.randint(0, 5, (60, 100), generator=gen) - 2).float() / 4).reshape(-1)
    for density in (0.5, 0.33, 0.9):  # cuts at 0.25, 0.5 and 0 (a zero)
        k = max(1, int(density * delta.numel()))
        expected = torch.zeros(delta.numel(), dtype=torch.bool)
        expected[torch.argsort(delta.abs(), descending=True)[:k]] = True  # mergekit's expression
        mask = magnitude_mask(delta, density)
        assert int(mask.sum()) == k
        assert torch.equal(delta * mask, delta * expected), density  # the same sparsified task vector
        if density != 0.9:  # a non-zero cut: the very same entries
            assert torch.equal(mask, expected), density
        lowest_index_first = torch.zeros_like(expected)
        lowest_index_first[torch.sort(delta.abs(), descending=True, stable=True).indices[:k]] = True
        if density != 0.9:
            assert not torch.equal(delta * expected, delta * lowest_index_first)  # the choice matters
    distinct = torch.randn(1000, generator=gen)  # no ties: the selection path, same set as the sort
    assert torch.equal(magnitude_mask(distinct, 0.3), distinct.abs() >= distinct.abs().sort().values[700])


# ---------------------------------------------------------------- errors and configs


@pytest.mark.parametrize(
    ("name", "base", "experts", "models", "shared", "message"),
    [
        ("slerp", t(1.0), [t(2.0)], None, {}, "needs `t`"),
        ("slerp", t(1.0), [t(2.0), t(3.0)], None, {"t": 0.5}, "exactly 1 model"),
        ("nuslerp", None, [t(1.0), t(2.0)], [{}, {}], {}, "needs `weight`"),
        ("nuslerp", None, [t(1.0)], [{"weight": 1.0}], {}, "exactly 2"),
        ("model_stock", t(0.0), [t(1.0)], None, {}, "at least 2"),
        ("nearswap", None, [t(1.0)], None, {"t": 0.1}, "needs the base"),
        ("multislerp", None, [t(1.0), t(-1.0), t(1.0)], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}], {}, "cancel"),
    ],
)  # fmt: skip
def test_bad_inputs_give_clear_errors(name, base, experts, models, shared, message):
    with pytest.raises(ExpertMergeError, match=message):
        merge(name, base, experts, models, **shared)


@pytest.mark.parametrize(
    ("method", "model_parameters", "parameters"),
    [
        ("slerp", {}, {"t": 0.4}),
        ("nuslerp", {"weight": 0.5}, {"nuslerp_flatten": False}),
        ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"lambda": 1.1}),
        ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}, {}),
        ("ram", {}, {"epsilon": 1e-4}),
        ("karcher", {}, {"max_iter": 5}),
        ("sce", {}, {"select_topk": 0.5}),
    ],
)
def test_mergekit_configs_of_the_new_methods_validate(method, model_parameters, parameters):
    experts = ["org/m1", "org/m2"] if method in ("slerp", "nuslerp") else ["org/m1", "org/m2", "org/m3"]
    models = [{"model": m, **({"parameters": model_parameters} if model_parameters else {})} for m in experts]
    if method == "slerp":
        models = models[1:]
    config = parse_merge_config(
        {
            "merge_method": method,
            "base_model": "org/m1" if method == "slerp" else "org/b",
            "models": models,
            "parameters": parameters,
        }  # fmt: skip
    )
    for key, value in parameters.items():
        assert config.parameters[key] == value
    assert all(m.parameters.get(k) == v for m in config.models for k, v in model_parameters.items())


def test_a_required_parameter_is_asked_for_before_any_model_is_read():
    with pytest.raises(ExpertMergeError, match="needs `t`"):
        parse_merge_config({"merge_method": "slerp", "base_model": "org/a", "models": [{"model": "org/b"}]})
    # ram's `epsilon` is set once per merge: under a model mergekit ignores it, so it is a warning here.
    config = parse_merge_config(
        {
            "merge_method": "ram",
            "base_model": "org/a",
            "models": [{"model": "org/b", "parameters": {"epsilon": 0.1}}],
        }
    )
    assert len(config.warnings) == 1 and "models[0].parameters.epsilon" in config.warnings[0]


@pytest.mark.parametrize("name", ["nuslerp", "slerp"])
def test_merge_of_tiny_models_equals_the_method_per_tensor(tiny_models, tmp_path, name):
    from safetensors.torch import load_file

    states = tiny_models.state_dicts
    first, second = list(tiny_models.experts)[:2]
    if name == "slerp":
        config = {"merge_method": "slerp", "base_model": str(tiny_models.base),
                  "models": [{"model": str(tiny_models.experts[first])}], "parameters": {"t": 0.3}}  # fmt: skip
    else:  # no base: nuslerp of the two models themselves
        config = {"merge_method": "nuslerp", "models": [
            {"model": str(tiny_models.experts[n]), "parameters": {"weight": w}} for n, w in ((first, 1.0), (second, 2.0))
        ]}  # fmt: skip
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    run_merge(path, out=tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    for key, base in states["base"].items():
        if name == "slerp":
            expected = merge("slerp", base, [states[first][key]], t=0.3)
        else:
            expected = merge(
                "nuslerp", None, [states[first][key], states[second][key]], [{"weight": 1.0}, {"weight": 2.0}]
            )
        assert torch.equal(written[key], expected), key
