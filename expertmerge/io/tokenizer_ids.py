"""Which tokenizer files define what token ids mean, and what a `tokenizer.json` maps: how `ExpertPool` and the
sequence MoE tell whether two models share one vocabulary."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

# Files that define what token ids mean; formatting-only files (tokenizer_config.json, chat templates) are not
# compared, since fine-tuning often rewrites them without changing a single id.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


def tokenizer_json_ids(path: Path) -> tuple[Any, Any]:
    """What a `tokenizer.json` maps: its model's vocabulary and its added tokens (content -> id).
    Parsed once per file version: the base's file is compared with every expert's (2 MB for SmolLM2)."""
    stat = Path(path).stat()
    return _tokenizer_json_ids(str(path), (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns))


@functools.lru_cache(maxsize=16)
def _tokenizer_json_ids(path: str, version: tuple[int, int, int, int]) -> tuple[Any, Any]:
    # `version` (mtime, size, inode, ctime) only keys the cache: a file replaced with the same size and a forged
    # mtime still has a new inode or ctime (see `file_hash`).
    data = json.loads(Path(path).read_text())
    vocab = data.get("model", {}).get("vocab")
    added = sorted((t.get("content"), t.get("id")) for t in data.get("added_tokens", []))
    return vocab, added
