"""What both demo zoos build with: the one training loop, its schedule and batch orders, the staged build."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from expertmerge.errors import ExpertMergeError
from expertmerge_zoos.staging import staged_build, write_manifest
from expertmerge_zoos.training import Schedule, epoch_batches, random_batches, train_causal_lm


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_its_floor() -> None:
    schedule = Schedule(steps=30, lr=6e-4, warmup_steps=3, min_lr_ratio=0.1)
    assert [schedule.factor(step) for step in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert schedule.factor(3) == 1.0
    assert schedule.factor(3 + 27 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 13 / 27)))
    assert schedule.factor(30) == pytest.approx(0.1)


def test_the_two_phase_orders_agree_to_rounding_but_not_bit_for_bit() -> None:
    fraction = Schedule(steps=150, lr=1e-3, warmup_steps=10)
    product = Schedule(steps=150, lr=1e-3, warmup_steps=10, phase_order="pi*done/span")
    factors = [(fraction.factor(step), product.factor(step)) for step in range(150)]
    assert all(a == pytest.approx(b, rel=1e-14, abs=1e-15) for a, b in factors)
    assert sum(a != b for a, b in factors) == 13  # why each zoo keeps its own order: its cached weights


def test_epoch_batches_visit_every_sample_once_before_any_twice() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = torch.cat(list(epoch_batches(10, batch_size=4, steps=5, generator=generator)))
    assert len(rows) == 20
    assert sorted(rows[:10].tolist()) == list(range(10))
    assert sorted(rows[10:20].tolist()) == list(range(10))


def test_random_batches_draw_from_the_generator_alone() -> None:
    draws = [torch.stack(list(random_batches(100, 8, 3, torch.Generator().manual_seed(1)))) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (3, 8) and int(draws[0].max()) < 100


def _right_padded(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 64, (16, 12), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(torch.randint(5, 13, (16,), generator=generator).tolist()):
        mask[row, length:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_training_lowers_the_loss_and_changes_only_the_chosen_tensors() -> None:
    from conftest import tiny_llama

    model = tiny_llama(seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids, mask = _right_padded(torch.Generator().manual_seed(0))
    schedule = Schedule(steps=40, lr=1e-2, warmup_steps=2)
    batches = epoch_batches(len(ids), 8, schedule.steps, torch.Generator().manual_seed(0))
    losses = train_causal_lm(model, ids, mask, batches, schedule, trains=lambda name: "layers.1.mlp" in name)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.92 * sum(losses[:5]) / 5  # 4.11 -> 3.69
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_without_an_attention_mask_right_padding_trains_the_same_to_rounding() -> None:
    from conftest import tiny_llama

    ids, mask = _right_padded(torch.Generator().manual_seed(2))
    schedule = Schedule(steps=5, lr=1e-2, warmup_steps=1)
    results = []
    for pass_mask in (True, False):
        model = tiny_llama(seed=0)
        batches = random_batches(len(ids), 8, schedule.steps, torch.Generator().manual_seed(0))
        losses = train_causal_lm(model, ids, mask, batches, schedule, pass_attention_mask=pass_mask)
        results.append((losses, model.model.layers[0].mlp.up_proj.weight))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_training_nothing_is_an_error() -> None:
    from conftest import tiny_llama

    ids, mask = _right_padded(torch.Generator().manual_seed(0))
    with pytest.raises(ExpertMergeError, match="trains no tensor"):
        train_causal_lm(tiny_llama(), ids, mask, [], Schedule(1, 1e-3, 1), trains=lambda name: False)


def test_staged_build_is_seeded_leaves_the_callers_rng_alone_and_renames_when_done(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_outside = torch.rand(3)
    torch.manual_seed(123)
    with staged_build(tmp_path / "zoo", seed=7) as staging:
        inside = torch.rand(3)
        write_manifest(staging, {"name": "z", "builder_version": 1}, 0.0)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.rand(3), expected_outside)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]
    assert (tmp_path / "zoo" / "zoo.json").is_file()


def test_a_staged_build_without_a_manifest_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with (
        pytest.raises(ExpertMergeError, match="wrote no zoo.json"),
        staged_build(tmp_path / "zoo", 0) as staging,
    ):
        (staging / "base").mkdir()
    assert list(tmp_path.iterdir()) == []
