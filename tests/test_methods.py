"""Training-free merges: hand-computed values, an independent loop implementation, and parity with mergekit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertmerge.errors import ExpertMergeError
from expertmerge.methods import (
    METHODS,
    ExpertParams,
    MethodParams,
    TaskArithmeticMethod,
    get_method,
    magnitude_mask,
    merge_tensor,
    random_mask,
    tensor_generator,
)

REFERENCE = Path(__file__).parent / "data" / "mergekit_reference.safetensors"


def params(*weights: float, density: float | list[float] = 1.0) -> list[ExpertParams]:
    densities = density if isinstance(density, list) else [density] * len(weights)
    return [ExpertParams(weight=w, density=d) for w, d in zip(weights, densities, strict=True)]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- an independent, element-by-element loop


def loop_merge(
    base: list[float],
    experts: list[list[float]],
    weights: list[float],
    keep: list[list[bool]] | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> list[float]:
    """The task-arithmetic family written out entry by entry in Python floats (keep=None: no trimming)."""
    deltas = [[x - b for x, b in zip(expert, base, strict=True)] for expert in experts]
    if keep is not None:
        trimmed = []
        for delta, kept in zip(deltas, keep, strict=True):
            new = [d if k else 0.0 for d, k in zip(delta, kept, strict=True)]
            before, after = sum(abs(d) for d in delta), sum(abs(d) for d in new)
            if rescale and before >= 1e-7 and after >= 1e-7:
                new = [d * before / after for d in new]
            trimmed.append(new)
        deltas = trimmed
    result = []
    for i, b in enumerate(base):
        weighted = [w * delta[i] for w, delta in zip(weights, deltas, strict=True)]
        if consensus:
            elected = 1.0 if sum(weighted) >= 0 else -1.0
            agree = [wd != 0 and (wd > 0) == (elected > 0) for wd in weighted]
            mixed = sum(wd for wd, a in zip(weighted, agree, strict=True) if a)
            divisor = sum(w for w, a in zip(weights, agree, strict=True) if a) or 1.0
        else:
            mixed = sum(weighted)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        if normalize:
            mixed /= divisor
        result.append(b + lambda_ * mixed)
    return result


def top_k_keep(values: list[float], density: float) -> list[bool]:
    k = max(1, int(density * len(values)))
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(values))]


# ---------------------------------------------------------------- registry


def test_registry_has_the_task_arithmetic_family_and_the_linear_alias():
    family = {n: m for n, m in METHODS.items() if isinstance(m, TaskArithmeticMethod)}
    assert set(family) == {
        "average", "task_arithmetic", "ties", "dare_linear", "dare_ties",
        "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    }  # fmt: skip
    assert get_method("linear") is get_method("average")
    assert "passthrough" in METHODS and len(METHODS) == 20  # mergekit 0.1.5's registry ('linear' is an alias)
    for name, method in family.items():
        assert method.name == name
        assert method.needs_base == (name != "average")
        assert method.uses_density == (method.sparsification is not None)


def test_method_defaults_are_mergekits():
    # (normalize, rescale, sparsification, consensus) from mergekit 0.1.5 merge_methods/registry.py
    expected = {
        "average": (True, False, None, None),
        "task_arithmetic": (False, False, None, None),
        "ties": (True, False, "magnitude", "sum"),
        "dare_linear": (False, True, "random", None),
        "dare_ties": (False, True, "random", "sum"),
    }
    for name, (normalize, rescale, sparsification, consensus) in expected.items():
        method = get_method(name)
        assert (method.default_normalize, method.default_rescale) == (normalize, rescale), name
        assert (method.sparsification, method.consensus) == (sparsification, consensus), name


def test_unknown_method_error_lists_known_names():
    with pytest.raises(ExpertMergeError, match="frankenslerp") as info:
        get_method("frankenslerp")
    for name in ("average", "linear", "task_arithmetic", "ties", "dare_ties", "slerp", "karcher", "sce"):
        assert name in str(info.value)


# ---------------------------------------------------------------- hand-computed values


def test_average_is_weighted_mean_and_ignores_base():
    experts = [t(1.0, 2.0), t(3.0, 6.0)]
    merged = merge_tensor(get_method("average"), t(100.0, 100.0), experts, params(1.0, 3.0), MethodParams())
    assert torch.allclose(merged, t(2.5, 5.0))
    unnormalized = merge_tensor(
        get_method("linear"), None, experts, params(1.0, 3.0), MethodParams(normalize=False)
    )
    assert torch.allclose(unnormalized, t(10.0, 20.0))


def test_task_arithmetic_adds_scaled_weighted_task_vectors():
    base = t(1.0, 1.0)
    experts = [t(2.0, 0.0), t(1.0, 3.0)]  # task vectors (1, -1) and (0, 2)
    method = get_method("task_arithmetic")
    merged = merge_tensor(method, base, experts, params(0.5, 1.0), MethodParams(lambda_=2.0))
    assert torch.allclose(merged, t(1.0 + 2 * 0.5, 1.0 + 2 * 1.5))
    normalized = merge_tensor(method, base, experts, params(0.5, 1.0), MethodParams(normalize=True))
    assert torch.allclose(normalized, t(1.0 + 0.5 / 1.5, 1.0 + 1.5 / 1.5))


def test_ties_trims_elects_and_averages_agreeing_entries():
    base = torch.full((4,), 10.0)
    experts = [base + t(1.0, -2.0, 3.0, 0.5), base + t(-1.5, 1.0, 0.5, -3.0)]
    # density 0.5 of 4 entries keeps 2: (0, -2, 3, 0) and (-1.5, 0, 0, -3); weighted by 1 and 0.5:
    # (0, -2, 3, 0) and (-0.75, 0, 0, -1.5); elected signs (-, -, +, -); each entry has one agreeing expert.
    method = get_method("ties")
    merged = merge_tensor(method, base, experts, params(1.0, 0.5, density=0.5), MethodParams())
    assert torch.allclose(merged - base, t(-0.75 / 0.5, -2.0, 3.0, -1.5 / 0.5))
    summed = merge_tensor(method, base, experts, params(1.0, 0.5, density=0.5), MethodParams(normalize=False))
    assert torch.allclose(summed - base, t(-0.75, -2.0, 3.0, -1.5))


def test_ties_tied_vote_elects_plus_and_all_zero_entries_keep_the_base():
    base = t(0.0, 0.0, 5.0)
    experts = [t(1.0, 2.0, 5.0), t(-1.0, -1.0, 5.0)]
    merged = merge_tensor(get_method("ties"), base, experts, params(1.0, 1.0), MethodParams())
    # entry 0: +1 and -1 sum to 0, which elects +, so only the first expert counts (divisor 1).
    # entry 1: sum +1 elects +. entry 2: no expert moved, divisor 0 -> 1, result is the base, not NaN.
    assert torch.equal(merged, t(1.0, 2.0, 5.0))


def test_ties_elects_on_weighted_deltas_and_normalizes_by_signed_weights():
    # mergekit semantics: a negative weight flips the vote; the divisor sums the (negative) weight too.
    base = t(0.0)
    experts = [t(2.0), t(1.0)]
    merged = merge_tensor(get_method("ties"), base, experts, params(-1.0, 1.0), MethodParams())
    # weighted deltas (-2, 1): elected -, only expert 0 agrees: -2 / -1 = 2
    assert torch.equal(merged, t(2.0))


def test_ties_density_keeps_int_of_density_times_numel():
    assert magnitude_mask(torch.randn(100), 0.29).sum() == 28  # 0.29 * 100 == 28.999999999999996
    assert magnitude_mask(torch.randn(100), 0.5).sum() == 50
    assert magnitude_mask(torch.randn(100), 0.001).sum() == 1  # never trims a tensor away entirely
    tied = t(1.0, 3.0, 2.0, 3.0, 2.0, 2.0)
    assert magnitude_mask(tied, 0.5).tolist() == [False, True, True, True, False, False]
    assert magnitude_mask(-tied.reshape(2, 3), 0.5).reshape(-1).tolist() == magnitude_mask(tied, 0.5).tolist()


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties"])
def test_density_one_does_not_sparsify_or_draw(name):
    gen = torch.Generator().manual_seed(0)
    base, experts = torch.randn(50), [torch.randn(50) for _ in range(3)]
    merged = merge_tensor(get_method(name), base, experts, params(1.0, 0.5, 0.2), MethodParams(), gen)
    method = get_method(name)
    expected = loop_merge(
        base.tolist(),
        [e.tolist() for e in experts],
        [1.0, 0.5, 0.2],
        None,
        method.consensus == "sum",
        method.default_normalize,
        False,
        1.0,
    )
    assert torch.allclose(merged, torch.tensor(expected), atol=1e-6)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())


# ---------------------------------------------------------------- against the loop implementation


@pytest.mark.parametrize(
    ("weights", "densities", "method_params"),
    [
        ([1.0, 1.0, 1.0], [0.3, 0.3, 0.3], MethodParams()),
        ([0.9, 0.4, 0.7], [0.2, 0.5, 0.8], MethodParams(normalize=False, lambda_=0.6)),
        ([0.9, -0.4, 0.7], [0.2, 0.5, 0.8], MethodParams(rescale=True, lambda_=1.4)),
        ([0.5, 0.5, 0.5], [1.0, 0.1, 0.6], MethodParams(normalize=True, int8_mask=True)),
    ],
)
def test_ties_matches_loop_implementation(weights, densities, method_params):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(6, 9, generator=gen)
    experts = [base + 0.1 * torch.randn(6, 9, generator=gen) for _ in weights]
    merged = merge_tensor(
        get_method("ties"), base, experts, params(*weights, density=densities), method_params
    )
    keep = [top_k_keep((e - base).reshape(-1).tolist(), d) for e, d in zip(experts, densities, strict=True)]
    expected = loop_merge(
        base.reshape(-1).tolist(),
        [e.reshape(-1).tolist() for e in experts],
        weights,
        keep,
        consensus=True,
        normalize=True if method_params.normalize is None else method_params.normalize,
        rescale=bool(method_params.rescale),
        lambda_=method_params.lambda_,
    )
    assert torch.allclose(merged.reshape(-1), torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(
    "method_params", [MethodParams(), MethodParams(rescale=False, normalize=True, lambda_=0.5)]
)
def test_dare_matches_loop_implementation_with_the_same_masks(name, method_params):
    method = get_method(name)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, generator=gen)
    experts = [base + 0.1 * torch.randn(40, generator=gen) for _ in range(3)]
    weights, densities = [1.0, 0.6, 0.8], [0.5, 0.7, 0.3]
    merged = merge_tensor(
        method, base, experts, params(*weights, density=densities), method_params, tensor_generator(5, "w")
    )
    # The masks are drawn one expert after the other from the generator; replay them.
    replay = tensor_generator(5, "w")
    keep = [random_mask(base, d, replay).tolist() for d in densities]
    expected = loop_merge(
        base.tolist(),
        [e.tolist() for e in experts],
        weights,
        keep,
        consensus=method.consensus == "sum",
        normalize=method.default_normalize if method_params.normalize is None else method_params.normalize,
        rescale=method.default_rescale if method_params.rescale is None else method_params.rescale,
        lambda_=method_params.lambda_,
    )
    assert torch.allclose(merged, torch.tensor(expected), atol=1e-6)


# ---------------------------------------------------------------- DARE statistics and determinism


def test_dare_keeps_a_density_fraction_and_rescale_preserves_expectation():
    tau = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    base = torch.zeros_like(tau)
    method = get_method("dare_linear")
    kept = random_mask(tau, 0.3, tensor_generator(0, "keep-rate")).float().mean().item()
    assert abs(kept - 0.3) < 0.03  # binomial std 0.01

    def mean_over_draws(rescale: bool) -> torch.Tensor:
        draws = [
            merge_tensor(
                method,
                base,
                [tau],
                params(1.0, density=0.3),
                MethodParams(rescale=rescale),
                tensor_generator(s, "x"),
            )
            for s in range(200)
        ]
        return torch.stack(draws).mean(0)

    rescaled = mean_over_draws(True)
    # each draw restores the L1 norm exactly; averaged over draws every entry tends to tau
    single = merge_tensor(
        method, base, [tau], params(1.0, density=0.3), MethodParams(), tensor_generator(0, "x")
    )
    assert torch.isclose(single.abs().sum(), tau.abs().sum(), rtol=1e-5)
    assert (rescaled - tau).norm() / tau.norm() < 0.15  # expected ~ sqrt(0.7 / 0.3 / 200) = 0.11
    plain = mean_over_draws(False)
    assert (plain - 0.3 * tau).norm() / tau.norm() < 0.05


def test_tensor_generator_depends_only_on_seed_and_name():
    def mask(seed: int, name: str) -> torch.Tensor:
        return random_mask(torch.zeros(256), 0.5, tensor_generator(seed, name))

    first = [mask(1, n) for n in ("a.weight", "b.weight")]
    second = [mask(1, n) for n in ("b.weight", "a.weight")][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(mask(1, "a.weight"), mask(1, "b.weight"))
    assert not torch.equal(mask(1, "a.weight"), mask(2, "a.weight"))


def test_dare_merge_reproduces_with_the_same_generator():
    base, experts = torch.randn(100), [torch.randn(100) for _ in range(2)]

    def run(name: str) -> torch.Tensor:
        return merge_tensor(
            get_method("dare_ties"),
            base,
            experts,
            params(1.0, 1.0, density=0.5),
            MethodParams(),
            tensor_generator(9, name),
        )

    assert torch.equal(run("x"), run("x"))
    assert not torch.equal(run("x"), run("y"))


# ---------------------------------------------------------------- dtypes and errors


def test_low_precision_inputs_are_merged_in_float32_and_returned_in_base_dtype():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen).bfloat16()
    experts = [(base.float() + 0.01 * torch.randn(64, generator=gen)).bfloat16() for _ in range(3)]
    method = get_method("ties")
    merged = merge_tensor(method, base, experts, params(1.0, 1.0, 1.0, density=0.5), MethodParams())
    reference = merge_tensor(
        method, base.float(), [e.float() for e in experts], params(1.0, 1.0, 1.0, density=0.5), MethodParams()
    )
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, reference.bfloat16())
    average = merge_tensor(
        get_method("average"), None, [e.half() for e in experts], params(1, 1, 1), MethodParams()
    )
    assert average.dtype == torch.float16


def test_int8_mask_has_no_numeric_effect():
    base, experts = torch.randn(30), [torch.randn(30) for _ in range(3)]
    a = merge_tensor(get_method("ties"), base, experts, params(1, 0.5, 2, density=0.4), MethodParams())
    b = merge_tensor(
        get_method("ties"), base, experts, params(1, 0.5, 2, density=0.4), MethodParams(int8_mask=True)
    )
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "base", "experts", "expert_params", "method_params", "message"),
    [
        (
            "ties",
            torch.zeros(3),
            [torch.zeros(3), torch.zeros(4)],
            params(1, 1),
            MethodParams(),
            r"shapes.*1 has \[4\]",
        ),
        (
            "average",
            None,
            [torch.zeros(2, 2), torch.zeros(2)],
            params(1, 1),
            MethodParams(),
            "different shapes",
        ),
        (
            "ties",
            torch.zeros(3),
            [torch.zeros(3)],
            params(1, density=0.0),
            MethodParams(),
            r"density must be in \(0, 1\]",
        ),
        (
            "dare_ties",
            torch.zeros(3),
            [torch.zeros(3)],
            params(1, density=1.5),
            MethodParams(),
            "density must be",
        ),
        (
            "task_arithmetic",
            torch.zeros(3),
            [torch.zeros(3)],
            params(1, density=0.5),
            MethodParams(),
            "no effect",
        ),
        ("ties", None, [torch.zeros(3)], params(1), MethodParams(), "needs the base"),
        ("ties", torch.zeros(3), [torch.zeros(3)], params(1, 1), MethodParams(), "2 expert parameter sets"),
        ("ties", torch.zeros(3), [], [], MethodParams(), "at least one expert"),
        ("average", None, [torch.zeros(3)], params(1), MethodParams(lambda_=0.5), "lambda"),
        ("average", None, [torch.zeros(3)] * 2, params(1, -1), MethodParams(), "sum of weights"),
        ("average", None, [torch.zeros(3, dtype=torch.long)], params(1), MethodParams(), "floating-point"),
    ],
)
def test_bad_inputs_give_clear_errors(name, base, experts, expert_params, method_params, message):
    with pytest.raises(ExpertMergeError, match=message):
        merge_tensor(get_method(name), base, experts, expert_params, method_params)


# ---------------------------------------------------------------- parity with mergekit


def load_reference() -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    with safe_open(str(REFERENCE), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    return metadata, json.loads(metadata["cases"]), tensors


REFERENCE_METADATA, REFERENCE_CASES, REFERENCE_TENSORS = load_reference()  # read once, not per case


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=[c["id"] for c in REFERENCE_CASES])
def test_matches_mergekit(case):
    """Outputs of mergekit's own merge functions (see tests/data/make_mergekit_reference.py), every entry.

    Random methods (DARE, DELLA): mergekit draws its masks from torch's global RNG, which the generator
    script seeded with `torch.manual_seed(seed)` right before each call. A generator seeded with the same
    number replays that stream, so we get the very same masks and compare exactly, not just statistically.
    Ties in magnitude (the `ties_in_magnitude` and `many_ties` sets) are broken as mergekit breaks them.
    """
    metadata, tensors = REFERENCE_METADATA, REFERENCE_TENSORS
    prefix = f"inputs/{case['input_set']}"
    base = tensors[f"{prefix}/base"] if case["base"] else None
    experts = [tensors[f"{prefix}/expert{i}"] for i in case["experts"]]
    method = get_method(case["method"])
    model_values = [
        {**method.defaults("model"), **{key: values[i] for key, values in case["models"].items()}}
        for i in range(len(experts))
    ]
    global_values = {**method.defaults("global"), **case["shared"]}
    generator = None if case["seed"] is None else torch.Generator().manual_seed(case["seed"])
    ours = method.merge(base, experts, model_values, global_values, generator)
    theirs = tensors[f"cases/{case['id']}/output"]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    difference = (ours - theirs).abs().max().item()
    assert difference <= 1e-6, f"max abs diff to mergekit {metadata['mergekit_version']}: {difference}"
