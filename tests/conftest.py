"""Shared fixtures: tiny real Llama models (a base and experts fine-tuned from it), built in seconds.

`tiny_models` is session-scoped and read-only: tests that need a broken variant copy a model with
`copy_model` into their own `tmp_path` and edit the copy.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

# Tests never reach a hub: a name that could be a hub id fails at once instead of retrying a network that this
# machine (and CI's) does not have. Set before transformers / huggingface_hub read it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_VOCAB = 64
FIT_TINY = str(Path(__file__).resolve().parents[1] / "configs" / "fit_tiny.yaml")
# A fit that only learns: no evaluation table, validation, checkpoints or logs.
LEAN_FIT = (
    "--export.evaluate",
    "false",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.logger",
    "false",
)


def fit_args(tmp: Path, name: str, *overrides: str, config: str = FIT_TINY) -> list[str]:
    """`fit` arguments for `config` (the tiny zoo's by default) exporting to tmp/name, logs in tmp/name-logs."""
    return [
        "fit",
        "--config",
        config,
        "--export.output_dir",
        str(tmp / name),
        "--trainer.default_root_dir",
        str(tmp / f"{name}-logs"),
        *overrides,
    ]


EXPERT_NAMES = ("alpha", "beta", "gamma")


def tiny_model_settings(**overrides) -> dict:
    """Config keys of the tests' tiny decoders (hidden 32, 2 layers, 4 heads, vocab 64), any family."""
    settings = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    return settings


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**tiny_model_settings(**overrides))


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised 2-layer `LlamaForCausalLM` (hidden 32, vocab 64), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of `model` with small random changes to every parameter: a stand-in for a fine-tune."""
    import copy

    expert = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in expert.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return expert


def tiny_tokenizer():
    """A word-level tokenizer over exactly TINY_VOCAB tokens, so it matches the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, TINY_VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_model(
    model, folder: Path, *, max_shard_size: str | None = None, as_bin: bool = False, tokenizer=None
):
    """Save like a user's checkpoint: safetensors (optionally sharded) or a `pytorch_model.bin`."""
    folder.mkdir(parents=True, exist_ok=True)
    if as_bin:
        model.config.save_pretrained(folder)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    elif max_shard_size:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@dataclass
class TinyModels:
    """Folders of a tiny base and experts. `sharded` holds the same weights split into several shards."""

    root: Path
    base: Path
    experts: dict[str, Path]
    sharded_base: Path
    sharded_experts: dict[str, Path]
    bin_expert: Path  # experts["alpha"]'s weights saved as pytorch_model.bin
    state_dicts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = tiny_tokenizer()
    base = tiny_llama(seed=0)
    models = {"base": base}
    models.update({name: perturbed(base, seed=k + 1) for k, name in enumerate(EXPERT_NAMES)})
    folders = {name: save_model(m, root / name, tokenizer=tokenizer) for name, m in models.items()}
    sharded = {
        name: save_model(m, root / "sharded" / name, max_shard_size="30KB", tokenizer=tokenizer)
        for name, m in models.items()
    }
    bin_expert = save_model(models["alpha"], root / "bin" / "alpha", as_bin=True, tokenizer=tokenizer)
    return TinyModels(
        root=root,
        base=folders["base"],
        experts={name: folders[name] for name in EXPERT_NAMES},
        sharded_base=sharded["base"],
        sharded_experts={name: sharded[name] for name in EXPERT_NAMES},
        bin_expert=bin_expert,
        state_dicts={
            name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in models.items()
        },
    )


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The demo zoo (base + arith/reverse/sort experts + data), built once per test session in a private cache.

    `EXPERTMERGE_CACHE` points at a session folder, so teacher-target caches never leak between sessions.
    """
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("EXPERTMERGE_CACHE", str(tmp_path_factory.mktemp("expertmerge-cache")))
    from expertmerge.zoo_registry import ensure_zoo

    yield ensure_zoo("tiny")
    monkeypatch.undo()
