"""Write `mergekit_reference.safetensors`: inputs and outputs of mergekit's own tensor-level merges.

`tests/test_methods.py` checks that `expertmerge.methods.merge_tensor` reproduces these outputs.
Generated with mergekit 0.1.5 and torch 2.13.0 (CPU); the versions are stored in the file's metadata.

mergekit is not a dependency of expertmerge, so it lives in its own virtual environment. To regenerate:

    python3 -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0   # first, so mergekit does not pull a CUDA build
    /tmp/mk-venv/bin/pip install mergekit
    /tmp/mk-venv/bin/python tests/data/make_mergekit_reference.py

Each case calls `mergekit.merge_methods.api.merge_tensors` on one tensor group: the base (index 0, for
the task-arithmetic family) and three experts, with per-expert `weight` / `density` and the method's shared
parameters. For DARE, mergekit draws its Bernoulli masks from torch's global RNG; the script seeds it with
`torch.manual_seed(seed)` right before the call, so a `torch.Generator().manual_seed(seed)` passed to our
`merge_tensor` draws the very same masks (same sampler, same order of experts), and the outputs can be
compared exactly.

File layout: tensors `inputs/<set>/base`, `inputs/<set>/expert<i>` and `cases/<id>/output`; metadata
`cases` (JSON list of case settings), `mergekit_version`, `torch_version`.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import torch
from mergekit.merge_methods.api import merge_tensors
from safetensors.torch import save_file

OUTPUT = Path(__file__).with_name("mergekit_reference.safetensors")
N_EXPERTS = 3


def input_sets() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)

    def experts_around(base: torch.Tensor, scale: float) -> list[torch.Tensor]:
        return [base + scale * torch.randn(base.shape, generator=gen) for _ in range(N_EXPERTS)]

    sets = {}
    base = 0.1 * torch.randn(10, 10, generator=gen)
    sets["matrix"] = (base, experts_around(base, 0.02))
    base = 0.1 * torch.randn(10, generator=gen)
    sets["vector"] = (base, experts_around(base, 0.05))
    # Dyadic values, so deltas are exact in float32 and many magnitudes tie: checks top-k tie-breaking.
    base = torch.round(8 * torch.randn(10, 10, generator=gen)) / 8
    deltas = [torch.round(3 * torch.randn(10, 10, generator=gen)) / 4 for _ in range(N_EXPERTS)]
    sets["ties_in_magnitude"] = (base, [base + d for d in deltas])
    base = 0.1 * torch.randn(32, 32, generator=gen)
    sets["large"] = (base, experts_around(base, 0.02))
    return {
        name: {"base": b, **{f"expert{i}": e for i, e in enumerate(es)}} for name, (b, es) in sets.items()
    }


def cases() -> list[dict]:
    out = []

    def add(method: str, input_set: str, weights, densities=None, seed=None, **shared):
        out.append(
            dict(
                id=f"{len(out):02d}_{method}_{input_set}",
                method=method,
                input_set=input_set,
                weights=list(weights),
                densities=None if densities is None else list(densities),
                seed=seed,
                shared=shared,
            )
        )

    add("linear", "matrix", [1.0, 1.0, 1.0])
    add("linear", "matrix", [0.5, 0.3, 0.2], normalize=False)
    add("linear", "vector", [2.0, -0.5, 1.0], normalize=True)

    add("task_arithmetic", "matrix", [1.0, 1.0, 1.0])
    add("task_arithmetic", "matrix", [0.3, 0.5, 0.2], **{"lambda": 0.7})
    add("task_arithmetic", "vector", [1.0, -0.5, 0.8], normalize=True)
    add("task_arithmetic", "large", [0.6, 0.6, 0.6], normalize=True, **{"lambda": 1.5})

    add("ties", "matrix", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    add("ties", "matrix", [1.0, 0.5, 0.8], [0.3, 0.5, 0.7])
    add("ties", "matrix", [1.0, 0.5, 0.8], [0.3, 0.5, 0.7], normalize=False)
    add("ties", "matrix", [0.7, 0.7, 0.7], [0.5, 0.5, 0.5], rescale=True, **{"lambda": 1.3})
    add("ties", "matrix", [1.0, 1.0, 1.0], [0.29, 0.001, 0.99], int8_mask=True)  # int(0.29*100) == 28
    add("ties", "vector", [1.0, -1.0, 0.5], [0.5, 0.6, 0.3])
    add("ties", "ties_in_magnitude", [1.0, 0.6, 0.9], [0.4, 0.25, 0.6])
    add("ties", "ties_in_magnitude", [1.0, 1.0, 1.0], [0.15, 0.15, 0.15], rescale=True)
    add("ties", "large", [1.0, 0.4, 0.7], [0.2, 0.4, 0.1])

    add("dare_linear", "matrix", [1.0, 1.0, 1.0], [0.5, 0.7, 0.3], seed=11)
    add("dare_linear", "matrix", [0.5, 0.3, 0.9], [0.4, 0.4, 0.9], seed=12, rescale=False)
    add("dare_linear", "large", [0.5, 0.3, 0.9], [0.2, 0.6, 0.5], seed=13, normalize=True)
    add("dare_ties", "matrix", [1.0, 0.6, 0.8], [0.5, 0.7, 0.3], seed=21)
    add("dare_ties", "matrix", [1.0, 0.6, 0.8], [0.5, 0.7, 0.3], seed=22, normalize=True, **{"lambda": 0.8})
    add("dare_ties", "large", [1.0, -0.5, 0.8], [0.3, 0.3, 0.6], seed=23, rescale=False)
    return out


def run_case(case: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    experts = [tensors[f"expert{i}"] for i in range(N_EXPERTS)]
    parameters = dict(case["shared"], weight=case["weights"])
    if case["method"] == "linear":
        return merge_tensors(experts, "linear", parameters=parameters)
    if case["densities"] is not None:
        parameters["density"] = case["densities"]
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    return merge_tensors([tensors["base"], *experts], case["method"], parameters=parameters, base_index=0)


def main() -> None:
    sets = input_sets()
    all_cases = cases()
    out = {f"inputs/{name}/{key}": t.contiguous() for name, ts in sets.items() for key, t in ts.items()}
    for case in all_cases:
        out[f"cases/{case['id']}/output"] = run_case(case, sets[case["input_set"]]).contiguous()
    metadata = {
        "cases": json.dumps(all_cases),
        "mergekit_version": version("mergekit"),
        "torch_version": torch.__version__,
    }
    save_file(out, str(OUTPUT), metadata=metadata)
    print(f"wrote {len(all_cases)} cases to {OUTPUT} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
