"""How a model's parameters are stored: module parameter names and checkpoint tensors, as transformers maps them.

transformers 5 converts checkpoint keys when it loads a model: it renames some (`embed_out` -> `lm_head`,
`block_sparse_moe` -> `mlp`, a missing or extra `model.` prefix) and builds others from several tensors (a
Mixtral or Qwen3-MoE checkpoint stores each routed expert's `w1` / `w3` / `w2`; the model holds them stacked
into 3-D `gate_up_proj` / `down_proj`). `save_pretrained` reverses the same conversions. So a parameter of the
loaded model and a tensor of its checkpoint may have different names, and one parameter may come from many
tensors.

`TensorLayout` asks the installed transformers for its conversions (`get_model_conversion_mapping` over the model
built on the meta device, as `from_pretrained` does) and applies them lazily: a parameter stored under another
name is read under that name; a converted parameter is built from its tensors when it is read (one at a time,
nothing else is loaded), and `to_checkpoint` turns the model's tensors back into the checkpoint's own names and
layout, so an output folder holds what the input folders hold and `from_pretrained` reads it back with no missing
or unexpected keys. Where the installed transformers has no conversion API (older versions), names are matched
as they are, with the `base_model_prefix` added or removed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from expertmerge.errors import ExpertMergeError

Reader = Callable[[str], torch.Tensor]  # checkpoint tensor name -> tensor (as stored)


def meta_model(config: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of `config` on the meta device in fp32: names, shapes and sizes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )


class _Group:
    """Checkpoint tensors that one converter turns into one or more module tensors."""

    def __init__(self, converter: Any, target: str) -> None:
        self.converter = converter
        self.target = target  # the first module name, as transformers keys the conversion
        self.sources: list[tuple[str, str]] = []  # (checkpoint key, the converter's source pattern)
        self.outputs: dict[str, tuple[int, ...]] = {}  # module name -> shape

    def convert(self, read: Reader, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        converter = copy.deepcopy(self.converter)
        for key, pattern in self.sources:
            converter.add_tensor(self.target, key, pattern, lambda key=key: read(key))
        values = converter.convert(self.target, model=model, config=model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in values.items()}


class TensorLayout:
    """Module parameter names <-> checkpoint tensor names of one architecture (see the module docstring).

    Args:
        model: the model on the meta device (`meta_model`).
        stored: the checkpoint's tensor names and shapes.
        label: how errors name the checkpoint.
    """

    def __init__(self, model: torch.nn.Module, stored: Mapping[str, tuple[int, ...]], label: str) -> None:
        self.model = model
        self.label = label
        self.stored = dict(stored)
        self.direct: dict[str, str] = {}  # module name -> the checkpoint key that holds it as it is
        self._groups: dict[str, _Group] = {}  # first module name -> its group
        self._group_of: dict[str, _Group] = {}  # every converted module name -> its group
        self.unused: list[str] = []  # checkpoint keys no parameter or buffer takes (transformers drops them)
        self._last: tuple[tuple[int, str, torch.dtype | None], dict[str, torch.Tensor]] | None = None
        state = dict(model.state_dict())
        mapping = _conversions(model)
        if mapping is None:
            self._match_plainly(state)
        else:
            self._match_converted(state, *mapping)

    # ------------------------------------------------------------------------------------------ building
    def _match_plainly(self, state: Mapping[str, Any]) -> None:
        for key in self.stored:
            name = key if key in state else self._other_prefix(key)
            if name in state:
                self.direct[name] = key
            else:
                self.unused.append(key)

    def _match_converted(self, state: Mapping[str, Any], transforms: list[Any], api: Any) -> None:
        renamings = [t for t in transforms if isinstance(t, api.WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, api.WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        prefix = self.model.base_model_prefix
        for key in sorted(self.stored, key=api.dot_natural_key):
            name, pattern = api.rename_source_key(key, renamings, converters, prefix, state)
            if (
                name not in state and key in state
            ):  # renamed by mistake: keep the name (transformers does too)
                name, pattern = api.rename_source_key(key, [], [], prefix, state)
            if name not in state:
                self.unused.append(key)
            elif pattern is None:
                self.direct[name] = key
            else:
                group = self._groups.setdefault(name, _Group(by_pattern[pattern], name))
                group.sources.append((key, pattern))
        for group in self._groups.values():
            shapes = group.convert(lambda key: torch.empty(self.stored[key], device="meta"), self.model)
            for name, value in shapes.items():
                if name not in state:
                    raise ExpertMergeError(
                        f"{self.label}: transformers converts its tensors {_few([k for k, _ in group.sources])} "
                        f"into '{name}', which the model does not have; this checkpoint cannot be read "
                        "tensor by tensor."
                    )
                group.outputs[name] = tuple(value.shape)
                self._group_of[name] = group
        used = [t for t in transforms if t.was_used()]
        self.model._weight_conversions = used  # what `save_pretrained` reverses, as after `from_pretrained`

    # ------------------------------------------------------------------------------------------ reading
    def __contains__(self, name: str) -> bool:
        return name in self.direct or name in self._group_of

    @property
    def converted(self) -> bool:
        """Whether some module tensor is built from several checkpoint tensors."""
        return bool(self._groups)

    def key(self, name: str) -> str | None:
        """The checkpoint key that holds module tensor `name` as it is (None: converted or absent)."""
        return self.direct.get(name)

    def sources(self, name: str) -> list[str]:
        """The checkpoint keys module tensor `name` is read from."""
        if name in self.direct:
            return [self.direct[name]]
        group = self._group_of.get(name)
        return [key for key, _ in group.sources] if group is not None else []

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.direct:
            return tuple(self.stored[self.direct[name]])
        return self._group_of[name].outputs[name]

    def read(
        self, read: Reader, name: str, dtype: torch.dtype | None = None, cache_id: int = 0
    ) -> torch.Tensor:
        """Module tensor `name` from a checkpoint of this layout (`read` gives its tensors by key), cast to
        `dtype`. A converted tensor is built from its checkpoint tensors; the group's other outputs (q, k, v
        out of one qkv) are kept for the next read of the same checkpoint (`cache_id`)."""
        if name in self.direct:
            tensor = read(self.direct[name])
            return tensor if dtype is None else tensor.to(dtype)
        group = self._group_of.get(name)
        if group is None:
            raise ExpertMergeError(f"{self.label} has no tensor for the model's '{name}'.")
        tag = (cache_id, group.target, dtype)
        if self._last is None or self._last[0] != tag:
            values = group.convert(read, self.model)
            self._last = (tag, {k: v if dtype is None else v.to(dtype) for k, v in values.items()})
        return self._last[1][name]

    def to_checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's tensors (module names) under the checkpoint's names and in its layout: every stored
        key, built back from the module tensors as `save_pretrained` would (the reverse conversions)."""
        out = {key: tensors[name] for name, key in self.direct.items() if name in tensors}
        if self._groups:
            from transformers.core_model_loading import revert_weight_conversion

            converted = {name: tensors[name] for name in self._group_of if name in tensors}
            for name, value in revert_weight_conversion(self.model, converted).items():
                out[self._stored_name(name)] = value
        missing = [key for key in self.stored if key not in out and key not in self.unused]
        if missing:
            raise ExpertMergeError(f"{self.label}: no module tensor gives the checkpoint's {_few(missing)}.")
        return out

    def _other_prefix(self, name: str) -> str:
        """`name` with the model's `base_model_prefix` removed where it has it, added where it lacks it."""
        prefix = str(getattr(self.model, "base_model_prefix", "") or "")
        if not prefix:
            return name
        return name[len(prefix) + 1 :] if name.startswith(prefix + ".") else f"{prefix}.{name}"

    def _stored_name(self, name: str) -> str:
        if name in self.stored:
            return name
        other = self._other_prefix(name)
        if other in self.stored:
            return other
        raise ExpertMergeError(
            f"{self.label}: transformers writes the model's tensors back as '{name}', which the checkpoint "
            "does not have; the output could not be written in the checkpoint's layout."
        )


def _conversions(model: torch.nn.Module) -> tuple[list[Any], Any] | None:
    """The installed transformers' load-time transforms for `model`, and the module holding its matching
    functions; None where it has no such API (transformers < 5)."""
    try:
        from transformers import core_model_loading as api
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    needed = ("WeightRenaming", "WeightConverter", "rename_source_key", "dot_natural_key")
    if not all(hasattr(api, name) for name in needed):
        return None
    return list(get_model_conversion_mapping(model)), api


def _few(names: Sequence[str], count: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in list(names)[:count])
    return shown + (f" (+{len(names) - count} more)" if len(names) > count else "")


def saved_layout(model: torch.nn.Module, planned: Sequence[Any]) -> list[Any]:
    """Planned output tensors named as `model`'s parameters, renamed and split as `save_pretrained` writes them
    (an MoE's fused 3-D experts back into one tensor per expert, under the family's checkpoint names), so the
    output reads like any checkpoint of the family (older transformers, serving engines).

    `planned`: `io.writer.PlannedTensor`s. A fused tensor is built once, when its first piece is written, and
    its pieces follow it in the file; every other tensor keeps its producer.
    """
    from expertmerge.io.writer import PlannedTensor

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 neither fuses nor converts
        return list(planned)
    out = []
    for tensor in planned:
        meta = {tensor.name: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")}
        names = {name: tuple(value.shape) for name, value in revert_weight_conversion(model, meta).items()}
        if list(names) == [tensor.name]:
            out.append(tensor)
            continue
        pieces: dict[str, torch.Tensor] = {}

        def piece(name: str, tensor: Any = tensor, pieces: dict[str, torch.Tensor] = pieces) -> torch.Tensor:
            if (
                not pieces
            ):  # the fused tensor's first piece: build it, split it, hand the pieces out one by one
                value = _materialise(tensor)
                pieces.update(revert_weight_conversion(model, {tensor.name: value}))
            return pieces.pop(name).contiguous()

        out += [
            PlannedTensor(name, shape, tensor.dtype, lambda n=name, p=piece: p(n))
            for name, shape in names.items()
        ]
    return out


def _materialise(tensor: Any) -> torch.Tensor:
    """A planned tensor's value: what its producer returns, or its streamed pieces joined in file order."""
    value = tensor.produce()
    if not isinstance(value, torch.Tensor):
        value = torch.cat([piece.reshape(-1) for piece in value])
    return value.reshape(tensor.shape).to(tensor.dtype)
