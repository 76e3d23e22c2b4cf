"""Write `mergekit_moe_reference.safetensors`: tiny input models and what real `mergekit-moe` 0.1.5 makes of them.

`tests/test_mergekit_moe.py` rebuilds the input model folders from this file, runs `expertmerge moe` on the
same configs and checks every output tensor against mergekit's. Run with mergekit's own environment:

    /work/mkvenv/bin/python tests/data/make_mergekit_moe_reference.py

(any venv with `pip install torch==2.13.0 mergekit` works; the versions are stored in the metadata).

Inputs: two families of 2-layer decoders (hidden 16, vocabulary 32, a word-level tokenizer): a Llama base with
three "experts" (the base plus seeded noise), and the same for Qwen3. Cases cover the deterministic gate modes
(`cheap_embed`, `hidden`, `hidden_avg`) with negative prompts, `residual_scale`, Mixtral / Qwen2-MoE (with a
shared expert, from Llama sources) / Qwen3-MoE outputs and fp32 / bf16 outputs, and `random` with
`--random-seed` (our `expertmerge: {seed: ...}`).

File layout: tensors `inputs/<family>/<model>/<tensor>` and `cases/<id>/<tensor>`; metadata `cases` (JSON list:
id, config with `{family}/<model>` placeholders, random_seed), `model_configs` (JSON: family -> config.json),
`tokenizer_files` (JSON: file name -> text), `mergekit_version`, `torch_version`, `transformers_version`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

OUTPUT = Path(__file__).with_name("mergekit_moe_reference.safetensors")
VOCAB = 32
MERGEKIT_MOE = Path(sys.executable).with_name("mergekit-moe")
PROMPTS = {
    0: ["w4 w5 w6", "w7 w4"],
    1: ["w10 w11 w12 w13"],
    2: ["w20 w21", "w22 w23 w24", "w25"],
}


def tokenizer_files(folder: Path) -> dict[str, str]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return {f.name: f.read_text() for f in sorted(folder.iterdir()) if f.suffix == ".json"}


def family_models(family: str, root: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config_class, model_class = (
        (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    )
    torch.manual_seed(0)
    base = model_class(config_class(**settings, head_dim=8)).eval()
    state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    models = {"base": state}
    for k in range(3):
        generator = torch.Generator().manual_seed(100 + k)
        models[f"expert{k}"] = {
            n: (t + 0.05 * torch.randn(t.shape, generator=generator)).contiguous() for n, t in state.items()
        }
    config = json.loads(base.config.to_json_string())
    config["dtype"] = "float32"
    return config, models


def cases() -> list[dict]:
    def experts(family: str, **extra_by_index) -> list[dict]:
        out = []
        for k in range(3):
            entry = {"source_model": f"{{{family}}}/expert{k}", "positive_prompts": PROMPTS[k]}
            entry.update(extra_by_index.get(f"e{k}", {}))
            out.append(entry)
        return out

    return [
        {
            "id": "mixtral_cheap_embed_fp32",
            "config": {
                "base_model": "{llama}/base",
                "gate_mode": "cheap_embed",
                "dtype": "float32",
                "experts": experts("llama", e0={"negative_prompts": ["w20 w21"]}, e2={"residual_scale": 0.5}),
            },
        },
        {
            "id": "mixtral_hidden_bf16_top1",
            "config": {
                "base_model": "{llama}/base",
                "gate_mode": "hidden",
                "dtype": "bfloat16",
                "experts_per_token": 1,
                "experts": experts("llama", e1={"negative_prompts": ["w4 w5", "w6"]}),
            },
        },
        {
            "id": "qwen_hidden_avg_shared_fp32",
            "config": {
                "base_model": "{llama}/base",
                "gate_mode": "hidden_avg",
                "architecture": "qwen",
                "dtype": "float32",
                "experts": experts("llama")[:2],
                "shared_experts": [
                    {"source_model": "{llama}/base", "positive_prompts": ["w8 w9"], "residual_scale": 0.1}
                ],
            },
        },
        {
            "id": "qwen3_cheap_embed_fp32",
            "config": {
                "base_model": "{qwen3}/base",
                "gate_mode": "cheap_embed",
                "experts": experts("qwen3"),
            },
        },
        {
            "id": "mixtral_random_seeded",
            "random_seed": 7,
            "config": {
                "base_model": "{llama}/base",
                "gate_mode": "random",
                "dtype": "float32",
                "experts": [{"source_model": f"{{llama}}/expert{k}"} for k in range(3)],
            },
        },
    ]


def fill(config: dict, roots: dict[str, Path]) -> dict:
    text = json.dumps(config)
    for family, root in roots.items():
        text = text.replace("{" + family + "}", str(root))
    return json.loads(text)


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        tokenizer = tokenizer_files(work / "tokenizer")
        roots = {}
        for family in ("llama", "qwen3"):
            config, models = family_models(family, work)
            configs[family] = config
            roots[family] = work / family
            for name, state in models.items():
                folder = work / family / name
                folder.mkdir(parents=True)
                save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
                (folder / "config.json").write_text(json.dumps(config, indent=2))
                for filename, text in tokenizer.items():
                    (folder / filename).write_text(text)
                tensors.update({f"inputs/{family}/{name}/{k}": v for k, v in state.items()})
        all_cases = cases()
        for case in all_cases:
            path = work / f"{case['id']}.yaml"
            path.write_text(yaml.safe_dump(fill(case["config"], roots)))
            out = work / "out" / case["id"]
            command = [str(MERGEKIT_MOE), str(path), str(out)]
            if case.get("random_seed") is not None:
                command += ["--random-seed", str(case["random_seed"])]
            subprocess.run(command, check=True, capture_output=True)
            produced = {}
            for file in sorted(out.glob("*.safetensors")):
                produced.update(load_file(file))
            tensors.update({f"cases/{case['id']}/{k}": v.contiguous() for k, v in produced.items()})
            print(f"{case['id']}: {len(produced)} tensors")
    metadata = {
        "cases": json.dumps(all_cases),
        "model_configs": json.dumps(configs),
        "tokenizer_files": json.dumps(tokenizer),
        "mergekit_version": version("mergekit"),
        "torch_version": torch.__version__,
        "transformers_version": version("transformers"),
    }
    save_file(tensors, OUTPUT, metadata=metadata)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
