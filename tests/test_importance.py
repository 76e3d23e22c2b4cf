import torch

from expertmerge.importance import allocate_chunks, importance_scores


def test_importance_follows_the_formula_and_is_normalised():
    coefficients = torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.4, 0.0]])
    mean_abs = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, 0.0]])
    numels = [10, 20, 30]
    raw = torch.tensor(
        [(0.5 * 1 + 0.1 * 4) * 10, (0.2 * 2 + 0.4 * 0.5) * 20, (0.1 * 3 + 0) * 30], dtype=torch.float64
    )
    scores = importance_scores(coefficients, mean_abs, numels)
    assert torch.allclose(scores, raw / raw.sum())
    assert abs(float(scores.sum()) - 1.0) < 1e-12


def test_total_never_exceeds_the_budget():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        importance = torch.rand(17, generator=generator) ** 3
        budget = int(torch.randint(0, 60, (1,), generator=generator))
        rows = torch.randint(1, 8, (17,), generator=generator).tolist()
        for kappa in (0.0, 0.5, 1.0, 2.0):
            chunks = allocate_chunks(importance, budget, kappa, rows)
            assert sum(chunks) <= budget
            assert all(0 <= c <= r for c, r in zip(chunks, rows, strict=True))
            if sum(rows) >= budget:
                assert sum(chunks) == budget, (trial, kappa)


def test_kappa_zero_gives_a_near_uniform_split():
    importance = torch.tensor([0.7, 0.2, 0.05, 0.04, 0.01])
    chunks = allocate_chunks(importance, budget=12, kappa=0.0)
    assert max(chunks) - min(chunks) <= 1
    assert sum(chunks) == 12


def test_larger_kappa_concentrates_chunks_on_important_tensors():
    importance = torch.tensor([0.6, 0.25, 0.1, 0.05])
    flat = allocate_chunks(importance, budget=8, kappa=1.0)
    sharp = allocate_chunks(importance, budget=8, kappa=2.0)
    assert flat == [5, 2, 1, 0]
    assert sharp[0] >= flat[0] and sharp[-1] == 0


def test_a_tensor_with_zero_task_vector_mass_gets_no_chunks():
    coefficients = torch.full((2, 4), 0.3)
    mean_abs = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 0.0, 1.0, 3.0]])
    importance = importance_scores(coefficients, mean_abs, [4, 4, 4, 4])
    for kappa in (0.0, 1.0):
        chunks = allocate_chunks(importance, budget=4, kappa=kappa)
        assert chunks[1] == 0
        assert sum(chunks) == 4
