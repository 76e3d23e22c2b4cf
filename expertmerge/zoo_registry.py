"""Named model zoos behind `zoo://<name>/<path>`: a registry of builders and the cache they build into.

The core library ships no zoo. A zoo is a `ZooBuilder` (a build function and its version), registered either
in code with `register_zoo(name, builder)` or by a package through the entry-point group `expertmerge.zoos`
(pyproject.toml: `[project.entry-points."expertmerge.zoos"] <name> = "<module>:<ZooBuilder object>"`).
Entry points are loaded only when their zoo is asked for, so resolving one zoo never imports another's code.

`ensure_zoo(name)` builds a zoo once into `<cache>/zoo/<name>` (under a file lock; the build itself is
atomic) and reuses it afterwards, as long as the `builder_version` in its `zoo.json` manifest matches;
`resolve_path(reference)` turns a `zoo://<name>/<path>` reference into its local path that way.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from expertmerge.errors import ExpertMergeError
from expertmerge.io.folder import usual_permissions
from expertmerge.paths import ZOO_SCHEME, cache_dir

ENTRY_POINT_GROUP = "expertmerge.zoos"
MANIFEST_NAME = "zoo.json"


@dataclass(frozen=True)
class ZooBuilder:
    """How to make one zoo.

    `build(out, seed=0)` writes a complete zoo into the folder `out` (which does not exist yet), including
    a `zoo.json` manifest with at least `name` and `builder_version`, and returns `out`. Bump `version`
    whenever the data, the models or the training change: cached zoos of another version are rebuilt.
    """

    build: Callable[..., Path]
    version: int
    description: str = ""


_registered: dict[str, ZooBuilder] = {}


def register_zoo(name: str, builder: ZooBuilder) -> None:
    """Make `zoo://<name>/...` resolve through `builder` (replacing an entry point of that name)."""
    if not name or "/" in name:
        raise ExpertMergeError(f"zoo name '{name}' must be non-empty and contain no '/'.")
    _registered[name] = builder


def unregister_zoo(name: str) -> None:
    """Forget a zoo registered with `register_zoo` (entry points stay discoverable)."""
    _registered.pop(name, None)


def _entry_points() -> dict[str, Any]:
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def zoo_names() -> list[str]:
    """Every zoo that can be asked for: registered in code or declared as an `expertmerge.zoos` entry point."""
    return sorted(set(_registered) | set(_entry_points()))


def zoo_builder(name: str) -> ZooBuilder:
    """The builder of zoo `name`; an unknown name is an ExpertMergeError listing the known ones."""
    if name in _registered:
        return _registered[name]
    point = _entry_points().get(name)
    if point is None:
        known = ", ".join(zoo_names()) or "none"
        raise ExpertMergeError(
            f"Unknown zoo '{name}' (in zoo://{name}/...); registered zoos: {known}. Zoos come from "
            f"`register_zoo` or the '{ENTRY_POINT_GROUP}' entry points of an installed package "
            "(the demo zoos: `pip install -e .` in the expertmerge checkout)."
        )
    builder = point.load()
    if not isinstance(builder, ZooBuilder):
        raise ExpertMergeError(
            f"Entry point '{name}' of '{ENTRY_POINT_GROUP}' ({point.value}) is a "
            f"{type(builder).__name__}, not an expertmerge.zoo_registry.ZooBuilder."
        )
    return builder


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The zoo's manifest, or None if the folder is not a complete zoo."""
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_current(folder: Path, name: str) -> bool:
    """Whether `folder` holds a complete zoo built by the current version of zoo `name`'s builder."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("builder_version") == zoo_builder(name).version


def ensure_zoo(name: str, force: bool = False) -> Path:
    """Folder of the zoo `name`, built once into the cache and reused afterwards.

    Safe when several processes ask at once: one builds under an exclusive file lock, the others wait and
    then find it. A zoo from another builder version (or `force`) is rebuilt and swapped in atomically.
    """
    builder = zoo_builder(name)  # an unknown name fails before the cache is touched
    root = cache_dir() / "zoo"
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if not force and is_current(target, name):
        return target  # the common case takes no lock
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not force and is_current(target, name):
                return target  # another process built it while we waited
            if target.exists():
                # Move the stale zoo aside first so the rename below never meets a half-deleted folder.
                retired = root / f".{name}.old-{os.getpid()}"
                os.rename(target, retired)
                shutil.rmtree(retired, ignore_errors=True)
            built = builder.build(target)
            usual_permissions(built)  # a builder's temporary files may be 0600
            return built
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_path(reference: str) -> str:
    """Turn `zoo://<zoo>/<relative path>` into a local path (building that zoo once if needed).

    Anything else is returned unchanged: a local path, or a hub id that is passed through.
    """
    if not reference.startswith(ZOO_SCHEME):
        return os.path.expanduser(reference)
    zoo_name, _, relative = reference[len(ZOO_SCHEME) :].partition("/")
    return str(ensure_zoo(zoo_name) / relative)
