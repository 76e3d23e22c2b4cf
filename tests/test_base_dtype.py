"""`model.base_dtype: bfloat16`: the base's learned tensors held in bf16, each merge still computed in fp32."""

from __future__ import annotations

import torch
from conftest import FIT_TINY

from expertmerge.cli.fit import read_fit_config
from expertmerge.plan import estimate_fit

STEPS = 6
# Measured on the tiny zoo (an fp32 checkpoint, so bf16 rounds its base) with the default objective (KL + 3 x
# the texts' loss, expert-gain balance): the two fits' coefficients differ by at most 5.5e-3 (mean 8.9e-4)
# after 6 steps, having moved up to 0.099 from 0.3
# (one coefficient whose gradient is near zero, where Adam's first steps move by lr x sign), most by ~1e-4
# to 1e-3; a bf16 checkpoint would give the fp32 fit's numbers exactly.
TOLERANCE = 1e-2
MEAN_TOLERANCE = 1.5e-3


def fitted(base_dtype: str) -> tuple[torch.Tensor, object]:
    """The tiny config's merge after STEPS hand-run steps (the fit's loss + backward + Adam)."""
    config = read_fit_config(FIT_TINY, ["--model.base_dtype", base_dtype])
    config.model.run.datamodule = config.datamodule
    learned = config.model.run.prepare()
    learned.before_training()
    merged = learned.merged
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=0.1)
    batches = iter(config.datamodule.train_dataloader())
    for _ in range(STEPS):
        batch = next(batches)
        loss, _, _ = learned.objective.training_loss(batch if isinstance(batch, list) else [batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return merged.coefficients.layerwise_values(), merged


def test_bf16_base_halves_the_learned_base_and_learns_the_fp32_coefficients(tiny_zoo) -> None:
    full, full_module = fitted("float32")
    half, half_module = fitted("bfloat16")
    names = half_module.coefficient_names
    assert {half_module.model.get_parameter(n).dtype for n in names} == {torch.bfloat16}
    others = [p for n, p in half_module.model.named_parameters() if n not in set(names)]
    assert {p.dtype for p in others} == {torch.float32}  # embeddings, norms, lm_head stay fp32
    merged = half_module.merged_parameters()
    assert {merged[n].dtype for n in names} == {torch.float32}  # the merge and the forward run in fp32
    moved = (full - 0.3).abs().max().item()
    assert moved > 0.05
    assert (half - full).abs().max().item() < TOLERANCE
    assert (half - full).abs().mean().item() < MEAN_TOLERANCE, (half - full).abs().mean().item()
    # the planner counts it: the learned tensors at 2 bytes instead of 4
    learned = sum(full_module.model.get_parameter(n).numel() for n in names)
    plans = [
        estimate_fit(full_module.model, 3, names, 8, 64, base_dtype=d)["resident"].parts["base"]
        for d in ("float32", "bfloat16")
    ]
    assert plans[0] - plans[1] == 2 * learned
