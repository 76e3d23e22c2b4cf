"""LightningModules and callbacks of expertmerge.

`ExpertMergingModule` is imported on first use, so importing this package does not start Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ExpertMergingModule"]


def __getattr__(name: str) -> Any:
    if name != "ExpertMergingModule":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module("lightning_modules.merging").ExpertMergingModule
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
