"""mergekit's task arithmetic family (average, task arithmetic, TIES, DARE, Breadcrumbs, DELLA) on one tensor.

Parameters mean exactly what they mean in mergekit (checked against mergekit 0.1.5, see
`tests/data/make_mergekit_reference.py`):

- `weight` scales each expert; `density` is the fraction of each task vector kept by sparsification.
- TIES keeps the top `max(1, int(density * numel))` entries of |tau_k| (ties at the cut: mergekit's sort).
- DARE keeps each entry with probability `density`.
- Breadcrumbs drops the `int(gamma * numel)` largest and then the smallest entries, keeping
  `int(density * numel)`; DELLA keeps each entry with a probability rising with its magnitude rank in its
  row, from density - epsilon to density + epsilon (see `expertmerge.methods.sparsification`).
- `rescale` (sparsifying methods only) multiplies the sparsified task vector so that its L1 norm equals
  the L1 norm before sparsification. This is mergekit's current rule; it is close to, but not exactly,
  the DARE paper's `1 / density` (the two agree in expectation over large tensors).
- Sign consensus "sum": the elected sign per entry is the sign of sum_k w_k tau_k (0 counts as +), and an
  expert contributes only where the sign of w_k tau_k equals the elected sign (an entry of 0 never does).
- `normalize` divides the mixed task vector by the summed weights of the experts that contributed
  (with consensus) or by sum_k w_k (without); a zero divisor is replaced by 1.
- `lambda_` scales the mixed task vector after normalization: result = base + lambda * mixed.
- `int8_mask` only changes the dtype of mergekit's consensus mask (a memory saving on GPU); it has no
  numeric effect here and is accepted for config compatibility.

Everything is computed in float32 (float64 if an input is float64) and returned in the base's dtype, or
the first expert's when there is no base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.methods.base import MergeMethod, check_inputs
from expertmerge.methods.parameters import Parameter
from expertmerge.methods.sparsification import sign_consensus, sparsify

# Below this value mergekit leaves a divisor at 1.
_DIVISOR_EPS = 1e-8


@dataclass(frozen=True)
class ExpertParams:
    """Per-expert settings: `weight` multiplies the expert's task vector, `density` is the kept fraction;
    `gamma` (Breadcrumbs: fraction of largest magnitudes dropped) and `epsilon` (DELLA: half-width of the
    keep probabilities) only matter to their sparsification."""

    weight: float = 1.0
    density: float = 1.0
    gamma: float = 0.01
    epsilon: float = 0.15


@dataclass(frozen=True)
class MethodParams:
    """Per-merge settings; `None` means the method's own default (as in mergekit)."""

    normalize: bool | None = None
    lambda_: float = 1.0
    rescale: bool | None = None
    int8_mask: bool = False


WEIGHT = Parameter(
    "weight", "model", float, 1.0, "multiplies the model's task vector (or the model, for `average`)"
)
DENSITY = Parameter(
    "density",
    "model",
    float,
    1.0,
    "fraction of the task vector kept by sparsification",
    low=0.0,
    high=1.0,
    low_open=True,
    neutral=1.0,
)
LAMBDA = Parameter(
    "lambda", "global", float, 1.0, "scales the mixed task vector: base + lambda * mixed", neutral=1.0
)
GAMMA = Parameter(
    "gamma",
    "model",
    float,
    0.01,
    "Breadcrumbs: fraction of the largest task-vector magnitudes dropped as outliers",
    low=0.0,
    high=1.0,
)
EPSILON = Parameter(
    "epsilon",
    "model",
    float,
    0.15,
    "DELLA: keep probabilities run from density - epsilon (smallest magnitude) to density + epsilon",
    low=0.0,
    high=1.0,
)
# Extra per-model parameters of a sparsification, as mergekit declares them.
_SPARSIFICATION_PARAMETERS = {"magnitude_outliers": (GAMMA,), "della_magprune": (EPSILON,)}
INT8_MASK = Parameter(
    "int8_mask",
    "global",
    bool,
    False,
    "mergekit's memory saving for the sign mask; no numeric effect",
    neutral=False,
)


@dataclass(frozen=True)
class TaskArithmeticMethod(MergeMethod):
    """mergekit's generalized task arithmetic family, described by its parts (and `average`, its base-free case)."""

    sparsification: str | None  # None | "magnitude" | "random" | "magnitude_outliers" | "della_magprune"
    consensus: str | None  # None | "sum"
    default_normalize: bool
    default_rescale: bool

    @property
    def uses_density(self) -> bool:
        return self.sparsification is not None

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        normalize = Parameter(
            "normalize",
            "global",
            bool,
            self.default_normalize,
            "divide by the summed weights (of the experts that agree in sign, with consensus)",
        )
        if not self.needs_base:
            return (WEIGHT, normalize)
        rescale = Parameter(
            "rescale",
            "global",
            bool,
            self.default_rescale,
            "restore each sparsified task vector's L1 norm",
            neutral=False,
        )
        sparsifying = (
            (DENSITY, *_SPARSIFICATION_PARAMETERS.get(self.sparsification, ())) if self.uses_density else ()
        )
        return (WEIGHT, *sparsifying, normalize, LAMBDA, rescale, INT8_MASK)

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        model_values: Sequence[Mapping[str, Any]],
        global_values: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        expert_params = [
            ExpertParams(
                weight=v.get("weight", 1.0),
                density=v.get("density", 1.0),
                gamma=v.get("gamma", GAMMA.default),
                epsilon=v.get("epsilon", EPSILON.default),
            )
            for v in model_values
        ]
        params = MethodParams(
            normalize=global_values.get("normalize"),
            lambda_=global_values.get("lambda", 1.0),
            rescale=global_values.get("rescale"),
            int8_mask=global_values.get("int8_mask", False),
        )
        return merge_tensor(self, base, experts, expert_params, params, generator)


def merge_tensor(
    method: TaskArithmeticMethod,
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    expert_params: Sequence[ExpertParams],
    params: MethodParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge one tensor of N experts (and the base they were fine-tuned from) with a training-free method.

    `generator` drives random sparsification (DARE); pass `tensor_generator(seed, name)` for merges that
    reproduce. Without it torch's global RNG is used, as in mergekit.
    """
    check_inputs(method, base, experts, len(expert_params))
    _check_params(method, expert_params, params)
    reference = base if base is not None else experts[0]
    work_dtype = (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in (base, *experts))
        else torch.float32
    )
    device = reference.device
    weights = [float(p.weight) for p in expert_params]
    normalize = method.default_normalize if params.normalize is None else bool(params.normalize)

    if not method.needs_base:
        merged = torch.zeros(reference.shape, dtype=work_dtype, device=device)
        for expert, weight in zip(experts, weights, strict=True):
            merged += expert.to(device=device, dtype=work_dtype) * weight
        if normalize:
            merged /= sum(weights)
        return merged.to(reference.dtype)

    rescale = method.default_rescale if params.rescale is None else bool(params.rescale)
    base_work = base.to(dtype=work_dtype)
    mixed = torch.zeros_like(base_work)
    # Sign election needs every weighted task vector at once; without it they are summed as they come.
    weighted_deltas = []
    for expert, expert_param, weight in zip(experts, expert_params, weights, strict=True):
        delta = expert.to(device=device, dtype=work_dtype) - base_work
        if method.sparsification is not None:
            delta = sparsify(
                delta,
                expert_param.density,
                method.sparsification,
                rescale,
                generator,
                gamma=expert_param.gamma,
                epsilon=expert_param.epsilon,
            )
        if method.consensus is None:
            mixed += delta * weight
        else:
            weighted_deltas.append(delta * weight)

    if method.consensus == "sum":
        masks = sign_consensus(weighted_deltas)
        divisor = torch.zeros_like(base_work)
        for delta, mask, weight in zip(weighted_deltas, masks, weights, strict=True):
            mixed += delta * mask
            divisor += mask.to(work_dtype) * weight
        divisor[divisor == 0] = 1
    else:
        divisor = sum(weights)
        if abs(divisor) < _DIVISOR_EPS:
            divisor = 1.0
    del weighted_deltas
    if normalize:
        mixed /= divisor
    if params.lambda_ != 1:
        mixed *= params.lambda_
    return (base_work + mixed).to(base.dtype)


def _check_params(
    method: TaskArithmeticMethod, expert_params: Sequence[ExpertParams], params: MethodParams
) -> None:
    for i, p in enumerate(expert_params):
        if not 0 < p.density <= 1:
            raise ExpertMergeError(f"Expert {i}: density must be in (0, 1], got {p.density}.")
        if p.density != 1 and not method.uses_density:
            raise ExpertMergeError(
                f"Expert {i}: density {p.density} has no effect with merge method {method.name!r}; "
                "use ties, dare_linear, dare_ties, breadcrumbs(_ties) or della(_linear) to sparsify."
            )
    if not method.needs_base and params.lambda_ != 1:
        raise ExpertMergeError(
            f"lambda {params.lambda_} has no effect with merge method {method.name!r} (it scales task vectors)."
        )
    normalize = method.default_normalize if params.normalize is None else params.normalize
    if not method.needs_base and normalize and sum(p.weight for p in expert_params) == 0:
        raise ExpertMergeError(
            f"Merge method {method.name!r} with normalize divides by the sum of weights, which is 0."
        )
