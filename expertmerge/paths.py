"""Where expertmerge keeps its caches, and what a `zoo://` reference looks like (`expertmerge.zoo_registry`
resolves one: `resolve_path`)."""

from __future__ import annotations

import os
from pathlib import Path

ZOO_SCHEME = "zoo://"


def cache_dir() -> Path:
    """Root of all caches (teacher targets, content hashes, the demo zoo); `EXPERTMERGE_CACHE` overrides it."""
    root = os.environ.get("EXPERTMERGE_CACHE")
    path = (
        Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertmerge"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path
