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
    # 4096 entries with only a few distinct magnitudes: the unstable sort's choice among thousands of ties.
    base = torch.round(16 * torch.randn(64, 64, generator=gen)) / 16
    deltas = [torch.round(2 * torch.randn(64, 64, generator=gen)) / 8 for _ in range(N_EXPERTS)]
    sets["many_ties"] = (base, [base + d for d in deltas])
    # Task vectors that are exactly zero on most entries, overlapping on some (RAM's unique / shared).
    base = 0.1 * torch.randn(16, 16, generator=gen)
    masks = [torch.rand(16, 16, generator=gen) < 0.35 for _ in range(N_EXPERTS)]
    sets["sparse"] = (base, [base + 0.05 * torch.randn(16, 16, generator=gen) * m for m in masks])
    # slerp's fallbacks: a colinear (scaled) and an antipodal model, and a zero tensor.
    base = 0.1 * torch.randn(8, 8, generator=gen)
    sets["colinear"] = (base, [2.5 * base, -base, torch.zeros_like(base)])
    return {
        name: {"base": b, **{f"expert{i}": e for i, e in enumerate(es)}} for name, (b, es) in sets.items()
    }


def cases() -> list[dict]:
    """Each case: the method, its inputs (`experts` indices into the set, `base` whether the base is one),
    per-model parameters (`models`: name -> one value per expert), shared parameters, the RNG seed."""
    out = []

    def add(method: str, input_set: str, experts=(0, 1, 2), base=True, seed=None, models=None, **shared):
        out.append(
            dict(
                id=f"{len(out):02d}_{method}_{input_set}",
                method=method,
                input_set=input_set,
                experts=list(experts),
                base=base,
                models={k: list(v) for k, v in (models or {}).items()},
                seed=seed,
                shared=shared,
            )
        )

    def ta(method, input_set, weights, densities=None, seed=None, **shared):
        models = {"weight": weights}
        if densities is not None:
            models["density"] = densities
        for key in ("gamma", "epsilon"):
            if key in shared:
                value = shared.pop(key)
                models[key] = value if isinstance(value, list) else [value] * len(weights)
        add(method, input_set, base=method != "linear", seed=seed, models=models, **shared)

    ta("linear", "matrix", [1.0, 1.0, 1.0])
    ta("linear", "matrix", [0.5, 0.3, 0.2], normalize=False)
    ta("linear", "vector", [2.0, -0.5, 1.0], normalize=True)

    ta("task_arithmetic", "matrix", [1.0, 1.0, 1.0])
    ta("task_arithmetic", "matrix", [0.3, 0.5, 0.2], **{"lambda": 0.7})
    ta("task_arithmetic", "vector", [1.0, -0.5, 0.8], normalize=True)
    ta("task_arithmetic", "large", [0.6, 0.6, 0.6], normalize=True, **{"lambda": 1.5})

    ta("ties", "matrix", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    ta("ties", "matrix", [1.0, 0.5, 0.8], [0.3, 0.5, 0.7])
    ta("ties", "matrix", [1.0, 0.5, 0.8], [0.3, 0.5, 0.7], normalize=False)
    ta("ties", "matrix", [0.7, 0.7, 0.7], [0.5, 0.5, 0.5], rescale=True, **{"lambda": 1.3})
    ta("ties", "matrix", [1.0, 1.0, 1.0], [0.29, 0.001, 0.99], int8_mask=True)  # int(0.29*100) == 28
    ta("ties", "vector", [1.0, -1.0, 0.5], [0.5, 0.6, 0.3])
    ta("ties", "ties_in_magnitude", [1.0, 0.6, 0.9], [0.4, 0.25, 0.6])
    ta("ties", "ties_in_magnitude", [1.0, 1.0, 1.0], [0.15, 0.15, 0.15], rescale=True)
    ta("ties", "large", [1.0, 0.4, 0.7], [0.2, 0.4, 0.1])
    ta("ties", "many_ties", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    ta("ties", "many_ties", [1.0, 0.5, 0.8], [0.3, 0.45, 0.7], rescale=True)

    ta("dare_linear", "matrix", [1.0, 1.0, 1.0], [0.5, 0.7, 0.3], seed=11)
    ta("dare_linear", "matrix", [0.5, 0.3, 0.9], [0.4, 0.4, 0.9], seed=12, rescale=False)
    ta("dare_linear", "large", [0.5, 0.3, 0.9], [0.2, 0.6, 0.5], seed=13, normalize=True)
    ta("dare_ties", "matrix", [1.0, 0.6, 0.8], [0.5, 0.7, 0.3], seed=21)
    ta("dare_ties", "matrix", [1.0, 0.6, 0.8], [0.5, 0.7, 0.3], seed=22, normalize=True, **{"lambda": 0.8})
    ta("dare_ties", "large", [1.0, -0.5, 0.8], [0.3, 0.3, 0.6], seed=23, rescale=False)

    ta("breadcrumbs", "matrix", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], gamma=0.1)
    ta("breadcrumbs", "many_ties", [1.0, 0.6, 0.9], [0.4, 0.6, 0.9], gamma=[0.01, 0.1, 0.2])  # 0.9 + 0.2 > 1
    ta("breadcrumbs", "large", [0.5, 0.8, 0.3], [0.3, 0.7, 0.2], normalize=True, **{"lambda": 1.2})
    ta("breadcrumbs_ties", "matrix", [1.0, 0.5, 0.8], [0.6, 0.4, 0.5], gamma=0.05)
    ta(
        "breadcrumbs_ties",
        "many_ties",
        [1.0, 1.0, 1.0],
        [0.3, 0.5, 0.7],
        gamma=0.02,
        normalize=True,
        rescale=True,
    )
    ta("breadcrumbs_ties", "vector", [1.0, -0.5, 0.8], [0.5, 0.6, 0.3], gamma=0.1)

    ta("della", "matrix", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], seed=31, epsilon=0.1)
    ta("della", "many_ties", [1.0, 0.6, 0.9], [0.3, 0.5, 0.7], seed=32)  # epsilon: mergekit's 0.15
    ta("della", "vector", [1.0, 0.5, 0.8], [0.4, 0.6, 0.5], seed=33, epsilon=0.2, rescale=False)
    ta("della_linear", "matrix", [1.0, 0.7, 0.4], [0.5, 0.4, 0.6], seed=34, epsilon=0.3)
    ta("della_linear", "large", [0.5, 0.5, 0.5], [0.3, 0.5, 0.7], seed=35, normalize=True)

    for input_set, t in (("matrix", 0.3), ("matrix", 0.7), ("vector", 0.5), ("large", -0.2), ("large", 1.2)):
        add("slerp", input_set, experts=[0], t=t)
    for expert, t in ((0, 0.4), (1, 0.6), (2, 0.3)):  # colinear, antipodal, a zero model
        add("slerp", "colinear", experts=[expert], t=t)

    add("nuslerp", "matrix", experts=[0, 1], models={"weight": [0.3, 0.7]})
    add("nuslerp", "matrix", experts=[0, 1], base=False, models={"weight": [1.0, 1.0]})
    add("nuslerp", "matrix", experts=[1, 2], models={"weight": [0.6, 0.4]}, nuslerp_flatten=False)
    add(
        "nuslerp",
        "large",
        experts=[0, 2],
        models={"weight": [0.2, 0.5]},
        nuslerp_flatten=False,
        nuslerp_row_wise=True,
    )
    add("nuslerp", "large", experts=[0, 1], base=False, models={"weight": [1.0, -1.0]}, nuslerp_flatten=False)
    add("nuslerp", "colinear", experts=[0, 1], base=False, models={"weight": [0.5, 0.5]})

    add("multislerp", "matrix", models={"weight": [1.0, 0.5, 0.8]})
    add("multislerp", "matrix", base=False, models={"weight": [1.0, 1.0, 1.0]})
    add("multislerp", "large", models={"weight": [0.2, 0.3, 0.4]}, normalize_weights=False)
    add("multislerp", "vector", experts=[0, 2], models={"weight": [0.7, 0.3]}, eps=1e-6)

    add("karcher", "matrix", base=False)
    add("karcher", "large", base=False, max_iter=2)
    add("karcher", "vector", experts=[0, 1], base=False, tol=1e-3)
    add("karcher", "colinear", base=False)  # one zero model

    add("model_stock", "matrix")
    add("model_stock", "matrix", filter_wise=True)
    add("model_stock", "vector", filter_wise=True)
    add("model_stock", "large", experts=[0, 1])

    for input_set, t in (("matrix", 0.01), ("matrix", 0.05), ("large", 0.001), ("sparse", 0.02)):
        add("nearswap", input_set, experts=[0], t=t)

    for input_set, expert in (("matrix", 0), ("vector", 1), ("large", 2), ("sparse", 0)):
        add("arcee_fusion", input_set, experts=[expert])

    add("ram", "sparse")
    add("ram", "sparse", epsilon=0.01)
    add("ram", "matrix", experts=[0, 1])
    add("ramplus_tl", "sparse")
    add("ramplus_tl", "sparse", r=0.5, alpha=1.0, epsilon=0.005)

    add("sce", "matrix")
    add("sce", "matrix", select_topk=0.3)
    add("sce", "ties_in_magnitude", select_topk=0.5, int8_mask=True)
    add("sce", "large", select_topk=0.29)
    add("sce", "sparse", select_topk=0.1)
    return out


def run_case(case: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    experts = [tensors[f"expert{i}"] for i in case["experts"]]
    parameters = dict(case["shared"], **case["models"])
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    if not case["base"]:
        return merge_tensors(experts, case["method"], parameters=parameters)
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
