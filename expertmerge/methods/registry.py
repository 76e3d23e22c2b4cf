"""The registry of training-free merge methods (mergekit's names and meanings), pure tensor code, no I/O.
`expertmerge.methods` re-exports its names.

To add a method: subclass `MergeMethod` (declare its `parameters`, implement `merge` on one tensor), put an
instance in `METHODS`, and test it on small tensors against a direct computation. The config schema
(`expertmerge.merge_config`) validates a YAML against the declared parameters; `run_merge` streams it.
"""

from __future__ import annotations

from expertmerge.errors import ExpertMergeError
from expertmerge.methods.base import MergeMethod, TensorMethod
from expertmerge.methods.model_stock import ANCHORED_METHODS
from expertmerge.methods.parameters import Parameter
from expertmerge.methods.passthrough import PassthroughMethod
from expertmerge.methods.ram import OVERLAP_METHODS
from expertmerge.methods.sparsification import (
    della_mask,
    magnitude_mask,
    outlier_mask,
    random_mask,
    sign_consensus,
    sparsify,
    tensor_generator,
)
from expertmerge.methods.spherical import SPHERICAL_METHODS
from expertmerge.methods.task_arithmetic import ExpertParams, MethodParams, TaskArithmeticMethod, merge_tensor

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

# mergekit's task arithmetic family, by its parts:
# name, needs a base, sparsification, sign consensus, default normalize, default rescale, description.
_TASK_ARITHMETIC_FAMILY = (
    ("average", False, None, None, True, False, "Weighted average of the experts' weights (mergekit 'linear'); "
     "the base is not used."),
    ("task_arithmetic", True, None, None, False, False, "base + lambda * sum_k w_k tau_k (Ilharco et al., 2023)."),
    ("ties", True, "magnitude", "sum", True, False, "Trim each task vector to its largest entries, elect signs, "
     "average the agreeing entries (Yadav et al., 2023)."),
    ("dare_linear", True, "random", None, False, True, "Randomly drop task-vector entries and rescale, then add "
     "(Yu et al., 2024)."),
    ("dare_ties", True, "random", "sum", False, True, "DARE's random drop and rescale with TIES sign election."),
    ("breadcrumbs", True, "magnitude_outliers", None, False, False, "Drop the largest (gamma) and smallest "
     "task-vector entries, then add (Davari & Belilovsky, 2023)."),
    ("breadcrumbs_ties", True, "magnitude_outliers", "sum", False, False, "Breadcrumbs' two-sided trim with "
     "TIES sign election."),
    ("della", True, "della_magprune", "sum", True, True, "Drop entries with probabilities ranked by "
     "magnitude (MagPrune), rescale, elect signs (Deep et al., 2024)."),
    ("della_linear", True, "della_magprune", None, False, True, "DELLA's MagPrune drop and rescale, then add."),
)  # fmt: skip

METHODS: dict[str, MergeMethod] = {
    name: TaskArithmeticMethod(name, needs_base, description, sparsification, consensus, normalize, rescale)
    for name, needs_base, sparsification, consensus, normalize, rescale, description in _TASK_ARITHMETIC_FAMILY
}
METHODS.update({m.name: m for m in (*SPHERICAL_METHODS, *ANCHORED_METHODS, *OVERLAP_METHODS)})

METHODS["passthrough"] = PassthroughMethod(
    "passthrough", False, "Copies its one input tensor (times `scale`); for frankenmerges with `slices`."
)

METHOD_ALIASES: dict[str, str] = {"linear": "average"}


def get_method(name: str) -> MergeMethod:
    """The merge method called `name` (or one of its aliases, such as mergekit's 'linear')."""
    key = METHOD_ALIASES.get(name, name)
    if key not in METHODS:
        known = ", ".join([*METHODS, *(f"{alias} (= {target})" for alias, target in METHOD_ALIASES.items())])
        raise ExpertMergeError(f"Unknown merge method {name!r}. Known methods: {known}.")
    return METHODS[key]


def known_parameters() -> dict[str, Parameter]:
    """Every parameter some registered method declares (first declaration wins), for typo hints and for
    refusing a value that only another method would use."""
    known: dict[str, Parameter] = {}
    for method in METHODS.values():
        for parameter in method.parameters:
            known.setdefault(parameter.name, parameter)
    return known
