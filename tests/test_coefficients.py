import pytest
import torch

from expertmerge.coefficients import MergeCoefficients, chunk_sizes
from expertmerge.errors import ExpertMergeError


def _setup(rows=6, cols=4, experts=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=generator)
    taus = torch.randn(experts, rows, cols, generator=generator)
    return base, taus


def test_layerwise_merge_is_base_plus_weighted_task_vectors():
    base, taus = _setup()
    coefficients = MergeCoefficients(["w"], [6], 3, alpha0=[0.2, 0.5, 0.7])
    merged = coefficients.merged_tensor(0, base, taus)
    expected = base + 0.2 * taus[0] + 0.5 * taus[1] + 0.7 * taus[2]
    assert torch.allclose(merged, expected, atol=1e-5)
    values = coefficients.values(0)
    assert values.shape == (3, 1)
    assert bool(((values > 0) & (values < 1)).all())


def test_gradient_matches_plain_autograd_for_bf16_task_vectors():
    base, taus = _setup(rows=8, cols=5)
    taus = taus.to(torch.bfloat16)
    coefficients = MergeCoefficients(["w"], [8], 3, alpha0=0.3, chunks={"w": 3})
    with torch.no_grad():
        coefficients.logits[0].add_(torch.randn(3, 3))
    weight = torch.randn(8, 5)
    (coefficients.merged_tensor(0, base, taus) * weight).sum().backward()
    ours = coefficients.logits[0].grad.clone()

    logits = coefficients.logits[0].detach().clone().requires_grad_(True)
    rows = torch.repeat_interleave(torch.sigmoid(logits), torch.tensor(chunk_sizes(8, 3)), dim=1)
    plain = base + (taus.float() * rows[:, :, None]).sum(0)
    (plain * weight).sum().backward()
    assert torch.allclose(ours, logits.grad, atol=1e-5)


def test_equal_chunks_reproduce_the_layerwise_merge_exactly():
    base, taus = _setup(rows=7)
    layerwise = MergeCoefficients(["w"], [7], 3, alpha0=0.3)
    with torch.no_grad():
        layerwise.logits[0].copy_(torch.tensor([[0.4], [-1.0], [2.0]]))
    start = {"w": layerwise.values(0).detach()}
    chunked = MergeCoefficients(["w"], [7], 3, alpha0=0.3, chunks={"w": 4}, start=start)
    assert chunked.values(0).shape == (3, 4)
    assert torch.equal(chunked.merged_tensor(0, base, taus), layerwise.merged_tensor(0, base, taus))
    assert chunk_sizes(7, 4) == [2, 2, 2, 1]


def test_chunk_count_never_exceeds_rows_and_zero_chunks_are_fixed():
    coefficients = MergeCoefficients(["a", "b"], [3, 5], 2, alpha0=0.3, chunks={"a": 10, "b": 0})
    assert coefficients.chunk_counts == [3, 0]
    assert coefficients.num_trainable() == 2 * 3
    assert torch.allclose(coefficients.values(1), torch.full((2, 1), 0.3))


def test_regularizer_measures_distance_from_the_start():
    coefficients = MergeCoefficients(["a", "b"], [3, 3], 2, alpha0=0.3)
    assert float(coefficients.regularizer().detach()) < 1e-6
    with torch.no_grad():
        coefficients.logits[0].fill_(0.0)  # c = 0.5 for tensor a
    expected = (2 * 0.2 + 2 * 0.0) / 4
    assert abs(float(coefficients.regularizer().detach()) - expected) < 1e-4


def test_alpha0_is_checked():
    with pytest.raises(ExpertMergeError, match="alpha0"):
        MergeCoefficients(["a"], [3], 2, alpha0=[0.1, 0.2, 0.3])
    with pytest.raises(ExpertMergeError, match="between 0 and 1"):
        MergeCoefficients(["a"], [3], 2, alpha0=1.5)


def test_coefficients_plot_title_says_what_was_fit():
    from expertmerge.plots import coefficients_title

    names, rows = ["q", "k", "v"], [4, 4, 4]
    layerwise = MergeCoefficients(names, rows, num_experts=2)
    assert (
        coefficients_title(layerwise.chunk_counts) == "learned coefficients, layer-wise fit (one per tensor)"
    )
    one_fixed = MergeCoefficients(names, rows, num_experts=2, chunks={"q": 1, "k": 1, "v": 0})
    assert coefficients_title(one_fixed.chunk_counts).endswith("layer-wise fit (one per tensor; 1 fixed)")
    chunked = MergeCoefficients(names, rows, num_experts=2, chunks={"q": 2, "k": 1, "v": 0})
    assert coefficients_title(chunked.chunk_counts) == (
        "learned coefficients, chunk-wise fit (chunk-size weighted mean per tensor)"
    )
