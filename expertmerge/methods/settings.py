"""mergekit's parameter forms, read and resolved per tensor: scalars, gradients over layers, filtered values.

```yaml
weight: 0.5                                   # a scalar
weight: [0.2, 0.5, 1.0]                       # a gradient: interpolated over the layer index (t in [0, 1])
weight:                                       # filtered values: the first entry whose `filter` is a
  - {filter: self_attn, value: [0.0, 1.0]}    #   substring of the tensor's name wins (no filter, or "*",
  - {value: 0.5}                              #   matches every tensor); a value may itself be a gradient
```

The rules are mergekit 0.1.5's (`mergekit.config.evaluate_setting`, `mergekit.parameter_resolver`):

- t of a layer is `i / (n - 1)` for the i-th of the n layers of its output slice (1 when n == 1); tensors
  outside the layers (embeddings, final norm, lm_head) get t = 0, i.e. a gradient's first value.
- A numeric gradient of m values interpolates linearly between its two neighbours at `t * (m - 1)`; a
  gradient of booleans (or other non-numbers) picks `values[int(t * (m - 1))]`. An empty list is no value.
- Scopes are searched from the most specific (the model's own `parameters`, then the slice's, then the
  top level) and the first one that gives a value wins; a filter list in which no entry matches gives no
  value, so the search goes on to the next scope, and then to the method's default.
- Per-model values are filtered on the model's *input* tensor name (which differs from the output name in
  a slice that moves layers); once-per-merge values on the output tensor name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from expertmerge.methods.parameters import Parameter

if TYPE_CHECKING:  # the methods' module loads torch; this one is read while a config is checked
    from expertmerge.methods.base import MergeMethod

Scalar = bool | int | float | str
# A gradient is a tuple of scalars; a filter list a tuple of `Conditional`s.
Setting = Any


@dataclass(frozen=True)
class Conditional:
    """One `- filter: <substring>` / `value: <scalar or gradient>` entry."""

    value: Any
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or bool(tensor_name and self.filter in tensor_name)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def _scalar(spec: Parameter, value: Any) -> Any:
    """One scalar checked against the declaration; YAML's `1e-3` (a string to PyYAML) is a number, as in
    mergekit, whose pydantic reads number-like strings for numeric parameters."""
    if isinstance(value, str) and spec.kind is float:
        with contextlib.suppress(ValueError):
            value = float(value)
    return spec.check(value)


def parse_setting(spec: Parameter, value: Any) -> Setting:
    """The setting as given, each scalar checked (raises ValueError with a message for the user).

    Returns a scalar, a tuple (gradient) or a tuple of `Conditional`s (filter list), in mergekit's reading.
    """
    if isinstance(value, Mapping):
        return (_conditional(spec, value),)
    if isinstance(value, list):
        if all(isinstance(item, Mapping) for item in value) and value:
            return tuple(_conditional(spec, item) for item in value)
        if not all(_is_scalar(item) for item in value):
            raise ValueError(
                f"expected a value, a list of values (a gradient over layers) or a list of "
                f"`- filter: <name part>` / `value: ...` entries, got {value!r}."
            )
        return tuple(_scalar(spec, item) for item in value)
    return _scalar(spec, value)


def _conditional(spec: Parameter, entry: Mapping[str, Any]) -> Conditional:
    unknown = sorted(set(entry) - {"filter", "value"})
    if unknown or "value" not in entry:
        raise ValueError(
            f"a filtered value is `{{filter: <part of a tensor name>, value: ...}}`, got {dict(entry)!r}."
        )
    name_filter = entry.get("filter")
    if name_filter is not None and not isinstance(name_filter, str):
        raise ValueError(f"a filter is a part of a tensor name (a string), got {name_filter!r}.")
    inner = entry["value"]
    if isinstance(inner, list):
        if not all(_is_scalar(item) for item in inner):
            raise ValueError(f"a filtered value is a value or a gradient, got {inner!r}.")
        return Conditional(tuple(_scalar(spec, item) for item in inner), name_filter)
    if not _is_scalar(inner):
        raise ValueError(f"a filtered value is a value or a gradient, got {inner!r}.")
    return Conditional(_scalar(spec, inner), name_filter)


def is_constant(setting: Setting) -> bool:
    """True for a plain scalar (the same value for every tensor)."""
    return not isinstance(setting, tuple)


def scalars(setting: Setting) -> Iterable[Any]:
    """Every scalar a setting can produce at a gradient's points (for dry runs and checks)."""
    if isinstance(setting, tuple):
        for item in setting:
            yield from scalars(item.value) if isinstance(item, Conditional) else (item,)
    else:
        yield setting


def evaluate(spec: Parameter, setting: Setting, tensor_name: str, t: float) -> Any:
    """The value of a setting for one tensor at layer position t, or None when it gives none."""
    if not isinstance(setting, tuple):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], Conditional):
        for entry in setting:
            if entry.matches(tensor_name):
                return evaluate(spec, entry.value, tensor_name, t)
        return None
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    low = int(scaled)
    high = min(len(setting) - 1, low + 1)
    frac = scaled - low
    value = (1 - frac) * setting[low] + frac * setting[high]
    return spec.check(float(value)) if spec.kind is float else spec.check(type(setting[0])(value))


def resolve(
    spec: Parameter, scopes: Iterable[Mapping[str, Setting] | None], tensor_name: str, t: float
) -> Any:
    """The first value the scopes give (most specific first), else the parameter's default."""
    for scope in scopes:
        if scope is not None and spec.name in scope:
            value = evaluate(spec, scope[spec.name], tensor_name, t)
            if value is not None:
                return value
    return spec.default


def resolve_values(
    method: MergeMethod,
    scope: str,
    settings: Sequence[Mapping[str, Setting] | None],
    tensor_name: str,
    t: float,
) -> dict[str, Any]:
    """The method's `scope` parameters for one tensor, from the settings (most specific first)."""
    return {p.name: resolve(p, settings, tensor_name, t) for p in method.parameters if p.scope == scope}


def to_yaml(setting: Setting) -> Any:
    """A setting back in the YAML form it was read from."""
    if not isinstance(setting, tuple):
        return setting
    if setting and isinstance(setting[0], Conditional):
        return [
            {**({"filter": c.filter} if c.filter is not None else {}), "value": to_yaml(c.value)}
            for c in setting
        ]
    return list(setting)
