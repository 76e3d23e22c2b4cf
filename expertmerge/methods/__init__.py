"""Training-free merge methods (mergekit's names and meanings) as pure tensor code, no I/O.

The registry (`METHODS`, `get_method`, and how to add a method) is `expertmerge.methods.registry`; its names are
re-exported here lazily, so importing this package (e.g. for `expertmerge.methods.schema`) starts no torch.
No submodule may share a re-exported name: importing it would set the package attribute to the module (the
masks live in `sparsification`, the function `sparsify` is re-exported).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "METHODS",
    "METHOD_ALIASES",
    "ExpertParams",
    "MergeMethod",
    "MethodParams",
    "Parameter",
    "TaskArithmeticMethod",
    "TensorMethod",
    "della_mask",
    "get_method",
    "known_parameters",
    "magnitude_mask",
    "merge_tensor",
    "outlier_mask",
    "random_mask",
    "sign_consensus",
    "sparsify",
    "tensor_generator",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("expertmerge.methods.registry"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
