"""What a merge method declares about each of its parameters, and the check of one value against it.

A method lists its parameters (name, per model or once per merge, type, default, valid range); the config
schema (`expertmerge.merge_config`) reads mergekit YAML against that list, so a new method brings its own
validation with it instead of a new branch in the reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

# Merges compute in float32: a finite Python float can still overflow to inf (or a weight underflow to 0
# and then divide by it) there, so numbers must be representable as float32 normals.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_SMALLEST_NORMAL = 1.1754943508222875e-38

Scope = Literal["model", "global"]


@dataclass(frozen=True)
class Parameter:
    """One parameter a merge method reads.

    `scope="model"`: set per model under `models[i].parameters`; a value under the top-level `parameters`
    is the default for models that do not set it (as in mergekit). `scope="global"`: set once, under the
    top-level `parameters`. `default=None` means "the method's own default", resolved by the method.
    `low`/`high` bound the value; `low_open`/`high_open` exclude the bound itself.
    `neutral` is the value with no effect: a method that does not declare the parameter accepts it only
    at that value (so `density: 1.0` under `task_arithmetic` is allowed, `density: 0.5` is refused).
    """

    name: str
    scope: Scope
    kind: type  # float | bool | int
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    neutral: Any = None

    @property
    def allowed(self) -> str:
        """The valid values in words, for messages and docs."""
        if self.kind is bool:
            return "true or false"
        if self.low is None and self.high is None:
            return "a finite number" if self.kind is float else "an integer"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"a number in {left}{low}, {high}{right}"

    def check(self, value: Any) -> Any:
        """The value as the method uses it; raises ValueError with a message for the user otherwise."""
        if isinstance(value, list):
            raise ValueError(
                f"a list ({value}) is a mergekit gradient over layers, which is not supported; give one "
                "value (or use `include`/`exclude` and separate merges for different tensor groups)."
            )
        if isinstance(value, dict):
            raise ValueError(
                "per-tensor values (`filter:` / `value:`) are not supported; give one value per model "
                "(or use `include`/`exclude` and separate merges for different tensor groups)."
            )
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}.")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected an integer, got {value!r}.")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}.")
        number = float(value)
        if not math.isfinite(number):
            allowed = "" if self.low is None and self.high is None else f"; allowed: {self.allowed}"
            raise ValueError(f"expected a finite number, got {value!r}{allowed}.")
        if abs(number) > FLOAT32_MAX:
            raise ValueError(
                f"{value!r} overflows float32, the precision merges compute in (largest {FLOAT32_MAX:.3g})."
            )
        if number != 0 and abs(number) < FLOAT32_SMALLEST_NORMAL:
            raise ValueError(
                f"{value!r} underflows float32, the precision merges compute in (smallest "
                f"{FLOAT32_SMALLEST_NORMAL:.3g}); use 0 or a larger value."
            )
        below = self.low is not None and (number < self.low or (self.low_open and number == self.low))
        above = self.high is not None and (number > self.high or (self.high_open and number == self.high))
        if below or above:
            raise ValueError(f"{number:g} is out of range; allowed: {self.allowed}.")
        return number
