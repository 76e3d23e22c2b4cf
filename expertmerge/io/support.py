"""The files written beside the weights: the base's tokenizer, generation and processor files (one list for
every export), and config.json with the output dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from expertmerge.io.reader import dtype_name

# A saved tokenizer's files: what a tokenizer rewrite replaces (io/tokenizer.py removes the base's copies first,
# so none is stale) and what is copied from the base next to the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Copied from the base next to the weights: tokenizer, chat template, generation settings, processor.
SUPPORT_FILES = (*TOKENIZER_FILES, "generation_config.json", "preprocessor_config.json")
# What an export writes beside the weights besides the base's files: merge card, plots, coefficients and eval
# JSON, the merge config; a few hundred KB on the largest models, so 2 MB covers them in free-space estimates.
EXTRA_FILES_BYTES = 2_000_000


def support_bytes(*folders: str | Path) -> int:
    """The free space an export needs beside its weights: the largest of the source folders' support files and
    config.json (a tokenizer.json alone can be 10+ MB), plus `EXTRA_FILES_BYTES`."""
    largest = 0
    for folder in folders:
        sizes = [
            (Path(folder) / name).stat().st_size
            for name in (*SUPPORT_FILES, "config.json")
            if (Path(folder) / name).is_file()
        ]
        largest = max(largest, sum(sizes))
    return largest + EXTRA_FILES_BYTES


def copy_support_files(base_dir: Path, target: Path, trust_remote_code: bool = False) -> list[str]:
    """Copy the base's `SUPPORT_FILES` that exist (and its `*.py` modeling code when remote code is trusted:
    a config with `auto_map` needs it next to it); returns the names copied."""
    copied = []
    for filename in SUPPORT_FILES:
        if (base_dir / filename).is_file():
            shutil.copyfile(base_dir / filename, target / filename)
            copied.append(filename)
    if trust_remote_code:
        for code in sorted(base_dir.glob("*.py")):
            shutil.copyfile(code, target / code.name)
            copied.append(code.name)
    return copied


def write_config(base_dir: Path, target: Path, dtype: torch.dtype) -> None:
    """The base's config.json with the output dtype (both `dtype` and the legacy `torch_dtype` key)."""
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(dtype)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
