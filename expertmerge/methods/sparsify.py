"""Sparsification and sign election of task vectors: the building blocks of TIES and DARE (pure tensor code).

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
