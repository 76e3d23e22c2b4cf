"""Where expertmerge keeps its caches, and how `zoo://` references resolve to local folders."""

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


def resolve_path(reference: str) -> str:
    """Turn `zoo://<zoo>/<relative path>` into a local path (building that zoo once if needed).

    Zoos come from `expertmerge.zoo_registry`. Anything else is returned unchanged: a local path, or a hub id
    that is passed through.
    """
    if not reference.startswith(ZOO_SCHEME):
        return os.path.expanduser(reference)
    from expertmerge.zoo_registry import ensure_zoo  # the registry imports this module

    zoo_name, _, relative = reference[len(ZOO_SCHEME) :].partition("/")
    return str(ensure_zoo(zoo_name) / relative)
