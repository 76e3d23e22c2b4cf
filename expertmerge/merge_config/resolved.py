"""A validated merge config (`MergeConfig`) and its entries, as `expertmerge.merge_config.parse` resolves them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from expertmerge.methods import MergeMethod, get_method
from expertmerge.methods.settings import Setting, to_yaml


@dataclass(frozen=True)
class ModelEntry:
    """One expert: a source and its parameters as mergekit resolves them for a constant setting (the
    top level's values and the method's defaults filled in). `settings` holds the model's own settings,
    as given (gradients and filter lists included), for the per-tensor resolution."""

    source: str
    parameters: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Setting] = field(default_factory=dict)

    @property
    def weight(self) -> float:
        return self.parameters.get("weight", 1.0)

    @property
    def density(self) -> float:
        return self.parameters.get("density", 1.0)


@dataclass(frozen=True)
class SliceSource:
    source: str
    layer_range: tuple[int, int]
    settings: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceEntry:
    sources: list[SliceSource]
    base_model: str | None = None
    settings: dict[str, Setting] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


@dataclass(frozen=True)
class TokenizerSpec:
    """Where the output's vocabulary comes from (`base`, `union` or a model source) and per-token rules."""

    source: str
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class MergeConfig:
    """A validated merge config. `path` is where it was read from (for messages); `raw` is the YAML as given.

    `parameters` holds every once-per-merge parameter the method declares, defaults (mergekit's) filled in;
    `settings` the top-level `parameters:` as given (per-model defaults included), for per-tensor values.
    """

    merge_method: str
    models: list[ModelEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    dtype: str | None = None  # the output's dtype; None: the base's stored dtype
    input_dtype: str | None = None  # mergekit's `dtype`: inputs are read in this precision
    tokenizer_source: str = "base"
    tokenizer: TokenizerSpec | None = None  # None: the base's tokenizer files are copied
    chat_template: str | None = None
    slices: list[SliceEntry] | None = None
    settings: dict[str, Setting] = field(default_factory=dict)
    seed: int = 0
    include: list[str] | None = None
    exclude: list[str] | None = None
    trust_remote_code: bool = False
    output_dir: str | None = None
    warnings: list[str] = field(default_factory=list)
    path: str = "<config>"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @property
    def referenced_models(self) -> list[str]:
        """Every model the config names, base first, then in the order they appear."""
        found = [self.base_model] if self.base_model is not None else []
        found += [m.source for m in self.models]
        for piece in self.slices or ():
            found += [piece.base_model] if piece.base_model else []
            found += [s.source for s in piece.sources]
        return list(dict.fromkeys(found))

    def to_mergekit_yaml(self) -> str:
        """The resolved config (defaults written out) in the same format, so the merge can be re-run."""
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            data["base_model"] = self.base_model
        if self.slices is None:
            data["models"] = [
                {"model": m.source, "parameters": {k: to_yaml(v) for k, v in m.settings.items()}}
                for m in self.models
            ]
        else:
            data["slices"] = [
                {
                    "sources": [
                        {
                            "model": s.source,
                            "layer_range": list(s.layer_range),
                            **(
                                {"parameters": {k: to_yaml(v) for k, v in s.settings.items()}}
                                if s.settings
                                else {}
                            ),
                        }
                        for s in piece.sources
                    ],
                    **({"base_model": piece.base_model} if piece.base_model else {}),
                    **(
                        {"parameters": {k: to_yaml(v) for k, v in piece.settings.items()}}
                        if piece.settings
                        else {}
                    ),
                }
                for piece in self.slices
            ]
        defaults = {**self.method.defaults("model"), **self.method.defaults("global")}
        given = {k: to_yaml(v) for k, v in self.settings.items()}
        data["parameters"] = {k: v for k, v in {**defaults, **given}.items() if v is not None}
        if self.input_dtype is not None:
            data["dtype"] = self.input_dtype
        if self.dtype is not None and self.dtype != self.input_dtype:
            data["out_dtype"] = self.dtype
        if self.tokenizer is None:
            data["tokenizer_source"] = self.tokenizer_source
        else:
            data["tokenizer"] = {
                "source": self.tokenizer.source,
                **({"tokens": self.tokenizer.tokens} if self.tokenizer.tokens else {}),
                **(
                    {"pad_to_multiple_of": self.tokenizer.pad_to_multiple_of}
                    if self.tokenizer.pad_to_multiple_of
                    else {}
                ),
            }
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        data["random_seed"] = self.seed
        if self.include is not None:
            data["include"] = list(self.include)
        if self.exclude is not None:
            data["exclude"] = list(self.exclude)
        if self.trust_remote_code:
            data["trust_remote_code"] = True
        return yaml.safe_dump(data, sort_keys=False)
