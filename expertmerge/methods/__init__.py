"""Training-free merge methods (mergekit's names and meanings) as pure tensor code, no I/O.

The registry (`METHODS`, `get_method`, and how to add a method) is `expertmerge.methods.registry`; its names are
re-exported here lazily, so importing this package (e.g. for `expertmerge.methods.settings`) starts no torch.
(The masks' module is `sparsification`: see `expertmerge.lazy` on names shared with submodules.)
"""

from __future__ import annotations

from expertmerge.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, "expertmerge.methods.registry"))
