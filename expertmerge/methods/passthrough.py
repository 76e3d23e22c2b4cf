"""mergekit's `passthrough`: one input tensor copied as it is, optionally multiplied by `scale`.

It is what frankenmerges use: `slices` stack layer ranges of one model each, and passthrough copies them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from expertmerge.errors import ExpertMergeError
from expertmerge.methods.base import MergeMethod
from expertmerge.methods.parameters import Parameter

SCALE = Parameter("scale", "model", float, None, "multiplies the copied tensor (none: copied unchanged)")


@dataclass(frozen=True)
class PassthroughMethod(MergeMethod):
    """Copies the only input; several inputs are refused (as mergekit's contract `max_inputs=1`)."""

    max_inputs: ClassVar[int] = 1  # the config refuses slices with more sources, naming the key

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        return (SCALE,)

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        model_values: Sequence[Mapping[str, Any]],
        global_values: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if len(experts) != 1:
            raise ExpertMergeError(
                f"'passthrough' copies exactly one model's tensor, got {len(experts)}; give one model "
                "(or one source per slice), or use another merge method."
            )
        scale = model_values[0].get("scale") if model_values else None
        tensor = experts[0]
        return tensor if scale is None else tensor * scale
