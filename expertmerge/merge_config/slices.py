"""The merge plan: which input tensors (model, name) make each output tensor, at which layer position t.

This is mergekit's planner (`mergekit.plan.MergePlanner`) on checkpoint names instead of architecture files:

- `models:` is one slice spanning every layer of the base; `slices:` are stacked in order, and the i-th of a
  slice's n layers reads layer `start + i` of each source and gets `t = i / (n - 1)` (1 when n == 1).
- Tensors outside the layers: those before them (embeddings) come from the first slice's sources, the others
  (final norm, lm_head) from the last slice's; both at t = 0, with that slice's settings.
- A layer tensor is a name `<prefix>.<index>.<rest>` under one stack of layers (`model.layers.`,
  `transformer.h.`, ...): its output index is the running count of layers written so far.

Pure: it reads names and layer counts through the callables it is given, never a tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from expertmerge.errors import ExpertMergeError
from expertmerge.io.model_config import json_key, layer_count, text_config
from expertmerge.io.reader import natural_key
from expertmerge.merge_config.resolved import MergeConfig, SliceEntry, SliceSource
from expertmerge.methods.settings import Setting

LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = ("embed", "wte", "wpe")  # non-layer tensors that come before the layers (mergekit's pre_weights)


@dataclass(frozen=True)
class TensorInput:
    """One input of an output tensor: a model, the name of its tensor, the model's own settings there."""

    model: str
    name: str
    settings: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: its inputs (the base among them for base-aware methods), t and the slice settings."""

    name: str
    inputs: tuple[TensorInput, ...]
    base: str | None
    t: float
    slice_settings: Mapping[str, Setting] = field(default_factory=dict)
    layer: tuple[str, int] | None = None  # (model, layer index) the output layer is read from

    @property
    def experts(self) -> tuple[TensorInput, ...]:
        return tuple(i for i in self.inputs if i.model != self.base)


def layer_of(name: str) -> tuple[str, int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> ("model.layers", 3, "mlp.up_proj.weight"); None outside layers."""
    match = LAYER.match(name)
    return None if match is None else (match["prefix"], int(match["index"]), match["rest"])


def _as_slices(config: MergeConfig, structure: str, num_layers: Callable[[str], int]) -> list[SliceEntry]:
    """`models:` as mergekit normalizes it: one slice over all layers (the base added for base-aware methods)."""
    if config.slices is not None:
        return config.slices
    method = config.method
    models = list(config.models)
    if method.uses_base and config.base_model is not None:
        models = [m for m in models if m.source != config.base_model]
        sources = [SliceSource(config.base_model, (0, num_layers(config.base_model)))]
    else:
        sources = []
    sources += [SliceSource(m.source, (0, num_layers(m.source)), m.settings) for m in models]
    return [SliceEntry(sources, None, {})]


def plan_tensors(
    config: MergeConfig,
    structure: str,
    names: Callable[[str], Sequence[str]],
    num_layers: Callable[[str], int],
) -> list[OutputTensor]:
    """Every output tensor in the output's name order. `structure` is the model whose non-layer tensors and
    config the output takes (the base, else the first model); `names(model)` lists a model's tensors."""
    slices = _as_slices(config, structure, num_layers)
    bases = _slice_bases(config, slices)
    _check_layer_ranges(config, slices, num_layers)
    stacks = {found[0] for name in names(structure) if (found := layer_of(name)) is not None}
    if len(stacks) > 1 and config.slices is not None:
        raise ExpertMergeError(
            f"{config.path}: key 'slices': the model has several stacks of layers ({sorted(stacks)}); slices "
            "need one."
        )
    cut = _Slices(slices, bases)
    planned = _outside_tensors(config, structure, cut, names) + _layer_tensors(config, structure, cut, names)
    return sorted(planned, key=lambda p: natural_key(p.name))


def _slice_bases(config: MergeConfig, slices: Sequence[SliceEntry]) -> list[str | None]:
    """Each slice's base (None for methods that use none); a base-aware method's base must be a source."""
    method = config.method
    bases = []
    for i, piece in enumerate(slices):
        base = (piece.base_model or config.base_model) if method.uses_base else None
        if base is not None and base not in [s.source for s in piece.sources]:
            raise ExpertMergeError(
                f"{config.path}: key 'slices[{i}].sources': '{config.merge_method}' needs the base model "
                f"'{base}' among the slice's sources (as in mergekit); add it with the same layer_range length."
            )
        if base is None and method.needs_base:
            raise ExpertMergeError(
                f"{config.path}: key 'base_model': missing; '{config.merge_method}' needs one."
            )
        bases.append(base)
    return bases


def _check_layer_ranges(
    config: MergeConfig, slices: Sequence[SliceEntry], num_layers: Callable[[str], int]
) -> None:
    for i, piece in enumerate(slices):
        for j, source in enumerate(piece.sources):
            have = num_layers(source.source)
            if source.layer_range[1] > have:
                raise ExpertMergeError(
                    f"{config.path}: key 'slices[{i}].sources[{j}].layer_range': {list(source.layer_range)} is "
                    f"past the {have} layer(s) of '{source.source}'."
                )


Names = Callable[[str], Sequence[str]]  # a model's tensor names


class _Slices(NamedTuple):
    """The slices to read, and each one's base (None for methods that use none)."""

    entries: Sequence[SliceEntry]
    bases: Sequence[str | None]


def _outside_tensors(config: MergeConfig, structure: str, cut: _Slices, names: Names) -> list[OutputTensor]:
    """The tensors outside the layers: from the first slice before the layers, else from the last (t = 0)."""
    slices, bases = cut
    planned = []
    for name in (n for n in names(structure) if layer_of(n) is None):
        index = 0 if any(part in name for part in _PRE) else -1
        piece = slices[index]
        inputs = tuple(TensorInput(s.source, name, s.settings) for s in piece.sources)
        for source in piece.sources:
            if name not in set(names(source.source)):
                raise ExpertMergeError(
                    f"{config.path}: '{source.source}' has no tensor '{name}' (the base has it)."
                )
        planned.append(OutputTensor(name, inputs, bases[index], 0.0, piece.settings))
    return planned


def _layer_tensors(config: MergeConfig, structure: str, cut: _Slices, names: Names) -> list[OutputTensor]:
    """The layers' tensors, slice after slice; the output layer index counts the layers written so far."""
    slices, bases = cut
    layer_names = [n for n in names(structure) if layer_of(n) is not None]
    planned = []
    out_layer = 0
    for piece, base in zip(slices, bases, strict=True):
        count = piece.num_layers
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            first = piece.sources[0]
            template_layer = first.layer_range[0] + offset
            templates = _layer_templates(names(first.source), template_layer) or _layer_templates(
                layer_names, 0
            )
            for prefix, rest in templates:
                inputs = []
                for source in piece.sources:
                    name = f"{prefix}.{source.layer_range[0] + offset}.{rest}"
                    if name not in set(names(source.source)):
                        raise ExpertMergeError(
                            f"{config.path}: '{source.source}' has no tensor '{name}' (needed by its slice)."
                        )
                    inputs.append(TensorInput(source.source, name, source.settings))
                planned.append(
                    OutputTensor(
                        f"{prefix}.{out_layer}.{rest}",
                        tuple(inputs),
                        base,
                        t,
                        piece.settings,
                        (first.source, template_layer),
                    )
                )
            out_layer += 1
    return planned


def _layer_templates(names: Sequence[str], index: int) -> list[tuple[str, str]]:
    found = []
    for name in names:
        layer = layer_of(name)
        if layer is not None and layer[1] == index:
            found.append((layer[0], layer[2]))
    return found


def output_layers(plan: Sequence[OutputTensor]) -> list[tuple[str, int]]:
    """(model, layer) each output layer is read from, in output order (for per-layer config lists)."""
    layers: dict[int, tuple[str, int]] = {}
    for tensor in plan:
        found = layer_of(tensor.name)
        if found is not None and tensor.layer is not None:
            layers.setdefault(found[1], tensor.layer)
    return [layers[i] for i in sorted(layers)]


def layer_config(
    config: dict[str, Any],
    layers: Sequence[tuple[str, int]],
    source_configs: Mapping[str, dict[str, Any]],
    model_config: Any,
) -> dict[str, Any]:
    """The output config.json for a stack of `layers`: the layer count, and every per-layer list (one entry per
    layer, e.g. `layer_types`) rebuilt from the entries of the layers it reads. `model_config` is `config`
    loaded by `transformers`: the count is read from it and written under the key its family stores it under
    (`n_layer` for GPT-2, `num_hidden_layers` for Llama)."""
    result = dict(config)
    text = "text_config" if isinstance(config.get("text_config"), dict) else None
    target = dict(result[text]) if text else result
    count = layer_count(model_config)
    for key, value in list(target.items()):
        if key == "architectures" or not isinstance(value, list) or len(value) != count or count < 2:
            continue
        rebuilt = []
        for model, index in layers:
            source = source_configs[model].get(text, source_configs[model]) if text else source_configs[model]
            entries = source.get(key)
            if not isinstance(entries, list) or index >= len(entries):
                raise ExpertMergeError(
                    f"config.json of '{model}' has no per-layer '{key}' entry for layer {index}; the output's "
                    f"'{key}' cannot be written."
                )
            rebuilt.append(entries[index])
        target[key] = rebuilt
    target.pop("num_hidden_layers", None)  # a hand-written alias of a renamed key would contradict it on load
    target[json_key(text_config(model_config), "num_hidden_layers")] = len(layers)
    if text:
        result[text] = target
    return result
