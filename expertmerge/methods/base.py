"""The interface every training-free merge method implements: a name, its declared parameters, a tensor merge."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.methods.parameters import Parameter

# One tensor's merge: (base or None, experts, per-model values, global values, generator) -> merged tensor.
TensorFunction = Callable[
    [
        torch.Tensor | None,
        Sequence[torch.Tensor],
        Sequence[Mapping[str, Any]],
        Mapping[str, Any],
        torch.Generator | None,
    ],
    torch.Tensor,
]


@dataclass(frozen=True)
class MergeMethod:
    """A named training-free merge, as mergekit's registry has them.

    Subclasses declare `parameters` (what the config may set, validated by the schema before any work) and
    implement `merge` on one tensor of every model: pure tensor code, no I/O, so a merge can stream.
    """

    name: str
    needs_base: bool
    description: str

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        raise NotImplementedError

    @property
    def base_policy(self) -> str:
        """mergekit's base contract. "required": `base` is the base model's tensor and `experts` the other
        models. "optional": the same when the config names a base model, else `base` is None and every
        model is an expert. "ignored": `base` is None and every model is an expert."""
        return "required" if self.needs_base else "ignored"

    @property
    def uses_base(self) -> bool:
        """Whether a base model named in the config is passed as `base` (and left out of `experts`)."""
        return self.base_policy != "ignored"

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def defaults(self, scope: str) -> dict[str, Any]:
        """The value of every parameter of `scope` ("model" or "global") that the config does not set."""
        return {p.name: p.default for p in self.parameters if p.scope == scope}

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        model_values: Sequence[Mapping[str, Any]],
        global_values: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge one tensor; `model_values[k]` / `global_values` hold the parameters by their YAML names."""
        raise NotImplementedError


@dataclass(frozen=True)
class TensorMethod(MergeMethod):
    """A method given by its parameter declarations and one tensor function (the non-task-arithmetic ones).

    `merge` checks what every such function relies on (the number of experts, shapes, floating dtypes,
    the parameters mergekit requires), computes in float32 (float64 if an input is float64) and returns
    the result in the base's dtype, or the first expert's when there is no base.
    """

    declared: tuple[Parameter, ...]
    function: TensorFunction
    policy: str = "required"
    min_experts: int = 1
    max_experts: int | None = None

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        return self.declared

    @property
    def base_policy(self) -> str:
        return self.policy

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        model_values: Sequence[Mapping[str, Any]],
        global_values: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        check_inputs(self, base, experts, len(model_values))
        for parameter in self.declared:
            # default None: mergekit has no default either, the config must set it.
            if parameter.default is not None:
                continue
            where = (
                "under each model's `parameters:`" if parameter.scope == "model" else "under `parameters:`"
            )
            values = model_values if parameter.scope == "model" else [global_values]
            if any(v.get(parameter.name) is None for v in values):
                raise ExpertMergeError(
                    f"Merge method {self.name!r} needs `{parameter.name}` ({parameter.description}); set it {where}."
                )
        tensors = [t for t in (base, *experts) if t is not None]
        work = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        merged = self.function(
            None if base is None else base.to(work),
            [e.to(device=tensors[0].device, dtype=work) for e in experts],
            model_values,
            global_values,
            generator,
        )
        return merged.to(tensors[0].dtype)


def check_inputs(
    method: MergeMethod, base: torch.Tensor | None, experts: Sequence[torch.Tensor], count: int
) -> None:
    """The tensors a merge got fit the method: a base where it needs one, one parameter set per expert,
    the number of experts it merges, one shape, floating dtypes."""
    if method.needs_base and base is None:
        raise ExpertMergeError(f"Merge method {method.name!r} needs the base model's tensor; none was given.")
    if not experts:
        raise ExpertMergeError(f"Merge method {method.name!r} needs at least one expert tensor.")
    low = getattr(method, "min_experts", 1)
    high = getattr(method, "max_experts", None)
    if len(experts) < low or (high is not None and len(experts) > high):
        wanted = (
            f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        )
        besides = " besides the base" if method.uses_base and base is not None else ""
        raise ExpertMergeError(
            f"Merge method {method.name!r} merges {wanted} model(s){besides}, got {len(experts)}; "
            "list that many under `models:`"
            + (" and name the base as `base_model`." if method.needs_base else ".")
        )
    if count != len(experts):
        raise ExpertMergeError(
            f"Got {len(experts)} expert tensors but {count} expert parameter sets; give one per expert."
        )
    shapes = [tuple(t.shape) for t in experts]
    expected = tuple(base.shape) if base is not None else shapes[0]
    mismatched = [i for i, shape in enumerate(shapes) if shape != expected]
    if mismatched:
        raise ExpertMergeError(
            f"Cannot merge tensors of different shapes: expected {list(expected)}"
            f"{' (the base)' if base is not None else ' (expert 0)'}, but expert(s) "
            + ", ".join(f"{i} has {list(shapes[i])}" for i in mismatched)
            + "."
        )
    for t in (base, *experts):
        if t is not None and not t.is_floating_point():
            raise ExpertMergeError(f"Only floating-point tensors can be merged, got dtype {t.dtype}.")
