"""Training-free merges (average, task arithmetic, TIES, DARE) as pure functions on one tensor at a time.

Parameters mean exactly what they mean in mergekit (checked against mergekit 0.1.5, see
`tests/data/make_mergekit_reference.py`):

- `weight` scales each expert; `density` is the fraction of each task vector kept by sparsification.
- TIES keeps the top `max(1, int(density * numel))` entries of |tau_k| (ties: lower flat index first).
- DARE keeps each entry with probability `density`.
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

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertmerge.errors import ExpertMergeError

# Below these values mergekit leaves a sparsified tensor unscaled / a divisor at 1.
_RESCALE_EPS = 1e-7
_DIVISOR_EPS = 1e-8


@dataclass(frozen=True)
class ExpertParams:
    """Per-expert settings: `weight` multiplies the expert's task vector, `density` is the kept fraction."""

    weight: float = 1.0
    density: float = 1.0


@dataclass(frozen=True)
class MethodParams:
    """Per-merge settings; `None` means the method's own default (as in mergekit)."""

    normalize: bool | None = None
    lambda_: float = 1.0
    rescale: bool | None = None
    int8_mask: bool = False


@dataclass(frozen=True)
class MergeMethod:
    """A named training-free merge. Task-arithmetic family methods are described by their parts."""

    name: str
    needs_base: bool
    sparsification: str | None  # None | "magnitude" | "random"
    consensus: str | None  # None | "sum"
    default_normalize: bool
    default_rescale: bool
    uses_density: bool
    description: str


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            name="average",
            needs_base=False,
            sparsification=None,
            consensus=None,
            default_normalize=True,
            default_rescale=False,
            uses_density=False,
            description="Weighted average of the experts' weights (mergekit 'linear'); the base is not used.",
        ),
        MergeMethod(
            name="task_arithmetic",
            needs_base=True,
            sparsification=None,
            consensus=None,
            default_normalize=False,
            default_rescale=False,
            uses_density=False,
            description="base + lambda * sum_k w_k tau_k (Ilharco et al., 2023).",
        ),
        MergeMethod(
            name="ties",
            needs_base=True,
            sparsification="magnitude",
            consensus="sum",
            default_normalize=True,
            default_rescale=False,
            uses_density=True,
            description="Trim each task vector to its largest entries, elect signs, average the agreeing "
            "entries (Yadav et al., 2023).",
        ),
        MergeMethod(
            name="dare_linear",
            needs_base=True,
            sparsification="random",
            consensus=None,
            default_normalize=False,
            default_rescale=True,
            uses_density=True,
            description="Randomly drop task-vector entries and rescale, then add (Yu et al., 2024).",
        ),
        MergeMethod(
            name="dare_ties",
            needs_base=True,
            sparsification="random",
            consensus="sum",
            default_normalize=False,
            default_rescale=True,
            uses_density=True,
            description="DARE's random drop and rescale with TIES sign election.",
        ),
    )
}

METHOD_ALIASES: dict[str, str] = {"linear": "average"}


def get_method(name: str) -> MergeMethod:
    """The merge method called `name` (or one of its aliases, such as mergekit's 'linear')."""
    key = METHOD_ALIASES.get(name, name)
    if key not in METHODS:
        known = ", ".join([*METHODS, *(f"{alias} (= {target})" for alias, target in METHOD_ALIASES.items())])
        raise ExpertMergeError(f"Unknown merge method {name!r}. Known methods: {known}.")
    return METHODS[key]


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU random generator seeded from (seed, tensor name) alone.

    Random sparsification of one tensor therefore does not depend on which tensors were merged before it,
    so merges can stream, skip or parallelise tensors and still reproduce.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the `max(1, int(density * numel))` entries of largest |value|.

    `int(density * numel)` is Python float arithmetic, as in mergekit (0.29 * 100 keeps 28, not 29).
    Equal magnitudes at the cut are kept lowest flat index first. mergekit leaves that choice to an
    unstable argsort, whose order depends on torch version and device, so only this part is ours.
    A selection instead of a full sort: no int64 index per entry, which matters for embedding matrices.
    """
    numel = tensor.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(tensor, dtype=torch.bool)
    keep = max(1, int(density * numel))
    magnitude = tensor.detach().abs().reshape(-1).float()
    cut = torch.kthvalue(magnitude, numel - keep + 1).values
    mask = magnitude > cut
    missing = keep - int(mask.sum())
    if missing > 0:
        at_cut = torch.nonzero(magnitude == cut).squeeze(1)
        mask[at_cut[:missing]] = True
    return mask.reshape(tensor.shape)


def random_mask(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean mask keeping each entry independently with probability `density`.

    The draw happens on the generator's device (CPU for `tensor_generator`) so the mask does not depend on
    where the merge runs; with a generator seeded like torch's global RNG it equals mergekit's mask.
    """
    if density >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    device = generator.device if generator is not None else tensor.device
    probabilities = torch.full(tensor.shape, float(density), dtype=torch.float32, device=device)
    return torch.bernoulli(probabilities, generator=generator).to(device=tensor.device, dtype=torch.bool)


def sparsify(
    delta: torch.Tensor,
    density: float,
    sparsification: str,
    rescale: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero all but a `density` fraction of a task vector; with `rescale`, restore its L1 norm."""
    if density >= 1:
        return delta
    if sparsification == "magnitude":
        mask = magnitude_mask(delta, density)
    elif sparsification == "random":
        mask = random_mask(delta, density, generator)
    else:
        raise ExpertMergeError(
            f"Unknown sparsification {sparsification!r}; expected 'magnitude' or 'random'."
        )
    kept = delta * mask.to(delta.dtype)
    if not rescale:
        return kept
    norm_before = delta.abs().sum()
    norm_after = kept.abs().sum()
    if norm_before < _RESCALE_EPS or norm_after < _RESCALE_EPS:
        return kept
    return kept * (norm_before / norm_after)


def sign_consensus(weighted_deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """TIES 'sum' election: per expert, where the sign of w_k tau_k equals the sign of sum_k w_k tau_k.

    A zero sum elects +; an entry that is exactly 0 (e.g. trimmed) has sign 0 and never agrees.
    """
    total = torch.zeros_like(weighted_deltas[0])
    for delta in weighted_deltas:
        total += delta
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    return [delta.sign() == elected for delta in weighted_deltas]


def merge_tensor(
    method: MergeMethod,
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
    _check_inputs(method, base, experts, expert_params, params)
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
            delta = sparsify(delta, expert_param.density, method.sparsification, rescale, generator)
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


def _check_inputs(
    method: MergeMethod,
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    expert_params: Sequence[ExpertParams],
    params: MethodParams,
) -> None:
    if not experts:
        raise ExpertMergeError(f"Merge method {method.name!r} needs at least one expert tensor.")
    if len(expert_params) != len(experts):
        raise ExpertMergeError(
            f"Got {len(experts)} expert tensors but {len(expert_params)} expert parameter sets; "
            "give one ExpertParams per expert."
        )
    if method.needs_base and base is None:
        raise ExpertMergeError(f"Merge method {method.name!r} needs the base model's tensor; none was given.")
    shapes = [tuple(t.shape) for t in experts]
    expected = tuple(base.shape) if base is not None else shapes[0]
    mismatched = [i for i, shape in enumerate(shapes) if shape != expected]
    if mismatched:
        raise ExpertMergeError(
            f"Cannot merge tensors of different shapes: expected {list(expected)}"
            f"{' (the base)' if base is not None else ' (expert 0)'}, but expert(s) "
            + ", ".join(f"{i} has {list(shapes[i])}" for i in mismatched)
            + "."
        )
    for t in (base, *experts):
        if t is not None and not t.is_floating_point():
            raise ExpertMergeError(f"Only floating-point tensors can be merged, got dtype {t.dtype}.")
    for i, p in enumerate(expert_params):
        if not 0 < p.density <= 1:
            raise ExpertMergeError(f"Expert {i}: density must be in (0, 1], got {p.density}.")
        if p.density != 1 and not method.uses_density:
            raise ExpertMergeError(
                f"Expert {i}: density {p.density} has no effect with merge method {method.name!r}; "
                "use ties, dare_linear or dare_ties to sparsify task vectors."
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
