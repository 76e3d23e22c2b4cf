"""Functional alignment: aligned experts compute exactly what they computed before, and known symmetries are found."""

from __future__ import annotations

import pytest
import torch

from expertmerge.alignment import (
    Alignment,
    CrossMoments,
    aligned_state,
    match_units,
    procrustes_rotation,
)
from expertmerge.alignment_stats import alignment_to_reference, model_activations
from expertmerge.errors import ExpertMergeError
from tests.conftest import TINY_VOCAB, tiny_llama


def _batches(seed: int = 0, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(4, TINY_VOCAB, (4, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0  # right padding: never counted
        mask[3, 9:] = 0
        out.append((ids, mask))
    return out


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(input_ids=i, attention_mask=m, use_cache=False).logits[m.bool()] for i, m in batches]
        )


def _load(model, state):
    from transformers import LlamaForCausalLM

    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(state)
    return copy


def _random_rotation(size: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed)))
    return q


def test_aligned_expert_keeps_its_logits_exactly():
    reference, expert = tiny_llama(seed=0), tiny_llama(seed=1)  # different random inits: nothing shared
    batches = _batches()
    alignment, report = alignment_to_reference(
        model_activations(reference, batches, heads=True), expert, batches, heads=True
    )
    assert (
        alignment.residual is not None
        and sorted(alignment.ffn) == [0, 1]
        and sorted(alignment.heads) == [0, 1]
    )
    assert any(not torch.equal(p, torch.arange(len(p))) for p in alignment.ffn.values())
    aligned = _load(expert, aligned_state(expert.state_dict(), alignment))
    assert (_logits(aligned, batches) - _logits(expert, batches)).abs().max() <= 1e-5
    assert report["ffn_correlation_after"] >= report["ffn_correlation_before"]
    assert report["residual_cosine_after"] >= report["residual_cosine_before"]


def test_alignment_undoes_a_known_permutation_and_rotation():
    reference = tiny_llama(seed=0)
    hidden, inter = reference.config.hidden_size, reference.config.intermediate_size
    scramble = Alignment(
        residual=_random_rotation(hidden, 3),
        ffn={
            layer: torch.randperm(inter, generator=torch.Generator().manual_seed(layer)) for layer in (0, 1)
        },
    )
    scrambled = _load(reference, aligned_state(reference.state_dict(), scramble))
    batches = _batches(seed=1)
    alignment, report = alignment_to_reference(model_activations(reference, batches), scrambled, batches)
    assert report["ffn_correlation_after"] == pytest.approx(1.0, abs=1e-6)
    assert report["residual_cosine_after"] == pytest.approx(1.0, abs=1e-5)
    # Matching recovers the inverse of each scramble: unit i of the reference sits at inverse(perm)[i].
    for layer, perm in scramble.ffn.items():
        assert torch.equal(alignment.ffn[layer], torch.argsort(perm))
    # The rotations compose to the identity (up to float rounding).
    assert (alignment.residual @ scramble.residual - torch.eye(hidden)).abs().max() < 1e-5
    realigned = aligned_state(scrambled.state_dict(), alignment)
    for name, tensor in reference.state_dict().items():
        if "layernorm" in name or name == "model.norm.weight":
            continue  # gains are folded into the maps that read the norms (ones after alignment)
        if (
            "q_proj" in name
            or "k_proj" in name
            or "v_proj" in name
            or "gate_proj" in name
            or "up_proj" in name
        ):
            continue  # these carry the folded gains now
        assert (realigned[name] - tensor).abs().max() < 1e-4, name


def test_correlation_and_matching_on_small_tensors():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=generator)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = torch.empty_like(a)
    b[:, perm] = 2.0 * a + 0.5  # unit perm[i] of b is an affine copy of unit i of a
    moments = CrossMoments()
    moments.add(a[:250], b[:250])
    moments.add(a[250:], b[250:])
    correlation = moments.correlation()
    assert correlation[torch.arange(6), perm].min() == pytest.approx(1.0, abs=1e-9)
    assert torch.equal(match_units(correlation), perm)
    rotation = procrustes_rotation(torch.eye(4) * 3.0)
    assert torch.allclose(rotation, torch.eye(4), atol=1e-6)


def test_tied_embeddings_refuse_residual_alignment_naming_the_tensor():
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    alignment = Alignment(residual=torch.eye(model.config.hidden_size))
    with pytest.raises(ExpertMergeError, match="untied embeddings.*model.embed_tokens.weight|embed_tokens"):
        aligned_state(model.state_dict(), alignment, tied=True)
