"""Lazy re-exports for package `__init__` files: a name is imported from its module on first use, so importing
a package (or one light submodule of it) starts no torch, Lightning or `datasets`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, for `exports` ({name: module defining it}).

    No submodule of `package` may share an exported name: importing it would set the package attribute to the
    module, and `__getattr__` is only asked for names the package does not have."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
