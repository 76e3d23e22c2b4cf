"""Sparsification and sign election of task vectors: the building blocks of TIES, DARE, Breadcrumbs and DELLA.

Meanings are mergekit's (0.1.5); see `expertmerge.methods.task_arithmetic` for how the methods combine them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from expertmerge.errors import ExpertMergeError

# Below this value mergekit leaves a sparsified tensor unscaled.
_RESCALE_EPS = 1e-7


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
    """Boolean mask of the `max(1, int(density * numel))` entries of largest |value|, chosen as mergekit does.

    `int(density * numel)` is Python float arithmetic, as in mergekit (0.29 * 100 keeps 28, not 29).
    mergekit keeps the first k of `torch.argsort(|x|.float(), descending=True)`, an unstable sort: which of
    several equal magnitudes at the cut survive is that sort's choice (fixed for a torch build and CPU, not
    by index). A selection (kthvalue) finds the cut without sorting; only when non-zero tied magnitudes
    straddle the cut do we run mergekit's very sort, so the same entries survive (the mask can differ from
    mergekit's only among entries that are 0, where the sparsified values are the same). Fine-tunes of a
    dequantised base tie at the cut often (191 of 272 SmolLM2 tensors at density 0.5, 24 of them above 0).
    """
    numel = tensor.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(tensor, dtype=torch.bool)
    keep = max(1, int(density * numel))
    magnitude = tensor.detach().abs().reshape(-1).float()
    cut = torch.kthvalue(magnitude, numel - keep + 1).values
    mask = magnitude >= cut
    if int(mask.sum()) == keep:
        return mask.reshape(tensor.shape)
    if cut == 0:
        # The tied entries are zeros: which of them count as kept changes no value (a kept 0 adds nothing
        # and never agrees in sign), so skip the sort; most tied cuts of real fine-tunes are at 0.
        mask = magnitude > 0
        missing = keep - int(mask.sum())
        mask[torch.nonzero(magnitude == 0).squeeze(1)[:missing]] = True
        return mask.reshape(tensor.shape)
    # Non-zero ties straddle the cut: mergekit's unstable sort decides which of them are kept.
    mask = torch.zeros(numel, dtype=torch.bool, device=tensor.device)
    mask[torch.argsort(magnitude, descending=True)[:keep]] = True
    return mask.reshape(tensor.shape)


def outlier_mask(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' two-sided trim (mergekit `magnitude_outliers`): drop the `int(gamma * numel)`
    largest magnitudes, then the smallest, keeping `int(density * numel)` entries.

    When density + gamma > 1 the outlier cut shrinks so that `int(density * numel)` entries remain. The
    entries are ranked by mergekit's own (unstable) ascending sort, so equal magnitudes at either cut are
    kept exactly as mergekit keeps them. Unlike TIES, a density whose `int` is 0 keeps nothing.
    """
    numel = tensor.numel()
    if density >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    target = int(density * numel)
    drop_bottom = max(0, numel - target - int(gamma * numel))
    order = torch.sort(tensor.detach().abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=tensor.device)
    mask[order[drop_bottom : drop_bottom + target]] = True
    return mask.reshape(tensor.shape)


def della_mask(
    tensor: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DELLA's MagPrune (mergekit `della_magprune`): keep each entry with a probability that grows with its
    magnitude rank within its row, linearly from `density - epsilon` (smallest) to `density + epsilon`.

    Ranks run along dim 1, as mergekit ranks them (each row of a matrix; a vector is one row) and come from
    mergekit's double argsort; the draw is one `torch.bernoulli` over the whole probability tensor, so a
    generator seeded like torch's global RNG reproduces mergekit's mask.
    """
    if density >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ExpertMergeError(
            f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1); lower `epsilon` "
            "(mergekit's default is 0.15) or move `density` away from 0 and 1."
        )
    shaped = tensor.detach().float()
    if shaped.dim() < 2:
        shaped = shaped.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(shaped.abs(), dim=1, descending=False), dim=1).float() + 1
    lowest = ranks.min(dim=1, keepdim=True).values
    highest = ranks.max(dim=1, keepdim=True).values
    # A row of one entry has no spread (0 / 0); mergekit fails there, we keep it with probability density.
    spread = ((ranks - lowest) / (highest - lowest)).nan_to_num(0.5).clamp(0, 1)
    probabilities = (density - epsilon) + spread * 2 * epsilon
    if generator is not None:
        probabilities = probabilities.to(generator.device)
    mask = torch.bernoulli(probabilities, generator=generator).to(device=tensor.device, dtype=torch.bool)
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
    gamma: float = 0.01,
    epsilon: float = 0.15,
) -> torch.Tensor:
    """Zero all but a `density` fraction of a task vector; with `rescale`, restore its L1 norm.

    `sparsification`: "magnitude" (TIES), "random" (DARE), "magnitude_outliers" (Breadcrumbs, `gamma`),
    "della_magprune" (DELLA, `epsilon`), mergekit's names.
    """
    if density >= 1:
        return delta
    if sparsification == "magnitude":
        mask = magnitude_mask(delta, density)
    elif sparsification == "random":
        mask = random_mask(delta, density, generator)
    elif sparsification == "magnitude_outliers":
        mask = outlier_mask(delta, density, gamma)
    elif sparsification == "della_magprune":
        mask = della_mask(delta, density, epsilon, generator)
    else:
        raise ExpertMergeError(
            f"Unknown sparsification {sparsification!r}; expected 'magnitude', 'random', "
            "'magnitude_outliers' or 'della_magprune'."
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
