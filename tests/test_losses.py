import math

import torch

from expertmerge.losses import (
    full_kl_per_token,
    hidden_loss,
    hidden_mse_loss,
    logit_kl_loss,
    masked_mean,
    next_token_nll,
    topk_kl_per_token,
)


def _teacher_topk(teacher: torch.Tensor, k: int, temperature: float = 1.0):
    values, indices = teacher.topk(k, dim=-1)
    return values, indices, torch.logsumexp(teacher / temperature, dim=-1)


def test_topk_kl_equals_full_kl_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    for temperature in (1.0, 2.0):
        full = full_kl_per_token(student, teacher, temperature)
        topk = topk_kl_per_token(student, *_teacher_topk(teacher, 11, temperature), temperature)
        assert torch.allclose(topk, full, atol=1e-5)
        assert float(full.min()) > 0


def test_topk_kl_with_tail_bucket_is_a_tight_lower_bound():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4, 50), torch.randn(3, 4, 50) * 4
    full = full_kl_per_token(student, teacher)
    bound = topk_kl_per_token(student, *_teacher_topk(teacher, 10))
    # Merging the tail into one bucket can only lose information (data-processing inequality).
    assert bool((bound <= full + 1e-5).all())
    assert float(bound.mean()) > 0.5 * float(full.mean())


def test_topk_kl_is_zero_for_the_teacher_itself():
    torch.manual_seed(2)
    teacher = torch.randn(2, 3, 30)
    kl = topk_kl_per_token(teacher.clone(), *_teacher_topk(teacher, 5))
    assert float(kl.abs().max()) < 1e-5


def test_padding_never_counts():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    loss = logit_kl_loss(full_kl_per_token(student, teacher), mask)
    changed = student.clone()
    changed[0, 4:] = 100.0  # garbage at padded positions
    assert torch.allclose(logit_kl_loss(full_kl_per_token(changed, teacher), mask), loss)
    per_token = full_kl_per_token(student, teacher)
    assert math.isclose(float(loss), float(per_token[mask.bool()].mean()), rel_tol=1e-6)

    hidden_s, hidden_t = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mse = hidden_mse_loss(hidden_s, hidden_t, mask)
    expected = ((hidden_s - hidden_t) ** 2)[mask.bool()].mean()
    assert math.isclose(float(mse), float(expected), rel_tol=1e-6)
    hidden_s[0, 5] = 1e3
    assert math.isclose(float(hidden_mse_loss(hidden_s, hidden_t, mask)), float(expected), rel_tol=1e-6)


def test_temperature_scales_kl_by_t_squared():
    torch.manual_seed(4)
    student, teacher = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    mask = torch.ones(1, 4)
    kl = full_kl_per_token(student, teacher, 2.0)
    assert math.isclose(float(logit_kl_loss(kl, mask, 2.0)), 4 * float(kl.mean()), rel_tol=1e-6)


def test_masked_mean_and_next_token_nll():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert math.isclose(float(masked_mean(values, mask)), (1 + 2 + 4) / 3, rel_tol=1e-6)
    logits = torch.zeros(1, 3, 4)
    nll, target_mask = next_token_nll(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[1, 1, 0]]))
    assert torch.allclose(nll, torch.full((1, 2), math.log(4)))
    assert target_mask.tolist() == [[1, 0]]


def test_normalized_hidden_mse_does_not_depend_on_the_hidden_state_scale():
    torch.manual_seed(5)
    student, teacher = torch.randn(2, 6, 8), torch.randn(2, 6, 8) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    relative = hidden_loss(student, teacher, mask, "normalized_mse")
    # the same relative error at 100x the norm (SmolLM2's middle layer vs a tiny model's) gives the same term
    assert math.isclose(
        float(hidden_loss(100 * student, 100 * teacher, mask, "normalized_mse")),
        float(relative),
        rel_tol=1e-5,
    )
    plain = hidden_mse_loss(student, teacher, mask)
    expected = float(plain) / float((teacher**2)[mask.bool()].mean())
    assert math.isclose(float(relative), expected, rel_tol=1e-5)
    assert math.isclose(
        float(hidden_loss(torch.zeros_like(teacher), teacher, mask, "normalized_mse")), 1.0, rel_tol=1e-5
    )
    assert float(hidden_loss(student, teacher, mask, "mse")) == float(plain)


def test_cosine_hidden_loss_sees_direction_only_and_skips_padding():
    torch.manual_seed(6)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = hidden_loss(student, teacher, mask, "cosine")
    assert math.isclose(float(hidden_loss(7 * student, teacher, mask, "cosine")), float(loss), rel_tol=1e-5)
    assert float(hidden_loss(teacher, teacher, mask, "cosine")) < 1e-6
    assert math.isclose(float(hidden_loss(-teacher, teacher, mask, "cosine")), 2.0, rel_tol=1e-5)
    changed = student.clone()
    changed[0, 3:] = 1e3
    assert math.isclose(float(hidden_loss(changed, teacher, mask, "cosine")), float(loss), rel_tol=1e-6)
