"""Streamed task vectors (`model.task_vectors: streamed`): the resident fit's numbers, one layer in hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LEAN_FIT, fit_args
from transformers import AutoConfig

from expertmerge.cli import main
from expertmerge.coefficients import MergeCoefficients, TaskVectors
from expertmerge.paths import cache_dir
from expertmerge.streaming import HostStore, StreamedTaskVectors, layer_groups

SHORT = ("--model.scheduler", "constant", *LEAN_FIT)


def coefficients(folder: Path) -> dict[str, dict[str, list[float]]]:
    return json.loads((folder / "coefficients.json").read_text())["coefficients"]


def assert_same(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for expert in a[name]:
            assert a[name][expert] == pytest.approx(b[name][expert], abs=tol), (name, expert)


def run(tmp: Path, name: str, *overrides: str) -> Path:
    assert main(fit_args(tmp, name, *SHORT, *overrides)) == 0
    return tmp / name


def test_streamed_fit_learns_the_resident_layerwise_and_chunkwise_coefficients(
    tiny_zoo, tmp_path: Path
) -> None:
    # One two-stage fit each way: the chunk allocation is computed from the stage-1 (layer-wise) values and
    # the task vectors, and the tensors left with 0 chunks keep their stage-1 value, so both stages are compared.
    chunked = ("--model.chunking", "true", "--trainer.max_steps", "3", "--model.stage2_steps", "3")
    resident = run(tmp_path, "resident", *chunked)
    streamed = run(tmp_path, "streamed", *chunked, "--model.task_vectors", "streamed")  # CPU: the disk store
    first, second = coefficients(resident), coefficients(streamed)
    assert_same(first, second)
    allocation = [
        json.loads((f / "chunk_allocation.json").read_text())["tensors"] for f in (resident, streamed)
    ]
    assert allocation[0].keys() == allocation[1].keys()
    for name, info in allocation[0].items():
        assert allocation[1][name]["chunks"] == info["chunks"]
        assert allocation[1][name]["importance"] == pytest.approx(info["importance"], rel=1e-6)
    assert {info["chunks"] for info in allocation[0].values()} >= {0, 2}  # fixed and chunked tensors both
    moved = max(abs(v - 0.3) for t in first.values() for vs in t.values() for v in vs)
    assert moved > 0.05  # the fits moved the coefficients: this is not the equality of two untouched starts
    # the disk store holds tau of the 14 learned tensors for 3 experts in bf16, and nothing else
    (store,) = (cache_dir() / "task_vectors").glob("*/model.safetensors")
    config = AutoConfig.from_pretrained(str(tiny_zoo / "base"))
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * inter
    expected = 3 * config.num_hidden_layers * per_layer * 2
    assert expected < store.stat().st_size < expected + 16_384  # + the header


def _stores(shapes: list[tuple[int, ...]], seed: int = 0) -> tuple[TaskVectors, StreamedTaskVectors]:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator).to(torch.bfloat16) for shape in shapes]
    resident = TaskVectors([s[1:] for s in shapes], shapes[0][0], torch.bfloat16)
    for index, tensor in enumerate(tensors):
        resident[index].copy_(tensor)
    return resident, StreamedTaskVectors(HostStore(tensors), shapes, NAMES)


NAMES = [f"model.layers.{layer}.{part}.weight" for layer in range(4) for part in ("q", "o")]


def test_layer_groups_follow_the_decoder_layers() -> None:
    assert layer_groups(NAMES) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layer_groups(["a.weight", "m.layers.0.q", "m.layers.0.k", "b"]) == [[0], [1, 2], [3]]


def test_streamed_gradient_equals_the_resident_gradient_and_holds_two_layers() -> None:
    shapes = [(3, 6, 5)] * len(NAMES)
    resident, streamed = _stores(shapes)
    generator = torch.Generator().manual_seed(1)
    bases = [torch.randn(6, 5, generator=generator) for _ in NAMES]
    grads = []
    for vectors in (resident, streamed):
        coefficients = MergeCoefficients(
            NAMES, [6] * len(NAMES), 3, alpha0=[0.2, 0.3, 0.4], chunks={NAMES[2]: 3}
        )
        merged = [coefficients.merged_tensor(i, bases[i], vectors.for_merge(i)) for i in range(len(NAMES))]
        if vectors is streamed:
            assert len(streamed._cache) <= 2  # the layer in hand and the one read ahead, never all four
        loss = sum((m.sin() * (i + 1)).sum() for i, m in enumerate(merged))
        loss.backward()
        grads.append([p.grad.clone() for p in coefficients.logits])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)  # the same bf16 values through the same ops: equal, not just close
    # forward read the 4 layers once; backward read them again from the top (the last two were in hand)
    assert streamed.reads <= 4 + 3


def test_streamed_reads_arrive_on_the_modules_device_and_index_like_a_sequence() -> None:
    resident, streamed = _stores([(2, 4, 3)] * len(NAMES))
    assert len(streamed) == len(resident) == len(NAMES)
    assert [t.shape for t in streamed] == [t.shape for t in resident]  # iteration stops at the end
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed, strict=True))
    with pytest.raises(IndexError):
        streamed[len(NAMES)]
