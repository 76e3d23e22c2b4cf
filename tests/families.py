"""Tiny random models of every common causal-LM family in transformers, and what `merge` and `fit` make of them.

Shared by tests/test_families.py (which checks each family's outcome against docs/ARCHITECTURES.md) and
benchmarks/architectures.py (which writes that page). Each family gets a base (random, 2 layers, hidden 32,
vocab 64) and two "fine-tunes" (the base plus small seeded random changes to every tensor), saved with
`save_pretrained` as users' checkpoints are.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The families checked: dense decoders, MoE decoders (transformers 5 stores their experts fused), older or
# renamed configs (GPT-2 style `n_layer`), and hybrids.
DENSE = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "olmo",
    "olmo2",
    "olmo3",
    "granite",
    "glm4",
    "cohere",
    "cohere2",
    "exaone4",
    "falcon",
    "helium",
    "ministral",
    "seed_oss",
    "smollm3",
    "stablelm",
    "starcoder2",
    "internlm3",
    "ernie4_5",
    "hunyuan_v1_dense",
]
MOE = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "phimoe",
    "granitemoe",
    "gpt_oss",
    "deepseek_v3",
    "dbrx",
    "jetmoe",
    "glm4_moe",
]
OLDER = ["gpt2", "bloom", "gpt_bigcode", "gptj", "gpt_neox", "gpt_neo", "opt", "codegen", "mpt"]
HYBRID = ["qwen3_next", "falcon_h1", "jamba", "mamba", "lfm2"]
FAMILIES = DENSE + MOE + OLDER + HYBRID

VOCAB = 64
# One set of small sizes; each config class takes the keys it knows (GPT-2's `n_embd`, Mixtral's
# `num_local_experts`, ...) and ignores the rest.
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    head_dim=8,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_positions=64,
    n_inner=64,
    ffn_dim=64,
    word_embed_proj_dim=32,
    rotary_dim=4,
    d_model=32,
    n_heads=4,
    n_layers=2,
    max_seq_len=64,
    tie_word_embeddings=False,
)


# Where one family's config needs other small sizes (None: leave the family's default).
FAMILY_SETTINGS: dict[str, dict] = {
    "falcon": {"head_dim": None},
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    ),
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    # the hybrids: one attention layer among the two, small state-space blocks
    "jamba": dict(
        attn_layer_offset=1,
        attn_layer_period=2,
        expert_layer_offset=1,
        expert_layer_period=2,
        mamba_d_state=8,
    ),
    "falcon_h1": dict(
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=16,
    ),
    "deepseek_v3": dict(
        head_dim=4,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        kv_lora_rank=16,
        q_lora_rank=16,
        n_group=1,
        topk_group=1,
    ),
}


def settings(family: str) -> dict:
    merged = {**SMALL, **FAMILY_SETTINGS.get(family, {})}
    return {key: value for key, value in merged.items() if value is not None}


def tokenizer():
    """A character-level tokenizer of exactly VOCAB tokens (byte-level BPE with no merges over letters and
    digits): transformers 5 loads a model folder's tokenizer with its family's own class (Qwen2's, GPT-2's ...),
    and each of them rebuilds this one with the same ids."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [*string.ascii_lowercase, *string.digits, "\u2581", "\u0120", *string.ascii_uppercase[:22]]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(characters)})
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@dataclass
class FamilyModels:
    family: str
    base: Path
    experts: dict[str, Path]


def build(family: str, root: Path, scale: float = 0.02, **overrides) -> FamilyModels:
    """Base + experts `e1`, `e2` of `family` under `root` (raises what transformers raises for a config it
    cannot build)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**settings(family), **overrides})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    folders = {}
    for index, name in enumerate(["base", "e1", "e2"]):
        model = copy.deepcopy(base)
        if index:
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
        model.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        folders[name] = root / name
    return FamilyModels(family, folders["base"], {"e1": folders["e1"], "e2": folders["e2"]})


def merge_config(models: FamilyModels) -> str:
    experts = "".join(
        f"  - model: {folder}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
        for folder in models.experts.values()
    )
    return f"merge_method: ties\nbase_model: {models.base}\nmodels:\n{experts}dtype: float32\n"


def fit_config(models: FamilyModels, root: Path) -> str:
    data = root / "calib.jsonl"
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    rows = [{"text": "".join(letters[(i * 7 + j * (i % 5 + 1)) % 36] for j in range(12))} for i in range(24)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    experts = ", ".join(f"{name}: {folder}" for name, folder in models.experts.items())
    tasks = "".join(
        f"    - {{name: t{name}, expert: {name}, sources: [{data}]}}\n" for name in models.experts
    )
    return (
        f"model:\n  base: {models.base}\n  experts: {{{experts}}}\n  alpha0: 0.3\n"
        f"data:\n  tasks:\n{tasks}"
        "  samples_per_task: 4\n  eval_samples_per_task: 2\n  max_length: 12\n  batch_size: 2\n"
        "trainer:\n  max_steps: 2\n  limit_val_batches: 0\n  enable_checkpointing: false\n  logger: false\n"
        "export:\n  evaluate: false\n"
    )


def loads_and_generates(folder: Path) -> str:
    """`ok` when `from_pretrained` reads `folder` with no missing, unexpected or mismatched keys and greedy
    generation runs; otherwise what went wrong, in one line."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    wrong = {kind: sorted(keys)[:3] for kind, keys in info.items() if keys}
    if wrong:
        return f"loads with {wrong}"
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return "ok" if out.shape == (1, 6) else f"generated shape {tuple(out.shape)}"


def one_line(text: str) -> str:
    """The last error line of a command's output (its one-line refusal), without the program prefix."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    line = (errors or lines or [""])[-1]
    return re.sub(r"^.*?error:\s*", "", line)


def _command(args: list[str]) -> tuple[int | str, str]:
    """Run `python -m expertmerge ARGS` in this process: (exit code or the exception's name, its output)."""
    import contextlib
    import io
    import traceback

    from expertmerge.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code: int | str = main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # what a user would see as a traceback
            traceback.print_exc(file=out)
            code = "traceback"
    return code, out.getvalue()


def outcome(family: str, root: Path, **overrides) -> dict[str, str]:
    """What `merge` (TIES) and `fit` (2 steps) do with `family`: `ok` (the output loads with no missing or
    unexpected keys and generates), `refused: <the one line>`, or what broke."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        models = build(family, root, **overrides)
    except Exception as error:  # transformers cannot build this config: not ours to judge
        return {"build": f"{type(error).__name__}: {str(error)[:120]}"}
    (root / "merge.yaml").write_text(merge_config(models))
    (root / "fit.yaml").write_text(fit_config(models, root))
    result = {}
    runs = {
        "merge": [
            "merge",
            "--config",
            str(root / "merge.yaml"),
            "--out",
            str(root / "merged"),
            "--no-progress",
        ],
        "fit": [
            "fit",
            "--config",
            str(root / "fit.yaml"),
            "--export.output_dir",
            str(root / "fitted"),
            "--trainer.default_root_dir",
            str(root / "logs"),
            "--trainer.enable_progress_bar",
            "false",
        ],
    }
    for command, args in runs.items():
        code, text = _command(args)
        folder = root / ("merged" if command == "merge" else "fitted")
        if code == 0:
            try:
                result[command] = loads_and_generates(folder)
            except Exception as error:
                result[command] = f"output broken: {type(error).__name__}: {str(error)[:150]}"
        elif code == 2:
            result[command] = f"refused: {one_line(text)}"
        else:
            result[command] = f"broken ({code}): {one_line(text)[:200]}"
    return result
