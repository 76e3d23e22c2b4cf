"""Content hashes of model folders and data, cached by (path, size, mtime, inode, ctime) so large files are read
once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from expertmerge.paths import cache_dir

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIG_FILES = ("config.json",)


def file_hash(path: str | os.PathLike) -> str:
    """blake2b of a file's bytes; remembered per (path, size, mtime, inode, ctime) in the cache folder.

    Size and mtime alone can be kept by a replaced file (`os.utime`, `cp -p`, `rsync -t`, a tar extract), and a
    stale hash reuses stale teacher targets and merge caches. The inode changes when a file is replaced by a
    rename, and the ctime changes on every write and every `utime`, and neither can be set by a user."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = hashlib.sha1(
        f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}".encode()
    ).hexdigest()
    memo = cache_dir() / "hashes" / f"{memo_key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    hasher = hashlib.blake2b()
    with open(path, "rb") as handle:  # chunked: `hashlib.file_digest` needs Python 3.11, we support 3.10
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    digest = hasher.hexdigest()[:32]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def model_content_hash(model: str | os.PathLike) -> str:
    """Hash of a model folder's weights and config; a hub id (no local folder) hashes as its name."""
    folder = Path(model)
    if not folder.is_dir():
        return "hub:" + str(model)
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name in _CONFIG_FILES)
    combined = hashlib.blake2b(digest_size=16)
    for item in files:
        combined.update(item.name.encode())
        combined.update(file_hash(item).encode())
    return combined.hexdigest()


def weights_hash(model: str | os.PathLike) -> str:
    """Hash of a model folder's weight files only (names and bytes): equal for a copy whose config was edited."""
    folder = Path(model)
    combined = hashlib.blake2b(digest_size=16)
    for item in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        combined.update(item.name.encode())
        combined.update(file_hash(item).encode())
    return combined.hexdigest()


def json_hash(value: object) -> str:
    """Stable short hash of a JSON-serialisable value (settings that key a cache)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
