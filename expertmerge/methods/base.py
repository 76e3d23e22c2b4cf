"""The interface every training-free merge method implements: a name, its declared parameters, a tensor merge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertmerge.methods.parameters import Parameter


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
