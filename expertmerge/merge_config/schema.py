"""The typed structure of a merge YAML (pydantic): keys, types, sources, layer ranges, tokenizer rules.

Method parameters are not checked here: `expertmerge.merge_config.parse` checks them against the chosen method.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from expertmerge.errors import ExpertMergeError
from expertmerge.io.reader import DTYPE_ALIASES, DTYPES
from expertmerge.methods import get_method
from expertmerge.paths import ZOO_SCHEME
from expertmerge.sources import looks_like_hub_id

# The output dtypes a config may name (the arithmetic is always fp32): the one dtype table's names and aliases.
DTYPE_NAMES = tuple(DTYPES)

# mergekit keys with no equivalent here, and what to do instead.
UNSUPPORTED = {
    "modules": "module-wise (multimodal) configs are not supported; merge the text model with `models:` or "
    "`slices:`",
}
_MISSING = {
    "merge_method": "missing; say which method to use, e.g. `merge_method: ties`.",
    "model": "missing; give the expert's folder, zoo:// reference or hub id.",
    "sources": "missing; give a non-empty list of `- model: <path>` / `layer_range: [start, end]` entries.",
    "layer_range": "missing; give `layer_range: [start, end]` (end exclusive), as in mergekit.",
}
_EXPECTED = {
    "string_type": "a non-empty string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "list_type": "a list",
}


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}.")
    return value


def _source(value: str) -> str:
    source = _text(value)
    if source.startswith(ZOO_SCHEME) or Path(os.path.expanduser(source)).exists():
        return source
    if "+" in source:
        raise ValueError(
            f"'{source}': LoRA sources (`model+lora`) are not supported; merge the adapter into its model first."
        )
    if looks_like_hub_id(source):
        return source  # passed through to the hub when the pool opens it
    raise ValueError(f"'{source}' is not an existing folder (nor a hub id like 'org/name').")


def _patterns(value: Any) -> Any:
    items = [value] if isinstance(value, str) else value
    if value is None:
        return None
    if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
        raise ValueError(f"expected a list of regular expressions, got {value!r}.")
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"'{pattern}' is not a valid regular expression ({error}).") from error
    return items


class _Schema(BaseModel):
    # strict: `true` is not a seed, "yes" is not a boolean, 3 is not a path. Unknown keys are taken out
    # (with a warning) before validation, so `forbid` only ever sees the unsupported ones.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelYAML(_Schema):
    """One `models[]` entry: `- model: <source>` (or just `- <source>`) with optional `parameters:`."""

    model: str
    parameters: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _entry(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"model": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"expected `model: <path>` (and optional `parameters:`), got {value!r}.")
        return value

    _model = field_validator("model")(lambda cls, value: _source(value))


class SliceSourceYAML(ModelYAML):
    """One `slices[].sources[]` entry: a model, its `layer_range: [start, end)` and optional `parameters`."""

    layer_range: tuple[int, int]

    @field_validator("layer_range", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        ok = isinstance(value, list | tuple) and len(value) == 2
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"expected `[start, end]` (two integers, end exclusive), got {value!r}.")
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"expected 0 <= start < end, got {list(value)}.")
        return tuple(value)


class SliceYAML(_Schema):
    sources: list[SliceSourceYAML]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None

    _base_model = field_validator("base_model")(lambda cls, value: None if value is None else _source(value))

    @field_validator("sources", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list of sources, got {value!r}.")
        return value


class TokenSourceYAML(_Schema):
    """`{kind: zero}` or `{kind: model_token, model: <source>, token_id: N | token: <text>}`."""

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> TokenSourceYAML:
        if self.kind not in ("zero", "model_token"):
            raise ValueError(f"kind {self.kind!r} is not one of zero, model_token.")
        if self.kind == "model_token" and (
            self.model is None or (self.token_id is None) == (self.token is None)
        ):
            raise ValueError("model_token needs `model` and exactly one of `token_id` / `token`.")
        return self


class TokenYAML(_Schema):
    source: str | TokenSourceYAML | None = None
    force: bool = False


class TokenizerYAML(_Schema):
    source: str = "union"
    tokens: dict[str, TokenYAML] | None = None
    pad_to_multiple_of: int | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"expected a positive integer, got {value}.")
        return value


class MergeYAML(_Schema):
    """The keys of a merge YAML and their types; method parameters are checked against the method after."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelYAML] | None = None
    slices: list[SliceYAML] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerYAML | None = None
    chat_template: str | None = None
    random_seed: int | None = None
    seed: int | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    trust_remote_code: bool = False
    output_dir: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        try:
            return get_method(_text(value)).name
        except ExpertMergeError as error:
            raise ValueError(str(error)) from error

    _base_model = field_validator("base_model")(lambda cls, value: None if value is None else _source(value))
    _output_dir = field_validator("output_dir")(lambda cls, value: None if value is None else _text(value))
    _include = field_validator("include", "exclude", mode="before")(lambda cls, value: _patterns(value))

    @field_validator("models", "slices", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, list) or not value):
            raise ValueError(f"expected a non-empty list of `- model: <path>` entries, got {value!r}.")
        return value

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> str | None:
        if value is None:
            return None
        name = DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
        if not isinstance(value, str) or name not in DTYPE_NAMES:
            raise ValueError(f"{value!r} is not one of {', '.join(DTYPE_NAMES)}.")
        return name

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, value: str | None) -> str | None:
        return None if value is None else _text(value)


# Known keys per place in the file, for the unknown-key warnings.
_SCHEMAS: dict[str, type[_Schema]] = {
    "": MergeYAML,
    "models": ModelYAML,
    "slices": SliceYAML,
    "sources": SliceSourceYAML,
    "tokenizer": TokenizerYAML,
}
