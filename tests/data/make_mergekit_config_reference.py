"""Write `mergekit_configs/expected.safetensors`: what REAL mergekit 0.1.5 writes for whole merge YAMLs.

`tests/test_merge_mergekit_configs.py` rebuilds the same inputs (`build_inputs`, seeded), runs our
`run_merge` on each config and compares tensors (max |diff| <= 1e-6 in fp32), config.json keys and the
tokenizer's vocabulary with what is stored here. The cases cover mergekit's parameter forms (per-layer
gradients, filtered values with fall-through, gradients of once-per-merge parameters, a key the method
ignores), two slice layouts (a same-range TIES of two slices with their own parameters, and a passthrough
frankenmerge that changes depth, with `scale`), a tokenizer union (a token only one model has), and
`tokenizer: {source: union, tokens: ..., pad_to_multiple_of}` (mergekit 0.1.5 crashes on new `tokens`
with `source: base`: it adds them to the base's own tokenizer) with a forced and a zero row and a chat template.

The inputs are tiny real Llama checkpoints (4 layers, hidden 32) with a small word-level tokenizer, built
from a seed by `build_inputs` with torch + transformers + tokenizers only (no expertmerge import, so the
script runs in mergekit's own environment):

    /work/mkvenv/bin/python tests/data/make_mergekit_config_reference.py

File layout: tensors `<case>/<tensor name>`; metadata `cases` (JSON: case -> {yaml, config, vocab,
chat_template}), `seed`, `mergekit_version`, `torch_version`, `transformers_version`.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

OUTPUT = Path(__file__).with_name("mergekit_configs") / "expected.safetensors"
SEED = 20261202
WORDS = [f"w{i}" for i in range(29)]  # + <pad>, <s>, </s> = 32 tokens
CONFIG_KEYS = ("num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads", "tie_word_embeddings")


def _tokenizer(extra: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )
    if extra:
        tokenizer.add_tokens(list(extra))
    return tokenizer


def _model(vocab_size: int, generator: torch.Generator, around: dict[str, torch.Tensor] | None, scale: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if around is None:
                start = torch.ones(parameter.shape) if "norm" in name else torch.zeros(parameter.shape)
                value = start + 0.1 * noise
            else:
                reference = around[name]
                if reference.shape != parameter.shape:  # a model with extra tokens: rows appended
                    rows = torch.zeros(parameter.shape)
                    rows[: reference.shape[0]] = reference
                    rows[reference.shape[0] :] = 0.1 * torch.randn(
                        (parameter.shape[0] - reference.shape[0], *parameter.shape[1:]), generator=generator
                    )
                    reference = rows
                value = reference + scale * noise
            parameter.copy_(value)
    return model


def build_inputs(root: Path) -> dict[str, Path]:
    """base, a, b (same vocabulary) and c (one extra token, `w_extra`), saved under `root`."""
    generator = torch.Generator().manual_seed(SEED)
    base = _model(32, generator, None, 0.0)
    state = {k: v.detach().clone() for k, v in base.named_parameters()}
    folders = {}
    for name, model, extra in (
        ("base", base, ()),
        ("a", _model(32, generator, state, 0.02), ()),
        ("b", _model(32, generator, state, 0.03), ()),
        ("c", _model(33, generator, state, 0.02), ("w_extra",)),
    ):
        folder = root / name
        model.save_pretrained(folder)
        _tokenizer(extra).save_pretrained(folder)
        folders[name] = folder
    return folders


TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"

# Model paths are written {base}, {a}, ...; the test and this script fill in their folders.
CASES = {
    "gradient_linear": """
merge_method: linear
models:
  - model: "{a}"
    parameters: {weight: [0.2, 0.5, 1.0]}
  - model: "{b}"
    parameters: {weight: 1.0}
dtype: float32
""",
    "filters_task_arithmetic": """
merge_method: task_arithmetic
base_model: "{base}"
models:
  - model: "{a}"
    parameters:
      weight:
        - {filter: self_attn, value: [0.0, 1.0]}
        - {filter: mlp, value: 0.3}
      density: 0.5
  - model: "{b}"
    parameters: {weight: 0.5}
parameters:
  weight: 0.7
  lambda: [0.5, 1.5]
dtype: float32
""",
    "ties_filtered_density": """
merge_method: ties
base_model: "{base}"
models:
  - model: "{a}"
    parameters: {weight: 1.0}
  - model: "{b}"
    parameters:
      weight: [{filter: down_proj, value: 0.2}, {value: [1.0, 0.5]}]
parameters:
  density: [{filter: mlp, value: 0.3}, {value: 0.7}]
  normalize: true
dtype: float32
""",
    "slices_same_range_ties": """
merge_method: ties
base_model: "{base}"
slices:
  - sources:
      - {model: "{base}", layer_range: [0, 2]}
      - model: "{a}"
        layer_range: [0, 2]
        parameters: {weight: [1.0, 0.2], density: 0.6}
      - {model: "{b}", layer_range: [0, 2]}
    parameters: {density: 0.4}
  - sources:
      - {model: "{base}", layer_range: [2, 4]}
      - {model: "{a}", layer_range: [2, 4]}
      - model: "{b}"
        layer_range: [2, 4]
        parameters: {weight: 0.3}
parameters: {weight: 0.8, density: 0.9}
dtype: float32
""",
    "passthrough_frankenmerge": """
merge_method: passthrough
base_model: "{a}"
slices:
  - sources:
      - {model: "{a}", layer_range: [0, 3]}
  - sources:
      - model: "{b}"
        layer_range: [1, 4]
        parameters:
          scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: [0.0, 1.0]}, {value: 1.0}]
dtype: float32
""",
    "tokenizer_union_ties": """
merge_method: ties
base_model: "{base}"
models:
  - model: "{a}"
    parameters: {weight: 0.6, density: 0.5}
  - model: "{c}"
    parameters: {weight: 0.4, density: 0.5}
tokenizer_source: union
dtype: float32
""",
    "tokenizer_tokens_linear": """
merge_method: linear
base_model: "{base}"
models:
  - model: "{base}"
    parameters: {weight: 0.5}
  - model: "{a}"
    parameters: {weight: 0.3}
  - model: "{b}"
    parameters: {weight: 0.2}
tokenizer:
  source: union
  tokens:
    w_new: {source: {kind: zero}}
    w_copy: {source: {kind: model_token, model: "{b}", token: w3}}
    w5: {source: "{a}", force: true}
  pad_to_multiple_of: 8
chat_template: "<TEMPLATE>"
dtype: float32
out_dtype: float32
""".replace("<TEMPLATE>", TEMPLATE.replace('"', '\\"')),
}


def fill(text: str, folders: dict[str, Path]) -> str:
    for name, folder in folders.items():
        text = text.replace("{" + name + "}", str(folder))
    return text


def main() -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tensors: dict[str, torch.Tensor] = {}
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = build_inputs(root / "inputs")
        for case, text in CASES.items():
            out = root / case
            print("case", case, flush=True)
            config = MergeConfiguration.model_validate(yaml.safe_load(fill(text, folders)))
            run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=True))
            for file in sorted(out.glob("*.safetensors")):
                for name, tensor in load_file(file).items():
                    tensors[f"{case}/{name}"] = tensor.contiguous()
            written = json.loads((out / "config.json").read_text())
            tokenizer = AutoTokenizer.from_pretrained(out)
            cases[case] = {
                "yaml": text,
                "config": {k: written.get(k) for k in CONFIG_KEYS} | {"dtype": written.get("dtype")},
                "vocab": tokenizer.get_vocab(),
                "chat_template": tokenizer.chat_template,
            }
    OUTPUT.parent.mkdir(exist_ok=True)
    save_file(
        tensors,
        OUTPUT,
        metadata={
            "cases": json.dumps(cases, sort_keys=True),
            "seed": str(SEED),
            "mergekit_version": version("mergekit"),
            "torch_version": torch.__version__,
            "transformers_version": version("transformers"),
        },
    )
    print(
        f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors, {len(cases)} cases)"
    )


if __name__ == "__main__":
    main()
