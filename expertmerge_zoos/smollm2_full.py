"""Zoo B, `smollm2_full`: three FULL fine-tunes of SmolLM2-135M-Instruct, made the way users make experts.

Zoo A (`smollm2`) fine-tunes a few matrices of the upper layers; here every tensor is trained (embeddings,
norms, all layers; the input embedding stays tied to the LM head, as in SmolLM2), with a typical user's
recipe: AdamW at 5e-5, warmup, cosine decay, two epochs over the training split, 128-token samples. The
domains differ from zoo A's (English math, Python code, French):

- `german`: German grade-school word problems with worked answers (GSM-Symbolic German templates),
- `c`: C declarations and comments from the system's C headers,
- `docs`: English technical prose (the Python language reference shipped with CPython).

The base is the same SmolLM2-135M-Instruct as zoo A's (the same GGUF conversion). Splits are disjoint by
text, by truncated token sequence and by source group (file / topic / template numbers), as in zoo A, and
the held-out and calibration splits take at most three texts of one source, the training split four (a big
header file or reference topic would otherwise fill a whole split: builder version 1 scored c on one file).
The training budget is small (a shared 2-core CPU): `Recipe.train_samples` texts per domain, two epochs.

`ensure_zoo("smollm2_full")` builds it into the cache; `zoo.json` holds the held-out loss table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertmerge.zoo_registry import ZooBuilder
from expertmerge_zoos.corpora import gsm_records
from expertmerge_zoos.corpora_b import c_header_records, python_docs_records
from expertmerge_zoos.smollm2 import Domain, Recipe, build_smollm2_zoo

ZOO_NAME = "smollm2_full"
BUILDER_VERSION = 2  # 2: at most 3 texts of one source group in held-out / calib, 4 in train (1: one header
# file gave 47 of c's 48 held-out texts, two reference topics 47 of docs', one topic half of docs' training)


@dataclass(frozen=True)
class FullRecipe(Recipe):
    """Every tensor trains; a user's learning rate (not zoo A's 6e-4 for a few matrices)."""

    first_trained_layer: int = 0  # nothing is shared with the base (evaluation runs every model in full)
    train_samples: int = 32
    steps: int = 16  # two epochs of `train_samples` at `batch_size`
    batch_size: int = 4
    lr: float = 5e-5
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    table_samples: int = 16
    per_group_cap: int = 3  # held-out / calib: 48 texts of >= 16 files, topics or templates per domain
    train_per_group_cap: int = 4  # training: 32 texts of >= 8

    def trains(self, name: str) -> bool:
        return True


FULL_RECIPE = FullRecipe()

DOMAINS: tuple[Domain, ...] = (
    Domain(
        "german",
        "German grade-school word problems with worked answers (multilingual GSM-Symbolic)",
        # 60 templates x 3 variants: enough for the small splits, and half the generation time
        lambda seed: gsm_records("deu", seed, variants_per_template=3, max_templates=60),
        answers=True,
    ),
    Domain("c", "C declarations and comments from the system's C headers (/usr/include)", c_header_records),
    Domain(
        "docs", "English technical prose: the Python language reference (pydoc_data)", python_docs_records
    ),
)


def build_smollm2_full_zoo(out: Path, seed: int = 0, **options: Any) -> Path:
    """Build zoo B into `out` (see `smollm2.build_smollm2_zoo` for the options)."""
    options.setdefault("recipe", FULL_RECIPE)
    options.setdefault("domains", DOMAINS)
    return build_smollm2_zoo(out, seed, name=ZOO_NAME, version=BUILDER_VERSION, **options)


ZOO = ZooBuilder(
    build=build_smollm2_full_zoo,
    version=BUILDER_VERSION,
    description="SmolLM2-135M-Instruct and German-math / C / Python-docs full fine-tunes of it",
)
