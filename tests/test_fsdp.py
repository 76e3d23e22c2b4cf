"""`--trainer.strategy fsdp` on 2 CPU processes (gloo) learns and exports what one process does.

Under fsdp the learned tensors' base and task vectors are sharded by decoder layer over the ranks
(`expertmerge/fsdp.py`) and the coefficients are replicated, their gradients averaged before every step. The
batches are shared out as under DDP (see tests/test_ddp.py): 2 ranks x accumulate 3 == 1 process x accumulate 6.
One Expert Merging++ fit covers both kinds: stage 1 is the layer-wise fit (its result decides the chunk
allocation, compared through the importances), stage 2 the chunk-wise one (compared coefficient by
coefficient), and the exported model is compared tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import TOLERANCE, fit_in_subprocess, flat

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def exported(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_fsdp_on_two_cpu_processes_learns_and_exports_the_single_process_merge(
    tiny_zoo, tmp_path: Path
) -> None:
    chunking = ("--model.chunking", "true", "--model.stage2_steps", "4", "--trainer.accelerator", "cpu")
    sharded = fit_in_subprocess(
        tmp_path,
        "fsdp",
        *chunking,
        "--trainer.strategy",
        "fsdp",
        "--trainer.devices",
        "2",
        "--trainer.accumulate_grad_batches",
        "3",
    )
    single = fit_in_subprocess(
        tmp_path, "single", *chunking, "--trainer.devices", "1", "--trainer.accumulate_grad_batches", "6"
    )
    # stage 1, layer-wise: the chunk allocation is a function of its coefficients and the task vectors (which
    # the sharded run reads back gathered from the shards)
    allocations = [
        json.loads((tmp_path / n / "chunk_allocation.json").read_text()) for n in ("fsdp", "single")
    ]
    importances = [[t["importance"] for _, t in sorted(a["tensors"].items())] for a in allocations]
    assert importances[0] == pytest.approx(importances[1], abs=TOLERANCE)
    assert allocations[0]["total_chunks"] == allocations[1]["total_chunks"] > 0
    # stage 2, chunk-wise
    assert sharded["chunk_counts"] == single["chunk_counts"]
    sharded_values, single_values = flat(sharded), flat(single)
    assert len(sharded_values) == len(single_values) >= 42
    assert sharded_values == pytest.approx(single_values, abs=TOLERANCE)
    # moved far more than the tolerance: a rank that kept its own gradients would not pass the check above
    assert max(abs(v - 0.3) for v in single_values) > 1000 * TOLERANCE
    # the export, gathered layer by layer on rank 0 and written by the one writer
    ours, theirs = exported(tmp_path / "fsdp"), exported(tmp_path / "single")
    assert sorted(ours) == sorted(theirs) and len(ours) > 14
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    assert worst <= 1e-6
